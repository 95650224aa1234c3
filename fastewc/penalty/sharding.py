"""Sharded parameters (FSDP2 ``fully_shard``, DTensor): what the regularizer needs to know of them.

Under FSDP2 every parameter is a ``DTensor`` whose rank-local piece (``to_local()``) is a slice of
the full tensor. The regularizer keeps its importance and anchor buffers for exactly that slice,
so a rank stores ``1/world`` of the state, and computes the penalty and its gradient on local
data only: the gradient ``lambda A (theta - m)`` is elementwise, so each rank's piece of it needs
nothing from the other ranks. Only the penalty *value* is summed over the ranks that hold
different pieces (one all-reduce of a scalar).

Everything here works from public DTensor API: ``distribute_tensor(..., src_data_rank=None)``
splits a full tensor locally (no communication) exactly as the parameter is split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from .._utils import is_sharded
from ..errors import ModelMismatchError

try:  # DTensor is in every torch this package supports, but keep import errors readable
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment]


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local piece of a DTensor (differentiable), or the tensor itself."""
    return t.to_local() if is_sharded(t) else t


@dataclass(frozen=True)
class ShardInfo:
    """Where a rank's piece of a parameter sits: enough to refuse a state saved by another rank
    or for another layout. JSON-serialisable through ``asdict``."""

    global_shape: tuple[int, ...]
    placements: tuple[str, ...]   # e.g. ("Shard(dim=0)",)
    mesh_shape: tuple[int, ...]
    coordinate: tuple[int, ...]   # this rank's coordinate in the mesh

    @classmethod
    def of(cls, p) -> "ShardInfo":
        mesh = p.device_mesh
        coord = mesh.get_coordinate()
        return cls(tuple(p.shape), tuple(repr(pl) for pl in p.placements), tuple(mesh.shape),
                   tuple(coord) if coord is not None else ())

    @classmethod
    def from_dict(cls, d: dict) -> "ShardInfo":
        return cls(tuple(int(x) for x in d["global_shape"]), tuple(str(x) for x in d["placements"]),
                   tuple(int(x) for x in d["mesh_shape"]), tuple(int(x) for x in d["coordinate"]))

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @property
    def keeps_constant(self) -> bool:
        """Whether this rank keeps a per-parameter scalar that must be counted once over the mesh:
        the rank at coordinate 0 along every sharded mesh dimension (replicas each keep it too,
        and replicated dimensions are not summed over)."""
        return all(c == 0 for c, pl in zip(self.coordinate, self.placements) if pl.startswith("Shard"))

    def describe(self) -> str:
        return (f"the piece at mesh coordinate {list(self.coordinate)} of a mesh of shape "
                f"{list(self.mesh_shape)}, placements {list(self.placements)}, global shape "
                f"{list(self.global_shape)}")


def full(t: torch.Tensor) -> torch.Tensor:
    """A full (unsharded) copy of a DTensor (all-gather: every rank must call it), or ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def local_piece(full_tensor: torch.Tensor, like) -> torch.Tensor:
    """This rank's piece of ``full_tensor`` laid out as DTensor ``like`` is: split locally, no
    communication (``src_data_rank=None``). ``full_tensor`` must have ``like``'s global shape."""
    d = distribute_tensor(full_tensor.detach(), like.device_mesh, like.placements, src_data_rank=None)
    return d.to_local()


def reduce_groups(named_params: dict[str, torch.Tensor]) -> list | None:
    """The process groups to sum the penalty value over for these protected parameters.

    ``None`` when no parameter is sharded (nothing to sum: plain and DDP-replicated models).
    Otherwise one group per mesh dimension along which the parameters are sharded; all
    parameters must be DTensors on one mesh, sharded along the same mesh dimensions, so that the
    sum of the local values over those groups counts every element exactly once.
    """
    sharded = {n: p for n, p in named_params.items() if is_sharded(p)}
    if not sharded:
        return None
    plain = [n for n in named_params if n not in sharded]
    if plain:
        raise ModelMismatchError(
            f"the protected parameters mix sharded (DTensor) ones, e.g. {next(iter(sharded))!r}, with plain "
            f"tensors, e.g. {plain[0]!r}; shard the whole model (fully_shard on the root module too) or "
            f"exclude the plain ones with include=/exclude=")
    first_name, first = next(iter(sharded.items()))
    mesh = first.device_mesh
    dims = _shard_dims(first)
    for n, p in sharded.items():
        if p.device_mesh != mesh or _shard_dims(p) != dims:
            raise ModelMismatchError(
                f"sharded parameters {first_name!r} ({list(first.placements)} on mesh {tuple(mesh.shape)}) and "
                f"{n!r} ({list(p.placements)} on mesh {tuple(p.device_mesh.shape)}) are split over different "
                f"mesh dimensions; fastewc sums the penalty over one set of mesh dimensions for all of them")
    if not dist.is_initialized():
        raise ModelMismatchError("the model has sharded (DTensor) parameters but torch.distributed is not initialised")
    if mesh.ndim == 1:
        return [mesh.get_group()] if dims else []
    return [mesh.get_group(d) for d in dims]


def _shard_dims(p) -> tuple[int, ...]:
    return tuple(i for i, pl in enumerate(p.placements) if isinstance(pl, Shard))


def all_reduce_value(value: torch.Tensor, groups: list) -> torch.Tensor:
    """``value`` summed over ``groups``, with the gradient of the local ``value``.

    Each rank's parameters only touch its own local sum, so the gradient must not be summed over
    ranks (that would multiply it by the number of shards): ``local + (total - local).detach()``.
    """
    total = value.detach().clone()
    for g in groups:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=g)
    if not value.requires_grad:
        return total
    return value + (total - value.detach())


# -- what the regularizer does with sharded parameters ------------------------------------------
# Registration takes full tensors and stores the rank's piece; binding checks that each stored
# piece is the piece this process holds, and splits names stored in full whose parameter is now
# sharded. Both use these functions, so the rules live in one place.

def split_task(fisher: dict, anchors: dict, kept: list[str], model_params: dict | None,
               stored: dict[str, ShardInfo]) -> tuple[dict, dict, dict[str, ShardInfo]]:
    """This rank's pieces of one task's full tensors, for the sharded parameters among ``kept``.

    Args:
        fisher, anchors: ``{name: full tensor}`` (validated, the parameters' global shapes).
        kept: the names the task protects.
        model_params: ``{name: parameter}`` of the model, or None when no model is known.
        stored: ``{name: ShardInfo}`` of the names already stored as pieces.

    Returns new ``fisher`` and ``anchors`` dicts (the caller's are never written) with the
    pieces in place of the full tensors, and the ``{name: ShardInfo}`` after this task. Raises
    ``ModelMismatchError`` when a name is stored as a piece but the parameter is no longer
    sharded the same way (or no model is given to split like).
    """
    sharded = {n: model_params[n] for n in kept if model_params is not None and is_sharded(model_params[n])}
    stale = [n for n in kept if n in stored and n not in sharded]
    if stale:
        where = ("pass model= so that the full tensors can be split like its parameters" if model_params is None
                 else "the model's parameter is a plain tensor now")
        names = ", ".join(repr(n) for n in stale[:8])
        raise ModelMismatchError(
            f"{names} stored as one rank's piece of a sharded parameter ({stored[stale[0]].describe()}): {where}")
    sharding = dict(stored)
    fisher, anchors = dict(fisher), dict(anchors)
    for n, p in sharded.items():
        info = ShardInfo.of(p)
        if n in sharding and sharding[n] != info:
            raise ModelMismatchError(f"{n!r} is stored as {sharding[n].describe()}, but this process holds "
                                     f"{info.describe()}")
        sharding[n] = info
        fisher[n] = local_piece(fisher[n], p)
        anchors[n] = local_piece(anchors[n], p)
    return fisher, anchors, sharding


def stored_full_but_sharded(names, model_params: dict | None, stored: dict[str, ShardInfo]) -> bool:
    """Whether a stored name is held in full while the model's parameter is sharded (the store
    must then be split like the model before more pieces are merged into it)."""
    return model_params is not None and any(
        n in model_params and is_sharded(model_params[n]) and n not in stored for n in names)


def check_piece(name: str, p, stored: ShardInfo | None, shape: torch.Size) -> tuple[str | None, ShardInfo | None]:
    """Compare a stored name with the model's parameter ``p``.

    ``stored``: the name's ShardInfo when it is stored as a piece, else None; ``shape``: the
    stored shape. Returns ``(problem, split)``: ``problem`` a sentence when they do not fit (or
    None), ``split`` the parameter's ShardInfo when the name is stored in full and must be split
    like ``p`` (or None).
    """
    if is_sharded(p):
        info = ShardInfo.of(p)
        if stored is None:
            if p.shape != shape:
                return f"{name!r} has shape {tuple(p.shape)}, registered with {tuple(shape)}", None
            return None, info
        if stored != info:
            return (f"{name!r} is stored as {stored.describe()}, but this process holds {info.describe()}: "
                    f"load the state that this rank saved, or register the full tensors in a fresh "
                    f"regularizer with register_task(..., model=model)"), None
        if local(p).shape != shape:
            return f"{name!r} has local shape {tuple(local(p).shape)}, stored with {tuple(shape)}", None
        return None, None
    if stored is not None:
        return (f"{name!r} is stored as {stored.describe()} of a sharded model, but the model's parameter is "
                f"a plain tensor: load the state into the sharded model (fully_shard first) on the rank that "
                f"saved it, or register the full tensors in a fresh regularizer"), None
    if p.shape != shape:
        return f"{name!r} has shape {tuple(p.shape)}, registered with {tuple(shape)}", None
    return None, None
