"""Where a tracked forward uses the tracked parameters: :class:`UseCheck`, the tracker's proof
that each parameter's gradient comes only from the modules whose hooks it reads.

The tracker reads a parameter's per-sample gradients at the sites of its plan: the module that
holds the parameter, or the one whose forward reads it for that module (a MultiheadAttention for
its ``out_proj``). A use anywhere else, such as ``F.linear(h, self.lin.weight)`` in a parent's
forward or a child never called whose parameters its parent reads, adds to the parameter's
gradient in the training step without passing any of those hooks: its tracked Fisher would be
wrong, with nothing to show it. ``estimate_fisher`` catches such a use by comparing its rules
with a per-sample loop on two samples; the tracker has no loop to compare with, so it watches a
forward instead: a torch-function mode sees every operation on a tracked parameter, and each
site's forward hooks say whether one of that parameter's sites is running.

It watches one forward (the tracker's first tracked forward after the modules' modes are set),
from the model's forward pre-hook to an ``always_call`` forward hook on the model, so that the
mode and the hooks are gone when that forward returns or raises. Operations under ``no_grad``,
and those whose result does not require grad (``p.dtype``, ``p.detach()``), do not add to the
gradient and are not uses.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


class UseCheck(TorchFunctionMode):
    """Watch the rest of the model's current forward. ``sites``: ``{parameter name: [modules
    whose forward may use it]}``; ``params``: ``{name: parameter}``. ``done(outside)`` is called
    when the forward returns, with ``{name: the first operation using it outside those
    modules}`` (empty where none does)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], sites: dict[str, list],
                 done: Callable[[dict], None]):
        super().__init__()
        self._done = done
        self._watched = {id(p): (n, [id(m) for m in sites[n]]) for n, p in params.items()}
        # the model's own forward is running (a site that is the model counts it so); the hooks
        # below see the calls that begin from now on, including a nested call of the model
        self._running = {id(model): 1}
        self._outside: dict[str, str] = {}
        self._handles = []
        for m in {id(m): m for ms in sites.values() for m in ms}.values():
            if m is not model:
                # the module's forward itself, inside the user's own hooks of it: what a hook does
                # with the parameters passes no hook of the tracker's either
                self._handles.append(m.register_forward_pre_hook(self._enter))
                self._handles.append(m.register_forward_hook(self._exit, always_call=True, prepend=True))
        self._handles.append(model.register_forward_pre_hook(self._enter, prepend=True))
        self._handles.append(model.register_forward_hook(self._model_exit, always_call=True))
        self.__enter__()

    def _enter(self, module, args):
        self._running[id(module)] = self._running.get(id(module), 0) + 1

    def _exit(self, module, args, output):
        self._running[id(module)] -= 1

    def _model_exit(self, module, args, output):
        self._running[id(module)] -= 1
        if self._running[id(module)]:
            return None  # a nested call of the model has ended, not the watched forward
        self.__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        if output is not None:  # None: the forward raised, and that error is the one to see
            self._done(self._outside)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch.is_grad_enabled():
            for t in tree_flatten((args, kwargs))[0]:
                use = self._watched.get(id(t)) if isinstance(t, torch.Tensor) else None
                if (use is not None and use[0] not in self._outside and not any(self._running.get(m) for m in use[1])
                        and any(isinstance(o, torch.Tensor) and o.requires_grad for o in tree_flatten(out)[0])):
                    self._outside[use[0]] = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
        return out
