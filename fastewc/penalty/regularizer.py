"""``EWCRegularizer``: the public facade of the penalty half of fastewc.

It keeps the interface of the plain EWC implementation fastewc replaces (``register_task(fisher,
optimal_params)``, ``forward(model)``; :mod:`fastewc.compat` describes that API) and hands the
work to three parts:

* :mod:`.store` - the collapsed buffers ``A``, ``m`` and constants ``c``: merging a task,
  growing the layout, state to and from a dict (plain tensors);
* :mod:`.binding` - laying the store out like a model and the autograd Function;
* :mod:`.sharding` - what changes when the model is sharded with FSDP2 (``fully_shard``).

The maths of the collapsed quadratic is in docs/design.md.
"""

from __future__ import annotations

import weakref
from typing import Mapping

import torch
import torch.nn as nn

from .._utils import unwrap_model, unwrapped_name
from ..errors import EWCInputError
from .binding import Binding, bind, model_device
from .function import PenaltyFunction
from .selection import ParamSelection
from .sharding import all_reduce_value, full, local, split_task, stored_full_but_sharded
from .store import PenaltyStore
from .validation import (BACKENDS, _names, check_choice, check_lambda, check_task, settings_from_config,
                         unwrap_names)

__all__ = ["EWCRegularizer", "OnlineEWC"]

# Format of get_extra_state(). 1: first format; 2: adds "check_finite", and "storage_dtype" may
# be None (follow the parameters). Older formats stay loadable.
STATE_VERSION = 2


def _tied_names_folded(fisher, anchors, model: nn.Module) -> tuple:
    """``fisher`` and ``anchors`` with every name of a tied parameter replaced by its canonical
    name (the one ``named_parameters()`` gives). Raises ``EWCInputError`` when ``fisher`` names
    one tied parameter twice (which of the two would be its Fisher is not ours to guess); of two
    anchors for one parameter, the one under the canonical name is kept."""
    if not isinstance(fisher, Mapping) or not isinstance(anchors, Mapping):
        return fisher, anchors  # check_task says what is wrong
    everything = dict(model.named_parameters(remove_duplicate=False))
    canonical = {id(p): n for n, p in model.named_parameters()}

    def canon(name: str) -> str:
        p = everything.get(name)
        return canonical[id(p)] if p is not None else name

    first: dict[str, str] = {}
    for n in fisher:
        c = canon(n)
        if c in first:
            raise EWCInputError(f"fisher names {first[c]!r} and {n!r}, which are one (tied) parameter of the model; "
                                f"give its Fisher once, under {c!r}")
        first[c] = n
    folded_anchors: dict = {}
    for n, t in anchors.items():
        c = canon(n)
        if c not in folded_anchors or n == c:
            folded_anchors[c] = t
    return {canon(n): f for n, f in fisher.items()}, folded_anchors


class EWCRegularizer(nn.Module):
    """Elastic Weight Consolidation penalty, stored collapsed and run on fused backends.

    Args:
        lambda_ewc: regularisation strength ``lambda`` (>= 0); may be changed at any time. The
            config-dict form ``EWCRegularizer({"ewc_lambda": 5000.0, ...})`` of the original API
            is accepted too.
        mode: ``"separate"`` (per-task EWC, a sum over tasks; stored collapsed, exact) or
            ``"online"`` (``F~ <- gamma F~ + F_t``, anchor = latest optimum).
        gamma: Online-EWC decay in [0, 1]; only meaningful with ``mode="online"``.
        storage_dtype: dtype of the two stored buffers. ``None`` (default) follows each
            parameter's dtype: float64 parameters get float64 buffers, float32 ones float32, and
            16-bit parameters float32 (a Fisher diagonal loses most digits in 16 bits).
            ``torch.bfloat16`` / ``torch.float16`` halve the memory (about 3 / 4 significant
            digits of Fisher and anchor); ``torch.float32`` / ``torch.float64`` force one dtype.
            Arithmetic is float32, or float64 where the parameter or the storage is float64.
        layer_lambdas: ``{glob: multiplier}`` of ``lambda_ewc`` per parameter name; the first
            matching glob wins. Folded into the buffers at registration.
        include, exclude: globs over parameter names; only names matching ``include`` (when
            given) and not ``exclude`` are protected.
        backend: ``"auto"`` (Triton on CUDA when available; on CPU the fused C kernel when a C
            compiler is found to build it, once per machine; else PyTorch, with a one-time
            warning on CPU saying why), ``"torch"``, ``"triton"`` or ``"cpu"``. The environment
            variable ``FASTEWC_BACKEND`` overrides it.
        check_finite: after every ``forward`` / ``accumulate_grad_``, raise ``EWCInputError``
            naming the first protected parameter that holds NaN or Inf. Costs one host-device
            synchronisation per step (it reads the penalty value).

    A parameter is protected when it has ``requires_grad``, appears in a registered Fisher and
    passes the globs. Tied parameters count once, under the name ``named_parameters()`` gives.

    Non-finite parameters: when a protected parameter holds NaN or Inf, the penalty value is NaN
    or Inf too (never a finite number), from ``forward`` and ``accumulate_grad_`` alike, on every
    backend; so is the gradient of that parameter. Without ``check_finite`` nothing is raised:
    the value shows it, as a task loss would.
    """

    def __init__(self, lambda_ewc: float | Mapping = 1000.0, *, mode: str = "separate", gamma: float = 1.0,
                 storage_dtype: torch.dtype | None = None, layer_lambdas: Mapping[str, float] | None = None,
                 include=None, exclude=None, backend: str = "auto", check_finite: bool = False):
        super().__init__()
        if isinstance(lambda_ewc, Mapping):  # the original API's EWCRegularizer(config) form
            settings = settings_from_config(lambda_ewc, dict(
                mode=mode, gamma=gamma, storage_dtype=storage_dtype, layer_lambdas=layer_lambdas, include=include,
                exclude=exclude, backend=backend, check_finite=check_finite))
            lambda_ewc, mode, gamma = settings["lambda_ewc"], settings["mode"], settings["gamma"]
            storage_dtype, layer_lambdas = settings["storage_dtype"], settings["layer_lambdas"]
            include, exclude, backend = settings["include"], settings["exclude"], settings["backend"]
            check_finite = settings["check_finite"]
        self._lambda = check_lambda(lambda_ewc)
        self._store = PenaltyStore(mode, gamma, storage_dtype)
        self._selection = ParamSelection.build(layer_lambdas, include, exclude)
        self._backend = check_choice(backend, BACKENDS, "backend")
        if not isinstance(check_finite, bool):
            raise EWCInputError(f"check_finite must be True or False, got {check_finite!r}")
        self._check_finite = check_finite
        self._binding: Binding | None = None
        self._model_ref = None

    # -- settings ------------------------------------------------------------------------------
    @property
    def lambda_ewc(self) -> float:
        return self._lambda

    @lambda_ewc.setter
    def lambda_ewc(self, value: float) -> None:
        self._lambda = check_lambda(value)  # applied at step time: nothing to re-pack

    ewc_lambda = lambda_ewc  # the original API's other spelling

    @property
    def mode(self) -> str:
        return self._store.mode

    @property
    def gamma(self) -> float:
        return self._store.gamma

    @property
    def storage_dtype(self) -> torch.dtype | None:
        """The ``storage_dtype`` setting (None: each group follows its parameters' dtype)."""
        return self._store.storage_dtype

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def check_finite(self) -> bool:
        return self._check_finite

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise EWCInputError(f"check_finite must be True or False, got {value!r}")
        self._check_finite = value

    @property
    def active_backends(self) -> tuple[str, ...]:
        """Names of the backends that ran the last step (``("torch",)``, ``("triton",)``, ...);
        empty before the first ``forward`` / ``accumulate_grad_`` on a model."""
        b = self._binding
        return tuple(sorted({backend.name for backend in b.backends})) if b is not None else ()

    @property
    def tasks_seen(self) -> int:
        return self._store.tasks_seen

    @property
    def protected_names(self) -> list[str]:
        """Names with stored importance (protected when the parameter has ``requires_grad``)."""
        return self._store.names

    @property
    def _packing(self):
        """The store's layout (a ``FlatPacking``, or None when nothing is registered)."""
        return self._store.packing

    def extra_repr(self) -> str:
        return (f"lambda_ewc={self._lambda:g}, mode={self.mode!r}, gamma={self.gamma:g}, "
                f"tasks_seen={self.tasks_seen}, params={len(self.protected_names)} ({self._store.numel} elements), "
                f"storage_dtype={self.storage_dtype}, backend={self._backend!r}")

    def importance(self) -> dict[str, torch.Tensor]:
        """The folded importance ``A`` per name (views of the flat buffer, shaped like the
        parameter, in the buffer dtype; for a sharded model, this rank's piece)."""
        return self._store.importance_views()

    def anchors(self) -> dict[str, torch.Tensor]:
        """The anchor ``m`` per name (views of the flat buffer, shaped like the parameter, in the
        buffer dtype; for a sharded model, this rank's piece)."""
        return self._store.anchor_views()

    # -- registration --------------------------------------------------------------------------
    @torch.no_grad()
    def register_task(self, fisher: Mapping[str, torch.Tensor], optimal_params: Mapping[str, torch.Tensor],
                      *, model: nn.Module | None = None) -> None:
        """Fold one finished task into the stored buffers.

        Args:
            fisher: ``{name: F}``, the diagonal Fisher of each parameter (>= 0, finite, the
                parameter's shape; any floating dtype and device).
            optimal_params: ``{name: theta*}`` for every name of ``fisher``, same shapes. It may
                name more parameters (e.g. a snapshot of the whole model where the Fisher covers
                only the trainable ones): those anchors are validated and ignored.
            model: optional; when given (or when a model was already seen by ``forward``), the
                names and shapes are checked against it before anything is stored, and its
                parameters' dtypes are recorded (else the anchors' dtypes are): a later step on
                a model whose parameter has another dtype is refused. A tied
                parameter's other names (``lm_head.weight`` for ``transformer.wte.weight``) are
                taken as the name ``named_parameters()`` gives; a Fisher that names one tied
                parameter twice is refused. Without a model, names found tied at the first step
                are folded into one entry there.

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
        if model_params is not None:
            fisher = unwrap_names(fisher, model_params, "fisher")
            optimal_params = unwrap_names(optimal_params, model_params, "optimal_params")
            fisher, optimal_params = _tied_names_folded(fisher, optimal_params, model)
            if any(n not in model_params and unwrapped_name(n, model_params) in model_params for n in self._store.names):
                self._rebind(model)  # stored names taken on a wrapper become the model's own first
        if isinstance(fisher, Mapping) and isinstance(optimal_params, Mapping):
            # DTensor inputs (e.g. a snapshot of a sharded model's parameters): validate and split
            # the full tensors, so every rank sees the same values and raises the same errors.
            fisher = {n: full(t) for n, t in fisher.items()}
            optimal_params = {n: full(t) for n, t in optimal_params.items()}
        check_task(fisher, optimal_params, self._store.known_shapes(), model_params)

        scales = {n: self._selection.scale(n) for n in fisher}
        scales = {n: s for n, s in scales.items() if s > 0.0}
        if not scales:
            raise EWCInputError(
                f"no parameter of this task is protected: include/exclude/layer_lambdas "
                f"({self._selection.to_config()}) filter out all of {_names(list(fisher))}")
        if stored_full_but_sharded(self._store.names, model_params, self._store.sharding):
            self._rebind(model)  # split the full tensors stored so far like the parameters first
        fisher, anchors, sharding = split_task(fisher, optimal_params, list(scales), model_params,
                                               self._store.sharding)
        specs = {}
        for n in scales:
            ref = local(model_params[n]) if model_params is not None else anchors[n]
            specs[n] = (ref.shape, (model_params[n] if model_params is not None else ref).dtype, ref.device)
        self._store = self._store.replace(sharding=sharding).merge(fisher, anchors, scales, specs)
        self._binding = None  # buffers or constants changed: plans are rebuilt at the next step

    def consolidate(self, model: nn.Module, data, **estimate_fisher_kwargs):
        """End of a task: estimate the Fisher on ``data`` (:func:`fastewc.estimate_fisher` with
        these keyword arguments), snapshot the current parameters as the optimum, and register
        both. Returns ``(fisher, optimal_params)``."""
        from ..workflow import consolidate  # at call time: the penalty half does not import the Fisher half

        return consolidate(self, model, data, **estimate_fisher_kwargs)

    # -- binding to a model --------------------------------------------------------------------
    def _bind(self, model: nn.Module) -> tuple[Binding, list[torch.Tensor]]:
        """The binding for ``model`` and its protected parameters in plan order (rebuilt only
        when a protected parameter changed since the last step)."""
        model = unwrap_model(model)
        b = self._binding
        params = b.current(model) if b is not None else None
        if params is None:
            b, found = self._rebind(model)
            params = [found[n] for n in b.names]
        return b, params

    def _rebind(self, model: nn.Module) -> tuple[Binding, dict[str, torch.Tensor]]:
        """Bind the store to ``model`` anew; returns the binding and ``{name: parameter}``."""
        store, b, found = bind(self._store, model, self._backend)
        self._store, self._binding, self._model_ref = store, b, weakref.ref(model)
        return b, found

    # -- the penalty ---------------------------------------------------------------------------
    def forward(self, model: nn.Module) -> torch.Tensor:
        """The penalty ``(lambda/2) sum_t sum_i s_i F_t,i (theta_i - theta*_t,i)^2`` (or its online form).

        Returns a 0-dim float32 tensor (float64 for float64 parameters/storage) on the device of
        the first protected parameter, differentiable with respect to the parameters: add it to
        the task loss and call ``backward()``. With nothing registered, a zero tensor on the
        model's device. No host-device synchronisation unless ``check_finite`` is on.
        """
        if self._store.packing is None:
            return torch.zeros((), device=model_device(model))
        binding, params = self._bind(model)
        if not binding.plans:
            return torch.zeros((), dtype=binding.out_dtype, device=binding.out_device)
        if binding.groups is not None:
            params = [local(p) for p in params]  # differentiable: the gradient lands in the DTensor's .grad
        binding.set_params(params)
        if torch.is_grad_enabled():
            value = PenaltyFunction.apply(binding, self._lambda, *params)
        else:
            value = binding.value(self._lambda)
        if binding.groups:
            value = all_reduce_value(value, binding.groups)
        if self._check_finite:
            binding.check_finite(value, params)
        return value

    def accumulate_grad_(self, model: nn.Module) -> torch.Tensor:
        """Add the penalty's gradient ``lambda * A * (theta - m)`` into every protected ``p.grad``.

        Allocates ``p.grad`` where it is ``None``. Returns the penalty value (as ``forward``
        would, detached) without a host-device sync (unless ``check_finite`` is on; it raises
        after the gradients were updated). Use it in loops that call ``backward()`` on the task
        loss only: it replaces ``(task_loss + ewc(model)).backward()`` at a fraction of the cost.
        """
        if self._store.packing is None:
            return torch.zeros((), device=model_device(model))
        binding, params = self._bind(model)
        if not binding.plans:
            return torch.zeros((), dtype=binding.out_dtype, device=binding.out_device)
        if binding.groups is None:
            binding.set_params(params)
            value = binding.accumulate(self._lambda)
        else:
            # Sharded: the backends update the local pieces of the DTensor gradients in place,
            # through stand-ins that alias the local pieces of the parameter and of its gradient:
            # new tensors every step over the storage the fingerprint covers, so what the
            # backends derived from the first step's (addresses, flat views) holds for them.
            stand_ins = []
            with torch.no_grad():
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    q = p.to_local().detach()
                    q.grad = p.grad.to_local()
                    stand_ins.append(q)
                binding.set_params(stand_ins)  # over the local pieces the fingerprint covers
                value = all_reduce_value(binding.accumulate(self._lambda), binding.groups)
        if self._check_finite:
            binding.check_finite(value, params)
        return value

    # -- state ---------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """Everything the regularizer holds, as plain values and per-name tensors (the state
        ``state_dict()`` carries under ``_extra_state``)."""
        return {"version": STATE_VERSION, "lambda_ewc": self._lambda, "selection": self._selection.to_config(),
                "backend": self._backend, "check_finite": self._check_finite, **self._store.to_state()}

    def set_extra_state(self, state: dict) -> None:
        """Replace the state with ``state`` (from ``get_extra_state``, this or an older format).
        Validated first: on any error ``EWCInputError`` says what is wrong, and nothing changes.

        State is what was learned and how it is weighed: the buffers, tasks seen, mode, gamma,
        ``lambda_ewc``, ``storage_dtype`` and the selection (``layer_lambdas``, ``include``,
        ``exclude``). ``backend`` and ``check_finite`` say how this instance runs, not what it
        holds: they keep the values this instance was given (``load_regularizer`` restores the
        saved ones into its fresh instance unless told otherwise)."""
        if not isinstance(state, Mapping):
            raise EWCInputError(f"not an EWCRegularizer state: expected a dict, got {type(state).__name__}")
        version = state.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise EWCInputError(f"not an EWCRegularizer state: no valid format version (got {version!r})")
        if version > STATE_VERSION:
            raise EWCInputError(
                f"EWCRegularizer state has format version {version}, newer than the versions this fastewc "
                f"reads (1 to {STATE_VERSION}): upgrade fastewc to load it")
        try:
            selection = state["selection"]
            if not isinstance(selection, Mapping):
                raise EWCInputError(f"EWCRegularizer state: 'selection' must be a dict, got {type(selection).__name__}")
            staged = EWCRegularizer(state["lambda_ewc"], backend=state["backend"],
                                    check_finite=state.get("check_finite", False), **selection)
            store = PenaltyStore.from_state(state)
        except KeyError as exc:
            raise EWCInputError(f"EWCRegularizer state (format version {version}) lacks the entry {exc}") from None
        except (TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise EWCInputError(f"EWCRegularizer state (format version {version}) is unreadable: {exc}") from None
        self._lambda, self._selection, self._store = staged._lambda, staged._selection, store
        self._binding, self._model_ref = None, None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, refusing with ``EWCInputError`` a dict without the
        regularizer's ``_extra_state`` entry (and leaving the regularizer unchanged)."""
        if not isinstance(state_dict, Mapping) or "_extra_state" not in state_dict:
            got = sorted(state_dict)[:5] if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise EWCInputError(f"not an EWCRegularizer state_dict: no '_extra_state' entry (got {got})")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __getstate__(self):
        # Bindings hold weak references and cached views: rebuilt after unpickling / deepcopy.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_binding"], state["_model_ref"] = None, None
        return state


class OnlineEWC(EWCRegularizer):
    """Online EWC with the original API's ``register_task(fisher, params)`` and ``compute_penalty(model)``.

    ``OnlineEWC(lambda_ewc, gamma=1.0)`` is ``EWCRegularizer(lambda_ewc, mode="online", gamma=gamma)``.
    """

    def __init__(self, lambda_ewc: float = 1000.0, gamma: float = 1.0, **kwargs):
        super().__init__(lambda_ewc, mode="online", gamma=gamma, **kwargs)

    def compute_penalty(self, model: nn.Module) -> torch.Tensor:
        return self(model)
