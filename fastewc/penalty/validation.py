"""Checks on user input. Each failure raises ``EWCInputError`` naming the parameter and what was
expected; the checks run before any state changes, so a rejected call leaves the regularizer as
it was."""

from __future__ import annotations

import math
from typing import Mapping

import torch

from .._utils import unwrapped_name
from ..errors import EWCInputError

MODES = ("separate", "online")
BACKENDS = ("auto", "torch", "triton", "cpu")
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CONFIG_KEYS = ("ewc_lambda", "lambda_ewc", "mode", "gamma", "storage_dtype", "layer_lambdas",
               "include", "exclude", "backend", "check_finite")


def settings_from_config(config: Mapping, defaults: dict) -> dict:
    """The constructor's settings from the original API's config dict (``{"ewc_lambda": 5000.0,
    ...}``; ``"lambda_ewc"`` is accepted too): ``defaults`` (the keyword arguments) updated by the
    dict, plus ``"lambda_ewc"`` (1000.0 when absent). Unknown keys are an ``EWCInputError``."""
    config = dict(config)
    unknown = [k for k in config if k not in CONFIG_KEYS]
    if unknown:
        raise EWCInputError(f"unknown config key(s) {_names(unknown)}; accepted: {', '.join(CONFIG_KEYS)}")
    if "ewc_lambda" in config and "lambda_ewc" in config:
        raise EWCInputError("config gives both 'ewc_lambda' and 'lambda_ewc'; give one")
    lam = config.pop("ewc_lambda", config.pop("lambda_ewc", 1000.0))
    return {**defaults, **config, "lambda_ewc": lam}


def check_lambda(value, what: str = "lambda_ewc") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        else:
            raise EWCInputError(f"{what} must be a number >= 0, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise EWCInputError(f"{what} must be a finite number >= 0, got {value!r}")
    return value


def check_gamma(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EWCInputError(f"gamma must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise EWCInputError(f"gamma must be in [0, 1], got {value!r}")
    return value


def check_choice(value, allowed, what: str) -> str:
    if value not in allowed:
        raise EWCInputError(f"unknown {what} {value!r}; expected one of {', '.join(map(repr, allowed))}")
    return value


def check_storage_dtype(value) -> torch.dtype:
    if value not in STORAGE_DTYPES:
        names = ", ".join(str(d) for d in STORAGE_DTYPES)
        raise EWCInputError(f"storage_dtype must be one of {names}; got {value!r}")
    return value


def _check_tensor(name: str, t, what: str) -> torch.Tensor | None:
    """Raise unless ``t`` is a dense floating tensor with data and finite values; returns its
    minimum (None when empty). Finiteness is read off the minimum and maximum, one reduction
    that propagates NaN and allocates nothing the size of ``t`` (``isfinite(t).all()`` would write
    and then read a boolean tensor as large as ``t``)."""
    if not isinstance(t, torch.Tensor):
        raise EWCInputError(f"{what}[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
    if t.is_meta:
        raise EWCInputError(f"{what}[{name!r}] is a meta tensor (a shape without data); expected a tensor "
                            "with values, e.g. the parameter after the model was materialised")
    if t.layout != torch.strided:
        raise EWCInputError(f"{what}[{name!r}] must be a dense tensor, got layout {t.layout}")
    if not t.is_floating_point():
        raise EWCInputError(f"{what}[{name!r}] must have a floating dtype, got {t.dtype}")
    if t.numel() == 0:
        return None
    low, high = torch.aminmax(t)
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        finite = torch.isfinite(t)
        n_nan = int(torch.isnan(t).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise EWCInputError(
            f"{what}[{name!r}] contains {n_nan} NaN and {n_inf} Inf values (of {t.numel()}); "
            "expected finite values")
    return low


def unwrap_names(d, model_params: Mapping[str, torch.Tensor], what: str):
    """``d`` (a task's dict) with names taken on a wrapped model (DDP's ``module.``,
    ``torch.compile``'s ``_orig_mod.``) renamed as the unwrapped model (``model_params``: its
    names) calls them. Anything but a dict keyed by str is returned as it is (``check_task``
    reports it). Raises ``EWCInputError`` when two names of ``d`` land on one."""
    if not isinstance(d, Mapping) or all(not isinstance(k, str) or k in model_params for k in d):
        return d
    out, came_from = {}, {}
    for k, v in d.items():
        n = unwrapped_name(k, model_params) if isinstance(k, str) else k
        if n in out:
            raise EWCInputError(f"{what} names parameter {n!r} twice: as {came_from[n]!r} and as {k!r} "
                                f"(a name taken on the wrapped model and one on the model itself)")
        out[n], came_from[n] = v, k
    return out


def check_task(
    fisher: Mapping[str, torch.Tensor],
    optimal_params: Mapping[str, torch.Tensor],
    known_shapes: Mapping[str, torch.Size],
    model_params: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Validate one task's dicts (name -> tensor) before anything is stored.

    Checks: both are dicts keyed by str, the Fisher not empty; every Fisher name has an anchor
    (``optimal_params`` may name more parameters, e.g. frozen ones the Fisher leaves out: those
    anchors are checked and then ignored); every value a dense floating tensor with data (not
    meta), finite; Fisher >= 0; Fisher and anchor of one name have the same shape, equal to the
    shape registered earlier for that name (``known_shapes``) and, when the model is known
    (``model_params``: every name the model answers to, tied aliases included), to the
    parameter's shape. An extra anchor is checked against the model's shape where the model has
    the name.
    """
    for what, d in (("fisher", fisher), ("optimal_params", optimal_params)):
        if not isinstance(d, Mapping):
            raise EWCInputError(f"{what} must be a dict mapping parameter names to tensors, got {type(d).__name__}")
        for k in d:
            if not isinstance(k, str):
                raise EWCInputError(f"{what} keys must be parameter names (str), got {k!r}")
    only_f = [n for n in fisher if n not in optimal_params]
    if only_f:
        raise EWCInputError(
            f"every parameter in fisher needs an anchor in optimal_params; missing for {_names(only_f)}")
    if not fisher:
        raise EWCInputError("fisher is empty: expected at least one parameter name -> tensor")
    if model_params is not None:
        unknown = [n for n in fisher if n not in model_params]
        if unknown:
            raise EWCInputError(f"the model has no parameter named {_names(unknown)}{_prefix_hint(unknown, model_params)}")
    for name in fisher:
        f, a = fisher[name], optimal_params[name]
        low = _check_tensor(name, f, "fisher")
        _check_tensor(name, a, "optimal_params")
        if f.shape != a.shape:
            raise EWCInputError(
                f"fisher[{name!r}] has shape {tuple(f.shape)} but optimal_params[{name!r}] has shape {tuple(a.shape)}")
        if name in known_shapes and known_shapes[name] != f.shape:
            raise EWCInputError(
                f"fisher[{name!r}] has shape {tuple(f.shape)}, but {tuple(known_shapes[name])} was registered "
                "for it earlier")
        if model_params is not None and model_params[name].shape != f.shape:
            raise EWCInputError(
                f"fisher[{name!r}] has shape {tuple(f.shape)}, but the model's parameter has shape "
                f"{tuple(model_params[name].shape)}")
        if low is not None and bool(low < 0):
            raise EWCInputError(
                f"fisher[{name!r}] has negative entries (min {float(f.min()):.3g}); a Fisher diagonal is >= 0")
    for name, a in optimal_params.items():
        if name in fisher:
            continue
        # Not stored (the Fisher does not cover it), but a bad value here is a bug upstream.
        _check_tensor(name, a, "optimal_params")
        if model_params is not None and name in model_params and model_params[name].shape != a.shape:
            raise EWCInputError(
                f"optimal_params[{name!r}] has shape {tuple(a.shape)}, but the model's parameter has shape "
                f"{tuple(model_params[name].shape)}")


def _names(names, limit: int = 8) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _prefix_hint(unknown, model_params) -> str:
    """Suggest the usual cause: a wrapper prefix such as DDP's ``module.``."""
    for n in unknown:
        for m in model_params:
            if m.endswith("." + n):
                return f" (the model has {m!r}: was the Fisher taken on an unwrapped model?)"
            if n.endswith("." + m):
                return f" (the model has {m!r}: was the Fisher taken on a wrapped model?)"
    return ""
