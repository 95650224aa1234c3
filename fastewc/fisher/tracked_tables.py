"""Tables a tracked model calls without the batch, followed until they meet it.

A table's output (T5's relative position bias on ``[T, S]`` buckets, BART's decoder positions on
``arange(T)``) holds no samples, so the gradient that reaches it in the backward is already summed
over them. Each sample's share exists only after the place where the table meets the batch:
``position_bias + mask`` (T5), ``embeds + positions`` (BART), ``bias.expand(N, ...)`` (MPNet).
The tracker hands the model the table's output as a :class:`Watched` tensor: every operation on it
that involves no tensor with the batch on dim 0 (``permute``, ``unsqueeze``, slicing, a cast)
hands on another watched result; the first that does is recorded where it is a broadcast (an
addition or subtraction with a batched tensor, ``where`` with a batched condition, ``expand`` to
the batch, or the additive mask of ``scaled_dot_product_attention``, passed in expanded to the
batch), and the gradient of its result gives each sample's gradient of the watched operand by
summing that sample's slice over the broadcast axes (:func:`sample_cotangent`). Any other
operation meeting the batch is refused by name, as is a table meeting it twice in one forward
(its samples' gradients would have to be added before squaring) or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

T = torch.Tensor
# operation -> the sign of the watched operand in its result, by position (0: self / input, 1: other)
_ADDS = {torch.add: (1, 1), T.add: (1, 1), T.add_: (1, 1), T.__add__: (1, 1), T.__radd__: (1, 1),
         T.__iadd__: (1, 1), torch.sub: (1, -1), T.sub: (1, -1), T.sub_: (1, -1), T.__sub__: (1, -1),
         T.__isub__: (1, -1), T.__rsub__: (-1, 1)}
_EXPANDS = (T.expand, T.expand_as)


@dataclass
class Table:
    """A watched table: the site it comes from, the batch size, and what to call where it meets
    the batch (``meet(table, operand, result, share)``, ``share(G)`` the operand's gradient before
    the broadcast is summed away, from the result's gradient ``G``) and where it meets it in a way
    the tracker does not follow (``refuse(table, message)``: the exception to raise, naming the
    table's parameters). ``keys``: the sites whose parameters it was computed with (a table fed
    through further layers: SwinV2's position-bias MLP); ``met``: whether it has met the batch in
    this forward."""

    name: str
    n: int
    meet: Callable
    refuse: Callable
    keys: list = field(default_factory=list)
    met: bool = False


class Watched(torch.Tensor):
    """A table's output (or a result computed from it alone) in the tracked forward."""

    _table: Table

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_flatten((args, kwargs))[0]
        mine = [x for x in leaves if isinstance(x, Watched)]
        if func is F.scaled_dot_product_attention and len(mine) == 1 and kwargs.get("attn_mask") is mine[0]:
            return _attention_with_bias(args, kwargs, mine[0])
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if not mine:
            return out
        table = mine[0]._table
        batched = [x for x in leaves if isinstance(x, torch.Tensor) and not isinstance(x, Watched)
                   and x.dim() > 0 and x.shape[0] == table.n]
        if func in _EXPANDS and isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] == table.n \
                and not batched and mine[0].dim() == out.dim() and mine[0].shape[0] == 1:
            table.meet(table, _plain(mine[0]), out, lambda G: G)
            return out
        if not batched:
            return tree_map(lambda t: watch(t, table) if isinstance(t, torch.Tensor) else t, out)
        share = _share(func, args, kwargs) if len(mine) == 1 else None
        if share is None or not isinstance(out, torch.Tensor) or out.shape[:1] != (table.n,) \
                or (mine[0].dim() >= out.dim() and mine[0].shape[0] != 1):
            raise table.refuse(table,
                f"FisherTracker: {table.name} is a table the model calls without the batch, and its output meets "
                f"the batch in {getattr(func, '__name__', func)}, where the tracker cannot take each sample's share "
                f"(it follows additions, subtractions, where and expand to the batch). Leave its parameters out "
                f"with params= (estimate_fisher covers them after training)")
        table.meet(table, _plain(mine[0]), out, share)
        return out


def _attention_with_bias(args, kwargs, bias):
    """``scaled_dot_product_attention`` with the watched table as its additive mask (T5's position
    bias): the mask goes in expanded to the batch, so that the gradient reaching it keeps each
    sample's share (the same values; the kernel sums a broadcast mask's gradient otherwise)."""
    table = bias._table
    query = args[0] if args else kwargs["query"]
    Z = _plain(bias)
    with torch._C.DisableTorchFunctionSubclass():
        if not (query.dim() == Z.dim() and query.shape[0] == table.n and Z.shape[0] == 1 and Z.is_floating_point()):
            raise table.refuse(table,
                f"FisherTracker: {table.name} is a table the model calls without the batch, and its output meets "
                f"the batch as the mask of scaled_dot_product_attention in a layout the tracker does not follow. "
                f"Leave its parameters out with params= (estimate_fisher covers them after training)")
        wide = Z.expand(table.n, *Z.shape[1:])
        table.meet(table, Z, wide, lambda G: G)
        return F.scaled_dot_product_attention(*args, **{**kwargs, "attn_mask": wide})


def _share(func, args, kwargs):
    """For an operation that broadcasts the one watched operand into its result, the function
    giving that operand's gradient, before the broadcast is summed away, from the result's ``G``;
    None for any other."""
    at = [k for k, a in enumerate(args) if isinstance(a, Watched)]
    if len(at) != 1:
        return None
    k = at[0]
    if func in _ADDS and k < 2 and kwargs.get("alpha", 1) == 1:
        sign = _ADDS[func][k]
        return (lambda G: G) if sign == 1 else (lambda G: -G)
    if func is torch.where and len(args) == 3 and k in (1, 2):      # where(cond, x, y)
        cond = args[0]
        return (lambda G: G * cond) if k == 1 else (lambda G: G * ~cond)
    if func is T.where and len(args) == 3 and k in (0, 2):          # x.where(cond, y)
        cond = args[1]
        return (lambda G: G * cond) if k == 0 else (lambda G: G * ~cond)
    return None


def _plain(t: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor)


def watch(t: torch.Tensor, table: Table) -> torch.Tensor:
    """``t`` as the model should get it: a :class:`Watched` alias of it (the same tensor in the
    autograd graph)."""
    with torch._C.DisableTorchFunctionSubclass():
        w = t.as_subclass(Watched)
    w._table = table
    return w


def table_of(values) -> Table | None:
    """The table of the first :class:`Watched` tensor among ``values``, or None."""
    for v in values:
        if isinstance(v, Watched):
            return v._table
    return None


def sample_cotangent(G: torch.Tensor, i: int, shape: torch.Size) -> torch.Tensor:
    """Sample ``i``'s share of the gradient of an operand of shape ``shape`` broadcast into a
    result whose gradient is ``G`` (the samples on dim 0): ``G[i:i+1]`` summed over the axes the
    operand broadcast along, in its shape (an operand of the result's rank has 1 on dim 0:
    :class:`Watched` refuses others)."""
    g = G[i:i + 1]
    lead = g.dim() - len(shape)
    dims = list(range(lead)) + [lead + k for k, s in enumerate(shape) if s == 1 and g.shape[lead + k] != 1]
    return g.sum(dims, keepdim=True).reshape(shape) if dims else g.reshape(shape)
