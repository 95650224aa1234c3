"""What a tracked step's loss must be, checked from the step itself: the loss-side hooks of
:class:`~.tracker.FisherTracker` (:class:`_LossChecks`, a base class of its step hooks).

The tracker turns each layer's output gradient into per-sample gradients by a factor it is told
(a declared ``reduction``, ``accumulation_steps``, ``scaler``) or reads (a Hugging Face model's
own loss, from its labels and the multiplier on ``output.loss``). These hooks check, on a
step's own tensors, what that factor rests on, at the end of the model's forward
(:meth:`_LossChecks._post_hook`) and, for the first steps, in the backward:

* a model's own loss: that it is the weighted per-sample losses of its logits, which convention
  of ``num_items_in_batch`` it follows, and that the backward reaches the logits through it alone;
* a declared loss: that every sample the model sees has a gradient (no loss over a masked subset),
  that samples of unequal lengths are not weighed by their token counts, that a cross-entropy on
  ``[N, C]`` logits weighs each sample as declared (class weights with ``reduction="mean"``, a
  loss scaled or divided by accumulation steps not declared), and that no output without a batch
  axis (a mixture of experts' ``aux_loss``) takes part in the loss.

It holds no state of its own: it reads and sets the tracker's (``reduction``,
``accumulation_steps``, ``_head``, ``_warned``, ``_outputs_checked``, ``_own_loss_checked``,
``_own_paths_checked``, ``_sums_over_num_items``) and calls the step's ``_begin`` and
``_on_loss_grad`` (:mod:`.tracked_step`).
"""

from __future__ import annotations

import warnings
from functools import partial

import torch

from ..errors import EWCInputError
from .problem import logits_of, model_loss_per_sample
from .sample_weights import check_own_loss, own_loss_matches, own_losses


def _output_tensors(output, where: str = "output") -> list:
    """``[(where, tensor)]``: the tensors of a model's output, through tuples, lists and dicts
    (a Hugging Face output is a dict), named by where they sit."""
    if isinstance(output, torch.Tensor):
        return [(where, output)]
    if isinstance(output, dict):
        return [t for k, v in output.items() for t in _output_tensors(v, f"{where}[{k!r}]" if where != "output"
                                                                        else f"output.{k}")]
    if isinstance(output, (tuple, list)):
        return [t for i, v in enumerate(output) for t in _output_tensors(v, f"{where}[{i}]")]
    return []


def _cross_entropy_factors(z: torch.Tensor, G: torch.Tensor) -> torch.Tensor | None:
    """Float64 ``c_n`` with ``G_n = c_n (softmax(z_n) - e_y)``, ``y`` the class where ``G_n`` is
    least (the gradient of ``c_n`` times a cross-entropy of the logits ``z_n``), for the rows not
    too confident to tell (``softmax`` within 1e-3 of one-hot); None where a row is not of that
    form (another loss), or none can tell."""
    if not bool(torch.isfinite(G).all()) or not bool(torch.isfinite(z).all()):
        return None
    G64 = G.double()
    d = torch.softmax(z.double(), -1)
    d[torch.arange(d.shape[0], device=d.device), G64.argmin(-1)] -= 1.0
    norm = d.square().sum(-1)
    c = (G64 * d).sum(-1) / norm.clamp_min(1e-300)
    tol = 1e-6 if G.dtype == torch.float64 else 1e-3 if G.dtype == torch.float32 else 3e-2
    told = norm > 1e-6
    resid = (G64 - c[:, None] * d).norm(dim=-1)
    if not bool(told.any()) or not bool((resid[told] <= tol * G64[told].norm(dim=-1)).all()):
        return None
    return c[told]


def _loss_and_logits(output) -> tuple:
    """``(loss, logits)`` of a Hugging Face model called with labels: ``output.loss`` and
    ``output.logits``, or the first two entries of the tuple it returns with
    ``return_dict=False`` (the loss first). ``(None, None)`` without a loss. Which tensors they
    are is then proven by :func:`check_own_loss` (the loss is the weighted per-sample losses of
    those logits)."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is not None:
        return loss, logits_of(output)
    if (isinstance(output, tuple) and len(output) >= 2 and all(isinstance(t, torch.Tensor) for t in output[:2])
            and output[0].dim() == 0):
        return output[0], output[1]
    return None, None


# The steps of a model's own loss whose logits' gradient is checked against that loss's alone: an
# extra loss on the outputs is there from the first step on.
_OWN_PATH_CHECKS = 3

# The steps of a declared loss whose output gradient is read for samples left out of the loss or of
# unequal lengths: the read is small, but a host sync on a GPU; either shows in the first steps.
_OUTPUT_CHECKS = 8


class _LossChecks:
    """The loss-side hooks of a tracked step (module docstring)."""

    def _post_hook(self, module, args, kwargs, output):
        """The end of the model's forward: hook a declared loss's outputs for the first steps'
        reads; check a model's own loss against its logits and hook it for the multiplier the
        backward reads."""
        p = self._pass
        if p is None or not torch.is_grad_enabled():
            return None
        self._tables_met(p)
        if p.weights is None:  # a loss of the user's own, declared
            self._watch_outputs(p, output)
            return None
        loss, logits = _loss_and_logits(output)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return None
        if p.weights_without_num_items is not None:
            self._read_num_items_convention(p, logits, kwargs["labels"], loss)
        elif not self._own_loss_checked:
            check_own_loss(self.model, self._head, own_losses(self.model, self._head, logits, kwargs["labels"]),
                           p.weights, loss)
            self._own_loss_checked = True
        loss.register_hook(partial(self._on_loss_grad, p))
        if self._own_paths_checked < _OWN_PATH_CHECKS and logits.requires_grad:
            self._own_paths_checked += 1
            logits.register_hook(partial(self._only_through_own_loss, p, logits.detach()[:1], kwargs["labels"][:1]))
        return None

    def _only_through_own_loss(self, p, logits: torch.Tensor, labels: torch.Tensor, G: torch.Tensor):
        """The first steps of a model's own loss: the gradient reaching the first sample's logits
        must be what ``output.loss`` alone sends there (the multiplier read on it, times that
        sample's share of the loss's gradient, recomputed from its logits: a sample's cost, not
        the batch's). A loss added on the outputs besides it (distillation on the logits) sends
        more, which no sample share of ``output.loss`` accounts for."""
        if p.dropped or p.multiplier is None or G is None:
            return None  # not tracked, or refused by _begin
        with torch.enable_grad():
            z = logits.requires_grad_()
            own = p.weights[0].double() * model_loss_per_sample(self.model, self._head, z, labels).double().sum()
            (g,) = torch.autograd.grad(own, z)
        want, G = g * p.multiplier.to(g.dtype), G[:1]
        scale = float(want.abs().max())
        # far above the rounding of logits' gradients in their dtype (the loss itself is float32)
        tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(G.dtype, 1e-4)
        if float((G.to(want.dtype) - want).abs().max()) > tol * max(scale, 1e-30):
            raise EWCInputError(
                f"FisherTracker: the backward reaches {type(self.model).__name__}'s logits through more than its "
                f"output.loss (a loss added on the outputs besides it, such as distillation): each sample's "
                f"gradient then has a part that its share of output.loss does not account for. Call the model "
                f"without labels, compute the whole loss yourself as a mean or sum over the batch's samples of "
                f"each sample's own loss, and declare it: FisherTracker(model, reduction=...)")
        return None

    def _read_num_items_convention(self, p, logits, labels, loss) -> None:
        """The model was given ``num_items_in_batch`` (the ``Trainer`` under gradient
        accumulation): Hugging Face's shared loss functions sum over it, a loss written in the
        model's own forward (BERT's classification heads) takes the mean over the batch and
        ignores it. Where the two give this batch different weights, the loss the model computed
        says which it follows, for every later step; until then (the same weights) the step is
        checked as any first step is. Neither: refused by :func:`check_own_loss`."""
        without, per = p.weights_without_num_items, own_losses(self.model, self._head, logits, labels)
        if not torch.equal(p.weights, without):
            if own_loss_matches(per, without, loss):
                self._sums_over_num_items, p.weights = False, without
            else:
                self._sums_over_num_items = True
        check_own_loss(self.model, self._head, per, p.weights, loss)
        self._own_loss_checked = True

    def _watch_outputs(self, p, output) -> None:
        """The first steps of a declared loss: read the output gradient (:meth:`_read_output_gradient`)
        for what a declared reduction cannot describe, and refuse a loss that uses an output
        without a batch axis (:meth:`_batch_term`)."""
        if self._outputs_checked >= _OUTPUT_CHECKS:
            return
        self._outputs_checked += 1
        out = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
        if isinstance(out, torch.Tensor) and out.requires_grad and out.dim() >= 1 and out.shape[0] == p.n > 1:
            out.register_hook(partial(self._read_output_gradient, self.reduction))
            if out.dim() == 2 and out.shape[1] > 1:
                out.register_hook(partial(self._cross_entropy_weights, p, out.detach()))
        for where, t in _output_tensors(output):
            if t.requires_grad and t.is_floating_point() and (t.dim() == 0 or t.shape[0] % p.n):
                t.register_hook(partial(self._batch_term, p, where))

    def _cross_entropy_weights(self, p, z: torch.Tensor, G: torch.Tensor) -> None:
        """Where the gradient reaching the logits ``[N, C]`` is a cross-entropy's, ``G_n = c_n
        (softmax(z_n) - e_y)``, ``c_n`` is what the loss weighs sample ``n`` by, against what the
        declaration says (``1 / factor``). Warn, once, where the two differ by a factor common to
        all samples (a loss multiplied by a constant, or divided by accumulation steps the tracker
        was not told of: the tracked Fisher is off by its square), or by per-sample factors that
        average exactly one over the batch (class weights in ``F.cross_entropy`` with
        ``reduction="mean"``, which divides by the batch's total weight: each sample's tracked
        gradient then carries a factor that depends on the rest of its batch). Per-sample weights
        that are the samples' own (``reduction="none"`` times weights, then ``.mean()``) are a
        loss of each sample's own and are not judged; nor is any other loss on the logits (label
        smoothing, a sum of losses), which is not of that form."""
        if G is None or p.dropped or p is not self._pass or "weights" in self._warned:
            return None
        self._begin(p)
        c = _cross_entropy_factors(z, G.detach())
        if c is None:
            return None
        f = p.factor
        ratio = c * (f.double() if isinstance(f, torch.Tensor) else float(f))
        tol = 1e-2 if G.dtype in (torch.float32, torch.float64) else 5e-2  # far above the rounding of c_n
        if bool(((ratio - 1).abs() <= tol).all()):
            return None
        uniform = bool(((ratio - ratio[0]).abs() <= tol * ratio[0].abs()).all())
        normalised = ratio.numel() == z.shape[0] and abs(float(ratio.mean()) - 1.0) <= tol / 10
        if uniform:
            what = (f"scales every sample's gradient by {float(ratio[0]):.4g} against what reduction="
                    f"{self.reduction!r}{'' if self.accumulation_steps == 1 else f' and accumulation_steps={self.accumulation_steps}'}"
                    f" say (a loss multiplied by a constant, or divided by accumulation steps not declared): the "
                    f"tracked Fisher would be {float(ratio[0]) ** 2:.4g} times the samples' own. Declare what "
                    f"multiplies the loss (accumulation_steps=, scaler=)")
        elif normalised:
            what = (f"weighs the samples by factors from {float(ratio.min()):.3g} to {float(ratio.max()):.3g} that "
                    f"average exactly one over the batch, as class weights in F.cross_entropy with reduction='mean' "
                    f"do (it divides by the batch's total weight, not by N): each sample's tracked gradient would "
                    f"carry a factor that depends on the rest of its batch. Take each sample's weighted loss and "
                    f"average over the samples: F.cross_entropy(logits, y, weight=w, reduction='none').mean()")
        else:
            return None
        self._warned.add("weights")
        warnings.warn(f"FisherTracker: the gradient reaching the logits is a cross-entropy's that {what}. If each "
                      f"sample's own loss is meant to carry these factors, this warning does not apply.",
                      UserWarning, stacklevel=2)
        return None

    def _batch_term(self, p, where: str, G: torch.Tensor) -> None:
        """A gradient reaches an output without a batch axis (Mixtral's ``aux_loss``, a
        load-balancing term over all the batch's tokens): that part of the loss belongs to the
        batch as a whole, so no sample has a gradient of a loss of its own, and its share of every
        sample's gradient would be summed as if it had."""
        if G is None or p.dropped or not bool(G.detach().ne(0).any()):
            return None
        p.end(dropped=True)
        raise EWCInputError(
            f"FisherTracker: the loss uses {where}, an output of the model without a batch axis (a term over the "
            f"whole batch, such as a mixture of experts' load-balancing aux_loss): reduction={self.reduction!r} "
            f"means the loss is the {self.reduction} over the batch's samples of each sample's own loss, which such "
            f"a term is not, so no per-sample gradient exists for it. Track without that term in the loss, or "
            f"estimate the Fisher with estimate_fisher after training")

    def _read_output_gradient(self, reduction: str, G: torch.Tensor) -> None:
        """Warn, once each, where the output gradient shows a loss that is not the declared
        reduction over the batch's samples of each sample's own loss:

        * some samples get no gradient at all and others do (a loss over a masked or filtered
          subset): a mean over the K kept samples weighs each 1/K, not 1/N, and the left-out
          samples would be counted as samples of zero gradient;
        * outputs with positions (``[N, T, C]`` logits) where some samples have a gradient at their
          first or last position and others none (padding the loss ignores, at sequences of
          different lengths): a loss averaged over the batch's tokens weighs each sample by its
          length, which neither declared reduction describes (a mean over samples weighs each
          1/N), and the tracked Fisher would be off without an error; a loss averaged per sample
          first is right, and only it."""
        if G is None:
            return None
        rows = G.detach().reshape(G.shape[0], -1).ne(0).any(1)
        if "left out" not in self._warned and bool(rows.any()) and not bool(rows.all()):
            self._warned.add("left out")
            warnings.warn(
                f"FisherTracker: in this batch {int((~rows).sum())} of {rows.numel()} samples get no gradient at the "
                f"model's output, so your loss leaves them out (a mask or filter on the outputs). reduction="
                f"{reduction!r} means your loss is the {reduction} over all the batch's samples of each sample's own "
                f"loss; a {reduction} over the kept samples alone weighs them otherwise, and the left-out samples "
                f"would be counted with a gradient of zero: the tracked Fisher would be off. Filter the batch before "
                f"the forward (model(x[keep])), so that every sample the model sees is in the loss. If a sample's "
                f"gradient is zero for another reason (a saturated softmax), this warning does not apply.",
                UserWarning, stacklevel=2)
        if G.dim() < 3 or G.shape[1] < 2 or "positions" in self._warned:
            return None
        ends = G.detach()[:, [0, -1]].flatten(2).ne(0).any(-1)  # [N, 2]: a gradient at the first / last position
        if bool((ends.any(0) & ~ends.all(0)).any()):
            self._warned.add("positions")
            warnings.warn(
                f"FisherTracker: the model's output has positions, and in this batch some samples have a gradient "
                f"at their first or last position and others none (padding the loss ignores). reduction="
                f"{reduction!r} means your loss is the {reduction} over the batch's samples of each "
                f"sample's own loss. A loss averaged over the batch's tokens (F.cross_entropy(logits.flatten(0, 1), "
                f"targets.flatten()) with ignored positions) weighs each sample by its number of tokens instead, and "
                f"the tracked Fisher would be off: average per sample first, e.g. F.cross_entropy(logits.transpose(1, "
                f"2), targets, reduction='none').sum(1) / (targets != -100).sum(1), then .mean(). If your loss does "
                f"that already, this warning does not apply. (A Hugging Face model called with labels needs "
                f"nothing: its own loss is weighed as it computes it.)", UserWarning, stacklevel=2)
        return None
