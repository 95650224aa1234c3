"""``EWCRegularizer``: a drop-in for the seed class, stored collapsed and run on fused backends.

Storage. However many tasks are registered, the regularizer keeps two flat buffers per
(device, dtype) group of parameters, ``A`` (importance) and ``m`` (anchor), plus one float64
constant per parameter:

* ``mode="separate"`` (the seed's per-task EWC). With per-parameter scale ``s`` (layer lambdas,
  include/exclude), ``sum_t s F_t (theta - theta*_t)^2 = A (theta - m)^2 + c`` where
  ``A = s sum_t F_t``, ``m = sum_t F_t theta*_t / sum_t F_t`` and ``c = s sum_t F_t (theta*_t - m)^2``
  (DESIGN.md). Each registration updates ``A, m, c`` in float64 with the pairwise-merge form
  ``m' = m + F/(A+F) (theta* - m)``, ``c' = c + A F/(A+F) (m - theta*)^2``, which loses nothing
  to cancellation; so the value *and* the gradient equal the per-task loop, at O(P) per step.
* ``mode="online"`` (Schwarz et al. 2018): ``A <- gamma A + s F_t``, ``m <- theta*_t``, ``c = 0``.

Binding. The buffers are laid out to match the model at the first ``forward``/``accumulate_grad_``
(moving them to the parameters' devices); every later call checks, in one pass over
``named_parameters()``, that no protected parameter was replaced, moved, reshaped, re-typed or
(un)frozen, and rebuilds the per-group plans only when one was.

Sharded models (FSDP2 ``fully_shard``, DTensor parameters; ``sharding.py``). Full Fisher and
anchor tensors are split like the parameters, locally, and only the rank's piece is stored; the
penalty and its gradient are computed on the local pieces and the value alone is all-reduced.
The state then holds the rank's pieces with their mesh coordinate, and is refused by a process
whose pieces differ.
"""

from __future__ import annotations

import math
import weakref
from typing import Mapping

import torch
import torch.nn as nn

from .backends import GroupPlan, select_backend
from .._utils import is_sharded, unwrap_model
from ..errors import EWCInputError, ModelMismatchError
from .packing import FlatPacking
from .selection import ParamSelection
from .sharding import ShardInfo, all_reduce_value, full, local, local_piece, reduce_groups
from .validation import (
    BACKENDS, MODES, _names, _prefix_hint, check_choice, check_gamma, check_lambda,
    check_storage_dtype, check_task,
)

__all__ = ["EWCRegularizer", "OnlineEWC"]

_REGISTER_CHUNK = 1 << 16  # float64 elements per merge chunk: 512 KB temporaries stay in L2
_STATE_VERSION = 1
_CONFIG_KEYS = ("ewc_lambda", "lambda_ewc", "mode", "gamma", "storage_dtype", "layer_lambdas",
                "include", "exclude", "backend")


class _Binding:
    """Per-model plans: which parameters are protected, their buffer views, their backends."""

    def __init__(self, model: nn.Module, key: list, plans: list[GroupPlan], backends: list,
                 constant: float, out_dtype: torch.dtype, out_device: torch.device, groups: list | None = None):
        self.model_ref = weakref.ref(model)
        self.groups = groups  # process groups to sum the value over (sharded models), else None
        self.key = key
        self.plans = plans
        self.backends = backends
        self.constant = constant
        self.out_dtype = out_dtype
        self.out_device = out_device

    def set_params(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Hand the live parameters (in packing order, protected only) to the plans."""
        i = 0
        for plan in self.plans:
            n = len(plan.names)
            plan.params = params[i : i + n]
            i += n
        return params

    def _total(self, sums: list[torch.Tensor], lam: float) -> torch.Tensor:
        total = None
        for s in sums:
            s = s.to(device=self.out_device, dtype=self.out_dtype, non_blocking=True)
            total = s if total is None else total + s
        return (total + self.constant) * (lam / 2.0)

    def value(self, lam: float) -> torch.Tensor:
        return self._total([b.penalty_sum(p) for p, b in zip(self.plans, self.backends)], lam)

    @property
    def eager(self) -> bool:
        return all(getattr(b, "eager_grads", False) for b in self.backends)

    def value_and_grads(self, lam: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        sums, grads = [], []
        for plan, backend in zip(self.plans, self.backends):
            s, g = backend.penalty_sum_and_grads(plan, lam)
            sums.append(s)
            grads.extend(g)
        return self._total(sums, lam), grads

    def grads(self, scale: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for plan, backend in zip(self.plans, self.backends):
            out.extend(backend.penalty_grads(plan, scale.to(plan.device, non_blocking=True)))
        return out

    def accumulate(self, lam: float) -> torch.Tensor:
        return self._total([b.accumulate_grad_(p, lam) for p, b in zip(self.plans, self.backends)], lam)


class _PenaltyFunction(torch.autograd.Function):
    """``(lambda/2)(sum A (theta - m)^2 + c)`` with the backend's gradient ``lambda A (theta - m)``.

    With an eager backend the forward pass computes the gradient together with the value and
    backward hands it over: on the 2-core dev CPU (AMD EPYC, 26M params in 99 tensors) that took
    forward+backward from 83.2 ms to 59.8 ms (benchmarks/bench_penalty.py, its "lazy grad"
    ablation row, same run), because theta, A and m are read once instead of twice. Backward drops its
    reference first, so autograd can adopt the tensor as ``p.grad`` instead of copying it. The
    parameters are saved only so that autograd raises if one is modified in place before
    backward; a second backward (``retain_graph=True``) recomputes from them.
    """

    @staticmethod
    def forward(ctx, binding: _Binding, lam: float, *params):
        ctx.binding, ctx.lam = binding, lam
        ctx.save_for_backward(*params)
        if binding.eager:
            value, ctx.grads = binding.value_and_grads(lam)
            return value
        ctx.grads = None
        return binding.value(lam)

    @staticmethod
    def backward(ctx, grad_out):
        params = ctx.saved_tensors  # raises if a parameter changed in place since forward
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            ctx.binding.set_params(list(params))
            grads = ctx.binding.grads(grad_out * ctx.lam)
        elif not (grad_out.device.type == "cpu" and bool(grad_out == 1)):
            # Reading grad_out is free on the CPU (no device to wait for); elsewhere always scale.
            torch._foreach_mul_(grads, grad_out)
        return (None, None, *grads)


class EWCRegularizer(nn.Module):
    """Elastic Weight Consolidation penalty, drop-in for the seed ``EWCRegularizer``.

    Args:
        lambda_ewc: regularisation strength ``lambda`` (>= 0); may be changed at any time. The
            seed's config-dict form ``EWCRegularizer({"ewc_lambda": 5000.0})`` is accepted too.
        mode: ``"separate"`` (per-task EWC, the seed's sum over tasks; stored collapsed, exact)
            or ``"online"`` (``F~ <- gamma F~ + F_t``, anchor = latest optimum).
        gamma: Online-EWC decay in [0, 1]; only meaningful with ``mode="online"``.
        storage_dtype: dtype of the two stored buffers: ``torch.float32`` (default),
            ``torch.bfloat16`` / ``torch.float16`` (half the memory; about 3 / 4 significant
            digits of Fisher and anchor) or ``torch.float64``. Arithmetic is float32 (float64
            for float64 parameters or storage).
        layer_lambdas: ``{glob: multiplier}`` of ``lambda_ewc`` per parameter name; the first
            matching glob wins. Folded into the buffers at registration.
        include, exclude: globs over parameter names; only names matching ``include`` (when
            given) and not ``exclude`` are protected.
        backend: ``"auto"`` (Triton on CUDA when available, else PyTorch), ``"torch"`` or
            ``"triton"``. The environment variable ``FASTEWC_BACKEND`` overrides it.

    A parameter is protected when it has ``requires_grad``, appears in a registered Fisher and
    passes the globs. Tied parameters count once, under the name ``named_parameters()`` gives.
    """

    def __init__(self, lambda_ewc: float | Mapping = 1000.0, *, mode: str = "separate", gamma: float = 1.0,
                 storage_dtype: torch.dtype = torch.float32, layer_lambdas: Mapping[str, float] | None = None,
                 include=None, exclude=None, backend: str = "auto"):
        super().__init__()
        if isinstance(lambda_ewc, Mapping):  # the seed's EWCRegularizer(config) form
            config = dict(lambda_ewc)
            unknown = [k for k in config if k not in _CONFIG_KEYS]
            if unknown:
                raise EWCInputError(f"unknown config key(s) {_names(unknown)}; accepted: {', '.join(_CONFIG_KEYS)}")
            if "ewc_lambda" in config and "lambda_ewc" in config:
                raise EWCInputError("config gives both 'ewc_lambda' and 'lambda_ewc'; give one")
            lambda_ewc = config.pop("ewc_lambda", config.pop("lambda_ewc", 1000.0))
            mode = config.get("mode", mode)
            gamma = config.get("gamma", gamma)
            storage_dtype = config.get("storage_dtype", storage_dtype)
            layer_lambdas = config.get("layer_lambdas", layer_lambdas)
            include = config.get("include", include)
            exclude = config.get("exclude", exclude)
            backend = config.get("backend", backend)
        self._lambda = check_lambda(lambda_ewc)
        self._mode = check_choice(mode, MODES, "mode")
        self._gamma = check_gamma(gamma)
        if self._mode == "separate" and self._gamma != 1.0:
            raise EWCInputError(f"gamma={gamma!r} only applies to mode='online'; mode='separate' keeps every task")
        self._storage_dtype = check_storage_dtype(storage_dtype)
        self._selection = ParamSelection.build(layer_lambdas, include, exclude)
        self._backend = check_choice(backend, BACKENDS, "backend")
        self._reset_state()

    def _reset_state(self) -> None:
        self._packing: FlatPacking | None = None
        self._importance: list[torch.Tensor] = []
        self._anchor: list[torch.Tensor] = []
        self._constant: dict[str, float] = {}
        self._param_dtypes: dict[str, torch.dtype] = {}  # recorded at the first bind
        self._sharding: dict[str, ShardInfo] = {}  # names stored as a rank's piece of a DTensor
        self._tasks_seen = 0
        self._binding: _Binding | None = None
        self._model_ref = None

    # -- settings ------------------------------------------------------------------------------
    @property
    def lambda_ewc(self) -> float:
        return self._lambda

    @lambda_ewc.setter
    def lambda_ewc(self, value: float) -> None:
        self._lambda = check_lambda(value)  # applied at step time: no re-pack

    ewc_lambda = lambda_ewc  # the seed's nexus spelling

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def gamma(self) -> float:
        return self._gamma

    @property
    def storage_dtype(self) -> torch.dtype:
        return self._storage_dtype

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def active_backends(self) -> tuple[str, ...]:
        """Names of the backends that ran the last step (``("torch",)``, ``("triton",)``, ...);
        empty before the first ``forward`` / ``accumulate_grad_`` on a model."""
        b = self._binding
        return tuple(sorted({backend.name for backend in b.backends})) if b is not None else ()

    @property
    def tasks_seen(self) -> int:
        return self._tasks_seen

    @property
    def protected_names(self) -> list[str]:
        """Names with stored importance (protected when the parameter has ``requires_grad``)."""
        return self._packing.names if self._packing is not None else []

    def extra_repr(self) -> str:
        n = self._packing.numel if self._packing is not None else 0
        return (f"lambda_ewc={self._lambda:g}, mode={self._mode!r}, gamma={self._gamma:g}, "
                f"tasks_seen={self._tasks_seen}, params={len(self.protected_names)} ({n} elements), "
                f"storage_dtype={self._storage_dtype}, backend={self._backend!r}")

    def importance(self) -> dict[str, torch.Tensor]:
        """The folded importance ``A`` per name (views of the flat buffer, storage dtype; for a
        sharded model, this rank's piece)."""
        return self._packing.unpack(self._importance) if self._packing is not None else {}

    def anchors(self) -> dict[str, torch.Tensor]:
        """The anchor ``m`` per name (views of the flat buffer, storage dtype; for a sharded
        model, this rank's piece)."""
        return self._packing.unpack(self._anchor) if self._packing is not None else {}

    # -- registration --------------------------------------------------------------------------
    @torch.no_grad()
    def register_task(self, fisher: Mapping[str, torch.Tensor], optimal_params: Mapping[str, torch.Tensor],
                      *, model: nn.Module | None = None) -> None:
        """Fold one finished task into the stored buffers.

        Args:
            fisher: ``{name: F}``, the diagonal Fisher of each parameter (>= 0, finite, the
                parameter's shape; any floating dtype and device).
            optimal_params: ``{name: theta*}`` with the same names and shapes.
            model: optional; when given (or when a model was already seen by ``forward``), the
                names and shapes are checked against it before anything is stored.

        Names filtered out by ``include``/``exclude`` (or a 0 layer multiplier) are ignored. On
        any error nothing is changed.

        Sharded models (FSDP2): give full tensors (or DTensors, gathered first) with the
        parameters' global shapes, and the model; every rank must call this with the same
        dicts, and stores only its own piece.
        """
        if model is None and self._model_ref is not None:
            model = self._model_ref()
        if model is not None:
            model = unwrap_model(model)
        model_params = dict(model.named_parameters(remove_duplicate=False)) if model is not None else None
        if isinstance(fisher, Mapping) and isinstance(optimal_params, Mapping):
            # DTensor inputs (e.g. a snapshot of a sharded model's parameters): validate and split
            # the full tensors, so every rank sees the same values and raises the same errors.
            fisher = {n: full(t) for n, t in fisher.items()}
            optimal_params = {n: full(t) for n, t in optimal_params.items()}
        known = {e.name: self._sharding[e.name].global_shape if e.name in self._sharding else e.shape
                 for e in self._packing.entries} if self._packing is not None else {}
        check_task(fisher, optimal_params, {n: torch.Size(s) for n, s in known.items()}, model_params)

        scales = {n: self._selection.scale(n) for n in fisher}
        kept = [n for n in fisher if scales[n] > 0.0]
        if not kept:
            raise EWCInputError(
                f"no parameter of this task is protected: include/exclude/layer_lambdas "
                f"({self._selection.to_config()}) filter out all of {_names(list(fisher))}")

        sharded = {n: model_params[n] for n in kept if model_params is not None and is_sharded(model_params[n])}
        stale = [n for n in kept if n in self._sharding and n not in sharded]
        if stale:
            where = ("pass model= so that the full tensors can be split like its parameters" if model is None
                     else "the model's parameter is a plain tensor now")
            raise ModelMismatchError(
                f"{_names(stale)} stored as one rank's piece of a sharded parameter "
                f"({self._sharding[stale[0]].describe()}): {where}")
        if sharded and self._packing is not None and any(
                e.name in model_params and is_sharded(model_params[e.name]) and e.name not in self._sharding
                for e in self._packing.entries):
            self._rebind(model)  # split the full tensors stored so far like the parameters first
        sharding = dict(self._sharding)
        fisher, optimal_params = dict(fisher), dict(optimal_params)  # never write into the caller's dicts
        for n, p in sharded.items():
            info = ShardInfo.of(p)
            if n in sharding and sharding[n] != info:
                raise ModelMismatchError(f"{n!r} is stored as {sharding[n].describe()}, but this process holds "
                                         f"{info.describe()}")
            sharding[n] = info
            fisher[n] = local_piece(fisher[n], p)
            optimal_params[n] = local_piece(optimal_params[n], p)

        # Grow the layout for names seen for the first time (new buffers, old content copied).
        packing, importance, anchor = self._packing, self._importance, self._anchor
        new = [n for n in kept if packing is None or n not in packing]
        if new:
            specs = [(e.name, e.shape, e.dtype, e.device) for e in packing.entries] if packing is not None else []
            for n in new:
                ref = local(model_params[n]) if model_params is not None else optimal_params[n]
                specs.append((n, ref.shape, ref.dtype, ref.device))
            grown = FlatPacking(specs)
            importance = [b.zero_() for b in grown.empty(self._storage_dtype)]
            anchor = [b.zero_() for b in grown.empty(self._storage_dtype)]
            if packing is not None:
                for e in packing.entries:
                    grown.view(importance, e.name).copy_(packing.view(self._importance, e.name))
                    grown.view(anchor, e.name).copy_(packing.view(self._anchor, e.name))
            packing = grown

        constant = dict(self._constant)
        for n in kept:
            constant[n] = constant.get(n, 0.0) + self._fold(
                packing.view(importance, n).view(-1), packing.view(anchor, n).view(-1),
                fisher[n].reshape(-1), optimal_params[n].reshape(-1), scales[n], first=n in new)
        if self._mode == "online" and self._gamma != 1.0:
            for e in packing.entries:
                if e.name not in scales or scales[e.name] == 0.0:  # absent from this task: decays
                    packing.view(importance, e.name).mul_(self._gamma)

        self._packing, self._importance, self._anchor, self._constant = packing, importance, anchor, constant
        self._sharding = sharding
        self._tasks_seen += 1
        self._binding = None  # buffers or constants changed: plans are rebuilt at the next step

    def _fold(self, a: torch.Tensor, m: torch.Tensor, f: torch.Tensor, t: torch.Tensor, s: float,
              first: bool) -> float:
        """Merge one task's (F, theta*) into (A, m) in place, in float64 chunks; return dc.

        ``first``: the name has no stored importance yet, so the merge is a copy.
        """
        if first:
            a.copy_(f.to(a.device) * s if s != 1.0 else f)
            m.copy_(t)
            return 0.0
        f64 = torch.float64
        dc = torch.zeros((), dtype=f64, device=a.device)
        for lo in range(0, a.numel(), _REGISTER_CHUNK):
            hi = min(lo + _REGISTER_CHUNK, a.numel())
            # copy=True: the in-place ops below must never write into the caller's tensors
            # (or our buffer) when they already are float64 on this device.
            a0 = a[lo:hi].to(f64, copy=True)
            fc = f[lo:hi].to(device=a.device, dtype=f64, copy=True)
            if s != 1.0:
                fc.mul_(s)
            tc = t[lo:hi].to(device=a.device, dtype=f64, copy=True)
            if self._mode == "online":
                a[lo:hi].copy_(a0.mul_(self._gamma).add_(fc))
                m[lo:hi].copy_(tc)
                continue
            a1 = a0 + fc
            # Share of the new task; where A + F = 0 both are 0: take the new anchor, add nothing.
            w = torch.where(a1 > 0, fc.div_(a1), 1.0)
            tc.sub_(m[lo:hi])  # theta* - m
            dc += torch.dot(a0.mul_(w), tc.square())  # A F / (A + F) (m - theta*)^2
            a[lo:hi].copy_(a1)
            m[lo:hi].add_(w.mul_(tc))  # m + w (theta* - m), rounded once into the storage dtype
        return float(dc)

    # -- binding to a model --------------------------------------------------------------------
    def _walk(self, model: nn.Module):
        """One pass over the model: a cheap fingerprint of the stored names' parameters, and them."""
        index = self._packing.index
        key, found = [], {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in index:
                    q = local(p)  # a DTensor's own data_ptr is 0: fingerprint its local piece
                    key.append((n, q.data_ptr(), q.shape, p.shape, p.dtype, q.device, p.requires_grad))
                    found[n] = p
        return key, found

    def _bind(self, model: nn.Module) -> tuple[_Binding, list[torch.Tensor]]:
        """The plans for ``model`` and its protected parameters in plan order (rebuilt only when needed)."""
        model = unwrap_model(model)
        key, found = self._walk(model)
        b = self._binding
        if b is None or b.model_ref() is not model or b.key != key:
            b = self._rebind(model)
            key, found = self._walk(model)  # names may have been canonicalised
            b.key = key
        return b, [found[n] for plan in b.plans for n in plan.names]

    def _rebind(self, model: nn.Module) -> _Binding:
        packing = self._packing
        everything = dict(model.named_parameters(remove_duplicate=False))
        canonical = {id(p): n for n, p in model.named_parameters()}
        resolved: dict[str, tuple[str, torch.Tensor]] = {}
        owner: dict[str, str] = {}
        missing, problems = [], []
        to_split: dict[str, tuple] = {}  # stored full, the parameter is sharded: (param, its ShardInfo)
        for e in packing.entries:
            p = everything.get(e.name)
            if p is None:
                missing.append(e.name)
                continue
            canon = canonical[id(p)]
            if canon in owner:
                raise ModelMismatchError(
                    f"{owner[canon]!r} and {e.name!r} are the same (tied) parameter of the model; "
                    f"register it once, under {canon!r}")
            owner[canon] = e.name
            resolved[e.name] = (canon, p)
            stored = self._sharding.get(e.name)
            if is_sharded(p):
                info = ShardInfo.of(p)
                if stored is None:
                    if p.shape != e.shape:
                        problems.append(f"{e.name!r} has shape {tuple(p.shape)}, registered with {tuple(e.shape)}")
                    else:
                        to_split[e.name] = (p, info)
                elif stored != info:
                    problems.append(
                        f"{e.name!r} is stored as {stored.describe()}, but this process holds {info.describe()}: "
                        f"load the state that this rank saved, or register the full tensors in a fresh "
                        f"regularizer with register_task(..., model=model)")
                elif local(p).shape != e.shape:
                    problems.append(f"{e.name!r} has local shape {tuple(local(p).shape)}, stored with {tuple(e.shape)}")
            elif stored is not None:
                problems.append(
                    f"{e.name!r} is stored as {stored.describe()} of a sharded model, but the model's parameter is "
                    f"a plain tensor: load the state into the sharded model (fully_shard first) on the rank that "
                    f"saved it, or register the full tensors in a fresh regularizer")
            elif p.shape != e.shape:
                problems.append(f"{e.name!r} has shape {tuple(p.shape)}, registered with {tuple(e.shape)}")
            if not p.is_floating_point():
                problems.append(f"{e.name!r} has non-floating dtype {p.dtype}")
            was = self._param_dtypes.get(e.name)
            if was is not None and was != p.dtype:
                problems.append(f"{e.name!r} changed dtype from {was} to {p.dtype} since it was registered")
        if missing:
            raise ModelMismatchError(
                f"the model has no parameter named {_names(missing)}{_prefix_hint(missing, everything)}")
        if problems:
            raise ModelMismatchError("the model no longer matches the registered parameters: " + "; ".join(problems))

        named = {canon: p for canon, p in resolved.values()}
        groups = reduce_groups({n: p for n, p in named.items() if p.requires_grad})

        # Lay the buffers out like the model (names canonical, groups by the parameters'
        # device and dtype; a sharded parameter's local piece). Built aside and swapped in, so a
        # failure leaves the state as it was.
        bound = FlatPacking((resolved[e.name][0], local(resolved[e.name][1]).shape, resolved[e.name][1].dtype,
                             local(resolved[e.name][1]).device) for e in packing.entries)
        if to_split or not bound.same_layout(packing):
            rename = {e.name: resolved[e.name][0] for e in packing.entries}

            def relaid(buffers):
                return {rename[n]: local_piece(t, to_split[n][0]) if n in to_split else t
                        for n, t in packing.unpack(buffers).items()}

            importance = bound.pack(relaid(self._importance), self._storage_dtype)
            anchor = bound.pack(relaid(self._anchor), self._storage_dtype)
            # A split parameter's constant is a sum over all its elements: keep it on one rank only.
            self._constant = {rename[n]: (c if n not in to_split or to_split[n][1].keeps_constant else 0.0)
                              for n, c in self._constant.items()}
            self._param_dtypes = {rename.get(n, n): d for n, d in self._param_dtypes.items()}
            self._sharding = {rename.get(n, n): i for n, i in self._sharding.items()}
            self._sharding.update({rename[n]: info for n, (_, info) in to_split.items()})
            self._packing, self._importance, self._anchor = bound, importance, anchor
            packing = bound
        for e in packing.entries:
            self._param_dtypes.setdefault(e.name, e.dtype)

        plans, backends, constant = [], [], []
        for g, group in enumerate(packing.groups):
            members = [packing.entries[i] for i in group.entries if named[packing.entries[i].name].requires_grad]
            if not members:
                continue
            wide = torch.float64 in (group.dtype, self._storage_dtype)
            plans.append(GroupPlan(
                device=group.device, param_dtype=group.dtype,
                compute_dtype=torch.float64 if wide else torch.float32,
                importance=self._importance[g], anchor=self._anchor[g],
                names=tuple(e.name for e in members), offsets=tuple(e.offset for e in members),
                importance_views=[packing.view(self._importance, e.name) for e in members],
                anchor_views=[packing.view(self._anchor, e.name) for e in members]))
            backends.append(select_backend(self._backend, group.device))
            constant.extend(self._constant.get(e.name, 0.0) for e in members)
        out_dtype = torch.float64 if any(p.compute_dtype == torch.float64 for p in plans) else torch.float32
        out_device = plans[0].device if plans else _model_device(model)
        self._model_ref = weakref.ref(model)
        self._binding = _Binding(model, None, plans, backends, math.fsum(constant), out_dtype, out_device, groups)
        return self._binding

    # -- the penalty ---------------------------------------------------------------------------
    def forward(self, model: nn.Module) -> torch.Tensor:
        """The penalty ``(lambda/2) sum_t sum_i s_i F_t,i (theta_i - theta*_t,i)^2`` (or its online form).

        Returns a 0-dim float32 tensor (float64 for float64 parameters/storage) on the device of
        the first protected parameter, differentiable with respect to the parameters: add it to
        the task loss and call ``backward()``. With nothing registered, a zero tensor on the
        model's device. No host-device synchronisation.
        """
        if self._packing is None:
            return torch.zeros((), device=_model_device(model))
        binding, params = self._bind(model)
        if not binding.plans:
            return torch.zeros((), dtype=binding.out_dtype, device=binding.out_device)
        if binding.groups is not None:
            params = [local(p) for p in params]  # differentiable: the gradient lands in the DTensor's .grad
        binding.set_params(params)
        if torch.is_grad_enabled():
            value = _PenaltyFunction.apply(binding, self._lambda, *params)
        else:
            value = binding.value(self._lambda)
        return all_reduce_value(value, binding.groups) if binding.groups else value

    @torch.no_grad()
    def accumulate_grad_(self, model: nn.Module) -> torch.Tensor:
        """Add the penalty's gradient ``lambda * A * (theta - m)`` into every protected ``p.grad``.

        Allocates ``p.grad`` where it is ``None``. Returns the penalty value (as ``forward``
        would, detached) without a host-device sync. Use it in loops that call ``backward()`` on
        the task loss only: it replaces ``(task_loss + ewc(model)).backward()`` at a fraction of
        the cost.
        """
        if self._packing is None:
            return torch.zeros((), device=_model_device(model))
        binding, params = self._bind(model)
        if not binding.plans:
            return torch.zeros((), dtype=binding.out_dtype, device=binding.out_device)
        if binding.groups is None:
            binding.set_params(params)
            return binding.accumulate(self._lambda)
        # Sharded: the backends update the local pieces of the DTensor gradients in place,
        # through stand-ins that alias the local pieces of the parameter and of its gradient.
        stand_ins = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            q = p.to_local().detach()
            q.grad = p.grad.to_local()
            stand_ins.append(q)
        binding.set_params(stand_ins)
        return all_reduce_value(binding.accumulate(self._lambda), binding.groups)

    def consolidate(self, model: nn.Module, data, **estimate_fisher_kwargs):
        """End of a task: estimate the Fisher on ``data`` (:func:`fastewc.estimate_fisher` with
        these keyword arguments), snapshot the current parameters as the optimum, and register
        both. Returns ``(fisher, optimal_params)``."""
        from ..workflow import consolidate  # at call time: the penalty half does not import the Fisher half

        return consolidate(self, model, data, **estimate_fisher_kwargs)

    # -- state ---------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        packing = self._packing
        return {
            "version": _STATE_VERSION,
            "lambda_ewc": self._lambda, "mode": self._mode, "gamma": self._gamma,
            "storage_dtype": str(self._storage_dtype).removeprefix("torch."),
            "selection": self._selection.to_config(), "backend": self._backend,
            "tasks_seen": self._tasks_seen,
            "names": packing.names if packing is not None else [],
            "dtypes": [str(e.dtype).removeprefix("torch.") for e in packing.entries] if packing is not None else [],
            "param_dtypes": {n: str(d).removeprefix("torch.") for n, d in self._param_dtypes.items()},
            "importance": self.importance(), "anchor": self.anchors(),
            "constant": dict(self._constant),
            "sharding": {n: i.to_dict() for n, i in self._sharding.items()},
        }

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise EWCInputError(f"not an EWCRegularizer state (version {_STATE_VERSION}): got {type(state).__name__}")
        staged = EWCRegularizer(
            state["lambda_ewc"], mode=state["mode"], gamma=state["gamma"],
            storage_dtype=_dtype(state["storage_dtype"]), backend=state["backend"],
            **state["selection"])
        names = list(state["names"])
        imp, anc = state["importance"], state["anchor"]
        if set(imp) != set(names) or set(anc) != set(names) or set(state["constant"]) - set(names):
            raise EWCInputError("EWCRegularizer state: importance/anchor/constant names do not match 'names'")
        if names:
            check_task(imp, anc, {})
            dtypes = [_dtype(d) for d in state["dtypes"]]
            packing = FlatPacking((n, imp[n].shape, dt, imp[n].device) for n, dt in zip(names, dtypes))
            staged._packing = packing
            staged._importance = packing.pack(imp, staged._storage_dtype)
            staged._anchor = packing.pack(anc, staged._storage_dtype)
        staged._constant = {n: float(c) for n, c in state["constant"].items()}
        staged._param_dtypes = {n: _dtype(d) for n, d in state["param_dtypes"].items()}
        sharding = state.get("sharding", {})  # absent in states written before sharding support
        if not isinstance(sharding, dict) or set(sharding) - set(names):
            raise EWCInputError("EWCRegularizer state: 'sharding' must map stored names to their shard layout")
        try:
            staged._sharding = {n: ShardInfo.from_dict(d) for n, d in sharding.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise EWCInputError(f"EWCRegularizer state: unreadable 'sharding' entry ({exc})") from None
        staged._tasks_seen = int(state["tasks_seen"])
        for k in ("_lambda", "_mode", "_gamma", "_storage_dtype", "_selection", "_backend", "_packing",
                  "_importance", "_anchor", "_constant", "_param_dtypes", "_sharding", "_tasks_seen"):
            setattr(self, k, getattr(staged, k))
        self._binding, self._model_ref = None, None

    def __getstate__(self):
        # Bindings hold weak references and cached views: rebuilt after unpickling / deepcopy.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_binding"], state["_model_ref"] = None, None
        return state


class OnlineEWC(EWCRegularizer):
    """Seed-compatible Online EWC: ``register_task(fisher, params)`` and ``compute_penalty(model)``.

    ``OnlineEWC(lambda_ewc, gamma=1.0)`` is ``EWCRegularizer(lambda_ewc, mode="online", gamma=gamma)``.
    """

    def __init__(self, lambda_ewc: float = 1000.0, gamma: float = 1.0, **kwargs):
        super().__init__(lambda_ewc, mode="online", gamma=gamma, **kwargs)

    def compute_penalty(self, model: nn.Module) -> torch.Tensor:
        return self(model)


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise EWCInputError(f"unknown dtype {name!r} in EWCRegularizer state")
    return dt
