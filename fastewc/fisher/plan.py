"""Where each selected parameter is used: the rule engine's plan.

:func:`make_plan` finds every use of every selected parameter and gives it a :class:`Site`: a
module with a per-layer rule (:mod:`.rules`), any other module (the module-local rule), or
operations outside any module (the op-local rule, for a bare ``nn.Parameter`` used in
``forward``). A module without a rule that uses its own parameters in operations (a class token
concatenated, a position table added) first has them followed by the op-local rule
(``RulePlan.scoped``), and goes module-local when that fails. A module whose output has no batch
axis (a position table) is followed into the operations that use that output, wherever they are.
A tied parameter has several such sites. :class:`RulePlan` holds the sites and the
parameters that go per sample instead (with the reason), and changes as the batched pass
(:mod:`.engine`) or the probe (:mod:`.probe`) finds what the structure alone did not tell.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .rules import rule_for
from .rules.replay import RECORDS

OPS = "<ops>"  # the site of parameters used by operations outside any module
FREE = "free:"  # the key prefix of a rule site's twin that follows its calls without a batch axis
PARAM = "param:"  # the key prefix of a trouble that concerns one parameter, not a site (RulePlan.absorb)


@dataclass
class Site:
    """Where selected parameters are used: a module (with a rule, or module-local) or operations."""

    key: str                       # "rule:<module>", "local:<module>" or OPS
    module_name: str
    module: nn.Module | None
    rule: object | None            # a rules.Rule for rule sites
    params: dict[str, str] = field(default_factory=dict)   # attr (relative name) -> selected name
    batch_free: bool = False       # called on inputs without a batch axis (position tables): its
                                   # output is followed into the operations that meet the batch
    axis: int = 0                  # rule sites: the samples' axis of the input and output, 0 unless
                                   # the probe proved another (a layer fed [T, N, d])
    per_sample: dict = field(default_factory=dict)   # module-local sites: call structure -> the
                                   # positions of its arguments that held the samples in the probe
                                   # (None: its calls disagreed)
    free_calls: tuple = ()         # a rule site and its batch-free twin (FREE + module name): the
                                   # calls of a pass, by order, that had no batch axis in the probe,
                                   # which the twin follows (DeBERTa's query projection applied to
                                   # the hidden states and to the relative-position table)

    @property
    def label(self) -> str:
        if self.rule is not None:
            return self.rule.name
        return "op-local" if self.key == OPS else "module-local"


@dataclass
class RulePlan:
    """Which sites cover which selected parameters; the others go per sample, with the reason."""

    sites: dict[str, Site]
    leftover: list[str]                                      # parameters for vmap / the loop
    reasons: dict[str, str] = field(default_factory=dict)    # leftover parameter -> why
    notes: dict[str, str] = field(default_factory=dict)      # covered parameter -> why no hand rule
    clone: set = field(default_factory=set)                  # sites whose output a later op modifies in place
                                                             # (OPS: the op recorder's results)
    probe_seconds: float = 0.0
    root: nn.Module | None = None                            # the model
    proving: bool = False   # the probe's passes, whose sums it checks against the per-sample loop
    # Op-local parameters followed only inside the forward of the module that holds them
    # (parameter -> (module name, attribute)): a failure sends them module-local, once.
    scoped: dict[str, tuple[str, str]] = field(default_factory=dict)
    # The op recorder's operations as the probe saw them: (ordinal, operation, structure, each
    # leaf's dims) -> (whether it met the batch, positions of the leaves holding the samples),
    # None where the probe's passes disagreed; a later pass decides those operations as the probe
    # did, not by a size that may coincide with its batch's (a [T, d] table with T = N).
    op_layouts: dict = field(default_factory=dict)
    # What the first call's one-sample forward found of the model's output (``arguments._Labels``:
    # its classes and loss), kept with the plan, whose signature it shares: a later call skips it.
    labels: object = None

    def copy(self, root: nn.Module | None = None) -> "RulePlan":
        """An independent copy; with ``root``, for that model (one with the same module names: a
        float32 twin's plan carried over to the model itself, or a :meth:`detached` plan given
        its model back), its modules looked up by name."""
        def module(s):
            if root is None:
                return s.module
            return None if s.key == OPS else root.get_submodule(s.module_name)

        sites = {k: Site(s.key, s.module_name, module(s), s.rule, dict(s.params), s.batch_free, s.axis,
                         dict(s.per_sample), s.free_calls)
                 for k, s in self.sites.items()}
        return RulePlan(sites, list(self.leftover), dict(self.reasons), dict(self.notes), set(self.clone),
                        self.probe_seconds, self.root if root is None else root, scoped=dict(self.scoped),
                        op_layouts=dict(self.op_layouts), labels=self.labels)

    def detached(self) -> "RulePlan":
        """A copy that holds no reference to the model (its modules are named only), for the plan
        cache, which must not keep a model alive: its key is a weak reference to the model, and
        a value referring to the key would make that key live as long as the cache.
        ``copy(model)`` gives the model back."""
        plan = self.copy()
        plan.root = None
        for site in plan.sites.values():
            site.module = None
        return plan

    @property
    def covered(self) -> set[str]:
        return {p for s in self.sites.values() for p in s.params.values()}

    @property
    def narrowed(self) -> frozenset:
        """The op-local parameters that a disagreement with the per-sample loop sends module-local
        (:meth:`drop_param`) before anything is dropped."""
        return frozenset(self.scoped)

    def drop_param(self, pname: str, why: str) -> None:
        """Send ``pname`` per sample, with the reason; a parameter followed op-local inside its
        module's forward goes module-local instead, the first time."""
        if pname in self.scoped:
            self._unscope(pname, why)
            return
        for key in list(self.sites):
            site = self.sites[key]
            site.params = {a: p for a, p in site.params.items() if p != pname}
            if not site.params:
                del self.sites[key]
        if pname not in self.leftover:
            self.leftover.append(pname)
            self.reasons[pname] = why

    def drop_site(self, key: str, why: str) -> None:
        for pname in list(self.sites[key].params.values()) if key in self.sites else []:
            self.drop_param(pname, why)

    def drop_all(self, why: str) -> None:
        self.scoped.clear()  # nothing is retried: the whole plan failed
        for pname in sorted(self.covered):
            self.drop_param(pname, why)

    def _unscope(self, pname: str, why: str) -> None:
        mname, attr = self.scoped.pop(pname)
        ops = self.sites[OPS]
        del ops.params[pname]
        if not ops.params:
            del self.sites[OPS]
        key = "local:" + mname
        site = self.sites.setdefault(key, Site(key, mname, self.root.get_submodule(mname), None))
        site.params[attr] = pname
        self.notes[pname] = f"module-local: followed op by op inside {mname}, {why}"

    def to_local(self, key: str, why: str) -> None:
        """A rule site whose calls the rule cannot read (keyword arguments, several tensors) goes
        module-local."""
        site = self.sites.pop(key)
        new = self.sites.setdefault("local:" + site.module_name,
                                    Site("local:" + site.module_name, site.module_name, site.module, None))
        new.params.update(site.params)
        for p in site.params.values():
            self.notes[p] = why

    def to_parent(self, key: str, why: str) -> None:
        """A module that is never called: its parent's forward uses the parameters directly
        (MultiheadAttention's ``out_proj``, say), so the parent's module-local rule takes them;
        where the parent has other children, or under the root, the operations that use them
        (op-local)."""
        site = self.sites[key]
        if site.module_name == "":
            self.drop_site(key, why)
            return
        del self.sites[key]
        parent_name, _, child = site.module_name.rpartition(".")
        parent = self.root.get_submodule(parent_name)
        if parent_name and any(name != child for name, _ in parent.named_children()):
            # A replay of the parent would rerun its other children's forwards too (DeBERTa's
            # encoder, which reads its position table's weight, around all its layers): the
            # operations on these parameters are followed inside its forward instead, and the
            # parent's module-local rule takes them only where that fails (_unscope).
            ops = self.sites.setdefault(OPS, Site(OPS, "", None, None))
            for attr, p in site.params.items():
                ops.params[p] = p
                self.scoped[p] = (parent_name, f"{child}.{attr}")
                self.notes[p] = f"{why}: followed op by op (module-local in {parent_name} if that fails)"
            return
        key2 = OPS if parent_name == "" and any(True for _ in parent.children()) else "local:" + parent_name
        new = self.sites.setdefault(key2, Site(key2, parent_name, parent if key2 != OPS else None, None))
        for attr, p in site.params.items():
            new.params[p if key2 == OPS else f"{child}.{attr}"] = p
            self.notes[p] = why

    def absorb(self, trouble: dict[str, tuple[str, str]]) -> None:
        """Act on what :func:`.engine.rules_pass` reported: ``(action, reason)`` per site key."""
        for key, (action, why) in trouble.items():
            if key.startswith(PARAM):  # "drop": what the op recorder could not follow
                if key[len(PARAM):] in self.covered:
                    self.drop_param(key[len(PARAM):], why)
                continue
            if key == OPS and action == "clone":  # the op recorder's results (its sites or batch-free modules')
                self.clone.add(OPS)
                continue
            if key not in self.sites:
                continue
            if action == "clone" and key not in self.clone:
                self.clone.add(key)
            elif action == "local":
                self.to_local(key, why)
            elif action == "parent":
                self.to_parent(key, why)
            elif action == "unused":
                del self.sites[key]
            elif action.startswith("axis="):
                self.sites[key].axis = int(action[len("axis="):])
                for p in self.sites[key].params.values():
                    self.notes.setdefault(p, why)
            elif action == "batch_free" or action.startswith("split="):
                site = self.sites[key]
                if action.startswith("split="):  # the calls with a batch axis stay with the rule
                    site.free_calls = tuple(int(c) for c in action[len("split="):].split(","))
                    site = self.sites[FREE + site.module_name] = Site(
                        FREE + site.module_name, site.module_name, site.module, None, dict(site.params),
                        free_calls=site.free_calls)
                site.batch_free = True
                for p in site.params.values():
                    self.notes.setdefault(p, why)
            else:
                self.drop_site(key, why)

    @property
    def rule_names(self) -> dict[str, str]:
        """``{module name: rule}`` for the module sites (op-local sites under ``"<ops>"``)."""
        return {s.module_name if s.key != OPS else OPS: s.label for s in self.sites.values()}

    @property
    def method_of(self) -> dict[str, str]:
        """``{parameter: rule}``: ``"a+b"`` for a parameter used at several sites."""
        out: dict[str, list] = {}
        for s in self.sites.values():
            for p in s.params.values():
                out.setdefault(p, []).append(s.label)
        return {p: "+".join(sorted(set(v))) for p, v in out.items()}


def make_plan(model: nn.Module, selected: dict[str, torch.Tensor], checked_rules: bool = True) -> RulePlan:
    """Structural plan: every use of every selected parameter gets a site. ``checked_rules``:
    whether rules that must see a call before they are known to suit it (``Rule.fits``) may
    serve; without a check of each call (the tracker's steps) their modules are module-local."""
    owners: dict[int, list] = {}
    seen: set = set()
    for mname, m in model.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            # One module placed at two paths is one site (its hook sees both calls); a site per
            # path would hook the same module twice and count every call twice.
            if p is not None and (id(m), attr) not in seen:
                seen.add((id(m), attr))
                owners.setdefault(id(p), []).append((mname, m, attr))
    plan = RulePlan({}, [], root=model)
    root_has_children = any(True for _ in model.children())
    for pname, p in selected.items():
        uses = owners.get(id(p), [])
        # A module that holds the parameter only to pass it to a child that owns it too (a head's
        # bias tied to its decoder's) is not a use of its own.
        uses = [u for u in uses if not any(v[0] != u[0] and (u[0] == "" or v[0].startswith(u[0] + "."))
                                           for v in uses)]
        for mname, m, attr in uses:
            rule, why = rule_for(m)
            if rule is not None and rule.fits is not None and not checked_rules:
                rule, why = None, f"the {rule.name} rule must see a call first"
            if rule is not None:
                key = "rule:" + mname
                site = plan.sites.setdefault(key, Site(key, mname, m, rule))
                site.params[attr] = pname
            elif mname == "" and root_has_children:
                site = plan.sites.setdefault(OPS, Site(OPS, "", None, None))
                site.params[pname] = pname
                plan.notes[pname] = "used outside any module"
            elif checked_rules and type(m) not in RECORDS and len(uses) == 1 and any(True for _ in m.children()):
                # A replay of the module would rerun its children's forwards too (ViT's patch
                # embedding around its class token): only the operations on its own parameters
                # are replayed instead. Proven by the probe, which sends it module-local (below)
                # when that fails.
                site = plan.sites.setdefault(OPS, Site(OPS, "", None, None))
                site.params[pname] = pname
                plan.scoped[pname] = (mname, attr)
                plan.notes[pname] = f"{why}: followed op by op (module-local if that fails)"
            else:
                key = "local:" + mname
                site = plan.sites.setdefault(key, Site(key, mname, m, None))
                site.params[attr] = pname
                plan.notes[pname] = why
        if len(uses) > 1:
            plan.notes[pname] = f"tied: used by {len(uses)} modules (" + ", ".join(u[0] or "<root>" for u in uses) + ")"
    return plan

