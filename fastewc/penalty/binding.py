"""Binding a :class:`~fastewc.penalty.store.PenaltyStore` to a model (the autograd Function that
runs a binding is in ``function.py``).

``bind(store, model, backend)`` lays the stored buffers out like the model's parameters (their
canonical names, devices and dtypes; a sharded parameter's local piece), checks that the model
still matches what was registered, and builds one ``GroupPlan`` per (device, dtype) group of
protected parameters with the backend that runs it. The result, a :class:`Binding`, is cached by
the regularizer with a fingerprint of the parameters: every later step re-finds the protected
parameters through their module paths (a ``ParamLocator``: one dict lookup per module on those
paths and one per parameter, where ``named_parameters()`` would visit every module and hash every
parameter), compares fingerprints, and binds again only when a protected parameter was replaced,
moved, reshaped, re-typed, re-laid out or (un)frozen, or a module on its path was replaced.
That comparison is the only check of what the backends keep: a plan lives as long as its
binding, and its parameters are always ones the fingerprint verified, so a backend keeps what it
derived from them (addresses, layouts, flat views) for the plan's life without looking again.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn

from .._utils import is_sharded, unwrapped_name
from ..errors import EWCInputError, ModelMismatchError
from .backends import GroupPlan, select_backend
from .packing import FlatPacking
from .sharding import check_piece, local, local_piece, reduce_groups
from .store import PenaltyStore
from .validation import _names, _prefix_hint

_FLOAT32_MAX = torch.finfo(torch.float32).max

__all__ = ["Binding", "ParamLocator", "bind", "fingerprint", "walk", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def fingerprint(params: list, sharded: bool) -> list | None:
    """Per parameter, what a binding depends on: address, shape, dtype, whether it is trained and
    whether it is contiguous; None if one is missing.

    The address also stands for the device and the class: a parameter moved to another device
    is copied while the old storage is alive, and host and device allocations never share
    addresses (unified virtual addressing), so it gets a new address; a parameter that becomes
    a DTensor reports address 0. ``sharded``: fingerprint each DTensor's local piece (and keep
    the global shape), for bindings made with DTensors.
    """
    for p in params:
        if p is None:  # not `None in params`: that calls Tensor.__eq__ on every parameter
            return None
    if sharded:
        with torch.no_grad():  # to_local() is differentiable: no graph for a fingerprint
            return [(q.data_ptr(), q.shape, p.shape, p.dtype, q.device, p.requires_grad, q.is_contiguous())
                    for p, q in ((p, local(p)) for p in params)]
    return [(p.data_ptr(), p.shape, p.dtype, p.requires_grad, p.is_contiguous()) for p in params]


class ParamLocator:
    """Re-finds named parameters of one model the way ``named_parameters()`` reached them, without
    visiting the rest of the module tree.

    Holds every (parent's ``_modules`` dict, child name, child module) edge on the parameters'
    paths and, per parameter, its owning module's ``_parameters`` dict and attribute (the dicts
    themselves: torch replaces entries in them, never the dicts). ``find()`` checks that each
    edge still leads to the same child and returns the parameters now registered under the
    names (None for one that is gone), or None when a module on a path was replaced or removed.
    What is found under a name is whatever that module holds now: the caller fingerprints it.

    Args:
        model: the module the names are relative to.
        names: parameter names as ``named_parameters()`` gives them.

    Raises:
        LookupError: a name that is not a ``_modules`` / ``_parameters`` path from ``model`` (a
            module that overrides ``named_parameters``); the caller then walks the tree instead.
    """

    def __init__(self, model: nn.Module, names):
        edges: dict[str, tuple[dict, str, nn.Module]] = {}
        self.slots: list[tuple[dict, str]] = []
        for name in names:
            *path, attr = name.split(".")
            module, prefix = model, ""
            for part in path:
                child = module._modules.get(part)
                if child is None:
                    raise LookupError(name)
                prefix += part + "."
                edges.setdefault(prefix, (module._modules, part, child))
                module = child
            if module._parameters.get(attr) is None:
                raise LookupError(name)
            self.slots.append((module._parameters, attr))
        self.edges = list(edges.values())

    def find(self) -> list | None:
        for children, part, child in self.edges:
            if children.get(part) is not child:
                return None
        return [params.get(attr) for params, attr in self.slots]


def walk(names, model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` for the parameters of ``model`` named in ``names`` (a set or dict),
    by one pass over ``model.named_parameters()`` (canonical names: a tied parameter once)."""
    return {n: p for n, p in model.named_parameters() if n in names}


class Binding:
    """The plans for one model: its protected parameters, their buffer views and backends.

    Args:
        model: the model (held by weak reference).
        found: ``{name: parameter}`` for every stored name (canonical names), trained or frozen;
            the binding serves while their fingerprint is unchanged.
        plans: one ``GroupPlan`` per group with protected parameters.
        backends: the backend object of each plan.
        constant: the sum of the protected names' constants ``c``.
        out_dtype, out_device: of the returned penalty value.
        groups: process groups to sum the value over (sharded models), else None.
    """

    def __init__(self, model: nn.Module, found: dict[str, torch.Tensor], plans: list[GroupPlan], backends: list,
                 constant: float, out_dtype: torch.dtype, out_device: torch.device, groups: list | None = None):
        self.model_ref = weakref.ref(model)
        names = list(found)
        self.sharded = any(is_sharded(p) for p in found.values())
        try:
            self.locator: ParamLocator | None = ParamLocator(model, names)
        except LookupError:
            self.locator = None  # found by walking the module tree at every step instead
        self.key_names, self.stored_names = names, set(names)
        self.key = fingerprint(list(found.values()), self.sharded)
        self.plans = plans
        self.backends = backends
        self.constant = constant
        self.out_dtype = out_dtype
        self.out_device = out_device
        self.groups = groups
        self.names = [n for plan in plans for n in plan.names]  # protected names in plan order
        position = {n: i for i, n in enumerate(names)}
        self.order = [position[n] for n in self.names]
        if self.order == list(range(len(names))):
            self.order = None  # plan order is the model's, every stored parameter trained
        # The protected parameters' fingerprint, in plan order.
        self._accumulators: list | None = None  # see grad_accumulators
        self.param_key = (None if self.key is None or self.sharded
                          else self.key if self.order is None else [self.key[i] for i in self.order])

    def current(self, model: nn.Module) -> list[torch.Tensor] | None:
        """The protected parameters of ``model`` in plan order if this binding still serves it
        (same model, every stored parameter with the same fingerprint), else None."""
        if self.model_ref() is not model:
            return None
        if self.locator is not None:
            found = self.locator.find()
            if found is None:
                return None
        else:
            named = walk(self.stored_names, model)
            found = [named.get(n) for n in self.key_names]
        if fingerprint(found, self.sharded) != self.key:
            return None
        return found if self.order is None else [found[i] for i in self.order]

    def set_params(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Hand the live parameters (in plan order, protected only) to the plans: only ones this
        binding verified (what ``current`` returned, or tensors over the same storage: their
        local pieces, stand-ins), since the backends trust what they derived from the first."""
        i = 0
        for plan in self.plans:
            n = len(plan.names)
            plan.params = params[i : i + n]
            i += n
        return params

    def grad_accumulators(self, params) -> list:
        """The autograd nodes that write ``params``' ``.grad`` (plan order), found once per binding:
        holding them keeps each parameter's node the same from one graph to the next, as
        distributed data parallel does, so later steps skip the lookup."""
        nodes = self._accumulators
        if nodes is None or len(nodes) != len(params):
            nodes = self._accumulators = [torch.autograd.graph.get_gradient_edge(p).node for p in params]
        return nodes

    def verified(self, params) -> bool:
        """Whether ``params`` (plan order) still have the fingerprint this binding was made with:
        false when one was replaced (``p.data = ...``) since it was found."""
        return fingerprint(list(params), False) == self.param_key

    def _total(self, sums: list, lam: float) -> torch.Tensor:
        """``(lam / 2)(sum of sums + constant)`` as one tensor of ``out_dtype`` on ``out_device``.
        ``sums``: 0-dim tensors, or floats from host backends (``host_sums``), which are folded
        in double precision with one tensor made at the end: after a pass over memory, every
        torch operation pays its fixed dispatch cost with cold caches, so fewer is cheaper."""
        half = lam / 2.0
        if all(type(s) is float for s in sums):
            try:
                total = (math.fsum(sums) + self.constant) * half
            except (OverflowError, ValueError):  # fsum refuses inf - inf and overflowing partials
                total = (sum(sums) + self.constant) * half
            if self.out_dtype is not torch.float64 and abs(total) > _FLOAT32_MAX:
                total = math.copysign(math.inf, total)  # overflows float32: inf, as torch ops give
            # scalar_tensor: the lightest way to a 0-dim tensor (torch.tensor parses its argument)
            return torch.scalar_tensor(total, dtype=self.out_dtype, device=self.out_device)
        total = None
        for s in sums:
            if type(s) is float:
                s = torch.tensor(s, dtype=self.out_dtype)
            s = s.to(device=self.out_device, dtype=self.out_dtype, non_blocking=True)
            total = s if total is None else total + s
        return (total + self.constant) * half

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

    def defers(self, params) -> bool:
        """Whether the penalty's backward may add its gradient into ``.grad`` itself, once autograd
        has written the task's (see ``PenaltyFunction``): the scale ``grad_out`` can be read for
        free (every group on the CPU), no process group is running (DDP's and FSDP's hooks reduce
        ``.grad`` while autograd writes it, before a callback at the end would add the penalty's
        part), and no parameter has a hook that should see the penalty's gradient."""
        if self.groups is not None or any(p.device.type != "cpu" for p in self.plans):
            return False
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return False
        return not any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in params)

    def accumulate_into(self, params, lam: float, scale: torch.Tensor) -> None:
        """``p.grad += lam * scale * A (theta - m)`` for ``params`` (plan order); ``scale``: a CPU
        0-dim tensor (the penalty's ``grad_out``)."""
        params = list(params)
        # The parameters forward saw: unchanged unless replaced under autograd's nose since then
        # (``p.data = ...``), where the backends' cached addresses would no longer hold.
        if not self.verified(params):
            with torch.no_grad():
                for p, g in zip(params, self.differentiable_grads(params, scale * lam)):
                    if p.grad is None:
                        p.grad = g
                    else:
                        p.grad.add_(g)
            return
        self.set_params(params)
        factor = lam * float(scale)
        for plan, backend in zip(self.plans, self.backends):
            backend.accumulate_grad_(plan, factor)

    def differentiable_grads(self, params, scale: torch.Tensor) -> list[torch.Tensor]:
        """``scale * A (theta - m)`` per parameter (plan order) from torch ops, differentiable in
        the parameters and ``scale``: the gradient a double backward differentiates."""
        out = []
        i = 0
        for plan in self.plans:
            for a, m in zip(plan.importance_views, plan.anchor_views):
                p = params[i]
                i += 1
                d = p.to(plan.compute_dtype) - m.to(plan.compute_dtype)
                out.append((scale.to(plan.compute_dtype) * a.to(plan.compute_dtype) * d).to(p.dtype))
        return out

    def check_finite(self, value: torch.Tensor, params: list[torch.Tensor]) -> None:
        """Raise ``EWCInputError`` when the penalty ``value`` is NaN/Inf, naming the first
        protected parameter (in plan order) that holds a non-finite value, and whether NaN or
        Inf. ``params``: the live parameters in plan order. One host sync (reading ``value``);
        the parameters are searched only when the value is not finite."""
        value = value.detach()
        if bool(torch.isfinite(value)):
            return
        for name, p in zip(self.names, params):
            q = local(p).detach()
            bad = ~torch.isfinite(q)
            if bool(bad.any()):
                n_nan = int(torch.isnan(q).sum())
                kind = "NaN" if n_nan else "Inf"
                raise EWCInputError(
                    f"protected parameter {name!r} holds {kind} values ({n_nan} NaN and {int(bad.sum()) - n_nan} "
                    f"Inf of {q.numel()}); the EWC penalty is {float(value):g} (check_finite=True)")
        why = ("every protected parameter on this rank is finite: the non-finite value is in another rank's piece"
               if self.groups else "every protected parameter is finite: A (theta - m)^2 overflowed the compute dtype")
        raise EWCInputError(f"the EWC penalty is {float(value):g}; {why} (check_finite=True)")


def bind(store: PenaltyStore, model: nn.Module, backend: str) -> tuple[PenaltyStore, Binding, dict]:
    """Bind ``store`` (with something stored) to ``model`` (already unwrapped).

    Returns ``(store, binding, found)``: the store laid out like the model (``store`` itself
    when its layout already fits; otherwise a new one, ``store`` left as it was), the binding,
    and ``{name: parameter}`` of the stored names. Raises ``ModelMismatchError`` naming every
    parameter that is missing or no longer matches what was registered.
    """
    packing = store.packing
    everything = dict(model.named_parameters(remove_duplicate=False))
    canonical = {id(p): n for n, p in model.named_parameters()}
    resolved: dict[str, tuple[str, torch.Tensor]] = {}
    owner: dict[str, str] = {}
    missing, problems = [], []
    aliases: dict[str, str] = {}  # stored name -> the stored name of the same (tied) parameter seen first
    to_split: dict[str, tuple] = {}  # stored full, the parameter is sharded: (param, its ShardInfo)
    for e in packing.entries:
        # A name taken on the wrapped model (DDP's "module.", torch.compile's "_orig_mod.")
        # finds its parameter too, and is renamed to the canonical name below.
        p = everything.get(e.name)
        if p is None:
            p = everything.get(unwrapped_name(e.name, everything))
        if p is None:
            missing.append(e.name)
            continue
        canon = canonical[id(p)]
        if canon in owner:
            if e.shape != p.shape:
                problems.append(f"{e.name!r} (the tied parameter {canon!r}) was registered with shape "
                                f"{tuple(e.shape)}, the parameter has {tuple(p.shape)}")
            aliases[e.name] = owner[canon]
            continue
        owner[canon] = e.name
        resolved[e.name] = (canon, p)
        problem, split = check_piece(e.name, p, store.sharding.get(e.name), e.shape)
        if problem is not None:
            problems.append(problem)
        elif split is not None:
            to_split[e.name] = (p, split)
        if not p.is_floating_point():
            problems.append(f"{e.name!r} has non-floating dtype {p.dtype}")
        was = store.param_dtypes.get(e.name)
        if was is not None and was != p.dtype:
            problems.append(f"{e.name!r} changed dtype from {was} to {p.dtype} since it was registered ({was} is "
                            "the parameter's dtype when register_task was given the model, else its anchor's: "
                            "give anchors of the parameter's dtype, or pass model=)")
    if missing:
        raise ModelMismatchError(
            f"the model has no parameter named {_names(missing)}{_prefix_hint(missing, everything)}")
    if problems:
        raise ModelMismatchError("the model no longer matches the registered parameters: " + "; ".join(problems))
    if aliases:
        # Names registered before the model was known, two of which turn out to be one tied
        # parameter: their quadratics are one quadratic of that tensor (the store folds them).
        sharded = sorted(n for pair in aliases.items() for n in pair if n in store.sharding)
        if sharded:
            raise ModelMismatchError(f"{_names(sharded)} are stored as shards under two names of one tied "
                                     "parameter; register it once, under one name")
        if store.mode == "online":
            pairs = ", ".join(f"{a!r} and {k!r}" for a, k in aliases.items())
            raise ModelMismatchError(
                f"{pairs} are one tied parameter, registered under two names before the regularizer knew the model; "
                f"in online mode each task moves that parameter's anchor, so the two cannot be merged afterwards. "
                f"Register its Fisher under one name, or pass model= to register_task (names are then matched)")
        return bind(store.folded(aliases), model, backend)

    named = {canon: p for canon, p in resolved.values()}
    groups = reduce_groups({n: p for n, p in named.items() if p.requires_grad})

    # Lay the buffers out like the model (canonical names, groups by the parameters' device and
    # dtype, a sharded parameter's local piece): a new store, so a failure leaves the old one.
    laid = FlatPacking((resolved[e.name][0], local(resolved[e.name][1]).shape, resolved[e.name][1].dtype,
                        local(resolved[e.name][1]).device) for e in packing.entries)
    if to_split or not laid.same_layout(packing):
        store = store.relaid(
            laid, rename={e.name: resolved[e.name][0] for e in packing.entries},
            pieces={n: (lambda t, p=p: local_piece(t, p)) for n, (p, _) in to_split.items()},
            keeps_constant={n: info.keeps_constant for n, (_, info) in to_split.items()},
            new_sharding={n: info for n, (_, info) in to_split.items()})
        packing = laid
    if any(e.name not in store.param_dtypes for e in packing.entries):  # states that did not record them
        store = store.replace(param_dtypes={**{e.name: e.dtype for e in packing.entries}, **store.param_dtypes})

    plans, backends, constant = [], [], []
    for g, group in enumerate(packing.groups):
        members = [packing.entries[i] for i in group.entries if named[packing.entries[i].name].requires_grad]
        if not members:
            continue
        wide = torch.float64 in (group.dtype, store.importance[g].dtype)
        plans.append(GroupPlan(
            device=group.device, param_dtype=group.dtype,
            compute_dtype=torch.float64 if wide else torch.float32,
            importance=store.importance[g], anchor=store.anchor[g],
            names=tuple(e.name for e in members), offsets=tuple(e.offset for e in members),
            importance_views=[packing.view(store.importance, e.name) for e in members],
            anchor_views=[packing.view(store.anchor, e.name) for e in members]))
        backends.append(select_backend(backend, group.device, group.dtype, store.importance[g].dtype))
        constant.extend(store.constant.get(e.name, 0.0) for e in members)
    out_dtype = torch.float64 if any(p.compute_dtype == torch.float64 for p in plans) else torch.float32
    out_device = plans[0].device if plans else model_device(model)
    found = walk(packing.index, model)  # after the layout: names are canonical now
    return store, Binding(model, found, plans, backends, math.fsum(constant), out_dtype, out_device, groups), found
