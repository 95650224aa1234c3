"""Recording the batched forward of the rule engine: what each site's calls took and returned.

:class:`_Recorder` puts a forward hook on every module site of a :class:`~.plan.RulePlan` and,
when the plan has an op site (or a module called without a batch axis), runs the forward with
those parameters (and those modules' outputs) as :class:`Watched` tensors, whose operations
:class:`_OpRecorder` records. Each record keeps a call's inputs and the outputs the loss is differentiated with
respect to (:func:`_prepare_outputs`), with the tensors' versions at the call, so that
:mod:`.engine` can tell when a later in-place op changed them.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .plan import OPS, RulePlan, Site
from .rules.attention import RecordingAttention
from .rules.local import ModuleCall, ParamLeaf, Rebuild, Recorded, fold_of, from_the_batch, spread_over
from .rules.replay import record_call


@dataclass
class _Call:
    rec: Recorded
    ok_for_rule: bool              # one positional tensor argument, a tensor output
    versions_in: list              # of the per-sample inputs, at the call
    versions_out: list             # of the outputs differentiated, at the call
    other_axis: int | None = None  # not ok: the one inner axis of the input with the batch's size
    unproven: str | None = None    # module-local: why its per-sample arguments are not the probe's


def inner_sample_axis(x, output, n: int) -> int | None:
    """The one axis between the first and the last of ``x`` (and of a same-shaped ``output``)
    whose size is the batch's, when the first's is not: where a layer fed ``[T, N, d]`` has its
    samples. None where no axis or several qualify."""
    if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor) or x.dim() < 3 or x.shape[0] == n:
        return None
    axes = [a for a in range(1, x.dim() - 1) if x.shape[a] == n]
    if len(axes) != 1 or output.dim() != x.dim() or output.shape[axes[0]] != n:
        return None
    return axes[0]


def _recomputing() -> bool:
    """Whether this forward runs inside a backward: a checkpoint recomputing what the forward
    computed, and the hooks recorded, before."""
    return torch._C._current_graph_task_id() != -1


def _prepare_outputs(outputs: list, clone: bool) -> tuple[list, dict]:
    """``(targets, handed)``: the tensors to differentiate the loss with respect to, and the
    replacements (by position) the rest of the model gets instead of the module's outputs.

    * An output computed from nothing that requires grad (the first layer's, with the parameters
      detached) becomes a leaf that does; the model continues with a copy, so that a later
      in-place op does not touch the leaf.
    * With several outputs, each is differentiated through its own alias (a view): one output
      may be computed from another inside the module (``h`` and ``h.square().mean()``), and the
      gradient w.r.t. ``h`` itself would then include the path through the other output, which
      the module's own vector-Jacobian product adds again.
    * ``clone``: a later op modifies the output in place: the model continues with a copy.
    """
    targets, handed = [], {}
    for k, t in enumerate(outputs):
        copy = clone
        if not t.requires_grad:
            t.requires_grad_(True)
            copy = True
        target = t.view_as(t) if len(outputs) > 1 else t
        targets.append(target)
        if copy:
            handed[k] = target.clone()
        elif target is not t:
            handed[k] = target
    return targets, handed


def _handed(output, rec: Recorded, replaced: dict, to_module):
    """The module's output with the recorded outputs' replacements put in (None: unchanged)."""
    if to_module is not None:
        # Recorded in another layout (a view of each output): the rest of the model must
        # continue from those views, or their gradients would never arrive.
        replaced = {k: replaced.get(k, t) for k, t in enumerate(rec.outputs)}
    if not replaced:
        return None
    if isinstance(output, torch.Tensor):
        return replaced[0] if to_module is None else to_module(0, replaced[0])
    leaves, spec = tree_flatten(output)
    for k, t in replaced.items():
        leaves[rec.out_index[k]] = t if to_module is None else to_module(k, t)
    return tree_unflatten(leaves, spec)


class _Recorder:
    """Forward hooks on the module sites and, for the op site and batch-free modules, an op
    recorder of every operation using the watched tensors."""

    def __init__(self, plan: RulePlan, n: int, values: dict[str, torch.Tensor]):
        self.n = n
        self.sites = plan.sites
        self.proving = plan.proving
        self.calls: dict[str, list[_Call]] = {k: [] for k in plan.sites if k != OPS}
        self.handles = []
        self.ops: list[Recorded] = []
        self.folds: set[int] = set()  # rows per sample the batch's own tensors had in this pass (> 1)
        self.call_counts: dict[str, int] = {}  # sites split by their calls: calls seen so far (_next_call)
        ops = plan.sites.get(OPS)
        needs_ops = ops is not None or any(s.batch_free for s in plan.sites.values())
        watched = {p: values[p] for p in ops.params.values()} if ops is not None else {}
        self.mode = (_OpRecorder(n, self.proving, self.folds, self.ops, watched, plan.op_layouts, plan.root,
                                 OPS in plan.clone) if needs_ops else None)
        # what the forward runs with: the parameters the op recorder follows as watched aliases
        self.values = values if not watched else {**values, **self.mode.params}
        self.attention: dict[str, RecordingAttention] = {}
        for key, site in plan.sites.items():
            if key == OPS:
                continue
            hook = self._batch_free_hook(site) if site.batch_free else self._hook(key, key in plan.clone)
            self.handles.append(site.module.register_forward_hook(hook, with_kwargs=True))
            if site.rule is None and not site.batch_free and type(site.module) is nn.MultiheadAttention:
                self.attention[key] = RecordingAttention(site.module)
                site.module.forward = self.attention[key].forward  # this instance, for this pass only

    def _next_call(self, key: str) -> int:
        """The order of this call among the calls of site ``key``'s module in this pass."""
        c = self.call_counts.get(key, 0)
        self.call_counts[key] = c + 1
        return c

    def _hook(self, key, clone):
        site = self.sites[key]

        def hook(module, args, kwargs, output):
            # An RNN's outputs have the samples on axis 1 (h_n, and output unless batch_first): its
            # call is recorded with every tensor moved samples-first, and handed back moved back.
            if site.free_calls and not _recomputing() and self._next_call(key) in site.free_calls:
                return None  # a call without a batch axis: its batch-free twin follows it
            rec, to_module = record_call(module, args, kwargs, output, self.n, folds=True, axis=site.axis)
            if site.free_calls and _recomputing() and not rec.outputs:
                return None
            if rec.fold > 1:
                self.folds.add(rec.fold)
            if _recomputing():
                # A forward inside the backward is a checkpoint recomputing what the first call
                # computed (and this hook recorded): the backward follows the first call's graph.
                # Nothing is recorded, but the rest of the block gets what the first call handed
                # on (a first layer's output made to require grad), or the recomputation would
                # save other tensors than the forward did and the checkpoint refuses it.
                rec.outputs, replaced = _prepare_outputs(rec.outputs, clone)
                return _handed(output, rec, replaced, to_module)
            one = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor)
            ok = (one and args[0].dim() > site.axis and args[0].shape[site.axis] == self.n * rec.fold
                  and len(rec.outputs) == 1)
            other = (inner_sample_axis(args[0], output, self.n) if one and not ok and not site.axis
                     and site.rule is not None and site.rule.sequence else None)
            unproven = self._per_sample(site, rec) if site.rule is None and rec.per_sample is None else None
            versions_in = [rec.leaves[k]._version for k in rec.batched]
            rec.outputs, replaced = _prepare_outputs(rec.outputs, clone)
            self.calls[key].append(_Call(rec, ok, versions_in, [t._version for t in rec.outputs], other, unproven))
            return _handed(output, rec, replaced, to_module)
        return hook

    def _per_sample(self, site: Site, rec: Recorded) -> str | None:
        """Fix which arguments of a module-local call hold the samples (``rec.per_sample``); the
        reason when that is not what the probe proved, else None.

        An argument holds the samples when its first axis has the batch's size: that is read while
        the probe proves the plan (its replays are compared with the per-sample loop there) and
        kept per call structure. A later pass takes the positions the probe saw, so a table whose
        rows only happen to equal that pass's batch size (rotary angles ``[T, d]`` with T = N) is
        passed to every sample whole instead of being split between them."""
        by_size = tuple(rec.batched)
        # the call's structure: its pytree, and which leaves are tensors (an optional mask given
        # in one call and None in another is another structure)
        shape = (str(rec.spec), tuple(isinstance(x, torch.Tensor) for x in rec.leaves))
        if self.proving:
            seen = site.per_sample.get(shape, by_size)
            site.per_sample[shape] = by_size if seen == by_size else None
            rec.per_sample = list(by_size)
            return None
        if shape not in site.per_sample:
            return f"{site.module_name} is called with arguments the probe did not see"
        seen = site.per_sample[shape]
        if seen is None or not set(seen) <= set(by_size):
            return f"{site.module_name}'s arguments hold the samples elsewhere than in the probe"
        rec.per_sample = list(seen)
        return None

    def _batch_free_hook(self, site: Site):
        """The module's output has no batch axis: follow it into the operations that use it,
        rebuilding it from the parameters by calling the module again."""
        def hook(module, args, kwargs, output):
            if _recomputing():
                return None  # a checkpoint's recomputation (see _hook)
            if site.free_calls and self._next_call(site.key) not in site.free_calls:
                return None  # a call with the batch: its rule site's
            # an argument itself built from parameters is rebuilt with them (ModuleCall.slots)
            inputs, _ = tree_flatten((args, kwargs))
            slots = {k: self.mode.builders[id(x)] for k, x in enumerate(inputs)
                     if isinstance(x, torch.Tensor) and id(x) in self.mode.builders}
            sources = set(site.params.values()).union(*(self.mode.sources[id(inputs[k])] for k in slots))
            leaves, spec = tree_flatten(output)
            for k, t in enumerate(leaves):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    leaves[k] = self.mode.watch(t, ModuleCall(module, dict(site.params), args, kwargs, k, slots),
                                                sources)
            return tree_unflatten(leaves, spec)
        return hook

    def recording(self):
        """The context of the forward: the op recorder records inside it only."""
        return self.mode if self.mode is not None else nullcontext()

    def remove(self):
        for h in self.handles:
            h.remove()
        for att in self.attention.values():
            del att.m.forward  # back to the class's forward


_REPEATS = (torch.Tensor.repeat, torch.tile)


def _repeated_rows(func, leaves, slots, out: torch.Tensor, n: int) -> int:
    """The rows of one copy where ``out`` is a watched tensor copied ``n`` times along its first
    axis, in other memory than a broadcast: 1 for one row copied along a new batch axis
    (``cls.repeat(n, 1, 1)``); ``r`` for ``r`` rows tiled ``n`` times, which is what each sample
    of a batch folded into rows of ``r`` sees (DeBERTa's position projections ``[heads, 2k, d]``
    repeated beside queries ``[N*heads, T, d]``); 0 otherwise. The probe checks what the rows
    are taken for against the per-sample loop."""
    if func not in _REPEATS or 0 not in slots or out.dim() == 0 or out.shape[0] % n or out.shape[0] < n or n < 2:
        return 0
    x = leaves[0]
    if x.dim() < out.dim() or x.shape[0] == 1:
        return 1
    return x.shape[0] if out.shape[0] == n * x.shape[0] else 0


_TRANSPOSES = (torch.Tensor.transpose, torch.transpose)


def _keeps_rows(func, leaves, slots, out: torch.Tensor, spread: dict) -> int:
    """The rows kept of a tensor copied over the batch (``spread``: id -> rows) that ``out``
    still has on its first axis: a transpose of two other axes (``keys.transpose(-1, -2)``
    after the repeat), or a contiguous copy; 0 otherwise."""
    if 0 not in slots or id(leaves[0]) not in spread or out.dim() == 0 or out.shape[0] != leaves[0].shape[0]:
        return 0
    if func is torch.Tensor.contiguous:
        return spread[id(leaves[0])]
    if func in _TRANSPOSES and len(leaves) == 3 and all(isinstance(a, int) for a in leaves[1:]):
        if all(a % out.dim() != 0 for a in leaves[1:]):
            return spread[id(leaves[0])]
    return 0


class Watched(torch.Tensor):
    """A tensor the op recorder follows: a parameter used outside any module, or a tensor built
    from parameters without a batch axis (a position table, a class token expanded). Only
    operations with such an argument reach Python (:meth:`_OpRecorder.op`), which returns a plain
    tensor once the batch is met, so the rest of the forward runs at torch's own speed; a
    torch-function mode would see every operation of the forward. After the pass (or in a
    checkpoint's recomputation, which the forward already recorded) it acts as a plain tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            ops = _recorder_of(args, kwargs)
            if ops is None or _recomputing():
                return out
            return ops.op(func, args, kwargs, out)


def _recorder_of(args, kwargs):
    """The open op recorder of a watched argument (one level of lists and tuples deep, as torch's
    operations take them), else None."""
    for group in (args, kwargs.values()):
        for x in group:
            if type(x) is list or type(x) is tuple:
                for y in x:
                    ops = y._fastewc_ops() if type(y) is Watched else None
                    if ops is not None and ops.recording:
                        return ops
            elif type(x) is Watched:
                ops = x._fastewc_ops()
                if ops is not None and ops.recording:
                    return ops
    return None


class _OpRecorder:
    """Records the operations that use watched tensors (:class:`Watched`: parameters used outside
    any module, and tensors derived from them without a batch axis) while :attr:`recording`: in
    the forward, entered as a context (not in the loss after it, nor after the pass)."""

    def __init__(self, n: int, proving: bool, folds: set, ops: list, watched: dict[str, torch.Tensor],
                 layouts: dict, root: nn.Module | None, clone: bool):
        # The recorder's own batch size, mode, folds and record list, not the recorder itself: a
        # reference back would make a cycle that keeps the pass's recorded tensors alive until
        # Python's cycle collector runs, well after the pass.
        self.n, self.proving, self.folds, self.ops = n, proving, folds, ops
        self.root = root
        self.clone = clone  # a later op modifies some result in place: the model continues with copies
        self.recording = False
        self._tables: set[int] | None = None  # the model's buffers' and parameters' storages, read when first asked
        self.layouts = layouts  # the plan's op_layouts: written while proving, read after
        self.ordinal = 0        # of the next operation using a watched tensor in this pass
        self.builders: dict[int, object] = {}
        self.sources: dict[int, set] = {}
        self.keep = []  # keeps derived tensors alive so that their ids stay unique
        self.spread: dict[int, int] = {}  # id of a watched tensor with a batch axis made by copying -> the
                                          # rows of one copy (Rebuild.spread)
        self.op_trouble: dict[str, str] = {}  # parameter -> why this pass cannot follow it op by op
        self._ref = weakref.ref(self)
        # the parameters' stand-ins for the forward: name -> its watched alias
        self.params = {name: self.watch(t, ParamLeaf(name), {name}) for name, t in watched.items()}

    def __enter__(self):
        self.recording = True
        return self

    def __exit__(self, *exc):
        self.recording = False

    def watch(self, t: torch.Tensor, build, sources: set) -> Watched:
        """Follow ``t`` from here on, rebuilt by ``build`` from ``sources``: its watched alias
        (``t`` itself when it is one)."""
        if type(t) is not Watched:
            t = t.as_subclass(Watched)
        t._fastewc_ops = self._ref  # weak: this recorder keeps its watched tensors (and what is built
                                    # from them) alive, and a cycle would outlive the pass
        self.builders[id(t)] = build
        self.sources[id(t)] = sources
        self.keep.append(t)
        return t

    def _module_table(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is rows of one of the model's buffers or parameters (a relative-position
        index ``[T, T]`` with T = N; SwinV2's position-bias MLP's last weight, with as many rows
        as heads), which hold no samples whatever their count; a buffer broadcast over the batch
        (``position_ids.expand(N, T)``, stride 0) is left to the size rule like any batch tensor."""
        if x.stride(0) == 0 or self.root is None:
            return False
        if self._tables is None:  # only an operation whose argument has the batch's rows asks
            self._tables = {t.untyped_storage().data_ptr()
                            for t in (*self.root.buffers(), *self.root.parameters())} - {0}
        return x.untyped_storage().data_ptr() in self._tables

    def _trouble(self, sources: set, why: str) -> None:
        """This pass cannot follow the parameters ``sources`` op by op: they go module-local, or
        per sample (:meth:`RulePlan.drop_param`), with ``why``; the others keep their rules."""
        for p in sources:
            self.op_trouble.setdefault(p, why)

    def op(self, func, args, kwargs, out):
        """Record one operation with a watched argument; returns what the model continues with
        (watched aliases of results without a batch axis; the results or their stand-ins for the
        backward where the batch is met)."""
        single = isinstance(out, torch.Tensor)
        if single and not out.is_floating_point():
            return out
        results, out_spec = ([out], None) if single else tree_flatten(out)
        floating = [k for k, t in enumerate(results) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not floating:
            return out
        leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
        slots = {k: self.builders[id(x)] for k, x in enumerate(leaves)
                 if isinstance(x, torch.Tensor) and id(x) in self.builders}
        if not slots:
            return out
        n = self.n
        name = getattr(func, "__name__", str(func))
        sources = set().union(*(self.sources[id(leaves[k])] for k in slots))
        fold = fold_of([x for k, x in enumerate(leaves) if k not in slots], n, seen=frozenset(self.folds))
        if fold > 1:
            self.folds.add(fold)
        key = (self.ordinal, name, str(spec), tuple(x.dim() if isinstance(x, torch.Tensor) else None for x in leaves))
        self.ordinal += 1
        # Where the probe settled this operation's layout, the proven positions are taken below and
        # a module's table among these only widens the set they must lie in: not looked for.
        settled = not self.proving and self.layouts.get(key) is not None
        by_size = tuple(k for k, x in enumerate(leaves) if isinstance(x, torch.Tensor) and k not in slots
                        and x.dim() > 0 and x.shape[0] == n * fold and (settled or not self._module_table(x)))
        # A watched argument is built from parameters alone: its batch axis, if any, is one made by
        # broadcasting or copying one row; a first axis that only has the batch's size holds no samples.
        meets = bool(by_size) or (single and out.dim() > 0 and out.shape[0] == n
                                  and any(id(leaves[k]) in self.spread for k in slots))
        if self.proving:
            seen = self.layouts.get(key, (meets, by_size, fold))
            self.layouts[key] = (meets, by_size, fold) if seen == (meets, by_size, fold) else None
        elif self.layouts.get(key) is not None:
            meets, proven, proven_fold = self.layouts[key]
            if not set(proven) <= set(by_size) or (meets and fold != proven_fold):
                self._trouble(sources, f"used in {name} whose arguments hold the samples elsewhere than in the probe")
                return out
            by_size = proven
        if not meets:
            if from_the_batch(leaves):
                # Another argument comes from the batch (watched ones never do) without holding
                # the samples on its first axis ([T, N, d]): rebuilt from the whole batch, the
                # result would mix every sample's rows into each sample's gradient.
                self._trouble(sources, f"used in {name} with the samples on another axis than the first")
                return out
            # No batch axis yet (pos[:T], scale * 2, biases.chunk(3)): remember how to rebuild each
            # result from the parameters (a batch axis made by broadcasting with one row; a size
            # that only equals the batch size is not taken for one).
            for k in floating:
                t, build = results[k], func if single else _Part(func, k)
                spread = (1 if spread_over(t, n) else 0) or (single and (
                    _repeated_rows(func, leaves, slots, t, n) or _keeps_rows(func, leaves, slots, t, self.spread)))
                results[k] = self.watch(t, Rebuild(build, list(leaves), spec, slots, spread), sources)
                if spread:
                    self.spread[id(results[k])] = spread
            return results[0] if single else tree_unflatten(results, out_spec)
        outs = [results[k] for k in floating]
        if any(t.dim() == 0 or t.shape[0] != n * fold for t in outs):
            self._trouble(sources, f"used in {name} whose result has no batch axis")
            return out
        rec = Recorded(leaves, spec, outs, floating, n, fold, slots, func, sources, per_sample=list(by_size),
                       spread={k: self.spread[id(leaves[k])] for k in slots if id(leaves[k]) in self.spread},
                       slot_sources={k: self.sources[id(leaves[k])] for k in slots})
        rec.versions_in = [rec.leaves[k]._version for k in rec.batched]
        rec.outputs, replaced = _prepare_outputs(rec.outputs, self.clone)
        rec.versions_out = [t._version for t in rec.outputs]
        self.ops.append(rec)
        if not replaced:
            return out
        for i, t in replaced.items():
            results[floating[i]] = t
        return results[0] if single else tree_unflatten(results, out_spec)


@dataclass(frozen=True)
class _Part:
    """The ``k``-th of an operation's results (``biases.chunk(3)[k]``), as :class:`Rebuild` calls it."""

    func: object
    k: int

    def __call__(self, *args, **kwargs):
        return tree_flatten(self.func(*args, **kwargs))[0][self.k]
