"""The collapsed EWC state: importance ``A``, anchor ``m`` and a constant ``c`` per parameter name.

Plain tensors only: nothing here knows about models, autograd or backends, so every rule can be
tested on dicts of tensors. However many tasks are registered, the store keeps two flat buffers
per (device, parameter dtype) group, laid out by a :class:`~fastewc.penalty.packing.FlatPacking`,
plus one float64 constant per name:

* ``mode="separate"`` (per-task EWC). With the per-parameter scale ``s`` (layer lambdas,
  include/exclude), ``sum_t s F_t (theta - theta*_t)^2 = A (theta - m)^2 + c`` where
  ``A = s sum_t F_t``, ``m = sum_t F_t theta*_t / sum_t F_t`` and ``c = s sum_t F_t (theta*_t - m)^2``
  (docs/design.md derives it). Each task is merged in float64 with the pairwise form
  ``m' = m + F/(A+F) (theta* - m)``, ``c' = c + A F/(A+F) (m - theta*)^2``, which loses nothing to
  cancellation: value *and* gradient equal the per-task loop, at O(P) per step.
* ``mode="online"`` (Schwarz et al. 2018): ``A <- gamma A + s F_t``, ``m <- theta*_t``, ``c = 0``;
  a name absent from a task keeps its anchor and its ``A`` decays by ``gamma``.

Storage dtype: ``None`` follows each parameter's dtype (float32 and float64 parameters get
buffers of their own dtype; 16-bit parameters get float32 buffers, because a Fisher diagonal's
small values underflow or lose most digits in 16 bits); an explicit dtype is used for every group.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ..errors import EWCInputError
from .packing import FlatPacking
from .sharding import ShardInfo
from .validation import STORAGE_DTYPES, _names, check_choice, check_gamma, check_storage_dtype, check_task, MODES

__all__ = ["PenaltyStore", "buffer_dtype", "dtype_name", "parse_dtype"]

# float64 elements per merge chunk: the temporaries of one chunk (512 KB each) stay in cache, and
# registration never holds a float64 copy of a whole parameter.
REGISTER_CHUNK = 1 << 16

Spec = tuple  # (shape, dtype, device) of a parameter, or of its local piece when sharded


def buffer_dtype(storage_dtype: torch.dtype | None, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the buffers that hold a ``param_dtype`` group (see the module docstring)."""
    if storage_dtype is not None:
        return storage_dtype
    return param_dtype if param_dtype in (torch.float32, torch.float64) else torch.float32


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def parse_dtype(name, what: str = "dtype") -> torch.dtype:
    dt = getattr(torch, str(name).removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise EWCInputError(f"unknown {what} {name!r} in EWCRegularizer state")
    return dt


class PenaltyStore:
    """``A``, ``m`` and ``c`` for a set of names, and how tasks merge into them.

    Args:
        mode: ``"separate"`` or ``"online"``.
        gamma: online decay in [0, 1] (1.0 for ``"separate"``).
        storage_dtype: buffer dtype, or None to follow each parameter's dtype.
        packing: the layout of the buffers (None: nothing stored yet).
        importance, anchor: one flat buffer per packing group, of ``buffer_dtype(storage_dtype,
            group dtype)``, on the group's device; shape ``[group.numel]``.
        constant: ``{name: c}`` (float64 Python floats; names absent count 0).
        param_dtypes: ``{name: dtype}`` each parameter had when it was registered; the binding
            refuses a model whose parameter has another dtype.
        sharding: ``{name: ShardInfo}`` for names stored as one rank's piece of a sharded tensor.
        tasks_seen: number of ``merge`` calls so far.

    A store is never half built: every field is given to the constructor, and ``merge`` /
    ``relaid`` return a new store (sharing unchanged buffers).
    """

    def __init__(self, mode: str = "separate", gamma: float = 1.0, storage_dtype: torch.dtype | None = None, *,
                 packing: FlatPacking | None = None, importance=(), anchor=(), constant: Mapping | None = None,
                 param_dtypes: Mapping | None = None, sharding: Mapping | None = None, tasks_seen: int = 0):
        self.mode = check_choice(mode, MODES, "mode")
        self.gamma = check_gamma(gamma)
        if self.mode == "separate" and self.gamma != 1.0:
            raise EWCInputError(f"gamma={gamma!r} only applies to mode='online'; mode='separate' keeps every task")
        self.storage_dtype = None if storage_dtype is None else check_storage_dtype(storage_dtype)
        self.packing = packing
        self.importance: list[torch.Tensor] = list(importance)
        self.anchor: list[torch.Tensor] = list(anchor)
        n_groups = len(packing.groups) if packing is not None else 0
        if len(self.importance) != n_groups or len(self.anchor) != n_groups:
            raise ValueError(f"expected {n_groups} importance and anchor buffers, got "
                             f"{len(self.importance)} and {len(self.anchor)}")
        self.constant: dict[str, float] = dict(constant or {})
        self.param_dtypes: dict[str, torch.dtype] = dict(param_dtypes or {})
        self.sharding: dict[str, ShardInfo] = dict(sharding or {})
        self.tasks_seen = int(tasks_seen)

    def replace(self, **changes) -> "PenaltyStore":
        """A new store with some fields changed (buffers not given are shared, not copied)."""
        fields = dict(mode=self.mode, gamma=self.gamma, storage_dtype=self.storage_dtype, packing=self.packing,
                      importance=self.importance, anchor=self.anchor, constant=self.constant,
                      param_dtypes=self.param_dtypes, sharding=self.sharding, tasks_seen=self.tasks_seen)
        fields.update(changes)
        mode, gamma, storage = fields.pop("mode"), fields.pop("gamma"), fields.pop("storage_dtype")
        return PenaltyStore(mode, gamma, storage, **fields)

    # -- reading -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return self.packing.names if self.packing is not None else []

    @property
    def numel(self) -> int:
        return self.packing.numel if self.packing is not None else 0

    def buffer_dtypes(self, packing: FlatPacking | None = None) -> list[torch.dtype]:
        """Per group of ``packing`` (default: this store's), the dtype of its buffers."""
        packing = packing if packing is not None else self.packing
        return [buffer_dtype(self.storage_dtype, g.dtype) for g in packing.groups] if packing is not None else []

    def known_shapes(self) -> dict[str, torch.Size]:
        """``{name: shape}`` registered so far (the global shape of a sharded parameter)."""
        if self.packing is None:
            return {}
        return {e.name: torch.Size(self.sharding[e.name].global_shape) if e.name in self.sharding else e.shape
                for e in self.packing.entries}

    def importance_views(self) -> dict[str, torch.Tensor]:
        """``{name: A}`` as views of the flat buffers, shaped like the parameter."""
        return self.packing.unpack(self.importance) if self.packing is not None else {}

    def anchor_views(self) -> dict[str, torch.Tensor]:
        """``{name: m}`` as views of the flat buffers, shaped like the parameter."""
        return self.packing.unpack(self.anchor) if self.packing is not None else {}

    # -- merging -------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, fisher: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor],
              scales: Mapping[str, float], specs: Mapping[str, Spec]) -> "PenaltyStore":
        """The store after one more task.

        Args:
            fisher, anchors: ``{name: tensor}`` for the names of ``scales``, validated by the
                caller (finite, Fisher >= 0, the stored shape); any floating dtype and device.
            scales: ``{name: s > 0}``, the names this task protects and their multipliers.
            specs: ``{name: (shape, dtype, device)}`` of the parameter for every name of
                ``scales``: where a new name's buffers go, and the dtype recorded for it.

        Names seen for the first time grow the layout (new buffers, old content copied). Names
        already stored are merged in place into the current buffers: copying them first would
        double the memory a registration needs; the inputs are validated before, so the merge
        itself cannot fail half way on bad input.
        """
        packing, importance, anchor = self.packing, self.importance, self.anchor
        new = [n for n in scales if packing is None or n not in packing]
        if new:
            entries = [(e.name, e.shape, e.dtype, e.device) for e in packing.entries] if packing is not None else []
            grown = FlatPacking(entries + [(n, *specs[n]) for n in new])
            # Every entry is written below (old ones copied, new ones folded in as a copy), so
            # only the alignment gaps need zeros.
            importance = grown.empty_with_zero_gaps(self.buffer_dtypes(grown))
            anchor = grown.empty_with_zero_gaps(self.buffer_dtypes(grown))
            if packing is not None:
                for e in packing.entries:
                    grown.view(importance, e.name).copy_(packing.view(self.importance, e.name))
                    grown.view(anchor, e.name).copy_(packing.view(self.anchor, e.name))
            packing = grown

        constant = dict(self.constant)
        for n, s in scales.items():
            dc = self._fold(packing.view(importance, n).view(-1), packing.view(anchor, n).view(-1),
                            fisher[n].reshape(-1), anchors[n].reshape(-1), s, first=n in new)
            constant[n] = constant.get(n, 0.0) + dc
        if self.mode == "online" and self.gamma != 1.0:
            for e in packing.entries:
                if e.name not in scales:  # absent from this task: its importance decays
                    packing.view(importance, e.name).mul_(self.gamma)
        param_dtypes = dict(self.param_dtypes)
        for n in scales:
            param_dtypes.setdefault(n, specs[n][1])
        return self.replace(packing=packing, importance=importance, anchor=anchor, constant=constant,
                            param_dtypes=param_dtypes, tasks_seen=self.tasks_seen + 1)

    def _fold(self, a: torch.Tensor, m: torch.Tensor, f: torch.Tensor, t: torch.Tensor, s: float,
              first: bool) -> float:
        """Merge one name's ``(F, theta*)`` into ``(A, m)`` in place, in float64 chunks; return ``dc``.

        ``a, m``: flat views of the buffers; ``f, t``: flat inputs (same length). ``first``: the
        name has no stored importance yet, so the merge is a copy.
        """
        if first:
            a.copy_(f.to(a.device) * s if s != 1.0 else f)
            m.copy_(t)
            return 0.0
        f64 = torch.float64
        dc = torch.zeros((), dtype=f64, device=a.device)
        for lo in range(0, a.numel(), REGISTER_CHUNK):
            hi = min(lo + REGISTER_CHUNK, a.numel())
            # copy=True: the in-place ops below must never write into the caller's tensors (or
            # into the buffers) when they already are float64 on this device.
            a0 = a[lo:hi].to(f64, copy=True)
            fc = f[lo:hi].to(device=a.device, dtype=f64, copy=True)
            if s != 1.0:
                fc.mul_(s)
            tc = t[lo:hi].to(device=a.device, dtype=f64, copy=True)
            if self.mode == "online":
                a[lo:hi].copy_(a0.mul_(self.gamma).add_(fc))
                m[lo:hi].copy_(tc)
                continue
            # m converted by a copy first: ops that mix float64 with the storage dtype take
            # torch's per-element casting loop.
            m0 = m[lo:hi].to(f64, copy=True)
            a1 = a0 + fc
            # Share of the new task; where A + F = 0 both are 0: take the new anchor, add nothing.
            w = torch.where(a1 > 0, fc.div_(a1), 1.0)
            tc.sub_(m0)  # theta* - m
            dc += torch.dot(a0.mul_(w), tc.square())  # A F / (A + F) (m - theta*)^2
            a[lo:hi].copy_(a1)
            m[lo:hi].copy_(m0.add_(w.mul_(tc)))  # m + w (theta* - m), rounded once into the storage dtype
        return float(dc)

    def folded(self, aliases: Mapping[str, str]) -> "PenaltyStore":
        """A new store in which each stored name of ``aliases`` (``{alias: kept name}``, two
        names of one tied parameter) is merged into the kept name's entry and removed: two
        quadratics of one tensor are one, merged as :meth:`merge` merges a task in separate mode.
        Not in online mode, where each task moves the anchor: two names registered apart are not
        two quadratics of the online penalty (the caller refuses them)."""
        if self.mode == "online":
            raise ValueError("folded: two stored names of one parameter have no online-mode merge")
        packing = FlatPacking((e.name, e.shape, e.dtype, e.device) for e in self.packing.entries if e.name not in aliases)
        dtypes = self.buffer_dtypes(packing)
        importance = packing.pack(self.importance_views(), dtypes)
        anchor = packing.pack(self.anchor_views(), dtypes)
        old_importance, old_anchor = self.importance_views(), self.anchor_views()
        constant = dict(self.constant)
        for alias, kept in aliases.items():
            dc = self._fold(packing.view(importance, kept).view(-1), packing.view(anchor, kept).view(-1),
                            old_importance[alias].reshape(-1), old_anchor[alias].reshape(-1), 1.0, first=False)
            constant[kept] = constant.get(kept, 0.0) + constant.pop(alias, 0.0) + dc
        return self.replace(packing=packing, importance=importance, anchor=anchor, constant=constant,
                            param_dtypes={n: d for n, d in self.param_dtypes.items() if n not in aliases})

    # -- layout --------------------------------------------------------------------------------
    def relaid(self, packing: FlatPacking, rename: Mapping[str, str], pieces: Mapping[str, object] | None = None,
               keeps_constant: Mapping[str, bool] | None = None,
               new_sharding: Mapping[str, ShardInfo] | None = None) -> "PenaltyStore":
        """The same state laid out as ``packing`` (new buffers; this store is left as it was).

        Args:
            packing: the new layout: every stored name, renamed by ``rename``, possibly with
                another shape (a sharded parameter's local piece), dtype or device.
            rename: ``{stored name: new name}`` for every stored name.
            pieces: ``{stored name: fn(full tensor) -> local piece}`` for names stored in full
                whose parameter is now sharded.
            keeps_constant: for those names, whether this rank keeps the name's constant (it
                is a sum over all elements, so exactly one rank along the sharded dims does).
            new_sharding: ``{stored name: ShardInfo}`` for those names.
        """
        pieces, keeps_constant, new_sharding = pieces or {}, keeps_constant or {}, new_sharding or {}

        def laid(buffers):
            return {rename[n]: pieces[n](t) if n in pieces else t for n, t in self.packing.unpack(buffers).items()}

        dtypes = self.buffer_dtypes(packing)
        constant = {rename[n]: (c if n not in pieces or keeps_constant.get(n, True) else 0.0)
                    for n, c in self.constant.items()}
        sharding = {rename.get(n, n): i for n, i in self.sharding.items()}
        sharding.update({rename[n]: i for n, i in new_sharding.items()})
        return self.replace(packing=packing, importance=packing.pack(laid(self.importance), dtypes),
                            anchor=packing.pack(laid(self.anchor), dtypes), constant=constant,
                            param_dtypes={rename.get(n, n): d for n, d in self.param_dtypes.items()},
                            sharding=sharding)

    # -- state ---------------------------------------------------------------------------------
    def to_state(self) -> dict:
        """The store as a dict of plain values and per-name tensors (views of the buffers)."""
        packing = self.packing
        return {
            "mode": self.mode, "gamma": self.gamma, "storage_dtype": dtype_name(self.storage_dtype),
            "tasks_seen": self.tasks_seen,
            "names": self.names,
            "dtypes": [dtype_name(e.dtype) for e in packing.entries] if packing is not None else [],
            "param_dtypes": {n: dtype_name(d) for n, d in self.param_dtypes.items()},
            "importance": self.importance_views(), "anchor": self.anchor_views(),
            "constant": dict(self.constant),
            "sharding": {n: i.to_dict() for n, i in self.sharding.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping) -> "PenaltyStore":
        """A store from ``to_state``'s dict (validated: raises ``EWCInputError`` naming the entry)."""
        storage = state["storage_dtype"]
        storage = None if storage is None else parse_dtype(storage, "storage_dtype")
        if storage is not None and storage not in STORAGE_DTYPES:
            raise EWCInputError(f"EWCRegularizer state: storage_dtype {storage} is not one of {STORAGE_DTYPES}")
        names = list(state["names"])
        imp, anc, constant = state["importance"], state["anchor"], state["constant"]
        if not all(isinstance(d, Mapping) for d in (imp, anc, constant, state["param_dtypes"])):
            raise EWCInputError("EWCRegularizer state: 'importance', 'anchor', 'constant' and 'param_dtypes' "
                                "must be dicts keyed by parameter name")
        if set(imp) != set(names) or set(anc) != set(names) or set(constant) - set(names):
            raise EWCInputError("EWCRegularizer state: importance/anchor/constant names do not match 'names'")
        packing = None
        importance = anchor = ()
        if names:
            check_task(imp, anc, {})
            dtypes = [parse_dtype(d) for d in state["dtypes"]]
            if len(dtypes) != len(names):
                raise EWCInputError(f"EWCRegularizer state: {len(dtypes)} dtypes for {len(names)} names")
            packing = FlatPacking((n, imp[n].shape, dt, imp[n].device) for n, dt in zip(names, dtypes))
            bufs = [buffer_dtype(storage, g.dtype) for g in packing.groups]
            importance, anchor = packing.pack(imp, bufs), packing.pack(anc, bufs)
        sharding = state.get("sharding", {})  # absent in states written before sharding support
        if not isinstance(sharding, Mapping) or set(sharding) - set(names):
            raise EWCInputError("EWCRegularizer state: 'sharding' must map stored names to their shard layout")
        try:
            sharding = {n: ShardInfo.from_dict(d) for n, d in sharding.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise EWCInputError(f"EWCRegularizer state: unreadable 'sharding' entry ({exc})") from None
        try:
            constant = {n: float(c) for n, c in constant.items()}
            tasks_seen = int(state["tasks_seen"])
        except (TypeError, ValueError) as exc:
            raise EWCInputError(f"EWCRegularizer state: unreadable constant or tasks_seen ({exc})") from None
        bad = [n for n, c in constant.items() if not math.isfinite(c)]
        if bad:
            raise EWCInputError(f"EWCRegularizer state: non-finite constant for {_names(bad)}")
        return cls(state["mode"], state["gamma"], storage, packing=packing, importance=importance, anchor=anchor,
                   constant=constant, param_dtypes={n: parse_dtype(d) for n, d in state["param_dtypes"].items()},
                   sharding=sharding, tasks_seen=tasks_seen)
