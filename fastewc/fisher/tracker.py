"""The per-sample Fisher diagonal as a by-product of the training steps a user already runs:
:class:`FisherTracker`.

The rule engine of :func:`~fastewc.estimate_fisher` turns a layer's input ``A`` and output gradient
``G`` into per-sample squared gradients. A training backward computes every layer's ``G`` anyway,
so the tracker records ``A`` with forward hooks, receives ``G`` through a hook on the layer's output
during the user's own backward, and applies the same rules (:mod:`.rules`). Nothing the training
step computes changes: the hooks only read, so parameter gradients, the optimizer and AMP see the
same numbers (two exceptions, which change no value: a position table called without a batch
axis hands on a broadcast view of its own output, documented at :meth:`FisherTracker._rule_hook`,
and a table called without the batch at all hands on its output as a watched alias, followed to
where it meets the batch: :mod:`.tracked_tables`).

This file holds what the user holds: the class, its arguments, ``start`` / ``stop``,
``fisher()``, the saved state, and the plan (which module's rule covers which parameter,
:func:`.plan.make_plan`, refused at construction when a parameter has no per-sample hook). The
hooks that run inside each training step, forward and backward, are :mod:`.tracked_step`'s
(those checking the loss :mod:`.tracked_loss`'s, where the parameters are used
:mod:`.tracked_uses`').

``G[n]`` is ``M w_n`` times the gradient of sample ``n``'s own loss (:mod:`.sample_weights`); the
tracker multiplies it by ``1 / (M w_n)`` before the rules, so what it sums is the square of each
sample's own gradient, never of a batch gradient.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn as nn

from .._utils import unwrap_model
from ..errors import EWCInputError, UntrackableParameters
from .arguments import select_parameters
from .plan import OPS, make_plan
from .problem import model_head
from .sample_weights import REDUCTIONS
from .sums import all_reduce_sums
from .tracked_step import _Pass, _StepHooks

_FORMAT = 1


class FisherTracker(_StepHooks):
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
            A loss of your own over sequences must average (or sum) per sample first: a mean over
            the batch's tokens weighs each sample by its length where lengths differ, which
            neither reduction describes; the first steps read the output gradient for that case
            and warn once. Every sample the model sees must be in the loss (filter a batch
            before the forward, not its outputs): the first steps warn where some samples get no
            output gradient. A cross-entropy on ``[N, C]`` logits is read there too: one scaled
            by a constant not declared, or with class weights and ``reduction="mean"`` (which
            divides by the batch's total weight), is warned about.
        accumulation_steps: ``k`` when you divide the loss by ``k`` for gradient accumulation.
        scaler: the ``torch.amp.GradScaler`` whose ``scale(loss)`` you back-propagate; its scale
            is divided out, and steps whose gradients overflow (which the scaler skips) are not
            counted.
        fraction: track a subset of each batch, ``max(1, round(fraction * N))`` samples drawn
            without replacement by a generator seeded with ``seed`` (``torch.randperm(N)[:k]``,
            sorted), to cut the cost.
        one_in: track one training forward (and its backward) in every ``one_in``, its position
            in each run of ``one_in`` forwards drawn by the same generator; the others run
            untouched. Each tracked step costs what it costs with ``one_in=1``, but a step's fixed
            part (every tracked weight's sum read and written, each layer's hooks) is paid once
            per run instead of at every step, which ``fraction`` cannot save. Combines with
            ``fraction``.
        decay: None (the mean over all samples seen), or a number in [0, 1): an exponential
            moving average over steps (EWC++), ``F <- decay * F + (1 - decay) * F_step`` with
            ``F_step`` the mean over the step's tracked samples; the first step sets ``F``.
        seed: the seed of the ``fraction`` and ``one_in`` draws.

    Refused with :class:`~fastewc.EWCInputError` (the message names what and how to fix it):
    parameters used outside any module's forward (a bare ``nn.Parameter`` such as a class token;
    exclude them with ``params=``), BatchNorm normalising with batch statistics (training mode:
    samples interact, so no per-sample gradient exists in that pass), active dropout inside a
    module without a hand rule that must be replayed (the replay would draw other masks; an
    ``nn.MultiheadAttention`` called once a step is read from its own backward instead), gradient
    checkpointing, two forward passes feeding one backward, and Hugging Face losses whose
    per-sample weights it cannot prove, or that get ``shift_labels`` / ``ignore_index`` beside
    ``labels``. The backward must reach the model's outputs only through the loss (an EWC penalty
    on the parameters is fine): checked for a model's own loss on its first steps (the first
    sample's logits must get that loss's gradient alone: a loss added on the outputs, such as
    distillation, is refused), assumed for a declared one. Each parameter must be used only in
    the forward of the module that holds it (or, for ``out_proj``, of its MultiheadAttention):
    the first tracked forward (again after the modules' modes change) is watched op by op, and a
    use elsewhere that adds to the parameter's gradient (``F.linear(h, self.lin.weight)`` in a
    parent's forward) is refused by name. Assumed, not checked: the samples are on dim 0 of the
    model's first tensor argument (a sequence-first input ``[T, N, d]`` would be taken as T
    samples), and the loss combines per-row losses of its own: a loss that couples rows
    (in-batch negatives, two views of a sample concatenated in one forward and compared across
    rows) has no per-sample gradient. A module without a hand
    rule is run on one sample the first time a call of its structure is seen, to prove which of
    its arguments hold the samples (a table shared by all samples may have as many rows as the
    batch); one that cannot reproduce its batched output
    alone (its samples interact) is refused by name. The first tracked step (again after the
    modules' modes change), and any step where a Linear or norm layer's input does not show by its
    shapes where the samples are (as many positions as samples, ``[T, N, d]`` or ``[N, T, d]`` with
    T = N; or a first axis other than the batch's: a sequence-first ``[T, N, d]``, or the batch
    folded into rows, OPT's ``[N*T, d]`` and Swin's ``[N*windows, ...]``), run the model once more on
    the batch's first sample, without gradients and with the random state restored: the samples'
    axis is the one of size 1 there, a batch folded into rows sample by sample begins with that
    sample's rows, and a table called without the batch keeps its shape (also one with as many
    rows as samples, T5's position buckets at T = N). A table's per-sample gradients are read where
    its output meets the batch in a broadcast (an addition, ``where``, ``expand``, the attention's
    additive mask; :mod:`.tracked_tables`); one meeting it otherwise is refused by name. A layout
    the probe does not show is refused by name.
    """

    def __init__(self, model: nn.Module, *, params=None, reduction: str = "mean", accumulation_steps: int = 1,
                 scaler=None, fraction: float = 1.0, one_in: int = 1, decay: float | None = None, seed: int = 0):
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
        if isinstance(one_in, bool) or not isinstance(one_in, numbers.Integral) or one_in < 1:
            raise EWCInputError(f"one_in must be a positive int (track one training step in every one_in); got "
                                f"{one_in!r}")
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
        self.one_in = int(one_in)
        self._forwards = 0  # training forwards seen (one_in > 1): where the current run stands
        self._pick = 0      # the position tracked in the current run
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
        self._modules: list = []
        self._sites: dict = {}
        self._pass: _Pass | None = None
        self._own_loss_checked = False
        self._sums_over_num_items: bool | None = None  # whether the model's own loss does (unknown: None)
        self._own_paths_checked = 0  # steps whose logits' gradient was checked against output.loss's alone
        self._outputs_checked = 0  # steps whose output gradient was read (samples left out, unequal lengths)
        self._warned: set[str] = set()  # what those reads warned about (once each)
        self._head = model_head(self.model)  # which Hugging Face loss the model computes, if any
        self._layouts: dict = {}  # module-local call structure -> positions of its per-sample arguments
        self._axes: dict[str, int] = {}  # rule site -> the axis holding its samples, where that was unambiguous
        self._assumed: set[str] = set()  # rule sites taken samples first while that was ambiguous (T = N)
        self._folds: set[str] = set()    # rule sites proven fed the batch folded into rows, sample by sample
        self._shapes_seen: dict[str, tuple] = {}  # rule site -> its first input's shape in that forward
        self._tables: set[str] = set()   # sites the probe showed to be tables called without the batch
        self._probing: dict | None = None  # while it runs: rule site -> what its first call gets
        self._replaying = False          # the end of a backward replays module-local sites (the model too)
        self._uses_checked: set = set()  # the modules' modes under which a forward showed every
                                         # parameter used only at its plan's sites (tracked_uses)
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
        self._modules = list(self.model.modules())  # whose modes those are
        return self

    def stop(self) -> "FisherTracker":
        """Remove every hook; the sums are kept (``fisher()``); a step not yet back-propagated is dropped."""
        for h in self._handles + self._site_handles:
            h.remove()
        if self._pass is not None:
            self._pass.end(dropped=True)  # the gradient hooks its forward left on tensors stay quiet
        self._handles, self._site_handles, self._flags, self._pass = [], [], None, None
        return self

    def __enter__(self) -> "FisherTracker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fisher(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}``: the mean over the samples seen of their squared gradients (with
        ``decay``: the moving average over steps); float32, float64 for float64 parameters.

        Under ``torch.distributed`` (DDP: each rank tracks its own samples) the sums and sample
        counts are all-reduced, so every rank gets the Fisher of all ranks' samples: every rank
        must call it. With ``decay`` it is the mean of the ranks' moving averages (the moving
        average of the global step means when every rank's batches are the same size)."""
        if self.decay is not None:
            sums, count = all_reduce_sums(self._sums, 1 if self.steps else 0)
        else:
            sums, count = all_reduce_sums(self._sums, self.samples_seen)
        if count == 0:
            raise EWCInputError("FisherTracker.fisher(): no training step has been tracked yet (run forward and "
                                "backward while the tracker is active)")
        return {n: s / count for n, s in sums.items()}

    def reset(self) -> None:
        """Forget every step seen (the hooks stay as they are)."""
        for s in self._sums.values():
            s.zero_()
        self._assumed.clear()  # what was summed under an assumed layout is gone
        self.samples_seen = self.steps = self.steps_skipped = 0
        self._forwards = 0  # the next training forward starts a run of one_in
        if self._pass is not None:
            self._pass.end()
        self._pass = None

    def state_dict(self) -> dict:
        return {"format": _FORMAT, "sums": {n: s.clone() for n, s in self._sums.items()},
                "samples_seen": self.samples_seen, "steps": self.steps, "steps_skipped": self.steps_skipped,
                "decay": self.decay, "generator": self._generator.get_state(), "forwards": self._forwards,
                "pick": self._pick}

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
        self._forwards, self._pick = int(state.get("forwards", 0)), int(state.get("pick", 0))

    # -- the plan: which module covers which parameter ----------------------------------------
    def _plan(self) -> None:
        plan = make_plan(self.model, self.selected, checked_rules=False)
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
            raise UntrackableParameters(
                f"FisherTracker: {outside[:6]} are used outside any module's forward (a bare nn.Parameter the model's "
                f"forward uses, e.g. a class token or position table): no hook sees a per-sample input and output "
                f"gradient for them. Leave them out: params=lambda n, p: p.requires_grad and n not in {outside[:6]}, "
                f"and estimate them with estimate_fisher", outside)
        self._sites = plan.sites
        self.rules = plan.method_of
        self._uses = {}
        for key, site in self._sites.items():
            for p in site.params.values():
                self._uses.setdefault(p, []).append(key)
