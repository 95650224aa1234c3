"""The module-local and op-local rules: per-sample gradients of one module's (or one operation's)
parameters with ``torch.func`` over that module alone, from what the batched pass recorded.

Any module without a hand-written rule is covered this way: the batched forward records all its
inputs (positional and keyword, tensors anywhere in tuples and dicts) and outputs, the batched
backward gives the gradient of every output, and ``vmap`` over the samples of ``vjp`` of the
module's own ``forward`` (each sample as a batch of one) gives each sample's gradient of the
module's parameters. The rest of the model is never run per sample. Parameters used outside any
module (a bare ``nn.Parameter`` added in the model's ``forward``) get the same treatment at the
level of the operations that use them.

A tensor argument counts as per-sample when its first dimension is the batch size; anything
else (a broadcast mask, rotary tables, flags) is passed to every sample unchanged. A module fed
the batch flattened together with another axis, sample-major (OPT's MLP on ``[N*T, d]``, Swin's
attention on ``[N*windows, ...]``), is recognised by its inputs that descend from the batch
(they require grad in the batched pass) having ``N*k`` rows; each sample is then its ``k`` rows
(:attr:`Recorded.fold`). The probe checks the result against the per-sample loop like any rule,
so a flattening in another order cannot pass unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..functional import call_once


@dataclass
class Recorded:
    """One call of a module or operation in the batched pass, ready to be replayed per sample."""

    leaves: list                   # flattened (args, kwargs)
    spec: object                   # their pytree structure
    outputs: list                  # the batched output tensors whose gradients are needed
    out_index: list                # their positions among the flattened outputs
    n: int                         # batch size
    fold: int = 1                  # rows per sample: the batch flattened with another axis (module docstring)
    param_slots: dict = field(default_factory=dict)   # op-local: leaf position -> f(params) giving that leaf
    func: Callable | None = None   # op-local: the operation
    sources: set = field(default_factory=set)         # op-local: the parameters it depends on
    slot_sources: dict = field(default_factory=dict)  # op-local: leaf position -> the parameters its
                                                      # argument is built from (one slot's, of those)
    versions_in: list = field(default_factory=list)   # op-local: batched inputs' versions at the call
    versions_out: list = field(default_factory=list)  # op-local: outputs' versions once recorded
    axis: int = 0                  # the samples' axis of a rule site's input and output (sequence first: 1)
    spread: dict = field(default_factory=dict)  # op-local: slot -> the rows its rebuild keeps of a batch
                                                # axis made by broadcasting or copying: 1 (cls.expand(n,
                                                # ...)), or r rows tiled for a batch folded into rows of r
    per_sample: list | None = None # positions of the leaves holding the samples, where the layer
                                   # family's recorder names them (a mask [T, S] with T = N is not
                                   # one) or a check proved them; else (a generic record) by size

    @property
    def batched(self) -> list[int]:
        if self.per_sample is not None:
            return list(self.per_sample)
        rows, a = self.n * self.fold, self.axis
        return [k for k, x in enumerate(self.leaves)
                if k not in self.param_slots and isinstance(x, torch.Tensor) and x.dim() > a and x.shape[a] == rows]

    def samples(self, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """Samples ``i..j`` of a batched tensor: ``[j - i, *rest]``, or ``[j - i, fold, *rest]``
        when the batch is folded into rows (samples first when they were on ``axis``)."""
        if self.axis:
            x = x.movedim(self.axis, 0)
        return x[i:j] if self.fold == 1 else x.unflatten(0, (self.n, self.fold))[i:j]


def batched_outputs(output, n: int, fold: int = 1) -> tuple[list, list]:
    """The per-sample tensors in a module output (tensor, tuple, dict or ``ModelOutput``) and
    their positions among its flattened leaves."""
    leaves, _ = tree_flatten(output)
    idx = [k for k, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n * fold
           and x.is_floating_point()]
    return [leaves[k] for k in idx], idx


def from_the_batch(leaves) -> bool:
    """Whether any of a call's arguments is computed from the batch: in the rules pass the
    parameters are detached and the model's floating inputs require grad, so exactly those do."""
    return any(isinstance(x, torch.Tensor) and x.requires_grad and x.is_floating_point() for x in leaves)


def fold_of(inputs: list, n: int, *, seen: frozenset = frozenset()) -> int:
    """Rows per sample of a call whose inputs have no axis of size ``n`` first: ``k`` when every
    input that descends from the batch (requires grad) has ``n*k`` rows, ``k > 1``; else 1.
    Where no input requires grad (a parameter's bias added to a mask over the batch's windows),
    ``k`` when every tensor input has ``n*k`` rows and ``k`` is among ``seen``, the folds that
    inputs descending from the batch had earlier in the pass: a table whose rows are only a
    multiple of the batch size is not taken for one."""
    if any(isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n for x in inputs):
        return 1
    rows = {x.shape[0] for x in inputs
            if isinstance(x, torch.Tensor) and x.requires_grad and x.dim() > 0 and x.is_floating_point()}
    allowed = None
    if not rows and seen:
        rows, allowed = {x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0}, seen
    if len(rows) != 1 or n < 1:
        return 1
    r = rows.pop()
    k = r // n if r > n and r % n == 0 else 1
    return k if allowed is None or k in allowed else 1


_ONE_TENSOR_SPEC = tree_flatten(((torch.zeros(()),), {}))[1]


def record(args, kwargs, output, n: int, folds: bool = False, axis: int = 0) -> Recorded:
    """One call's record. ``folds``: recognise a batch folded into rows (:func:`fold_of`), which
    needs a pass where only tensors that descend from the batch require grad (the rule engine's,
    with the parameters detached; not a training step). ``axis``: a rule site whose samples are
    on that axis of its one input and output (a layer fed ``[T, N, d]``; never folded)."""
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
        # The common call (one tensor in, one out): no pytree walk.
        fold = fold_of([args[0]], n) if folds and not axis else 1
        per = output.dim() > axis and output.shape[axis] == n * fold and output.is_floating_point()
        return Recorded([args[0]], _ONE_TENSOR_SPEC, [output] if per else [], [0] if per else [], n, fold, axis=axis)
    leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
    fold = fold_of(leaves, n) if folds else 1
    outs, idx = batched_outputs(output, n, fold)
    return Recorded(leaves, spec, outs, idx, n, fold)


def _per_sample_vjp(fn, params: dict, rec: Recorded, grads: list, i: int, j: int) -> dict:
    """``{name: [j - i, *shape]}``: ``vmap`` over samples ``i..j`` of the vjp of ``fn(params, args,
    kwargs)`` with each sample's output gradients."""
    batched = rec.batched
    # one sample is a batch of one, or its rows when the batch is folded into rows
    alone = (lambda x: x.unsqueeze(0)) if rec.fold == 1 else (lambda x: x)

    def one(p, xs, gs):
        leaves = list(rec.leaves)
        for k, x in zip(batched, xs):
            leaves[k] = alone(x)
        args, kwargs = tree_unflatten(leaves, rec.spec)

        def f(p):
            out_leaves, _ = tree_flatten(fn(p, args, kwargs))
            return [out_leaves[k] for k in rec.out_index]

        _, pull = vjp(f, p)
        return pull([alone(g) for g in gs])[0]

    xs = [rec.samples(rec.leaves[k], i, j) for k in batched]
    gs = [rec.samples(g, i, j) for g in grads]
    return vmap(one, in_dims=(None, 0, 0))(params, xs, gs)


def module_blocks(module: torch.nn.Module, attrs: list[str], rec: Recorded, grads: list, i: int, j: int) -> dict:
    """Per-sample gradients ``{attr: [j - i, *shape]}`` of ``module``'s parameters ``attrs`` (names
    relative to the module) for one recorded call; ``grads``: the gradient of each recorded output."""
    params = {a: module.get_parameter(a).detach() for a in attrs}
    return _per_sample_vjp(lambda p, a, kw: call_once(module, p, a, kw), params, rec, grads, i, j)


@dataclass(frozen=True)
class ParamLeaf:
    """An operation's argument that is the parameter ``name`` itself (``p[name]``)."""

    name: str

    def __call__(self, p: dict) -> torch.Tensor:
        return p[self.name]


@dataclass(frozen=True, eq=False)
class Rebuild:
    """An argument without a batch axis, rebuilt from the parameters: the operation ``func`` on
    the recorded arguments ``leaves`` (structure ``spec``), those at ``slots`` rebuilt in turn;
    ``spread``: the result had a batch axis made by broadcasting or copying, and this many rows of
    it are kept (one; or the ``r`` rows a sample of a batch folded into rows of ``r`` sees), 0: all."""

    func: Callable
    leaves: list
    spec: object
    slots: dict
    spread: int = 0
    versions: tuple = ()  # of each recorded tensor argument, at the call (None elsewhere)

    def __post_init__(self):
        object.__setattr__(self, "versions", tuple(x._version if isinstance(x, torch.Tensor) else None
                                                   for x in self.leaves))

    def __call__(self, p: dict) -> torch.Tensor:
        ls = list(self.leaves)
        for k, b in self.slots.items():
            ls[k] = b(p)
        a, kw = tree_unflatten(ls, self.spec)
        y = self.func(*a, **kw)
        return y[: self.spread] if self.spread else y


@dataclass(frozen=True, eq=False)
class ModuleCall:
    """The output of a module called without a batch axis (a position table), rebuilt from the
    parameters: the module called again on the recorded arguments, its parameters ``params``
    (attribute -> parameter name) in place; ``k``: which flattened output. ``slots``: the
    arguments (by position among the flattened ``(args, kwargs)``) that are themselves built from
    parameters (DeBERTa's normalised position table, projected by each layer's query), rebuilt in
    turn, so that the gradient reaches those parameters too."""

    module: torch.nn.Module
    params: dict
    args: tuple
    kwargs: dict
    k: int
    slots: dict = field(default_factory=dict)
    versions: tuple = ()  # of the tensor arguments, at the call

    def __post_init__(self):
        object.__setattr__(self, "versions", tuple(x._version for x in tree_flatten((self.args, self.kwargs))[0]
                                                   if isinstance(x, torch.Tensor)))

    def __call__(self, p: dict) -> torch.Tensor:
        mine = {a: p[n] for a, n in self.params.items()}
        args, kwargs = self.args, self.kwargs
        if self.slots:
            leaves, spec = tree_flatten((args, kwargs))
            for k, build in self.slots.items():
                leaves[k] = build(p)
            args, kwargs = tree_unflatten(leaves, spec)
        return tree_flatten(call_once(self.module, mine, args, kwargs))[0][self.k]

    def looks_up_rows(self) -> bool:
        """Whether the call is a plain ``nn.Embedding``'s lookup of fixed indices: its every
        output element is a weight element chosen by position, and its backward adds each
        output gradient back there (no padding row kept at zero, no frequency scaling, no
        renormalisation of the weight in place)."""
        m, idx = self.module, self.args[0] if len(self.args) == 1 else None
        return (isinstance(m, torch.nn.Embedding) and type(m).forward is torch.nn.Embedding.forward and not self.slots
                and "forward" not in vars(m) and set(self.params) == {"weight"} and m.padding_idx is None
                and m.max_norm is None and not m.scale_grad_by_freq and not self.kwargs and self.k == 0
                and isinstance(idx, torch.Tensor) and not idx.is_floating_point() and not idx.is_complex()
                and (idx._version,) == self.versions)  # the indices as they were at the call


# Operations that give each output element one input element chosen by position alone, when no
# other argument is a tensor (or a dtype, which ``view`` would reinterpret the bits as).
_BY_POSITION = frozenset({
    torch.Tensor.expand, torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.permute, torch.permute,
    torch.Tensor.transpose, torch.transpose, torch.Tensor.t, torch.t, torch.Tensor.unsqueeze, torch.unsqueeze,
    torch.Tensor.squeeze, torch.squeeze, torch.Tensor.flatten, torch.flatten, torch.Tensor.unflatten,
    torch.Tensor.__getitem__, torch.Tensor.contiguous, torch.Tensor.narrow, torch.narrow, torch.Tensor.select,
    torch.select, torch.Tensor.repeat, torch.tile, torch.Tensor.flip, torch.flip, torch.Tensor.movedim,
    torch.movedim})


def _by_position(build) -> bool:
    """Whether ``build`` is its parameter itself, an embedding's lookup of fixed rows of it, or a
    chain of :data:`_BY_POSITION` operations on those whose other arguments are plain numbers,
    slices and the like (``cls.expand(n, -1, -1)`` with one row kept), or fills of a fixed mask
    (:func:`_fills`): each element it gives is a parameter element, chosen by position, or a
    constant."""
    if isinstance(build, ParamLeaf):
        return True
    if isinstance(build, ModuleCall):
        return build.looks_up_rows()
    return (isinstance(build, Rebuild) and len(build.slots) == 1
            and (_fills(build) or build.func in _BY_POSITION and not any(
                isinstance(x, (torch.Tensor, torch.dtype)) for k, x in enumerate(build.leaves) if k not in build.slots))
            and _by_position(next(iter(build.slots.values()))))


def _fills(build: Rebuild) -> bool:
    """Whether ``build`` is ``torch.where(mask, x, fill)`` (or ``where(mask, fill, x)``) or
    ``x.masked_fill(mask, fill)`` of its one rebuilt argument ``x``, with a boolean ``mask``
    unchanged since the call and a number ``fill`` (a causal mask's): each element is ``x``'s
    at its position, or the constant."""
    if build.spec != _THREE_ARGS_SPEC or len(build.slots) != 1:
        return False
    (k,) = build.slots
    if build.func is torch.where and k in (1, 2):
        m, fill = 0, 3 - k
    elif build.func is torch.Tensor.masked_fill and k == 0:
        m, fill = 1, 2
    else:
        return False
    mask, value = build.leaves[m], build.leaves[fill]
    return (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask._version == build.versions[m]
            and isinstance(value, (int, float)) and not isinstance(value, bool))


def _with_fills(build) -> bool:
    """Whether a chain that selects by position puts constants in (:func:`_fills`)."""
    return isinstance(build, Rebuild) and (_fills(build) or any(_with_fills(b) for b in build.slots.values()))


# Operations whose gradient w.r.t. a broadcast argument is the output gradient summed over the
# broadcast axes, times a sign per argument position: ``x + pos``, ``pos + x``, ``x - bias``, and
# in place, ``x += pos`` (BigBird's embeddings), whose replay under ``torch.func`` would fail.
_ADDITIVE = {torch.add: (1, 1), torch.Tensor.add: (1, 1), torch.Tensor.__add__: (1, 1),
             torch.Tensor.__radd__: (1, 1), torch.sub: (1, -1), torch.Tensor.sub: (1, -1),
             torch.Tensor.__sub__: (1, -1), torch.Tensor.__rsub__: (-1, 1),
             torch.Tensor.add_: (1, 1), torch.Tensor.__iadd__: (1, 1), torch.Tensor.sub_: (1, -1),
             torch.Tensor.__isub__: (1, -1)}


def spread_over(t: torch.Tensor, n: int) -> bool:
    """Whether ``t`` has a batch axis made by broadcasting (``cls.expand(n, -1, -1)``, or over
    the ``n*k`` rows of a batch folded into rows: stride 0, every row the same memory): the
    op-local rule rebuilds it with one row, as a sample replayed alone sees it."""
    return n > 1 and t.dim() > 0 and t.shape[0] >= n and t.shape[0] % n == 0 and t.stride(0) == 0


def _leaf_positions(rec: Recorded) -> tuple:
    """``(args, kwargs)`` of a recorded call with each leaf replaced by its index in ``rec.leaves``."""
    return tree_unflatten(list(range(len(rec.leaves))), rec.spec)


def _arguments(rec: Recorded) -> dict | None:
    """``{argument name or position: leaf index}`` of a recorded call whose arguments are leaves
    themselves (no tensor inside a tuple or dict); None otherwise."""
    args, kwargs = _leaf_positions(rec)
    if not all(isinstance(a, int) for a in (*args, *kwargs.values())):
        return None
    return {**dict(enumerate(args)), **kwargs}


def _sample_leaf(rec: Recorded, k: int, i: int, j: int) -> torch.Tensor:
    """Leaf ``k`` for samples ``i..j``: its rows where it holds the samples, else as it is (broadcast)."""
    x = rec.leaves[k]
    return rec.samples(x, i, j) if k in rec.batched else x


def _additive_grad(rec: Recorded, k: int, G: torch.Tensor, i: int, j: int) -> torch.Tensor | None:
    if rec.spec != _TWO_ARGS_SPEC:
        return None
    return -G if _ADDITIVE[rec.func][k] < 0 else G


def _where_grad(rec: Recorded, k: int, G: torch.Tensor, i: int, j: int) -> torch.Tensor | None:
    """``torch.where(condition, input, other)``: the output gradient where the argument was taken."""
    if rec.spec != _THREE_ARGS_SPEC or k not in (1, 2):
        return None
    cond = rec.leaves[0]
    if not isinstance(cond, torch.Tensor) or cond.dtype != torch.bool:
        return None
    cond = _sample_leaf(rec, 0, i, j)
    return G * (cond if k == 1 else ~cond).to(G.dtype)


_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_mask_grad(rec: Recorded, k: int, G: torch.Tensor, i: int, j: int) -> torch.Tensor | None:
    """``F.scaled_dot_product_attention``'s additive float ``attn_mask`` (a learned position bias):
    its gradient is that of the attention scores, ``P * (dP - rowsum(dP * P))`` with ``P`` the
    attention probabilities and ``dP = dO V^T``, recomputed for the samples in one batched pass."""
    where = _arguments(rec)
    if where is None:
        return None
    named = {(_SDPA_NAMES[a] if isinstance(a, int) else a): leaf for a, leaf in where.items()}
    value = {name: rec.leaves[leaf] for name, leaf in named.items()}
    if (named.get("attn_mask") != k or value.get("dropout_p", 0.0) != 0.0 or value.get("enable_gqa", False)
            or value.get("is_causal", False)  # torch allows no attn_mask with is_causal
            or any(named.get(t) not in rec.batched for t in ("query", "key", "value"))):
        return None
    q, key, v = (_sample_leaf(rec, named[t], i, j) for t in ("query", "key", "value"))
    mask = value["attn_mask"]
    if not mask.is_floating_point() or q.shape[-3] != key.shape[-3]:
        return None
    scale = value.get("scale")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    P = torch.softmax((q @ key.transpose(-2, -1)) * scale + mask, -1).nan_to_num(0.0)  # a row masked entirely: none
    dP = G @ v.transpose(-2, -1)
    return P * (dP - (dP * P).sum(-1, keepdim=True))


def _cat_grad(rec: Recorded, k: int, G: torch.Tensor, i: int, j: int) -> torch.Tensor | None:
    """``torch.cat(tensors, dim)`` along an axis other than the samples' (a class token put before
    the patches): the output gradient's slice where the argument was placed."""
    args, kwargs = _leaf_positions(rec)
    if not args or not isinstance(args[0], (tuple, list)) or k not in args[0] or len(args) > 2:
        return None
    dim = rec.leaves[args[1]] if len(args) == 2 else rec.leaves[kwargs["dim"]] if "dim" in kwargs else 0
    if set(kwargs) - {"dim"} or not isinstance(dim, int):
        return None
    rows = 1 if rec.fold > 1 else 0   # G's axis of a sample's rows, where the batch is folded into rows
    dim = dim % (G.dim() - rows)
    parts = [rec.leaves[t] for t in args[0]]
    if dim == 0 or any(not isinstance(t, torch.Tensor) or t.dim() != G.dim() - rows for t in parts):
        return None
    start = sum(t.shape[dim] for t in parts[: args[0].index(k)])
    return G.narrow(dim + rows, start, rec.leaves[k].shape[dim])


def _batched_matmul_grad(rec: Recorded, k: int, G: torch.Tensor, i: int, j: int) -> torch.Tensor | None:
    """``torch.bmm(a, b)`` (``[R, T, d] @ [R, d, S]``) with one argument a table copied over the
    batch's rows (DeBERTa's relative-position keys, repeated for the batch folded with the heads
    into ``R = N*heads`` rows): that argument's per-sample gradient, at one sample's rows of it,
    ``a_n^T G_n`` or ``G_n b_n^T``, ``[samples, rows, d, S]`` (``[samples, rows, T, d]``); summed
    over a sample's rows where one row of the table was broadcast over all of them."""
    kept = rec.spread.get(k)
    if rec.spec != _TWO_ARGS_SPEC or len(rec.param_slots) != 1 or kept not in (1, rec.fold):
        return None
    other = 1 - k
    x = rec.leaves[other]
    if other not in rec.batched or x.dim() != 3 or rec.leaves[k].dim() != 3:
        return None
    x = rec.samples(x, i, j)                  # [samples, (rows,) T, d] or [samples, (rows,) d, S]
    if rec.fold == 1:
        x, G = x.unsqueeze(1), G.unsqueeze(1)
    g = x.transpose(-1, -2) @ G if k == 1 else G @ x.transpose(-1, -2)
    return g.sum(1, keepdim=True) if kept < g.shape[1] else g


# Operations with the per-sample gradient w.r.t. an argument without a batch axis in closed form:
# ``f(rec, k, G, i, j)`` gives it at the output's shape (for samples i..j), or None.
_CLOSED_FORM = {**{f: _additive_grad for f in _ADDITIVE}, torch.where: _where_grad, torch.cat: _cat_grad,
                torch.nn.functional.scaled_dot_product_attention: _sdpa_mask_grad}
# The same at the argument's own shape (one sample's rows of it): nothing is broadcast.
_AT_ARGUMENT = {torch.bmm: _batched_matmul_grad, torch.Tensor.bmm: _batched_matmul_grad}


def _closed_form_blocks(rec: Recorded, values: dict[str, torch.Tensor], grads: list, i: int, j: int) -> dict | None:
    """The per-sample gradients of an argument ``b`` without a batch axis, in closed form, for the
    operations of ``_CLOSED_FORM`` (``x + pos``, ``torch.where(mask, bias, -inf)``, an attention's
    learned ``attn_mask``): sample ``n``'s gradient is that operation's gradient for ``b`` at the
    output's shape, summed over the axes ``b`` is broadcast along; then back through the
    batch-free chain that built ``b`` from the parameters (one ``vjp``, its pull-back mapped over
    the samples). None where it does not apply, and the generic replay serves."""
    at_argument = _AT_ARGUMENT.get(rec.func)
    grad_of = at_argument or _CLOSED_FORM.get(rec.func)
    if grad_of is None or len(grads) != 1:
        return None
    G = rec.samples(grads[0], i, j)
    result: dict[str, torch.Tensor] = {}
    for k, build in rec.param_slots.items():
        b = rec.leaves[k]
        g = grad_of(rec, k, G, i, j)   # [samples, (fold,) *the shape b is broadcast to]
        if g is None:
            return None
        kept = rec.spread.get(k)
        bshape = (kept, *b.shape[1:]) if kept else tuple(b.shape)  # what ``build`` gives
        if at_argument is None:
            rows = g.dim() - (1 if rec.fold > 1 else 0)
            shape = (1,) * (rows - len(bshape)) + bshape
            if len(shape) != rows or shape[0] != 1:
                return None  # the argument is wider than the output, or spans the batch axis
            if rec.fold > 1:  # the rows of a sample: one more axis the argument is broadcast along
                shape = (1, *shape)
            axes = [d for d in range(1, len(shape)) if shape[d] == 1 and g.shape[d] != 1]
            g = g.sum(axes, keepdim=True) if axes else g
        g = g.reshape(G.shape[0], *bshape).to(b.dtype)
        if isinstance(build, ParamLeaf):
            got = {build.name: g}
        else:
            # this argument's own parameters: a selection reads one (the class token of a
            # concatenation with a distillation token is its own selection, not one of both)
            srcs = {name: values[name] for name in rec.slot_sources.get(k, rec.sources)}
            # the argument as the pass computed it (the rows of a spread one ``build`` gives)
            selected = _selection(build, srcs, rec.leaves[k][:kept] if kept else rec.leaves[k])
            if selected is not None:
                name, where = selected
                p = srcs[name]
                flat = g.new_zeros(g.shape[0], p.numel() + 1)   # the last column takes the constants'
                flat.index_add_(1, where, g.reshape(g.shape[0], -1))
                got = {name: flat[:, :-1].reshape(g.shape[0], *p.shape)}
            else:
                _, pull = vjp(build, srcs)
                got = vmap(pull)(g)[0]
        for name, t in got.items():
            result[name] = t if name not in result else result[name] + t
    return result


# Backward nodes of operations whose every output element is one element of one input, as it is
# (views, expansions, copies, gathers, concatenations, where / masked_fill): a chain of them has a
# pull-back that adds each output gradient element into the parameter element it came from, if any.
_SELECTING = frozenset({
    "AliasBackward0", "AsStridedBackward0", "CatBackward0", "CloneBackward0", "DiagonalBackward0",
    "ExpandBackward0", "FlipBackward0", "GatherBackward0", "IndexBackward0", "IndexSelectBackward0",
    "MaskedFillBackward0", "NarrowBackward0", "PermuteBackward0", "RepeatBackward0", "RollBackward0",
    "SelectBackward0", "SliceBackward0", "SplitBackward0", "SplitWithSizesBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3", "StackBackward0", "TBackward0",
    "TransposeBackward0", "UnbindBackward0", "UnfoldBackward0", "UnsafeViewBackward0",
    "UnsqueezeBackward0", "ViewBackward0", "WhereBackward0"})
_NO_PADDING = (-1, 2**64 - 1)   # how an embedding's backward node stores padding_idx=None


def _selects_from(node, leaf: torch.Tensor) -> bool:
    """Whether the graph from ``node`` down to ``leaf`` is made of selecting operations only (an
    embedding without a padding row or frequency scaling is one), whose inputs are ``leaf``,
    another such operation or a constant (no gradient: a mask's fill value)."""
    todo, seen = [node], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        name = type(fn).__name__
        if name == "AccumulateGrad":
            if fn.variable is not leaf:
                return False
            continue
        if name == "EmbeddingBackward0":
            if fn._saved_padding_idx not in _NO_PADDING or fn._saved_scale_grad_by_freq:
                return False
        elif name not in _SELECTING:
            return False
        todo.extend(nxt for nxt, _ in fn.next_functions)
    return True


def _selection(build, srcs: dict, actual: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """``(name, where)`` when ``build`` only selects elements of the one parameter ``name`` or
    constants (``cls.expand(n, -1, -1)`` rebuilt with one row, ``table[index].permute(2, 0, 1)``,
    an embedding of fixed positions, a causal mask's fill): ``where[e]`` is the flat position in
    the parameter of the rebuilt argument's element ``e``, or the parameter's size for a constant.
    It is read by rebuilding the argument from the positions themselves (with gradients, whose
    graph says whether the chain only selects), and from the positions shifted by a constant,
    which moves the parameter's elements and no constant. Each sample's pull-back is then one
    ``index_add`` for every sample at once. None otherwise (a chain with arithmetic, a parameter
    too large for its positions to be exact in its dtype). ``actual``: the argument as the pass
    computed it, which the selection must reproduce from the parameter's values."""
    if len(srcs) != 1:
        return None
    (name, p), = srcs.items()
    size = p.numel()
    exact_up_to = {torch.float32: 2**24, torch.float64: 2**53}.get(p.dtype, 0)
    if 2 * size + 1 >= exact_up_to:
        return None

    def positions(shift: int = 0) -> torch.Tensor:
        return torch.arange(shift, shift + size, dtype=p.dtype, device=p.device).view(p.shape)

    if _by_position(build):
        # known to select by position: the positions rebuilt say which, and where constants are
        # filled in, the positions shifted by a constant say where (a constant does not move)
        with torch.no_grad():
            at = build({name: positions()}).reshape(-1)
            if not _with_fills(build):
                return name, at.long()
            moved = build({name: positions(size + 1)}).reshape(-1) - at == size + 1
            return name, torch.where(moved, at, size).long()
    leaf = positions().requires_grad_()
    with torch.enable_grad():
        b = build({name: leaf})
    if b is leaf:  # the parameter itself
        same = actual.shape == p.shape and torch.equal(actual.detach(), p.detach())
        return (name, torch.arange(size, device=p.device)) if same else None
    if not isinstance(b, torch.Tensor) or b.grad_fn is None or not _selects_from(b.grad_fn, leaf):
        return None
    with torch.no_grad():
        at = b.detach().reshape(-1)
        shifted = build({name: positions(size + 1)}).reshape(-1)
        got = actual.detach().reshape(-1)
        if not (at.shape == shifted.shape == got.shape):
            return None  # which elements it takes depends on their values (p[p > 0])
        moved = shifted - at == size + 1
        where = torch.where(moved, at, size).long()
        # the values themselves: the parameter's where it was selected, the constants elsewhere
        # (an embedding's max_norm renormalises the parameter in place: not a selection)
        if not torch.equal(got[moved], p.reshape(-1)[where[moved]]) or not torch.equal(got[~moved], at[~moved]):
            return None
    return name, where


_TWO_ARGS_SPEC = tree_flatten(((torch.zeros(()), torch.zeros(())), {}))[1]
_THREE_ARGS_SPEC = tree_flatten(((torch.zeros(()), torch.zeros(()), torch.zeros(())), {}))[1]


def op_blocks(rec: Recorded, values: dict[str, torch.Tensor], grads: list, i: int, j: int) -> dict:
    """Per-sample gradients ``{name: [j - i, *shape]}`` of the parameters an operation used
    (``values``: name -> the parameter tensor the model saw). Each slot of ``rec.param_slots``
    rebuilds its argument from the parameters: the parameter itself, or a chain of operations
    without a batch axis applied to it (``pos[:T]``, ``scale * 2``)."""
    got = _closed_form_blocks(rec, values, grads, i, j)
    if got is not None:
        return got

    def call(p, args, kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        for k, build in rec.param_slots.items():
            leaves[k] = build(p)
        a, kw = tree_unflatten(leaves, spec)
        return rec.func(*a, **kw)

    return _per_sample_vjp(call, {n: v.detach() for n, v in values.items()}, rec, grads, i, j)
