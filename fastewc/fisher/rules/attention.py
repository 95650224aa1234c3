"""``nn.MultiheadAttention`` without a per-sample replay of attention.

The generic module-local rule replays the whole attention once per sample under ``vmap``. Its
parameters, though, are only used by four linear maps: the q/k/v projections (rows of
``in_proj_weight``) and ``out_proj``; each sample's parameter gradients are ``G_n^T X_n`` as for
any Linear, given the gradients ``G`` of the projections' outputs. During the batched pass the
module runs through :class:`RecordingAttention` (the same maths in the open), so the one backward
gives those gradients; where that cannot run, one batched replay of the module with the
projections as autograd leaves (:func:`mha_blocks`) gives them for all samples at once. For
self-attention (one input) the three projections are one Linear map of width 3E. When the
parameters have no other use, their sums of squares are formed like a Linear layer's over a
sequence (:func:`~fastewc.fisher.rules.linear.sq_sum_linear`), without ``[n, 3E, E]`` blocks;
a call that does not ask for the attention weights runs the fused
``scaled_dot_product_attention``, as the module itself would.

Covers the configuration most models use (``batch_first=True``, equal q/k/v widths, no
``bias_k``/``bias_v``, no ``add_zero_attn``, in eval mode or without dropout,
``key_padding_mask`` and a 2-D ``attn_mask`` boolean or additive, ``is_causal``, the averaged
attention weights unused by the loss); anything else returns None and the generic module-local rule takes the module. The
probe checks the result against the per-sample loop like any rule.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .linear import sq_sum_linear
from .local import Recorded

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _recordable(m: nn.MultiheadAttention) -> bool:
    return (type(m) is nn.MultiheadAttention and m._qkv_same_embed_dim and m.bias_k is None
            and not m.add_zero_attn and m.in_proj_weight is not None)


def _covered(m: nn.MultiheadAttention) -> bool:
    # in training mode only without dropout: the same maths then, and no mask to draw again
    return _recordable(m) and (not m.training or m.dropout == 0.0)


def _applies(m: nn.MultiheadAttention) -> bool:
    """Covered, with the samples on axis 0 of its inputs as the module itself takes them."""
    return _covered(m) and m.batch_first


class _SamplesFirst:
    """First positional leaf of a call of a sequence-first module (``batch_first=False``) recorded
    with its samples moved to axis 0 (:func:`mha_record`); no module's forward takes it, so only
    :func:`_replay` can replay such a record."""


def mha_record(m: nn.MultiheadAttention, args, kwargs, output, n: int):
    """``(record, to_module)`` of a call with every per-sample tensor samples-first, and which
    leaves those are (query, key, value, key padding mask: never a ``[T, S]`` attention mask that
    happens to have N rows); None for a call not covered (the generic record takes it). A
    sequence-first module's (``batch_first=False``, ``[T, N, E]`` inputs) tensors are moved to
    samples-first: the layout comes from the module's flag, never from a size."""
    if not _recordable(m):
        return None
    try:
        bound = _SIGNATURE.bind(m, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = dict(bound.arguments)
    q, k, v = a.pop("query"), a.pop("key"), a.pop("value")
    a.pop("self")
    attn_mask, kpm = a["attn_mask"], a["key_padding_mask"]
    axis = 0 if m.batch_first else 1
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[axis] == n for t in (q, k, v)):
        return None
    if (attn_mask is not None and attn_mask.dim() != 2) or (kpm is not None and kpm.shape[0] != n):
        return None
    if not isinstance(output, tuple) or len(output) != 2 or not isinstance(output[0], torch.Tensor):
        return None
    first = {id(t): t if m.batch_first else t.movedim(1, 0) for t in (q, k, v)}   # self-attention: one tensor
    marker = () if m.batch_first else (_SamplesFirst(),)
    leaves, spec = tree_flatten(((*marker, first[id(q)], first[id(k)], first[id(v)]), a))
    per_sample = sorted({k for k, t in enumerate(leaves) if any(t is x for x in (*first.values(), kpm))
                         and isinstance(t, torch.Tensor)})
    out, weights = output
    outputs, out_index = [out if m.batch_first else out.movedim(1, 0)], [0]
    if isinstance(weights, torch.Tensor) and weights.is_floating_point():
        outputs.append(weights)   # [N, T, S] or [N, H, T, S]: samples first in either layout
        out_index.append(1)

    def to_module(slot: int, t: torch.Tensor) -> torch.Tensor:
        return t.movedim(0, 1) if slot == 0 else t

    return Recorded(leaves, spec, outputs, out_index, n, per_sample=per_sample), (None if m.batch_first else to_module)


def _replay(m: nn.MultiheadAttention, rec, grads: list, i: int, j: int):
    """``(inputs, C, G, gP)`` of samples ``i..j`` from one batched replay of the recorded call:
    the projections' inputs, the attention's combined heads ``C``, the output gradient and the
    projections' output gradients; None when this configuration is not covered."""
    leaves = list(rec.leaves)
    for k in rec.batched:
        leaves[k] = leaves[k][i:j]
    args, kwargs = tree_unflatten(leaves, rec.spec)
    samples_first = bool(args) and isinstance(args[0], _SamplesFirst)
    if not (_covered(m) and (m.batch_first or samples_first)):
        return None
    try:
        bound = _SIGNATURE.bind(m, *args[samples_first:], **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = bound.arguments
    q, k, v = a["query"], a["key"], a["value"]
    attn_mask, kpm = a["attn_mask"], a["key_padding_mask"]
    if q.dim() != 3 or (attn_mask is not None and attn_mask.dim() != 2):
        return None
    G = grads[0][i:j]
    # the gradient of the attention weights, where the loss uses them (one host sync)
    Gw = grads[1][i:j] if len(grads) > 1 and bool(grads[1][i:j].abs().sum() > 0) else None
    with torch.enable_grad():
        inputs = _inputs(q, k, v)
        P, (Qh, Kh, Vh) = _project(m, inputs, leaves=True)
        mask = _mask(q.shape[0], q.shape[1], k.shape[1], kpm, attn_mask, a["is_causal"], q.dtype, q.device)
        gC = G @ m.out_proj.weight.detach()  # out = C W^T + b
        if Gw is None:
            # the fused attention, as the module runs it when the weights are not asked for: one
            # forward and one backward, no [b, H, T, S] weights kept
            heads = torch.nn.functional.scaled_dot_product_attention(Qh, Kh, Vh, attn_mask=mask)
            C = heads.transpose(1, 2).reshape(Qh.shape[0], Qh.shape[2], -1)
            gP = torch.autograd.grad(C, P, gC)
        else:
            weights = _weights(Qh, Kh, mask)
            C = _combine(weights, Vh)
            shown = weights.mean(1) if a["average_attn_weights"] else weights
            gP = torch.autograd.grad([C, shown], P, [gC, Gw.to(shown.dtype)])
    # Under autocast (the replay runs as its forward ran) the projections' products are in half
    # precision and the recorded inputs in whatever dtype each came: the sums take one dtype.
    parts = [*inputs, C, G, *gP]
    dtype = _sums_dtype(parts)
    inputs, (C, G), gP = ([t.to(dtype) for t in ts] for ts in (inputs, (C.detach(), G), gP))
    return inputs, C, G, gP


def _sums_dtype(tensors: list) -> torch.dtype:
    """The dtype all of ``tensors`` promote to, float32 at least."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def mha_blocks(m: nn.MultiheadAttention, attrs: list[str], rec, grads: list, i: int, j: int) -> dict | None:
    """Per-sample gradients ``{attr: [j - i, *shape]}`` of the attention's parameters, or None
    when this configuration is not covered."""
    got = _replay(m, rec, grads, i, j)
    return None if got is None else _blocks_from(m, attrs, *got)


def mha_sq_sums(m: nn.MultiheadAttention, attrs: list[str], rec, grads: list) -> dict | None:
    """``{attr: sum over the samples of the squared per-sample gradient}`` of a recorded call
    whose parameters have no other use, without ``[n, 3E, E]`` blocks; None when this
    configuration is not covered."""
    got = _replay(m, rec, grads, 0, rec.n)
    if got is None:
        return None
    inputs, C, G, gP = got
    return _sq_sums_from(m, attrs, inputs, C, [G], [gP])


def _inputs(q, k, v) -> tuple:
    """The projections' distinct inputs: ``(q,)`` for self-attention, where the three
    projections are one Linear map of width 3E (``in_proj_weight`` as a whole), else ``(q, k, v)``."""
    return (q,) if q is k and k is v else (q, k, v)


def _project(m, inputs: tuple, leaves: bool):
    """The projections' outputs ``P`` (one ``[b, T, 3E]`` for one input, else q, k and v;
    autograd leaves when ``leaves``) and the q/k/v heads ``[b, H, T or S, d]``, as
    ``F.multi_head_attention_forward`` computes them."""
    b, H = inputs[0].shape[0], m.num_heads
    d = inputs[0].shape[-1] // H
    W = m.in_proj_weight.detach() if leaves else m.in_proj_weight
    bias = m.in_proj_bias
    if bias is not None and leaves:
        bias = bias.detach()
    if len(inputs) == 1:
        P = [torch.nn.functional.linear(inputs[0], W, bias)]
    else:
        bs = bias.chunk(3) if bias is not None else (None, None, None)
        P = [torch.nn.functional.linear(x, w, c) for x, w, c in zip(inputs, W.chunk(3), bs)]
    if leaves:
        P = [t.detach().requires_grad_(True) for t in P]
    qkv = P[0].chunk(3, -1) if len(P) == 1 else P
    return P, [t.reshape(b, -1, H, d).transpose(1, 2) for t in qkv]


def _mask(b, T, S, kpm, attn_mask, is_causal, dtype, device) -> torch.Tensor | None:
    """The additive mask ``[b or 1, 1, T, S]`` of the key padding, attention and causal masks, or None."""
    mask = None
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=device).triu(1)
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype).view(1, 1, T, S)
    if kpm is not None:
        pad = _additive(kpm, dtype).view(b, 1, 1, S)
        mask = pad if mask is None else mask + pad
    return mask


def _weights(Qh, Kh, mask):
    scores = Qh @ Kh.transpose(-1, -2) / math.sqrt(Qh.shape[-1])
    return torch.softmax(scores if mask is None else scores + mask, -1)


def _combine(weights, Vh):
    b, H, T, d = weights.shape[0], weights.shape[1], weights.shape[2], Vh.shape[-1]
    return (weights @ Vh).transpose(1, 2).reshape(b, T, H * d)


def _out_proj(m, C, detach: bool = True):
    w, b = m.out_proj.weight, m.out_proj.bias
    if detach:
        w, b = w.detach(), None if b is None else b.detach()
    return torch.nn.functional.linear(C, w, b)


def _rows(parts: list, dim: int) -> torch.Tensor:
    """The rows of ``in_proj_*`` from each input's projection (no copy for the one of self-attention)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _blocks_from(m, attrs, inputs, C, G, gP) -> dict | None:
    """Per-sample blocks from the projections' inputs and output gradients (see :func:`_project`)."""
    result = {}
    if "in_proj_weight" in attrs:
        result["in_proj_weight"] = _rows([torch.bmm(g.transpose(1, 2), x) for g, x in zip(gP, inputs)], 1)
    if "in_proj_bias" in attrs and m.in_proj_bias is not None:
        result["in_proj_bias"] = _rows([g.sum(1) for g in gP], 1)
    if "out_proj.weight" in attrs:
        result["out_proj.weight"] = torch.bmm(G.transpose(1, 2), C)
    if "out_proj.bias" in attrs and m.out_proj.bias is not None:
        result["out_proj.bias"] = G.sum(1)
    if set(result) != set(attrs):
        return None
    return result


_SUMMED = {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}


def sq_sums_into(m, totals: dict, inputs, C, Gs, gPs, alpha: float = 1.0, picks=None, weights=None) -> bool:
    """Add ``alpha`` times the sums of squared per-sample gradients into ``totals`` (``{attr:
    running sum}``, in place) from the projections' inputs and, per column, the output gradient
    ``Gs[k]`` and the projections' output gradients ``gPs[k]``: the four projections are Linear
    maps, summed like Linear layers over a sequence (``picks``, ``weights``: as theirs), each
    input's projection into its rows of ``in_proj_*``. False, adding nothing, where ``totals``
    holds a parameter this does not cover."""
    if not set(totals) <= _SUMMED:
        return False
    w, b = totals.get("in_proj_weight"), totals.get("in_proj_bias")
    if w is not None or b is not None:
        start = 0
        for r, x in enumerate(inputs):
            rows = slice(start, start + gPs[0][r].shape[-1])
            into = {a: t[rows] for a, t in (("weight", w), ("bias", b)) if t is not None}
            sq_sum_linear(x, [g[r] for g in gPs], False, into=into, alpha=alpha, picks=picks, weights=weights)
            start = rows.stop
    into = {a: totals[k] for a, k in (("weight", "out_proj.weight"), ("bias", "out_proj.bias")) if k in totals}
    if into:
        sq_sum_linear(C, Gs, False, into=into, alpha=alpha, picks=picks, weights=weights)
    return True


def _sq_sums_from(m, attrs, inputs, C, Gs, gPs) -> dict | None:
    """``{attr: sum over samples and columns of the squared per-sample gradient}`` (see
    :func:`sq_sums_into`), or None where an attribute is not covered."""
    totals = {a: torch.zeros(m.get_parameter(a).shape, device=C.device,
                             dtype=(C if a.startswith("out_proj") else inputs[0]).dtype) for a in attrs}
    return totals if sq_sums_into(m, totals, inputs, C, Gs, gPs) else None


class RecordingAttention:
    """During the batched pass, ``nn.MultiheadAttention`` computed in the open (the same maths):
    its projections' outputs are then part of the batched graph and get their gradients from the
    one backward, so no replay is needed. A configuration it does not cover runs the module's own
    forward (and is replayed)."""

    def __init__(self, m: nn.MultiheadAttention):
        self.m = m
        self.calls: list = []

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        m = self.m
        if not _applies(m) or query.dim() != 3 or (attn_mask is not None and attn_mask.dim() != 2):
            self.calls.append(None)
            return type(m).forward(m, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        inputs = _inputs(query, key, value)
        P, (Qh, Kh, Vh) = _project(m, inputs, leaves=False)
        mask = _mask(query.shape[0], query.shape[1], key.shape[1], key_padding_mask, attn_mask, is_causal,
                     query.dtype, query.device)
        if need_weights:
            weights = _weights(Qh, Kh, mask)
            C = _combine(weights, Vh)
        else:  # the fused kernel the module itself would use: same maths, no weights kept
            heads = torch.nn.functional.scaled_dot_product_attention(Qh, Kh, Vh, attn_mask=mask)
            C = heads.transpose(1, 2).reshape(Qh.shape[0], Qh.shape[2], -1)
        out = _out_proj(m, C, detach=False)
        self.calls.append({"inputs": inputs, "C": C, "P": P})
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights

    def sq_sums(self, c: int, attrs: list[str], Gs: list, gPs: list) -> dict | None:
        """``{attr: sum over samples and columns of the squared per-sample gradient}`` without
        forming ``[n, 3E, E]`` blocks (:func:`_sq_sums_from`). ``Gs``: the output gradient per
        column; ``gPs``: the projections' output gradients per column. Only for parameters with
        no other use."""
        entry = self.calls[c]
        if entry is None:
            return None
        return _sq_sums_from(self.m, attrs, [x.detach() for x in entry["inputs"]], entry["C"].detach(), Gs, gPs)

    def blocks(self, c: int, attrs: list[str], G, gP, i: int, j: int) -> dict | None:
        entry = self.calls[c]
        if entry is None:
            return None
        inputs = [x[i:j].detach() for x in entry["inputs"]]
        return _blocks_from(self.m, attrs, inputs, entry["C"][i:j].detach(), G[i:j], [g[i:j] for g in gP])


# -- a tracked training step: the projections read from the step's own autograd graph ------------
# The tracker cannot change how the module computes (the training step must stay bit for bit the
# same), so it cannot run it in the open as RecordingAttention does. Its backward still computes
# the projections' output gradients, inside the nodes of F.multi_head_attention_forward's matmuls
# by the weights: a prehook on each in-projection's node receives its output gradient, and the
# out-projection's node holds its input C as a saved tensor. Self-attention projects with all of
# in_proj_weight at once; otherwise the weight's rows are split (query, and key and value
# together when they are one tensor, else each) and the split's output index says which rows a
# matmul uses. The matmuls take sequence-first rows (t, n): the functional's inputs are [L, N, E]
# and its output is the out-projection's rows viewed as [T, N, E]. A graph of another shape
# (another backend's nodes, a compiled module) is not read: the replay serves.
_PASS = ("TBackward0", "ToCopyBackward0")                 # a weight transposed or cast
_SPLITS = ("SplitBackward0", "SplitWithSizesBackward0")  # its rows taken apart
_MATMULS = {"AddmmBackward0": (2, "_saved_mat1"),        # node -> (operand of the weight, saved input)
            "MmBackward0": (1, "_saved_self")}
_SEARCHED = 256                                          # nodes of one call's graph looked at, at most


def _part_of(edge, w: torch.Tensor) -> int | None:
    """The part of ``w`` that autograd edge ``(node, input number)`` leads to through transposes,
    casts and at most one split: the split's output index (0 without one), or None where the
    edge leads elsewhere."""
    fn, nr = edge
    part, split = 0, False
    while fn is not None:
        if fn.name() in _SPLITS:
            if split:
                return None
            part, split = nr, True
        elif hasattr(fn, "variable"):
            return part if fn.variable is w else None
        elif fn.name() not in _PASS:
            return None
        if len(fn.next_functions) != 1:
            return None
        fn, nr = fn.next_functions[0]
    return None


def _matmuls_by(nodes: list, w: torch.Tensor) -> list:
    """``[(node, part)]``: the matmul nodes that multiply by ``w`` or a part of its rows."""
    found = []
    for fn in nodes:
        if fn.name() in _MATMULS:
            part = _part_of(fn.next_functions[_MATMULS[fn.name()][0]], w)
            if part is not None:
                found.append((fn, part))
    return found


@dataclass
class ObservedCall:
    """One call of a tracked step, samples first: per in-projection (one for self-attention), its
    input ``Xs[r]`` ``[N, L, E]`` and, once the backward has reached it, its output gradient
    ``gPs[r]`` ``[N, L, rows]``; and the out-projection's input ``C`` ``[N, T, E]``."""

    Xs: list
    widths: list
    C: torch.Tensor
    gPs: list = field(default_factory=list)

    @property
    def reached(self) -> bool:
        """Whether the backward reached every in-projection (gave each its output gradient)."""
        return all(g is not None for g in self.gPs)

    def take(self, r: int, grad_outputs) -> None:
        """Prehook of in-projection ``r``'s node: keep its output gradient, samples first."""
        g = grad_outputs[0]
        N, L = self.Xs[r].shape[:2]
        if g is not None and g.numel() == L * N * self.widths[r]:
            self.gPs[r] = g.detach().reshape(L, N, -1).transpose(0, 1)


def observe_projections(m: nn.Module, args, kwargs, output) -> ObservedCall | None:
    """The projections of one training call of ``nn.MultiheadAttention`` as its own backward
    will compute them, with both weights trained; None for a graph of another shape. The returned
    call's ``gPs`` are filled by prehooks on the in-projections' nodes, registered here: the nodes
    hold the hooks and the call, never the other way round (a cycle through autograd's nodes
    would keep the step's graph alive)."""
    if (type(m) is not nn.MultiheadAttention or not m._qkv_same_embed_dim or m.bias_k is not None
            or not (m.in_proj_weight.requires_grad and m.out_proj.weight.requires_grad)):
        return None
    try:
        bound = _SIGNATURE.bind(m, *args, **kwargs)
    except TypeError:
        return None
    q, k, v = (bound.arguments.get(a) for a in ("query", "key", "value"))
    out = output[0] if isinstance(output, tuple) and output else None
    if not (all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (q, k, v))
            and isinstance(out, torch.Tensor) and out.grad_fn is not None):
        return None
    E = m.embed_dim
    # the in-projections, as the functional splits in_proj_weight's rows between its inputs
    parts = [(q, 3 * E)] if q is k and k is v else [(q, E), (k, 2 * E)] if k is v else [(q, E), (k, E), (v, E)]
    Xs = [x if m.batch_first else x.transpose(0, 1) for x, _ in parts]
    N, T = Xs[0].shape[:2]
    stops = {t.grad_fn for t in (q, k, v)}
    seen, frontier, nodes = set(), [out.grad_fn], []
    while frontier and len(nodes) < _SEARCHED:
        fn = frontier.pop()
        if fn is None or fn in stops or fn in seen:
            continue
        seen.add(fn)
        nodes.append(fn)
        frontier.extend(nxt for nxt, _ in fn.next_functions)
    ins, outs = _matmuls_by(nodes, m.in_proj_weight), _matmuls_by(nodes, m.out_proj.weight)
    if sorted(r for _, r in ins) != list(range(len(parts))) or [r for _, r in outs] != [0]:
        return None
    C = getattr(outs[0][0], _MATMULS[outs[0][0].name()][1], None)
    if not isinstance(C, torch.Tensor) or C.shape != (T * N, E):
        return None
    call = ObservedCall([x.detach() for x in Xs], [w for _, w in parts], C.detach().view(T, N, E).transpose(0, 1),
                        [None] * len(parts))
    for fn, r in ins:
        fn.register_prehook(partial(call.take, r))
    return call
