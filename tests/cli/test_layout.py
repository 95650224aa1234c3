"""The package's layering, read from the source: dependencies point one way.

    tooling (cli, bench/, demo/, integrations/, compat, reference)
        -> workflow (consolidate: estimate + snapshot + register)
            -> fisher/ | penalty/   (neither imports the other)
                -> native/          (building the C kernels; imports only _utils, errors)
                    -> _utils, errors   (import nothing from fastewc)

Every module's imports are read with ``ast`` (nothing is imported). Module-level imports are the
ones that run when the module is imported: top-level statements, including those inside a
top-level ``if`` / ``try`` / ``with`` or a class body. Imports inside a function run only when it
is called; they are allowed, but the ones that cross a layer boundary the wrong way are listed in
``LAZY_ALLOWED`` so that each is a decision, not an accident. Also checked: no import cycle
between modules at module level, and the README's "Layout" section names every folder and
package that exists (see ``docs/design.md``, "Layout").
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What each half of the core must not import at module level (prefixes of module names).
TOOLING = ["fastewc.bench", "fastewc.demo", "fastewc.integrations", "fastewc.cli", "fastewc.workflow",
           "fastewc.compat", "fastewc.reference", "fastewc.merge", "fastewc.streaming"]
FORBIDDEN = {
    "fastewc.fisher": ["fastewc.penalty", *TOOLING],
    "fastewc.penalty": ["fastewc.fisher", *TOOLING],
}
# Function-level imports that go against the arrows above, by (importing package, imported
# module): called at run time only, so they create no import-time dependence.
LAZY_ALLOWED = {
    # EWCRegularizer.consolidate is a convenience that forwards to fastewc.workflow.consolidate.
    ("fastewc.penalty", "fastewc.workflow"),
}


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    out = {}
    for base, prefix in ((ROOT / "fastewc", "fastewc"),):
        for f in sorted(base.rglob("*.py")):
            if "__pycache__" in f.parts:
                continue
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([prefix, *parts])] = f
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The fastewc modules one import statement loads (a name imported from a package counts as
    its submodule when a file of that name exists, else as the package itself)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "fastewc"]
    if node.level:
        pkg = module if _is_package(module) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{node.module}" if node.module else pkg
    else:
        base = node.module or ""
    if base.split(".")[0] != "fastewc":
        return []
    return sorted({f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names})


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(module-level imports, function-level imports) of ``module``, as fastewc module names."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    top, lazy = set(), set()

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (lazy if in_function else top).update(_resolve(module, child))
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, True)  # never runs: not an import-time dependence
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, lazy


IMPORTS = {m: _imports(m) for m in MODULES}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_every_import_resolves_to_a_module():
    # Guards the parser itself: a typo'd or stale import target would silently escape the rules.
    unknown = {(m, t) for m, (top, lazy) in IMPORTS.items() for t in top | lazy if t not in MODULES}
    assert not unknown, sorted(unknown)


@pytest.mark.parametrize("half", sorted(FORBIDDEN))
def test_core_half_imports_no_other_half_and_no_tooling(half):
    bad = [f"{m} imports {t}" for m, (top, _) in IMPORTS.items() if _under(m, half)
           for t in sorted(top) if any(_under(t, f) for f in FORBIDDEN[half])]
    assert not bad, "\n".join(bad)


def test_native_imports_only_the_leaves():
    bad = [f"{m} imports {t}" for m, (top, lazy) in IMPORTS.items() if _under(m, "fastewc.native")
           for t in sorted(top | lazy)
           if not any(_under(t, ok) for ok in ("fastewc.native", "fastewc._utils", "fastewc.errors"))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("leaf", ["fastewc._utils", "fastewc.errors", "fastewc.kernels"])
def test_leaf_modules_import_nothing_from_fastewc(leaf):
    bad = [f"{m} imports {t}" for m, (top, lazy) in IMPORTS.items() if _under(m, leaf)
           for t in sorted(top | lazy) if not _under(t, leaf)]
    assert not bad, "\n".join(bad)


def test_lazy_imports_against_the_layering_are_the_listed_ones():
    found = set()
    for m, (_, lazy) in IMPORTS.items():
        for half, banned in FORBIDDEN.items():
            if _under(m, half):
                found |= {(half, t) for t in lazy if any(_under(t, f) for f in banned)}
    assert found <= LAZY_ALLOWED, f"new function-level imports against the layering: {sorted(found - LAZY_ALLOWED)}"


def test_no_import_cycles():
    graph = {m: sorted(top) for m, (top, _) in IMPORTS.items()}
    state, stack, cycles = {}, [], []

    def dfs(m):
        state[m] = "open"
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


# -- README ----------------------------------------------------------------------------------------
_NOT_SOURCE = re.compile(r"^(\.|__pycache__$|build$|dist$|venv$|.*\.egg-info$)")


def _layout_entries() -> dict[str, str]:
    """The README "Layout" tree: top-level entry (``fastewc/``, ``tests/``, ...) -> its text, the
    entry's own line plus the indented lines under it."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert section, "README has no '## Layout' section"
    block = re.search(r"```\n(.*?)```", section.group(1), flags=re.S)
    assert block, "README 'Layout' has no code block with the tree"
    entries, current = {}, None
    for line in block.group(1).splitlines():
        if line[:1].strip():
            current = line.split()[0]
            entries[current] = line
        elif current is not None:
            entries[current] += "\n" + line
    return entries


def _named(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", text) is not None


def test_readme_layout_names_every_folder_and_package():
    entries = _layout_entries()
    missing = [f"{d.name}/" for d in sorted(ROOT.iterdir())
               if d.is_dir() and not _NOT_SOURCE.match(d.name) and f"{d.name}/" not in entries]
    inside = entries.get("fastewc/", "")
    for init in sorted((ROOT / "fastewc").rglob("__init__.py")):
        if init.parent != ROOT / "fastewc" and not _named(inside, f"{init.parent.name}/"):
            missing.append(init.parent.relative_to(ROOT).as_posix() + "/")
    for f in sorted((ROOT / "fastewc").glob("*.py")):
        if f.stem != "__init__" and not _named(inside, f.name):
            missing.append(f"fastewc/{f.name}")
    tests = entries.get("tests/", "")
    for d in sorted((ROOT / "tests").iterdir()):
        if d.is_dir() and not _NOT_SOURCE.match(d.name) and not _named(tests, f"{d.name}/"):
            missing.append(f"tests/{d.name}/")
    assert not missing, f"README 'Layout' does not mention {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = 'python -m pytest -q -m "not slow"'
    assert command in readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert ci[-1] == command, f".ci/run ends with {ci[-1]!r}, not the README's test command"
