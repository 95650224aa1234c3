"""One training step under :class:`~fastewc.FisherTracker`: its forward recorded, its backward
folded into the running sums.

:class:`_StepHooks` is the half of the tracker that runs inside the user's step. Forward: the
model's pre-hook opens a :class:`_Pass` (the batch size, the tracked subset, the per-sample
weights of a model's own loss), and a hook on every site of the tracker's plan records each
call's input (rule sites) or inputs and outputs (module-local sites) and hooks the outputs'
gradients. Backward: the first gradient fixes the per-sample factor ``1 / (M w_n)``
(:mod:`.sample_weights`); a site with one use of parameters used nowhere else is squared and
summed at once by its rule; the other uses are stashed, and when the backward ends their
per-sample gradients are added up, squared and summed, and the step is folded into the running
Fisher (mean or moving average; skipped with the scaler's overflowing steps). What the step's
loss must be for that factor to hold is checked by the loss-side hooks it inherits
(:mod:`.tracked_loss`).

It holds no state of its own: it reads the tracker's plan (``_sites``, ``_uses``), options
(``fraction``, ``one_in``, ``reduction``, ``accumulation_steps``, ``scaler``, ``decay``), the
modes whose plan's parameter uses a forward has checked (``_uses_checked``, :mod:`.tracked_uses`), sums
(``_sums``, ``_dtypes``, ``samples_seen``, ``steps``, ``steps_skipped``) and where the run of
``one_in`` forwards stands (``_forwards``, ``_pick``), all set by
:class:`~.tracker.FisherTracker`, and calls its ``_plan()`` when the modules' modes change.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._utils import AUTOCAST_DEVICES, autocast_state, precision
from ..errors import EWCInputError, UntrackableParameters
from .problem import plain_attention, untouched_rng
from .rules import add_sq_sums
from .rules.registry import factor_terms
from .rules.attention import sq_sums_into
from .rules.embedding import lookup_rows
from .rules.local import Recorded
from .rules.replay import local_blocks, local_sq_sums, observe_call, record_call
from .recording import inner_sample_axis
from .rules.tied_head import head_and_rows_sq_sum, tied_uses
from .sample_weights import declared_factor, inverse, own_loss_weights
from .sums import all_finite, squares_of_uses
from .tracked_loss import _LossChecks
from .tracked_tables import Table, Watched, sample_cotangent, table_of, watch
from .tracked_uses import UseCheck

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass
class _Call:
    """One call of a site in the tracked forward: a rule site's input, or a module-local record."""

    A: torch.Tensor | None                 # rule sites: the input (detached), samples first
    rec: Recorded | None                   # module-local sites
    version: int                           # of A (rule sites): an in-place change makes A stale
    grads: list = field(default_factory=list)   # output gradients, samples first, stashed until the backward ends
    observed: object = None                # module-local sites: what its own backward hands over
    axis: int = 0                          # rule sites: the axis of the input and output holding the samples
    fold: int = 1                          # rule sites: rows per sample of a batch folded into rows (A: [n, fold, ...])
    shapes: dict = field(default_factory=dict)  # output slot -> its shape, where the hook sits on the product
                                           # the output reshapes (_hook_target)
    versions: list = field(default_factory=list)  # module-local sites: the aliased outputs' versions at the call


@dataclass
class _Pass:
    """What one tracked forward recorded, until its backward has been folded into the sums."""

    n: int                                 # samples in the batch
    idx: torch.Tensor | None               # the tracked subset (fraction < 1), sorted
    weights: torch.Tensor | None           # w_n of the model's own loss (dict batches with labels)
    calls: dict                            # site key -> [_Call]
    multiplier: torch.Tensor | None = None # d(objective)/d(model's own loss), seen in the backward
    factor: object = None                  # 1 / (M w_n) of the tracked samples: float or [k] tensor
    weights_without_num_items: torch.Tensor | None = None  # w_n were the model's loss to ignore
                                           # num_items_in_batch, while which it does is unknown
    started: bool = False
    dropped: bool = False                  # the tracker stopped before this pass's backward
    step: dict = field(default_factory=dict)   # name -> this step's sum of squares (step buffers)
    autocast: dict = field(default_factory=dict)   # the forward's autocast state, for replays
    inputs: tuple = ((), {})               # the model's arguments, for the probe of the layers' layouts
    probe: dict | None = None              # what the probe saw on this pass's first sample (_probe)
    tables: list = field(default_factory=list)  # the tables watched in this forward (tracked_tables.Table)

    @property
    def k(self) -> int:
        return self.n if self.idx is None else int(self.idx.numel())

    def end(self, dropped: bool = False) -> None:
        """Let go of what the forward recorded, when the pass is folded, dropped or replaced. A
        module-local record holds the outputs whose gradient hooks hold this pass: a cycle through
        autograd's nodes that Python's collector cannot see, which would keep each step's whole
        graph alive."""
        self.dropped = self.dropped or dropped
        self.calls = {}
        self.inputs = ((), {})
        self.probe = None
        self.tables = []


def _own_arithmetic():
    """What the tracker's own arithmetic in a gradient hook runs under: no autograd recording and
    no autocast. Inside a backward both are off already unless the user asked otherwise
    (``create_graph=True``, a backward called within an autocast region on the CPU); then, at
    every hook of every step, nothing is entered."""
    if not torch.is_grad_enabled() and not any(torch.is_autocast_enabled(d) for d in AUTOCAST_DEVICES):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(precision({}))
    return stack


def _hook_target(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose gradient hook sees the gradient of a layer's output ``t`` even where the
    model modifies ``t`` in place afterwards: ``t``, or the product ``t`` reshapes. A Linear's
    output on three or more axes is a view of its two-axis product, and autograd routes the
    gradient of a view modified in place (Longformer's ``query /= sqrt(d)``, a residual added in
    place) around the view's own node, where a hook on ``t`` sits: it never ran, and that call's
    squares were missing without an error. The product's node stays on the path."""
    b = t._base
    if b is not None and b.requires_grad and b.numel() == t.numel() and b.is_contiguous() and t.is_contiguous():
        return b
    return t


def _shapes(values) -> tuple:
    """The shape of each tensor among ``values`` (None for anything else)."""
    return tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in values)


def _fingerprint(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` (its first axis) projected on one fixed random direction, in float64, and
    the same for the rows' magnitudes: rows compared without being kept."""
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    v = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(flat.device)
    return flat @ v, flat.abs() @ v.abs()


# Relative tolerance of a value computed on the batch against the same on one sample alone (the
# products' summation orders differ), by dtype; 1e-2 for half precision.
_ONE_SAMPLE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _first_rows(A: torch.Tensor, k: int, seen: tuple) -> bool:
    """Whether the step's input ``A`` (a batch folded into rows) begins with the ``k`` rows that the
    probe's first sample got (``seen``: their :func:`_fingerprint`), to the rounding of a batched
    against a one-sample pass. Rows all alike are refused: they could be any sample's."""
    want, scale = seen
    if want.numel() != k or bool((want == want[0]).all()):
        return False
    got, _ = _fingerprint(A[:k])
    tol = _ONE_SAMPLE_RTOL.get(A.dtype, 1e-2) if A.is_floating_point() else 0.0
    return bool(((got - want).abs() <= tol * scale).all())


# Keywords a Hugging Face model hands to its own loss that change which labels it counts.
_LOSS_READS = ("shift_labels", "ignore_index")

class _StepHooks(_LossChecks):
    """The forward and backward hooks of :class:`~.tracker.FisherTracker` (a base class of it)."""

    # -- forward -------------------------------------------------------------------------------
    def _install_site_hooks(self) -> None:
        for h in self._site_handles:
            h.remove()
        self._plan()  # a rule may apply in one mode and not another (BatchNorm)
        self._site_handles = []
        for key, site in self._sites.items():
            hook = self._rule_hook(key) if site.rule is not None else self._local_hook(key)
            # first of the module's forward hooks: what the module computed, before a hook of the
            # user's changes it (scales, masks), which the rules could not know of
            self._site_handles.append(site.module.register_forward_hook(hook, with_kwargs=True, prepend=True))

    def _pre_hook(self, module, args, kwargs):
        if not torch.is_grad_enabled() or self._replaying:
            return None  # evaluation, or the tracker's own replay of a model that holds parameters itself
        if torch._C._current_graph_task_id() != -1:
            raise EWCInputError("FisherTracker: the model's forward runs inside a backward (gradient checkpointing "
                                "recomputes it): the tracker cannot tell that forward from a training one; turn "
                                "checkpointing off while tracking")
        flags = tuple([m.training for m in self._modules])  # a list read at start(): no walk a step
        if flags != self._flags:  # a BatchNorm's mode is among the flags: checked when they change
            self._refuse_mixing()
            self._install_site_hooks()
            self._flags = flags
        if self.one_in > 1 and not self._tracks_this_forward():
            if self._pass is not None:
                self._pass.end()  # as below: a later backward through it is refused
            self._pass = None     # the hooks do nothing without a pass
            return None
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
        if not leaves:
            raise EWCInputError("FisherTracker: the model was called without a tensor input with a batch axis")
        n = leaves[0].shape[0]
        labels = kwargs.get("labels") if isinstance(kwargs.get("labels"), torch.Tensor) else None
        weights = without = None
        if labels is not None:
            if args:
                raise EWCInputError("FisherTracker: a model called with labels= computes its own loss; pass its "
                                    "inputs as keywords too (model(**batch)) so that the tracker reads the batch")
            other = sorted(k for k in _LOSS_READS if kwargs.get(k) is not None)
            if other:
                raise EWCInputError(
                    f"FisherTracker: the model is called with {other} besides labels=; its own loss then reads "
                    f"them, and the tracker, which weighs each sample by its counted labels (-100 ignored), could "
                    f"not know each sample's share. Call it with labels= alone, or compute the loss yourself as a "
                    f"mean or sum over the batch's samples and declare it: FisherTracker(model, reduction=...)")
            num_items = kwargs.get("num_items_in_batch")
            weights = own_loss_weights(self.model, self._head, labels,
                                       None if self._sums_over_num_items is False else num_items)
            if num_items is not None and self._sums_over_num_items is None:
                # which convention the model's loss follows is read after the forward (_post_hook)
                without = own_loss_weights(self.model, self._head, labels, None)
        idx = None
        if self.fraction < 1.0:
            k = max(1, round(self.fraction * n))
            idx = torch.randperm(n, generator=self._generator)[:k].sort().values.to(leaves[0].device)
        if self._pass is not None:
            self._pass.end()  # a forward whose backward never ran (its backward, if it comes, is refused)
        self._pass = _Pass(n, idx, weights, {key: [] for key in self._sites}, autocast=autocast_state(),
                           inputs=(args, kwargs), weights_without_num_items=without)
        if flags not in self._uses_checked:  # the first tracked forward of these modes' plan
            self._probe(self._pass)  # each site's first call is checked against it (_is_table)
            UseCheck(self.model, self.selected, {n: [self._sites[k].module for k in keys] for n, keys in self._uses.items()},
                     partial(self._used_outside, self._pass, flags))
        return None

    def _used_outside(self, p: _Pass, flags: tuple, outside: dict) -> None:
        """The end of a forward watched by :class:`.tracked_uses.UseCheck`: refuse parameters used
        outside the modules whose hooks read them (their gradient would have parts no hook sees)."""
        if not outside:
            self._uses_checked.add(flags)
            return
        p.end(dropped=True)
        if self._pass is p:
            self._pass = None
        names = sorted(outside)
        where = "; ".join(f"{n!r} by {outside[n]}" for n in names[:4])
        raise UntrackableParameters(
            f"FisherTracker: {names[:6]} are used in the model's forward outside the modules whose hooks read their "
            f"per-sample gradients ({where}): e.g. a layer's weight passed to F.linear in its parent's forward, or "
            f"a child module never called whose parameters its parent reads. That use's share of each sample's "
            f"gradient passes no hook, so their tracked Fisher would be wrong. Leave them out: params=lambda n, p: "
            f"p.requires_grad and n not in {names[:6]}, and estimate them with estimate_fisher (which finds such "
            f"uses); or use each parameter only through the module that holds it", names)

    def _tracks_this_forward(self) -> bool:
        """Whether this training forward is the one of its run of ``one_in`` that is tracked (its
        position drawn when the run starts, so that a loader's period cannot line up with it)."""
        at = self._forwards % self.one_in
        if at == 0:
            self._pick = int(torch.randint(self.one_in, (1,), generator=self._generator))
        self._forwards += 1
        return at == self._pick

    def _probe(self, p: _Pass) -> dict:
        """What each site's first call gets when the model runs on the first sample of pass ``p``'s
        batch alone: ``{site key: (input shape, its rows' fingerprints)}`` for a rule site, ``{site
        key: (its tensor arguments' shapes, its outputs' shapes)}`` for a module-local one. Run at
        most once a pass: at the first tracked forward of each set of modules' modes (before it, so
        that each site's first call there is checked against it: :meth:`_is_table`), and by a
        layer whose layout its shapes cannot tell: an input with as many positions as samples (T =
        N: ``[T, N, d]`` or ``[N, T, d]``), or one whose first axis is not the batch's (sequence
        first, or the batch folded into rows). On one sample the samples' axis is the one of size
        1, a batch folded into rows gives that sample's rows alone, and a table the model calls
        without the batch has the shape it has in the step. The run
        is nested in the step's forward, without gradients (the hooks only note what the layers
        get, nothing is summed) and with the random state saved and restored around it (the rest
        of the step draws the dropout masks it would draw untracked). The shapes it shows are kept
        (:meth:`_axis_shown`). Empty for a model that cannot run one sample, or is
        given an argument that its forward might change (anything but tensors and plain values: a
        key-value cache)."""
        if p.probe is not None:
            return p.probe
        p.probe = {}
        n = p.n
        args, kwargs = p.inputs
        leaves, spec = tree_flatten((args, kwargs))
        if not all(x is None or isinstance(x, (torch.Tensor, bool, int, float, str)) for x in leaves):
            return p.probe  # an object the forward may change (a key-value cache): the step's call alone uses it
        one = [x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n else x for x in leaves]
        args1, kwargs1 = tree_unflatten(one, spec)
        self._probing = {}
        try:
            with torch.no_grad(), untouched_rng(leaves):
                self.model(*args1, **kwargs1)
        except Exception:  # noqa: BLE001 - a model that needs more than one sample: no probe
            self._probing = {}
        finally:
            p.probe, self._probing = self._probing, None
        for key, (shape, _) in p.probe.items():
            if self._sites[key].rule is not None:
                self._shapes_seen.setdefault(key, shape)
        return p.probe

    def _axis_shown(self, key: str, A: torch.Tensor) -> int | None:
        """The axis of ``A`` that the probe showed holds the samples: the one whose size the
        one-sample input had as 1, all others equal; None where the probe showed none (or ran on
        a batch of other shapes)."""
        shape = self._shapes_seen.get(key)
        if shape is None or len(shape) != A.dim():
            return None
        axes = [a for a in range(A.dim() - 1)
                if shape[a] == 1 and shape[:a] + shape[a + 1:] == tuple(A.shape[:a]) + tuple(A.shape[a + 1:])]
        return axes[0] if len(axes) == 1 else None

    def _refuse_mixing(self) -> None:
        for name, m in self.model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
                raise EWCInputError(
                    f"FisherTracker: BatchNorm {name!r} normalises with the batch's statistics (training mode), so each "
                    f"sample's gradient depends on the other samples of its batch and no per-sample Fisher exists in "
                    f"this pass. Put BatchNorm in eval mode while tracking (m.eval() for each BatchNorm), or use "
                    f"estimate_fisher after training")

    def _rule_hook(self, key: str):
        site = self._sites[key]

        def hook(module, args, kwargs, output):
            """Record the input. A position table called without a batch axis (``wpe(arange(T)[None])``,
            added to a batch by broadcasting) hands on ``output.expand(N, ...)``: the same values,
            broadcast as the addition would, so that its gradient arrives per sample."""
            if self._probing is not None:  # the one-sample forward of _probe: what the layer gets
                if args and isinstance(args[0], torch.Tensor) and key not in self._probing:
                    x = args[0]
                    self._probing[key] = (tuple(x.shape), _fingerprint(x) if x.dim() else None)
                return None
            p = self._pass
            if p is None or not torch.is_grad_enabled():
                return None
            if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                raise self._untrackable([key], f"FisherTracker: {site.module_name} ({type(module).__name__}) is called "
                                            f"with keyword, several or non-tensor arguments; its rule reads one input "
                                            f"tensor")
            A, handed, axis, fold = args[0], None, 0, 1
            if (isinstance(module, nn.Embedding) and A.dim() > 0 and A.shape[0] == 1 and output.shape[0] == 1
                    and p.n != 1):
                A = A.expand(p.n, *A.shape[1:])
                output = handed = output.expand(p.n, *output.shape[1:])
            elif isinstance(A, Watched) or self._is_table(key, [A], [output]):
                return self._watch_table(p, key, output, table_of([A]))
            else:
                axis, fold = self._sample_axis(key, module, A, output, p.n)
            if output.requires_grad:
                calls = p.calls[key]
                mine = A.detach().movedim(axis, 0) if fold == 1 else A.detach().unflatten(0, (p.n, fold))
                hooked = output if handed is not None else _hook_target(output)
                calls.append(_Call(mine, None, A._version, axis=axis, fold=fold,
                                   shapes={0: tuple(output.shape)} if hooked is not output else {}))
                hooked.register_hook(partial(self._on_grad, p, key, len(calls) - 1, 0))
            else:
                self._refuse_frozen(site)
            return handed
        return hook

    def _sample_axis(self, key: str, module: nn.Module, A: torch.Tensor, output, n: int) -> tuple[int, int]:
        """``(axis, fold)``: the axis of a rule site's input (and output) that holds the samples, and
        the rows each sample has there when the batch is folded into rows (else 1).

        The first axis, where it has the batch's size and no other axis does. Else the layout is
        read from the probe (:meth:`_probe`) the first time: an inner axis where the probe's input
        has size 1 there and the step's has the batch (a layer fed ``[T, N, d]``, as PyTorch's
        sequence-first layers are), or ``k`` rows per sample where the step's first axis is ``N k``
        and the probe's ``k``, its rows those the step's input begins with (the batch folded into
        rows sample by sample: OPT's layers on ``[N*T, d]``, Swin's attention on ``[N*windows, ...]``;
        a fold in another order, ``[T*N, d]``, shows other rows first). Shapes alone cannot tell a
        fold ``[N*k, N, d]`` from a sequence-first input, so without a probe an inner axis is read
        from them only where the first axis is not a multiple of the batch. Where the first axis
        has the batch's size and another does too (T = N), the axis this site had where that was
        unambiguous or in the probe serves, else the first, and a later call that shows otherwise
        is an error naming the steps taken the wrong way, never a silent sum."""
        site = self._sites[key]
        known = self._axes.get(key)
        if A.dim() > 0 and A.shape[0] == n:
            if not (site.rule.sequence and A.dim() >= 3 and n in A.shape[1:-1]):
                axis = 0                      # unambiguous
            else:
                if known is None:  # the first tracked forward of these modes ran the probe (_pre_hook)
                    known = self._axis_shown(key, A)
                    if known is not None:
                        self._axes[key] = known
                if known is None:
                    self._assumed.add(key)    # T = N, and neither a step nor the probe told the layout
                return (0 if known is None else known), 1
        elif site.rule.sequence and (layout := self._not_first(key, A, output, n)) is not None:
            axis, fold = layout
            if fold > 1:
                return 0, fold
        else:
            folded = A.dim() > 0 and A.shape[0] > n and A.shape[0] % n == 0
            raise self._untrackable([key],
                f"FisherTracker: {site.module_name} ({type(module).__name__}) is called on a tensor of shape "
                f"{tuple(A.shape)} whose first axis is not the batch of {n} samples"
                + ("; its rule needs the samples on dim 0" if not site.rule.sequence else
                   ", and the model run on its first sample alone does not show where the samples are there (on "
                   "one inner axis, or folded into the first axis sample by sample, as its rule needs)")
                + (f". The first axis is {A.shape[0] // n} rows per sample: "
                   + ("a layer without sequence axes on a batch folded into rows is not tracked"
                      if not site.rule.sequence else "a batch folded into rows is tracked where the model's forward "
                      "runs on one sample and that sample's rows come first")
                   + "; estimate_fisher covers it after training" if folded else "")
                + f", or leave {site.module_name}'s parameters out with params=")
        if known is None and axis != 0 and key in self._assumed:
            raise EWCInputError(
                f"FisherTracker: {site.module_name} ({type(module).__name__}) takes its samples on axis {axis} "
                f"(shape {tuple(A.shape)} now), but earlier steps called it with as many positions as samples and "
                f"were taken samples first: their sums are wrong. Call reset() and track with a batch size other "
                f"than the sequence length for the first step, or feed the layer samples first")
        if known is not None and known != axis:
            raise EWCInputError(
                f"FisherTracker: {site.module_name} ({type(module).__name__}) took its samples on axis {known} "
                f"before and on axis {axis} now ({tuple(A.shape)})")
        self._axes[key] = axis
        return axis, 1

    def _seen(self, key: str):
        """``(input shapes, output shapes or None)`` the probe's one sample gave this site's first
        call, where this is the site's first call in a forward that ran the probe; else None."""
        p = self._pass
        seen = None if p.probe is None or p.n == 1 or p.calls[key] else p.probe.get(key)
        if seen is None:
            return None
        return ((seen[0],), None) if self._sites[key].rule is not None else seen

    def _batch_free(self, key: str, inputs: list) -> list[int]:
        """Which of a module-local call's ``inputs`` (tensors, or None) hold the samples on dim 0
        only by coincidence: the probe saw them with the same shape on one sample (a table with
        as many rows as the batch has samples, rotary angles ``[T, d]`` at T = N); not taken to
        hold the samples."""
        seen = self._seen(key)
        here = _shapes(inputs)
        if seen is None or len(seen[0]) != len(here):  # no probe, or a call of another structure
            return []
        return [k for k, (a, b) in enumerate(zip(here, seen[0])) if a is not None and a == b and a[:1] == (self._pass.n,)]

    def _is_table(self, key: str, inputs: list, outputs: list) -> bool:
        """Whether a site is a table the model calls without the batch: decided on its first call
        in a forward that ran the probe, where every tensor argument (and output) has the shape it
        has on one sample (T5's relative position buckets ``[T, S]``, a position table's
        ``arange(T)``, also where T = N), then kept. Its output is then watched until it meets the
        batch (:meth:`_watch_table`)."""
        if key in self._tables:
            return True
        seen = self._seen(key)
        here, outs = _shapes(inputs), _shapes(outputs)
        if seen is None or len(seen[0]) != len(here) or not any(h is not None for h in here + outs):
            return False
        changed = [x for x, a, b in zip(inputs, here, seen[0]) if a != b]
        if seen[1] is None:  # a rule site: its one input
            table = not changed
        else:  # a module: outputs of the same shapes; an input that changed only token ids read for their shape
            table = tuple(seen[1]) == outs and all(not x.is_floating_point() for x in changed)
        if table:
            self._tables.add(key)
        return table

    def _watch_table(self, p: _Pass, key: str, output, upstream: Table | None):
        """Hand the model a table's output as a :class:`.tracked_tables.Watched` tensor, followed
        until it meets the batch, where :meth:`_table_met` hooks the result's gradient. A site fed
        a watched table (``upstream``) joins that table: its output must still be one (no batch
        met inside it), and its parameters' gradients are read with the table's."""
        site = self._sites[key]
        what = f"{site.module_name} ({type(site.module).__name__})"
        if upstream is not None:
            if not isinstance(output, Watched) or output._table is not upstream:
                raise self._untrackable(upstream.keys[:1],
                    f"FisherTracker: {what} is fed a table the model calls without the batch ({upstream.name}) and "
                    f"gives what the tracker does not follow (the batch met inside it, or several outputs). Leave "
                    f"both's parameters out with params= (estimate_fisher covers them after training)")
            if key not in upstream.keys:
                upstream.keys.append(key)
            return None
        if not isinstance(output, torch.Tensor):
            raise self._untrackable([key], f"FisherTracker: {what} is a table the model calls without the batch, with "
                                           f"several outputs; leave its parameters out with params= (estimate_fisher "
                                           f"covers them after training)")
        if not output.requires_grad:
            self._refuse_frozen(site)
            return None
        # a refusal names the table's own parameters: the layers it was fed through may track once
        # it is left out (a table's flow can reach the batch's layers where it is not seen to meet it)
        table = Table(what, p.n, partial(self._table_met, p),
                      lambda t, message: self._untrackable(t.keys[:1], message), [key])
        p.tables.append(table)
        return watch(output, table)

    def _table_met(self, p: _Pass, table: Table, Z: torch.Tensor, R: torch.Tensor, share) -> None:
        """A watched table's output ``Z`` (or a result of it alone) is broadcast into ``R``, which
        has the batch on dim 0: each sample's gradient of the table's parameters is read from
        ``R``'s gradient in the backward (:meth:`_table_grads`)."""
        if p is not self._pass or p.dropped or not torch.is_grad_enabled():
            return
        if table.met:
            raise table.refuse(table,
                f"FisherTracker: {table.name} is a table the model calls without the batch, and its output meets "
                f"the batch in two places of one forward; each sample's gradient would have to be added up from "
                f"both before it is squared, which the tracker does not do. Leave its parameters out with params= "
                f"(estimate_fisher covers them after training)")
        table.met = True
        R.register_hook(partial(self._table_grads, p, table, Z, share))

    def _tables_met(self, p: _Pass) -> None:
        """The end of a tracked forward: a watched table that never met the batch where the tracker
        follows it (its output used otherwise, or not at all) would have no sums; refused by name
        before the backward adds anything."""
        for table in p.tables:
            if not table.met:
                p.end(dropped=True)
                if self._pass is p:
                    self._pass = None
                raise table.refuse(table,
                    f"FisherTracker: {table.name} is a table the model calls without the batch, and its output does not "
                    f"meet the batch in the forward where the tracker can follow it (an addition, subtraction, where "
                    f"or expand to the batch, or the mask of scaled_dot_product_attention, with the samples on dim 0). "
                    f"Leave its parameters out with params= (estimate_fisher covers them after training)")

    def _table_grads(self, p: _Pass, table: Table, Z: torch.Tensor, share, G: torch.Tensor):
        """Each tracked sample's gradient of a table's parameters: its share of ``G`` (the gradient
        of the result the table met the batch in) carried back through the table alone, one
        sample at a time (the table's graph is kept for the step's own backward), scaled by the
        sample's factor and squared into the sums."""
        if p.dropped:
            return None
        with _own_arithmetic():
            self._begin(p)
            names = list(dict.fromkeys(n for key in table.keys for n in self._sites[key].params.values()))
            params = [self.selected[n] for n in names]
            samples = range(p.n) if p.idx is None else p.idx.tolist()
            f = p.factor
            G = share(G.detach())
            for j, i in enumerate(samples):
                grads = torch.autograd.grad(Z, params, sample_cotangent(G, i, Z.shape), retain_graph=True,
                                            allow_unused=True)
                fj = f[j] if isinstance(f, torch.Tensor) and f.dim() == 1 else f
                for name, g in zip(names, grads):
                    if g is not None:
                        self._add(p, name, (g * fj).square())
        return None

    def _not_first(self, key: str, A: torch.Tensor, output, n: int) -> tuple[int, int] | None:
        """``(axis, fold)`` of a sequence layer's input whose first axis is not the batch's (see
        :meth:`_sample_axis`), or None where neither an inner axis nor a fold is shown."""
        if not isinstance(output, torch.Tensor) or A.dim() < 2 or output.dim() < 1:
            return None
        rows = A.shape[0]
        if key in self._folds:  # proven on an earlier call; the rows per sample may change (T)
            return (0, rows // n) if rows > n and rows % n == 0 and output.shape[0] == rows else None
        inner = inner_sample_axis(A, output, n)
        known = self._axes.get(key)
        if known is not None and known != 0:  # an inner axis, read before
            return (inner, 1) if inner is not None else None
        seen = self._probe(self._pass).get(key) if not self._pass.calls[key] else None
        if seen is None:  # no probe: from the shapes only where no fold can have made them
            return (inner, 1) if inner is not None and rows % n else None
        shape, rows_seen = seen
        if inner is not None and self._axis_shown(key, A) == inner:
            return inner, 1
        k = shape[0] if shape else 0
        if (k > 1 and rows == n * k and shape[1:] == tuple(A.shape[1:]) and output.shape[0] == rows
                and _first_rows(A, k, rows_seen)):
            self._folds.add(key)
            return 0, k
        return None

    def _local_hook(self, key: str):
        site = self._sites[key]
        # what may draw random masks in a replay (read when the modes change: the hooks are new then)
        masks = [(name, m) for name, m in site.module.named_modules()
                  if isinstance(m, (*_DROPOUTS, nn.MultiheadAttention, nn.RNNBase))]

        def hook(module, args, kwargs, output):
            if self._probing is not None:  # the one-sample forward of _probe: the call's shapes
                if key not in self._probing:
                    self._probing[key] = (_shapes(tree_flatten((args, kwargs))[0]), _shapes(tree_flatten(output)[0]))
                return None
            p = self._pass
            if p is None or not torch.is_grad_enabled():
                return None
            # an attention call whose projections its own backward hands over needs no replay,
            # so its dropout is no obstacle (where it is the module's one use in the pass)
            observed = observe_call(module, args, kwargs, output)
            alone = observed is not None and not p.calls[key] and self._unshared(key)
            active = [name for name, m in masks
                      if m.training and ((isinstance(m, _DROPOUTS) and m.p > 0)
                                         or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0 and not alone)
                                         or (isinstance(m, nn.RNNBase) and m.dropout > 0 and m.num_layers > 1))]
            if active:
                raise self._untrackable([key],
                    f"FisherTracker: {site.module_name} ({type(module).__name__}) has no hand rule, so its parameters' "
                    f"per-sample gradients come from replaying it, and its dropout "
                    f"({site.module_name + ('.' + active[0] if active[0] else '')}) is active: a replay draws other "
                    f"masks. Set that dropout to 0 (or the module to eval mode), or leave its parameters out with params=")
            rec, to_module = record_call(module, args, kwargs, output, p.n)  # RNNs: samples first
            x = args[0] if args else None
            if (isinstance(module, nn.RNNBase) and to_module is None and isinstance(x, torch.Tensor) and x.dim() == 3
                    and x.shape[0 if module.batch_first else 1] != p.n):
                # its own layout says where its batch is; dim 0 (time, sequence first) would
                # reproduce its first row on one "sample" and pass the check below
                raise EWCInputError(
                    f"FisherTracker: {site.module_name} ({type(module).__name__}, batch_first={module.batch_first}) "
                    f"is called on a batch of {x.shape[0 if module.batch_first else 1]}, but the tracker took {p.n} "
                    f"samples from dim 0 of the model's first tensor argument: the model's inputs must hold the "
                    f"samples on dim 0 (a sequence-first input [T, N, ...] is taken as T samples)")
            inputs = tree_flatten((args, kwargs))[0]
            if table_of(inputs) is not None or self._is_table(key, inputs, tree_flatten(output)[0]):
                return self._watch_table(p, key, output, table_of(inputs))
            if rec.per_sample is None:  # a generic record: which arguments hold the samples is proven
                rec.per_sample = self._sample_arguments(key, module, rec, self._batch_free(key, rec.leaves))
            if not rec.batched or not rec.outputs:
                raise self._untrackable([key], f"FisherTracker: {site.module_name} ({type(module).__name__}) is called "
                                               f"without the batch of {p.n} samples on dim 0 of its inputs and outputs: "
                                               f"a table the model calls without the batch gets its gradient summed over "
                                               f"the samples. Leave its parameters out with params= (estimate_fisher "
                                               f"covers them after training)")
            outs = [t for t in rec.outputs if t.requires_grad]
            if not outs:
                self._refuse_frozen(site)
                return None
            handed = None
            if len(rec.outputs) > 1 or to_module is not None:
                # One output may be computed from another inside the module: the gradient w.r.t. each
                # is taken through an alias that only the rest of the model uses, or the replay's
                # vector-Jacobian product would count the inner path twice.
                rec.outputs = [t.view_as(t) for t in rec.outputs]
                leaves, spec = tree_flatten(output)
                for slot, (k, t) in enumerate(zip(rec.out_index, rec.outputs)):
                    leaves[k] = t if to_module is None else to_module(slot, t)
                handed = tree_unflatten(leaves, spec)
            calls = p.calls[key]
            call = _Call(None, rec, 0, [None] * len(rec.outputs), observed)
            calls.append(call)
            for slot, t in enumerate(rec.outputs):
                if t.requires_grad:
                    hooked = t if handed is not None else _hook_target(t)
                    if hooked is not t:
                        call.shapes[slot] = tuple(t.shape)
                    hooked.register_hook(partial(self._on_grad, p, key, len(calls) - 1, slot))
            if handed is not None:  # aliases: one modified in place would hide its gradient (_finish)
                call.versions = [t._version for t in rec.outputs]
            return handed
        return hook

    def _untrackable(self, keys, message: str) -> UntrackableParameters:
        """The refusal of sites whose parameters the tracker cannot read from the training step,
        naming those parameters (which ``params=`` may leave out)."""
        names = dict.fromkeys(n for key in keys for n in self._sites[key].params.values())
        return UntrackableParameters(message, names)

    def _refuse_frozen(self, site) -> None:
        """A site's output needs no gradient in a tracked step. Where that is because its
        parameters were frozen after the tracker was made (the first layer, whose input needs
        none either), no gradient of theirs arrives, and their sums would stop while every later
        sample is still counted: refused, not diluted."""
        frozen = [n for n in site.params.values() if not self.selected[n].requires_grad]
        if frozen:
            raise EWCInputError(
                f"FisherTracker: {frozen[:4]} no longer require grad (frozen after the tracker was made), so no "
                f"training backward computes their gradient, while the samples of the steps go on being counted. "
                f"Read this tracker's fisher() (or state_dict()) for the steps so far, and track on with a new "
                f"FisherTracker of the parameters that train (params=)")

    def _sample_arguments(self, key: str, module: nn.Module, rec: Recorded, shared: list[int]) -> list[int]:
        """The positions of a module-local call's arguments that hold the samples, proven on its
        first sample the first time a call of this structure is seen, then kept.

        Candidates are the tensors whose first axis has the batch's size, less those ``shared``:
        the probe saw them with that shape on one sample (:meth:`_batch_free`). A shared table
        with as many rows (rotary angles ``[T, d]`` with T = N) may still be among them where the
        probe did not run, so the module is run on sample 0 alone (no grad: no hook records it)
        and must reproduce row 0 of the batched call; where it does not, a candidate passed whole
        instead is tried."""
        shape = (key, str(rec.spec), tuple(isinstance(x, torch.Tensor) for x in rec.leaves))
        known = self._layouts.get(shape)
        if known is not None:
            return list(known)
        candidates = [k for k in rec.batched if k not in shared]
        options = [candidates] + [[k for k in candidates if k != one] for one in candidates]
        want = [o.detach()[:1] for o in rec.outputs]
        for option in options:
            if option and self._reproduces(module, rec, option, want):
                self._layouts[shape] = tuple(option)
                return list(option)
        raise self._untrackable([key],
            f"FisherTracker: {self._sites[key].module_name} ({type(module).__name__}) has no hand rule, and run on "
            f"one sample it does not reproduce its batched output however its arguments with the batch's size "
            f"are split, so which of them hold the samples is unknown; leave its parameters out with params=")

    @staticmethod
    def _reproduces(module: nn.Module, rec: Recorded, option: list[int], want: list) -> bool:
        # copies: a module that writes into its inputs must not touch the training step's tensors
        leaves = [(x.detach()[:1] if k in option else x.detach()).clone() if isinstance(x, torch.Tensor) else x
                  for k, x in enumerate(rec.leaves)]
        args, kwargs = tree_unflatten(leaves, rec.spec)
        try:
            with torch.no_grad():
                out = module(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a split the module cannot take is not its layout
            return False
        got, _ = tree_flatten(out)
        got = [got[k] for k in rec.out_index] if len(got) > max(rec.out_index, default=-1) else []
        if len(got) != len(want):
            return False
        tol = lambda w: _ONE_SAMPLE_RTOL.get(w.dtype, 1e-2)  # noqa: E731
        return all(isinstance(g, torch.Tensor) and g.shape == w.shape
                   and (w.numel() == 0 or torch.allclose(g, w, rtol=tol(w), atol=tol(w) * float(w.abs().max())))
                   for g, w in zip(got, want))

    # -- backward ------------------------------------------------------------------------------
    def _on_loss_grad(self, p: _Pass, g: torch.Tensor):
        if p.dropped:
            return
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
        if p.dropped:
            return None  # its forward ran while tracked, its backward after stop(): not tracked
        with _own_arithmetic():
            self._begin(p)
            call = p.calls[key][c]
            site = self._sites[key]
            if slot in call.shapes:  # received on the product the output reshapes (_hook_target)
                G = G.view(call.shapes[slot])
            if call.A is not None and call.axis:
                G = G.movedim(call.axis, 0)
            elif call.A is not None and call.fold > 1:
                G = G.unflatten(0, (p.n, call.fold))
            if site.rule is None or not self._alone(p, key):
                call.grads = call.grads or [None]
                call.grads[slot] = G.detach()   # added to its other uses' when the backward ends
                return None
            dtype = self._site_dtype(site)
            (A,), (G,), how = self._reading(p, dtype, [self._input(site, call)], [G.detach()])

            def add(totals):
                add_sq_sums(site.rule, site.module, A, [G], totals, **how)
                return True
            self._sums_into(p, site, dtype, add)
        return None

    def _reading(self, p: _Pass, dtype, inputs: list, grads: list) -> tuple[list, list, dict]:
        """``(inputs, grads, how)``: a site's inputs and output gradients as its sums read them,
        and ``how`` (``alpha``, ``picks``, ``weights``) they are read. The tracked samples are read
        where they are, and the per-sample factor is applied as the sums read them
        (``factor_terms``: a kernel does so with no copy). Copies only to convert the dtype."""
        alpha, weights = factor_terms(p.factor, p.k)
        how = {"alpha": alpha, "picks": p.idx, "weights": weights}
        if any(t.dtype != dtype for t in (*inputs, *grads)):
            inputs, grads = [self._tracked(p, t, dtype) for t in inputs], [self._tracked(p, t, dtype) for t in grads]
            how["picks"] = None
        return inputs, grads, how

    def _sums_into(self, p: _Pass, site, dtype, add) -> bool:
        """``add(totals)`` with the running sums (or this step's buffers) of the site's
        parameters, where they have the site's dtype; else with fresh sums of that dtype, added
        in afterwards. ``add`` returns whether it added (False: nothing added)."""
        names = site.params
        if all(self._dtypes[n] == dtype for n in names.values()):
            return add({a: self._running(p, n) for a, n in names.items()})
        totals = {a: torch.zeros_like(self._sums[n], dtype=dtype) for a, n in names.items()}
        if not add(totals):
            return False
        for a, n in names.items():
            self._add(p, n, totals[a])
        return True

    def _alone(self, p: _Pass, key: str) -> bool:
        """Whether the site was called once in this pass and its parameters have no other use: then
        its sums of squares need no per-sample blocks added up with other uses'."""
        return len(p.calls[key]) == 1 and self._unshared(key)

    def _unshared(self, key: str) -> bool:
        """Whether the site's parameters have no use but this site."""
        return all(len(self._uses[q]) == 1 for q in self._sites[key].params.values())

    @staticmethod
    def _input(site, call: _Call) -> torch.Tensor:
        """A rule site's recorded input, refused when modified in place after the call."""
        if call.A._version != call.version:
            raise EWCInputError(f"FisherTracker: the input of {site.module_name} was modified in place after the "
                                f"call, so the recorded input is not what the layer saw")
        return call.A

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

    def _running(self, p: _Pass, name: str) -> torch.Tensor:
        """Where this step's squares of ``name`` are added: the running sum, or this step's buffer
        where a step is folded in as a whole (a decay, a scaler's step that may be skipped)."""
        if self.decay is None and self.scaler is None:
            return self._sums[name]
        if name not in p.step:
            p.step[name] = torch.zeros_like(self._sums[name])
        return p.step[name]

    def _add(self, p: _Pass, name: str, sq: torch.Tensor, scale: float = 1.0) -> None:
        """Add ``scale * sq`` into the running sum (or this step's buffer)."""
        self._running(p, name).add_(sq.to(self._dtypes[name]), alpha=scale)

    def _finish(self, p: _Pass) -> None:
        """The backward through ``p`` ended: add up the uses of shared parameters and of the
        module-local sites, square and sum them; fold the step into the running Fisher."""
        if p is not self._pass:
            return
        self._pass = None
        # Replays of module-local sites run attention as plain products. Entering that mode goes
        # through torch's Python operator layer at every step, so a step of rule sites alone,
        # which replays nothing, skips it.
        replays = any(calls and self._sites[key].rule is None for key, calls in p.calls.items())
        try:
            self._refuse_modified_aliases(p)
            self._replaying = True
            with _own_arithmetic(), plain_attention() if replays else contextlib.nullcontext():
                self._shared(p)
                self._fold(p)
        finally:
            self._replaying = False
            p.end()

    def _refuse_modified_aliases(self, p: _Pass) -> None:
        """A module-local site's outputs reach the model as aliases (views) whose gradients are
        hooked; one modified in place after the call has its gradient routed around the alias's
        node, so the hook never ran and that output's share would read as zero. Refused by name."""
        for key, calls in p.calls.items():
            for call in calls:
                if call.versions and any(t._version != v for t, v in zip(call.rec.outputs, call.versions)):
                    site = self._sites[key]
                    raise self._untrackable([key],
                        f"FisherTracker: an output of {site.module_name} ({type(site.module).__name__}) is modified in "
                        f"place after the module returns it, which hides its gradient from the tracker; compute "
                        f"that step out of place (x = x * s rather than x *= s), or leave the module's parameters "
                        f"out with params=")

    def _shared(self, p: _Pass) -> None:
        users = [(key, c) for key, calls in p.calls.items() for c, call in enumerate(calls)
                 if any(g is not None for g in call.grads)]
        users = [u for u in users if not self._local_sq_sums(p, *u)]
        users = self._tied_heads(p, users)
        if not users:
            return
        names = {n for key, _ in users for n in self._sites[key].params.values()}
        per = sum(self.selected[n].numel() * self.selected[n].element_size() for n in names)
        prepared = {u: self._prepare(p, *u) for u in users}
        # Rules that add into another use's block (an embedding into its tied head) come last.
        users.sort(key=lambda u: (self._sites[u[0]].rule is not None and self._sites[u[0]].rule.add_into is not None,
                                  str(u)))

        def add_into(use, i, j, acc):
            site = self._sites[use[0]]
            A, _, grads = prepared[use]
            into = {a: acc.get(n) for a, n in site.params.items()}
            return (site.rule is not None and site.rule.add_into is not None and None not in into.values()
                    and site.rule.add_into(site.module, A[i:j], grads[0][i:j], into))

        def blocks(use, i, j):
            site = self._sites[use[0]]
            got = self._blocks(p, site, *prepared[use], i, j)
            return {site.params[a]: b for a, b in got.items() if a in site.params}

        totals: dict[str, torch.Tensor] = {}
        squares_of_uses(users, p.k, per, add_into, blocks, totals)
        for name, total in totals.items():
            self._add(p, name, total)

    def _tied_heads(self, p: _Pass, users: list) -> list:
        """Sum each weight shared by a Linear head and embedding lookups of its rows without
        per-sample blocks (``tied_head``); the uses left for the blocks."""
        by_param: dict[str, list] = {}
        for u in users:
            for q in self._sites[u[0]].params.values():
                by_param.setdefault(q, []).append(u)
        done = set()
        for q, us in by_param.items():
            found = tied_uses(q, us, lambda u: self._sites[u[0]])
            if found is None or len(self._sites[found[0][0]].params) != 1:  # a head's bias goes by blocks
                continue
            head, lookups = found
            A, _, Gs = self._prepare(p, *head, scaled=False)  # the head's factor goes to the sum
            rows = []
            for use in lookups:
                Au, _, Gu = self._prepare(p, *use)
                rows.append(lookup_rows(self._sites[use[0]].module, Au, Gu))
            self._add(p, q, head_and_rows_sq_sum(A, Gs, rows, scale=p.factor))
            done.update(us)
        return [u for u in users if u not in done]

    def _local_sq_sums(self, p: _Pass, key: str, c: int) -> bool:
        """Add a module-local site's sums of squares without per-sample blocks where its layer
        family has that route and its parameters no other use (True when it did)."""
        site = self._sites[key]
        if site.rule is not None or not self._alone(p, key):
            return False
        call, dtype, attrs = p.calls[key][c], self._site_dtype(site), list(site.params)
        obs = call.observed
        if obs is not None and call.grads[0] is not None and obs.reached:
            # read from the backward: its projections' inputs and output gradients, in place
            (*Xs, C), (G, *gPs), how = self._reading(p, dtype, [*obs.Xs, obs.C], [call.grads[0], *obs.gPs])
            if self._sums_into(p, site, dtype, lambda totals: sq_sums_into(site.module, totals, Xs, C, [G], [gPs],
                                                                            **how)):
                return True
        _, rec, grads = self._prepare(p, key, c)
        with precision(p.autocast):  # a replay computes what the module computed: as its forward ran
            got = local_sq_sums(site.module, attrs, rec, grads)
        if got is None:
            return False
        for attr, name in site.params.items():
            self._add(p, name, got[attr].to(dtype))
        return True

    def _prepare(self, p: _Pass, key: str, c: int, scaled: bool = True):
        """``(A, rec, grads)`` of one stashed use, restricted to the tracked samples and scaled
        (a rule site's output gradients left unscaled with ``scaled=False``)."""
        site, call = self._sites[key], p.calls[key][c]
        dtype = self._site_dtype(site)
        if site.rule is not None:
            G = self._tracked(p, call.grads[0], dtype)
            return self._tracked(p, self._input(site, call), dtype), None, [self._scaled(p, G) if scaled else G]
        rec = call.rec
        grads = [self._scaled(p, self._tracked(p, torch.zeros_like(o) if g is None else g, o.dtype))
                 for g, o in zip(call.grads, rec.outputs)]
        if p.idx is not None:
            leaves = list(rec.leaves)
            for k in rec.batched:
                leaves[k] = leaves[k].index_select(0, p.idx)
            rec = Recorded(leaves, rec.spec, rec.outputs, rec.out_index, p.k)
        return None, rec, grads

    def _blocks(self, p: _Pass, site, A, rec, grads, i, j) -> dict:
        if site.rule is not None:
            return site.rule.per_sample(site.module, A[i:j], grads[0][i:j])
        with precision(p.autocast):
            got = local_blocks(site.module, list(site.params), rec, grads, i, j)
        dtype = self._site_dtype(site)
        return {a: t.to(dtype) for a, t in got.items()}

    def _fold(self, p: _Pass) -> None:
        if p.step and self.scaler is not None and self.scaler.is_enabled():
            if not all_finite(p.step.values()):
                self.steps_skipped += 1   # the scaler skips this step's update: so does the Fisher
                return
        if self.decay is not None:
            for name, s in self._sums.items():
                step = p.step.get(name)  # None: no gradient this step, a mean of zero
                if self.steps == 0 and step is None:
                    s.zero_()
                elif self.steps == 0:
                    s.copy_(step / p.k)
                else:
                    s.mul_(self.decay)
                    if step is not None:
                        s.add_(step, alpha=(1.0 - self.decay) / p.k)
        elif p.step:
            for name, s in p.step.items():
                self._sums[name].add_(s)
        self.samples_seen += p.k
        self.steps += 1
