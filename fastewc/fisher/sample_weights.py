"""How much of a training loss each sample carries, so that :class:`~fastewc.FisherTracker` can undo
it and recover the gradient of each sample's own loss.

A training backward differentiates ``M * sum_n w_n loss_n``: ``w_n`` is the sample's weight in the
batch loss (``1/N`` for a batch mean, ``1`` for a sum, ``T_n / T`` for a token mean over the batch,
``T_n`` the sample's counted tokens and ``T`` the batch's) and ``M`` what multiplies the whole loss
(a ``GradScaler``'s scale, ``1/k`` under gradient accumulation). So the output gradient of any layer
for sample ``n`` is ``M w_n`` times the gradient of that sample's own loss, and multiplying it by
``1 / (M w_n)`` gives the latter exactly. The factor is never inferred from numbers: it is declared
(``reduction``, ``accumulation_steps``, ``scaler``) or read from what the model is called with
(the labels of a Hugging Face model computing its own loss).
"""

from __future__ import annotations

import torch

from ..errors import EWCInputError
from .batches import IGNORE_INDEX
from .problem import model_loss_per_sample, problem_type, shifted_labels

REDUCTIONS = ("mean", "sum")
# Hugging Face heads whose own loss the tracker can split per sample (problem.model_head's names).
TOKEN_HEADS = ("causal_lm", "seq2seq_lm", "token_classification", "masked_lm")


def declared_factor(reduction: str, n: int) -> float:
    """``1 / w_n`` of a plain loss declared as the ``mean`` or the ``sum`` over its ``n`` samples."""
    return float(n) if reduction == "mean" else 1.0


def own_loss_weights(model, head: str | None, labels: torch.Tensor, num_items=None) -> torch.Tensor:
    """``[N]`` weights ``w_n`` of each sample in the batch loss a Hugging Face model computes from
    ``labels`` (``model(**batch).loss = sum_n w_n loss_n``, ``loss_n`` its own loss alone, as
    :func:`~fastewc.fisher.problem.model_loss_per_sample` forms it).

    Token heads (causal LM with its shift, an encoder-decoder's LM over its decoder's labels, token
    classification, masked LM) take the mean over the batch's counted tokens: ``w_n = T_n / T``.
    Sequence classification: the mean over the samples whose label is not ``-100``
    (single-label), or over all samples (regression, multi-label). ``num_items``: the
    ``num_items_in_batch`` the caller passed (the ``Trainer`` under gradient accumulation), for a
    model whose loss sums over it instead of taking the mean (``T`` is then that number); a
    model's own loss may or may not (Hugging Face's shared loss functions do, a loss written in
    the model's forward does not): :func:`own_loss_matches` tells which."""
    cls = type(model).__name__
    if head is None or head not in TOKEN_HEADS + ("sequence_classification",):
        raise EWCInputError(
            f"FisherTracker does not know how {cls}'s own loss weighs its samples (known: causal LM, "
            f"encoder-decoder LM, masked LM, token and sequence classification); call the model without 'labels', compute the loss yourself as a "
            f"mean or sum over the batch's samples, and declare it: FisherTracker(model, reduction='mean' or 'sum')")
    n = labels.shape[0]
    if head == "sequence_classification":
        # A Hugging Face config always names num_labels; 2 stands for "not regression" without one.
        kind = problem_type(getattr(model, "config", None), labels, 2)
        if kind != "single_label_classification":
            return torch.full((n,), 1.0 / n, dtype=torch.float64, device=labels.device)
        counts = (labels.reshape(n) != IGNORE_INDEX).to(torch.float64)
    else:
        lab = shifted_labels(labels) if head == "causal_lm" else labels
        counts = (lab.reshape(n, -1) != IGNORE_INDEX).sum(1).to(torch.float64)
    total = counts.sum() if num_items is None else torch.as_tensor(num_items, dtype=torch.float64,
                                                                   device=counts.device).reshape(())
    return counts / total


def own_losses(model, head: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[N]`` float64: each sample's own loss from the model's logits, without gradients, for
    :func:`own_loss_matches` and :func:`check_own_loss` (one computation serves both)."""
    with torch.no_grad():
        return model_loss_per_sample(model, head, logits.detach(), labels).double()


def _weighted(per: torch.Tensor, weights: torch.Tensor) -> float:
    return float((weights.to(per.device, torch.float64) * per).sum())


def own_loss_matches(per: torch.Tensor, weights: torch.Tensor, loss: torch.Tensor) -> bool:
    """Whether the model's batch loss is ``sum_n w_n loss_n`` with these weights and the samples'
    own losses ``per``, to the rounding the head computes its loss in: float32 at least (causal LM
    and token classification upcast with ``.float()``), a few steps of the loss's own precision in
    a bfloat16 or float16 model, whose classification heads keep the logits' dtype."""
    got = float(loss.detach())
    rtol = max(1e-4, 4 * torch.finfo(loss.dtype).eps) if loss.is_floating_point() else 1e-4
    return abs(_weighted(per, weights) - got) <= rtol * max(abs(got), 1e-6)


def check_own_loss(model, head: str, per: torch.Tensor, weights: torch.Tensor, loss: torch.Tensor) -> None:
    """Raise unless the model's batch loss is ``sum_n w_n loss_n`` with the weights the tracker uses
    (``per``: :func:`own_losses`): proven on the model's first tracked forward, so that a head
    whose loss is formed differently (another reduction, label smoothing, a custom
    ``loss_function``) is refused, not mis-scaled."""
    if not own_loss_matches(per, weights, loss):
        raise EWCInputError(
            f"FisherTracker: {type(model).__name__}'s own loss ({float(loss.detach()):.6g}) is not the weighted mean "
            f"of its per-sample {head} losses the tracker assumes ({_weighted(per, weights):.6g}), so each sample's "
            f"share of it is unknown; call the model without 'labels', compute a loss that is a mean or sum over the "
            f"batch's samples, and declare it with reduction='mean' or 'sum'")


def inverse(weights: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """``1 / (M w_n)``, 0 where ``w_n = 0`` (a sample without counted tokens: no gradient, and its
    own loss, 0 by convention, has none either)."""
    scaled = weights * multiplier.to(weights.dtype)
    return torch.where(weights > 0, 1.0 / torch.where(weights > 0, scaled, torch.ones_like(scaled)),
                       torch.zeros_like(scaled))
