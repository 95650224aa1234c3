"""The per-sample Fisher diagonal as a by-product of the training steps a user already runs:
:class:`FisherTracker`.

The rule engine of :func:`~fastewc.estimate_fisher` turns a layer's input ``A`` and output gradient
``G`` into per-sample squared gradients. A training backward computes every layer's ``G`` anyway,
so the tracker records ``A`` with forward hooks, receives ``G`` through a hook on the layer's output
during the user's own backward, and applies the same rules (:mod:`.rules`). Nothing the training
step computes changes: the hooks only read, so parameter gradients, the optimizer and AMP see the
same numbers (one exception, documented at :meth:`FisherTracker._rule_hook`: a position table
called without a batch axis hands on a broadcast view of its own output).

``G[n]`` is ``M w_n`` times the gradient of sample ``n``'s own loss (:mod:`.sample_weights`); the
tracker multiplies it by ``1 / (M w_n)`` before the rules, so what it sums is the square of each
sample's own gradient, never of a batch gradient.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._utils import unwrap_model
from ..errors import EWCInputError
from .engine import OPS, make_plan
from .estimate import select_parameters
from .problem import logits_of, model_head, plain_attention
from .rules import BLOCK_BYTES, chunks, sq_sum_of
from .rules.attention import LOCAL_REPLAYS
from .rules.local import Recorded, module_blocks, record
from .sample_weights import REDUCTIONS, check_own_loss, declared_factor, inverse, own_loss_weights

_FORMAT = 1
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass
class _Call:
    """One call of a site in the tracked forward: a rule site's input, or a module-local record."""

    A: torch.Tensor | None                 # rule sites: the input (detached)
    rec: Recorded | None                   # module-local sites
    version: int                           # of A (rule sites): an in-place change makes A stale
    grads: list = field(default_factory=list)   # output gradients, stashed until the backward ends


@dataclass
class _Pass:
    """What one tracked forward recorded, until its backward has been folded into the sums."""

    n: int                                 # samples in the batch
    idx: torch.Tensor | None               # the tracked subset (fraction < 1), sorted
    weights: torch.Tensor | None           # w_n of the model's own loss (dict batches with labels)
    calls: dict                            # site key -> [_Call]
    multiplier: torch.Tensor | None = None # d(objective)/d(model's own loss), seen in the backward
    factor: object = None                  # 1 / (M w_n) of the tracked samples: float or [k] tensor
    started: bool = False
    step: dict = field(default_factory=dict)   # name -> this step's sum of squares (step buffers)

    @property
    def k(self) -> int:
        return self.n if self.idx is None else int(self.idx.numel())


class FisherTracker:
    """Exact per-sample Fisher diagonal (empirical) accumulated from the training steps you run.

    While active, every training backward adds each sample's squared gradient, of that sample's
    own loss, into running sums, by the per-layer rules of :func:`~fastewc.estimate_fisher`::

        tracker = FisherTracker(model)              # the training loss is a mean over the batch
        with tracker:
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        fisher = tracker.fisher()                   # {name: mean over samples seen of g_n^2}

    With the parameters fixed and dropout off this equals ``estimate_fisher(model, same_batches,
    kind="empirical")``; during training it is the Fisher along the trajectory (training mode,
    dropout on).

    Args:
        model: the ``nn.Module`` being trained (DDP / DataParallel are unwrapped).
        params: names / globs / predicate, as in ``estimate_fisher`` (default: every parameter
            with ``requires_grad``).
        reduction: how the loss you back-propagate combines the batch's per-sample losses,
            ``"mean"`` (default) or ``"sum"`` over dim 0. Not used for a Hugging Face model called
            with ``labels`` whose own ``output.loss`` you back-propagate: the tracker reads the
            labels and weighs each sample as that loss does (a token mean for language models).
        accumulation_steps: ``k`` when you divide the loss by ``k`` for gradient accumulation.
        scaler: the ``torch.amp.GradScaler`` whose ``scale(loss)`` you back-propagate; its scale
            is divided out, and steps whose gradients overflow (which the scaler skips) are not
            counted.
        fraction: track a subset of each batch, ``max(1, round(fraction * N))`` samples drawn
            without replacement by a generator seeded with ``seed`` (``torch.randperm(N)[:k]``,
            sorted), to cut the cost.
        decay: None (the mean over all samples seen), or a number in [0, 1): an exponential
            moving average over steps (EWC++), ``F <- decay * F + (1 - decay) * F_step`` with
            ``F_step`` the mean over the step's tracked samples; the first step sets ``F``.
        seed: the seed of the ``fraction`` draw.

    Refused with :class:`~fastewc.EWCInputError` (the message names what and how to fix it):
    parameters used outside any module's forward (a bare ``nn.Parameter`` such as a class token;
    exclude them with ``params=``), BatchNorm normalising with batch statistics (training mode:
    samples interact, so no per-sample gradient exists in that pass), active dropout inside a
    module without a hand rule (its replay would draw other masks), gradient checkpointing, two
    forward passes feeding one backward, and Hugging Face losses whose per-sample weights it cannot
    prove. Assumed, not checked: the backward reaches the model's outputs only through the
    declared loss (an EWC penalty on the parameters is fine), and each parameter is used only in
    the forward of the module that holds it (``estimate_fisher(..., return_info=True)`` proves
    that for a model).
    """

    def __init__(self, model: nn.Module, *, params=None, reduction: str = "mean", accumulation_steps: int = 1,
                 scaler=None, fraction: float = 1.0, decay: float | None = None, seed: int = 0):
        if not isinstance(model, nn.Module):
            raise EWCInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if reduction not in REDUCTIONS:
            raise EWCInputError(f"reduction must be one of {REDUCTIONS} (how your loss combines the batch's "
                                f"per-sample losses); got {reduction!r}")
        if (not isinstance(accumulation_steps, numbers.Integral) or isinstance(accumulation_steps, bool)
                or accumulation_steps < 1):
            raise EWCInputError(f"accumulation_steps must be a positive int (the k your loss is divided by); "
                                f"got {accumulation_steps!r}")
        if (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real)
                or not 0.0 < float(fraction) <= 1.0):
            raise EWCInputError(f"fraction must be a number in (0, 1]; got {fraction!r}")
        if decay is not None and (isinstance(decay, bool) or not isinstance(decay, numbers.Real)
                                  or not 0.0 <= float(decay) < 1.0):
            raise EWCInputError(f"decay must be None (mean over all samples) or a number in [0, 1); got {decay!r}")
        if scaler is not None and not (callable(getattr(scaler, "get_scale", None))
                                       and callable(getattr(scaler, "is_enabled", None))):
            raise EWCInputError(f"scaler must be a torch.amp.GradScaler; got {type(scaler).__name__}")
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise EWCInputError(f"seed must be an int; got {seed!r}")
        self.model = unwrap_model(model)
        self.selected = select_parameters(self.model, params)
        frozen = [n for n, p in self.selected.items() if not p.requires_grad]
        if frozen:
            raise EWCInputError(f"params: {frozen[:4]} do not require grad, so no training backward computes their "
                                f"gradient; leave them out of params=")
        self.reduction = reduction
        self.accumulation_steps = int(accumulation_steps)
        self.scaler = scaler
        self.fraction = float(fraction)
        self.decay = None if decay is None else float(decay)
        self._generator = torch.Generator().manual_seed(int(seed))
        self._dtypes = {n: torch.float64 if p.dtype == torch.float64 else torch.float32
                        for n, p in self.selected.items()}
        self._sums = {n: torch.zeros(p.shape, dtype=self._dtypes[n], device=p.device) for n, p in self.selected.items()}
        self.samples_seen = 0
        self.steps = 0
        self.steps_skipped = 0
        self._handles: list = []
        self._site_handles: list = []
        self._flags = None
        self._sites: dict = {}
        self._pass: _Pass | None = None
        self._own_loss_checked = False
        self.rules: dict[str, str] = {}
        self._plan()  # refuse what no rule covers now, not at the first step

    # -- public API ------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self) -> "FisherTracker":
        """Hook the model: every training backward from now on is tracked."""
        if self.active:
            raise EWCInputError("FisherTracker.start(): already started (stop() first, or use one `with` block)")
        self._handles = [self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                         self.model.register_forward_hook(self._post_hook, with_kwargs=True)]
        self._flags = None  # the site hooks follow the modules' modes, installed at the first forward
        return self

    def stop(self) -> "FisherTracker":
        """Remove every hook; the sums are kept (``fisher()``); a step not yet back-propagated is dropped."""
        for h in self._handles + self._site_handles:
            h.remove()
        self._handles, self._site_handles, self._flags, self._pass = [], [], None, None
        return self

    def __enter__(self) -> "FisherTracker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fisher(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}``: the mean over the samples seen of their squared gradients (with
        ``decay``: the moving average over steps); float32, float64 for float64 parameters."""
        if self.samples_seen == 0:
            raise EWCInputError("FisherTracker.fisher(): no training step has been tracked yet (run forward and "
                                "backward while the tracker is active)")
        if self.decay is not None:
            return {n: s.clone() for n, s in self._sums.items()}
        return {n: s / self.samples_seen for n, s in self._sums.items()}

    def reset(self) -> None:
        """Forget every step seen (the hooks stay as they are)."""
        for s in self._sums.values():
            s.zero_()
        self.samples_seen = self.steps = self.steps_skipped = 0
        self._pass = None

    def state_dict(self) -> dict:
        return {"format": _FORMAT, "sums": {n: s.clone() for n, s in self._sums.items()},
                "samples_seen": self.samples_seen, "steps": self.steps, "steps_skipped": self.steps_skipped,
                "decay": self.decay, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved, into a tracker of the same model and ``decay``."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise EWCInputError(f"state: expected a FisherTracker.state_dict() (format {_FORMAT}); got "
                                f"{type(state).__name__} with format {getattr(state, 'get', lambda k: None)('format')}")
        if state["decay"] != self.decay:
            raise EWCInputError(f"state: saved with decay={state['decay']}, this tracker has decay={self.decay}; the "
                                f"sums mean different things")
        sums = state["sums"]
        if set(sums) != set(self._sums):
            raise EWCInputError(f"state: parameters differ (missing {sorted(set(self._sums) - set(sums))[:4]}, "
                                f"unknown {sorted(set(sums) - set(self._sums))[:4]})")
        for n, t in sums.items():
            if t.shape != self._sums[n].shape:
                raise EWCInputError(f"state: {n!r} has shape {tuple(t.shape)}, the parameter {tuple(self._sums[n].shape)}")
        for n, t in sums.items():
            self._sums[n].copy_(t)
        self.samples_seen, self.steps = int(state["samples_seen"]), int(state["steps"])
        self.steps_skipped = int(state["steps_skipped"])
        self._generator.set_state(state["generator"])

    # -- the plan: which module covers which parameter ----------------------------------------
    def _plan(self) -> None:
        plan = make_plan(self.model, self.selected)
        # MultiheadAttention reads out_proj's weight in its own forward (out_proj is never called):
        # its module-local replay takes out_proj's parameters too, as the engine's probe finds.
        for key, site in list(plan.sites.items()):
            parent = site.module_name.rpartition(".")[0]
            if key.startswith("rule:") and site.module_name and isinstance(
                    self.model.get_submodule(parent), nn.MultiheadAttention):
                plan.to_parent(key, "read by its MultiheadAttention's forward")
        outside = sorted(plan.sites[OPS].params.values()) if OPS in plan.sites else []
        outside += [p for p in plan.leftover if p not in outside]
        if outside:
            raise EWCInputError(
                f"FisherTracker: {outside[:6]} are used outside any module's forward (a bare nn.Parameter the model's "
                f"forward uses, e.g. a class token or position table): no hook sees a per-sample input and output "
                f"gradient for them. Leave them out: params=lambda n, p: p.requires_grad and n not in {outside[:6]}, "
                f"and estimate them with estimate_fisher")
        self._sites = plan.sites
        self.rules = plan.method_of
        self._uses = {}
        for key, site in self._sites.items():
            for p in site.params.values():
                self._uses.setdefault(p, []).append(key)

    def _install_site_hooks(self) -> None:
        for h in self._site_handles:
            h.remove()
        self._plan()  # a rule may apply in one mode and not another (BatchNorm)
        self._site_handles = []
        for key, site in self._sites.items():
            hook = self._rule_hook(key) if site.rule is not None else self._local_hook(key)
            self._site_handles.append(site.module.register_forward_hook(hook, with_kwargs=True))

    # -- forward -------------------------------------------------------------------------------
    def _pre_hook(self, module, args, kwargs):
        if not torch.is_grad_enabled():
            return None  # evaluation: nothing to track
        if torch._C._current_graph_task_id() != -1:
            raise EWCInputError("FisherTracker: the model's forward runs inside a backward (gradient checkpointing "
                                "recomputes it): the tracker cannot tell that forward from a training one; turn "
                                "checkpointing off while tracking")
        self._refuse_mixing()
        flags = tuple(m.training for m in self.model.modules())
        if flags != self._flags:
            self._install_site_hooks()
            self._flags = flags
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
        if not leaves:
            raise EWCInputError("FisherTracker: the model was called without a tensor input with a batch axis")
        n = leaves[0].shape[0]
        labels = kwargs.get("labels") if isinstance(kwargs.get("labels"), torch.Tensor) else None
        weights = None
        if labels is not None:
            if args:
                raise EWCInputError("FisherTracker: a model called with labels= computes its own loss; pass its "
                                    "inputs as keywords too (model(**batch)) so that the tracker reads the batch")
            weights = own_loss_weights(self.model, model_head(self.model), labels, kwargs.get("num_items_in_batch"))
        idx = None
        if self.fraction < 1.0:
            k = max(1, round(self.fraction * n))
            idx = torch.randperm(n, generator=self._generator)[:k].sort().values.to(leaves[0].device)
        self._pass = _Pass(n, idx, weights, {key: [] for key in self._sites})
        return None

    def _refuse_mixing(self) -> None:
        for name, m in self.model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
                raise EWCInputError(
                    f"FisherTracker: BatchNorm {name!r} normalises with the batch's statistics (training mode), so each "
                    f"sample's gradient depends on the other samples of its batch and no per-sample Fisher exists in "
                    f"this pass. Put BatchNorm in eval mode while tracking (m.eval() for each BatchNorm), or use "
                    f"estimate_fisher after training")

    def _post_hook(self, module, args, kwargs, output):
        p = self._pass
        if p is None or p.weights is None or not torch.is_grad_enabled():
            return None
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return None
        if not self._own_loss_checked:
            check_own_loss(self.model, model_head(self.model), logits_of(output), kwargs["labels"], p.weights, loss)
            self._own_loss_checked = True
        loss.register_hook(partial(self._on_loss_grad, p))
        return None

    def _rule_hook(self, key: str):
        site = self._sites[key]

        def hook(module, args, kwargs, output):
            """Record the input. A position table called without a batch axis (``wpe(arange(T)[None])``,
            added to a batch by broadcasting) hands on ``output.expand(N, ...)``: the same values,
            broadcast as the addition would, so that its gradient arrives per sample."""
            p = self._pass
            if p is None or not torch.is_grad_enabled():
                return None
            if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                raise EWCInputError(f"FisherTracker: {site.module_name} ({type(module).__name__}) is called with keyword, "
                                    f"several or non-tensor arguments; its rule reads one input tensor")
            A, handed = args[0], None
            if A.dim() == 0 or A.shape[0] != p.n:
                if (isinstance(module, nn.Embedding) and A.dim() > 0 and A.shape[0] == 1 and output.shape[0] == 1):
                    A = A.expand(p.n, *A.shape[1:])
                    output = handed = output.expand(p.n, *output.shape[1:])
                else:
                    raise EWCInputError(
                        f"FisherTracker: {site.module_name} ({type(module).__name__}) is called on a tensor of shape "
                        f"{tuple(A.shape)} whose first axis is not the batch of {p.n} samples; the per-sample rules "
                        f"need the samples on dim 0")
            if output.requires_grad:
                calls = p.calls[key]
                calls.append(_Call(A.detach(), None, A._version))
                output.register_hook(partial(self._on_grad, p, key, len(calls) - 1, 0))
            return handed
        return hook

    def _local_hook(self, key: str):
        site = self._sites[key]

        def hook(module, args, kwargs, output):
            p = self._pass
            if p is None or not torch.is_grad_enabled():
                return None
            active = [name for name, m in module.named_modules()
                      if m.training and ((isinstance(m, _DROPOUTS) and m.p > 0)
                                         or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0))]
            if active:
                raise EWCInputError(
                    f"FisherTracker: {site.module_name} ({type(module).__name__}) has no hand rule, so its parameters' "
                    f"per-sample gradients come from replaying it, and its dropout "
                    f"({site.module_name + ('.' + active[0] if active[0] else '')}) is active: a replay draws other "
                    f"masks. Set that dropout to 0 (or the module to eval mode), or leave its parameters out with params=")
            rec = record(args, kwargs, output, p.n)
            if not rec.batched or not rec.outputs:
                raise EWCInputError(f"FisherTracker: {site.module_name} ({type(module).__name__}) is called without "
                                    f"the batch of {p.n} samples on dim 0 of its inputs and outputs")
            outs = [t for t in rec.outputs if t.requires_grad]
            if not outs:
                return None
            handed = None
            if len(rec.outputs) > 1:
                # One output may be computed from another inside the module: the gradient w.r.t. each
                # is taken through an alias that only the rest of the model uses, or the replay's
                # vector-Jacobian product would count the inner path twice.
                rec.outputs = [t.view_as(t) for t in rec.outputs]
                leaves, spec = tree_flatten(output)
                for k, t in zip(rec.out_index, rec.outputs):
                    leaves[k] = t
                handed = tree_unflatten(leaves, spec)
            calls = p.calls[key]
            calls.append(_Call(None, rec, 0, [None] * len(rec.outputs)))
            for slot, t in enumerate(rec.outputs):
                if t.requires_grad:
                    t.register_hook(partial(self._on_grad, p, key, len(calls) - 1, slot))
            return handed
        return hook

    # -- backward ------------------------------------------------------------------------------
    def _on_loss_grad(self, p: _Pass, g: torch.Tensor):
        p.multiplier = g.detach().reshape(())
        self._begin(p)

    def _begin(self, p: _Pass) -> None:
        """First hook of the backward through pass ``p``: fix the per-sample factor and queue the
        step's completion for when the backward ends."""
        if p is not self._pass:
            raise EWCInputError("FisherTracker: a backward runs through a forward pass that is not the latest one "
                                "(two forward passes feeding one backward, or a second backward through one graph): "
                                "the tracker handles one backward per forward")
        if p.started:
            return
        p.started = True
        if p.weights is not None:
            if p.multiplier is None:
                raise EWCInputError(
                    "FisherTracker: the model was called with labels but the backward does not go through its own "
                    "loss (output.loss), so each sample's share of the loss is unknown; back-propagate output.loss, or "
                    "call the model without labels and declare your loss with reduction='mean' or 'sum'")
            c = inverse(p.weights, p.multiplier)
            p.factor = c if p.idx is None else c[p.idx]
        else:
            scale = 1.0
            if self.scaler is not None and self.scaler.is_enabled():
                scale = getattr(self.scaler, "_scale", None)
                # the scale tensor, not get_scale(): no host-device sync; float64 so that N k / scale
                # rounds no worse than the gradients it multiplies
                scale = self.scaler.get_scale() if not isinstance(scale, torch.Tensor) else scale.reshape(()).double()
            # the loss was multiplied by scale / k and weighs each sample by w_n
            p.factor = declared_factor(self.reduction, p.n) * self.accumulation_steps / scale
        torch.autograd.Variable._execution_engine.queue_callback(partial(self._finish, p))

    def _on_grad(self, p: _Pass, key: str, c: int, slot: int, G: torch.Tensor):
        with torch.no_grad():
            self._begin(p)
            call = p.calls[key][c]
            site = self._sites[key]
            if site.rule is None or len(p.calls[key]) > 1 or any(len(self._uses[q]) > 1 for q in site.params.values()):
                call.grads = call.grads or [None]
                call.grads[slot] = G.detach()   # added to its other uses' when the backward ends
                return None
            if call.A._version != call.version:
                raise EWCInputError(f"FisherTracker: the input of {site.module_name} was modified in place after the "
                                    f"call, so the recorded input is not what the layer saw")
            dtype = self._site_dtype(site)
            A, G = self._tracked(p, call.A, dtype), self._scaled(p, self._tracked(p, G.detach(), dtype))
            got = sq_sum_of(site.rule, site.module, A, [G])
            for attr, name in site.params.items():
                self._add(p, name, got[attr])
        return None

    def _site_dtype(self, site) -> torch.dtype:
        return torch.float64 if any(self._dtypes[n] == torch.float64 for n in site.params.values()) else torch.float32

    @staticmethod
    def _tracked(p: _Pass, t: torch.Tensor, dtype) -> torch.Tensor:
        t = t if p.idx is None else t.index_select(0, p.idx)
        return t.to(dtype) if t.is_floating_point() else t

    @staticmethod
    def _scaled(p: _Pass, G: torch.Tensor) -> torch.Tensor:
        f = p.factor
        if isinstance(f, torch.Tensor) and f.dim() == 1:
            return G * f.to(G.dtype).view(-1, *([1] * (G.dim() - 1)))
        return G * (f.to(G.dtype) if isinstance(f, torch.Tensor) else f)

    def _add(self, p: _Pass, name: str, sq: torch.Tensor) -> None:
        if self.decay is None and self.scaler is None:
            self._sums[name].add_(sq.to(self._dtypes[name]))
        elif name in p.step:
            p.step[name].add_(sq.to(self._dtypes[name]))
        else:
            p.step[name] = sq.to(self._dtypes[name]).clone()

    def _finish(self, p: _Pass) -> None:
        """The backward through ``p`` ended: add up the uses of shared parameters and of the
        module-local sites, square and sum them; fold the step into the running Fisher."""
        if p is not self._pass:
            return
        self._pass = None
        with torch.no_grad(), plain_attention():
            self._shared(p)
            self._fold(p)

    def _shared(self, p: _Pass) -> None:
        users = [(key, c) for key, calls in p.calls.items() for c, call in enumerate(calls)
                 if any(g is not None for g in call.grads)]
        if not users:
            return
        names = {n for key, _ in users for n in self._sites[key].params.values()}
        per = sum(self.selected[n].numel() * self.selected[n].element_size() for n in names)
        prepared = {u: self._prepare(p, *u) for u in users}
        # Rules that add into another use's block (an embedding into its tied head) come last.
        users.sort(key=lambda u: (self._sites[u[0]].rule is not None and self._sites[u[0]].rule.add_into is not None,
                                  str(u)))
        for i, j in chunks(p.k, per, BLOCK_BYTES // 4):
            acc: dict[str, torch.Tensor] = {}
            for key, c in users:
                site = self._sites[key]
                A, rec, grads = prepared[(key, c)]
                mine = {a: n for a, n in site.params.items()}
                if (site.rule is not None and site.rule.add_into is not None and all(n in acc for n in mine.values())
                        and site.rule.add_into(site.module, A[i:j], grads[0][i:j], {a: acc[n] for a, n in mine.items()})):
                    continue
                for attr, b in self._blocks(site, A, rec, grads, i, j).items():
                    name = site.params.get(attr)
                    if name is None:
                        continue
                    if name in acc:
                        acc[name].add_(b)
                    else:
                        # later uses add into it in place: it must own its memory
                        acc[name] = b.clone() if b._is_view() or any(
                            b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() for a in acc.values()) else b
            for name, b in acc.items():
                self._add(p, name, b.square().sum(0))

    def _prepare(self, p: _Pass, key: str, c: int):
        """``(A, rec, grads)`` of one stashed use, restricted to the tracked samples and scaled."""
        site, call = self._sites[key], p.calls[key][c]
        dtype = self._site_dtype(site)
        if site.rule is not None:
            if call.A._version != call.version:
                raise EWCInputError(f"FisherTracker: the input of {site.module_name} was modified in place after the "
                                    f"call, so the recorded input is not what the layer saw")
            return self._tracked(p, call.A, dtype), None, [self._scaled(p, self._tracked(p, call.grads[0], dtype))]
        rec = call.rec
        grads = [self._scaled(p, self._tracked(p, torch.zeros_like(o) if g is None else g, o.dtype))
                 for g, o in zip(call.grads, rec.outputs)]
        if p.idx is not None:
            leaves = list(rec.leaves)
            for k in rec.batched:
                leaves[k] = leaves[k].index_select(0, p.idx)
            rec = Recorded(leaves, rec.spec, rec.outputs, rec.out_index, p.k)
        return None, rec, grads

    def _blocks(self, site, A, rec, grads, i, j) -> dict:
        if site.rule is not None:
            return site.rule.per_sample(site.module, A[i:j], grads[0][i:j])
        attrs = list(site.params)
        replay = LOCAL_REPLAYS.get(type(site.module))
        got = replay(site.module, attrs, rec, grads, i, j) if replay is not None else None
        if got is None:
            got = module_blocks(site.module, attrs, rec, grads, i, j)
        dtype = self._site_dtype(site)
        return {a: t.to(dtype) for a, t in got.items()}

    def _fold(self, p: _Pass) -> None:
        if p.step and self.scaler is not None and self.scaler.is_enabled():
            if not bool(torch.isfinite(torch.stack([s.sum() for s in p.step.values()]).sum())):
                self.steps_skipped += 1   # the scaler skips this step's update: so does the Fisher
                return
        if self.decay is not None:
            for name, s in self._sums.items():
                step = p.step.get(name)
                mean = step / p.k if step is not None else torch.zeros_like(s)
                if self.steps == 0:
                    s.copy_(mean)
                else:
                    s.mul_(self.decay).add_(mean, alpha=1.0 - self.decay)
        elif p.step:
            for name, s in p.step.items():
                self._sums[name].add_(s)
        self.samples_seen += p.k
        self.steps += 1
