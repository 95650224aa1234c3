"""The reference Fisher diagonals: one sample's forward and ``backward()`` at a time, squared and
summed in Python (see the package docstring for what differs from the original code)."""

from __future__ import annotations

import fnmatch
from contextlib import ExitStack
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import eval_mode

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _one_sample_batch_norm(model: nn.Module) -> ExitStack:
    """PyTorch's CPU batch norm backward (eval mode, seen in 2.13) gives wrong input, weight and
    bias gradients for a batch of one whose output gradient has a channels-last layout, as
    ``x.flatten(2).transpose(1, 2)`` after it hands back: while the returned context is open,
    every batch norm has its output gradient made contiguous first, for these one-sample loops
    (by a hook on the output tensor, since an in-place ReLU may follow the norm)."""
    def on_output(module, args, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda g: g.contiguous())

    stack = ExitStack()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            stack.callback(m.register_forward_hook(on_output).remove)
    return stack


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    # named_parameters() yields a tied parameter once, under its first name, as in the original.
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _per_sample_fisher(
    model: nn.Module,
    data: Iterable,
    num_samples: int,
    loss_fn: LossFn,
    label_for: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Shared loop: one forward/backward per sample, accumulate squared grads, divide by count."""
    params = _trainable(model)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    with eval_mode(model), _one_sample_batch_norm(model):
        for batch in data:
            if seen >= num_samples:
                break
            inputs, targets = batch[0], (batch[1] if len(batch) > 1 else None)
            for i in range(min(inputs.shape[0], num_samples - seen)):
                model.zero_grad(set_to_none=True)
                output = model(inputs[i : i + 1])
                target = targets[i : i + 1] if targets is not None else None
                loss = loss_fn(output, label_for(output, target))
                loss.backward()
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n] += p.grad.detach().pow(2)
                seen += 1
    model.zero_grad(set_to_none=True)
    if seen == 0:
        raise ValueError("reference Fisher: the data yielded no samples")
    return {n: f / seen for n, f in fisher.items()}


def compute_fisher(
    model: nn.Module, data_loader: Iterable, num_samples: int = 200, loss_fn: LossFn | None = None
) -> dict[str, torch.Tensor]:
    """Empirical Fisher by the original per-sample loop: mean over samples of ``grad(loss)^2``.

    ``data_loader`` yields ``(inputs, targets)``; ``loss_fn(output[1, ...], target[1]) -> scalar``
    defaults to cross-entropy on logits. Returns ``{name: tensor}`` shaped like the parameters,
    for every parameter with ``requires_grad`` (tied parameters once).
    """
    loss_fn = loss_fn or F.cross_entropy
    return _per_sample_fisher(model, data_loader, num_samples, loss_fn, lambda out, y: y)


def compute_true_fisher(
    model: nn.Module,
    data_loader: Iterable,
    num_samples: int = 200,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """"True" (sampled) Fisher: labels drawn from the model's own predictive distribution.

    For each sample in order, one label is drawn with
    ``torch.multinomial(softmax(output[0]), 1, generator=generator)``; a fast path that draws in
    the same order with the same generator gets the same labels.
    """
    loss_fn = loss_fn or F.cross_entropy

    def sample(output: torch.Tensor, _target) -> torch.Tensor:
        with torch.no_grad():
            probs = F.softmax(output.detach()[0].double(), dim=-1)
            return torch.multinomial(probs, 1, generator=generator)  # shape [1]

    return _per_sample_fisher(model, data_loader, num_samples, loss_fn, sample)


def compute_exact_fisher(
    model: nn.Module, data_loader: Iterable, num_samples: int = 200
) -> dict[str, torch.Tensor]:
    """Exact Fisher for a classifier: ``mean_n sum_y p(y|x_n) grad(-log p(y|x_n))^2``.

    One backward per (sample, class): slow by construction. ``model(x)`` must return logits
    ``[1, C]``.
    """
    params = _trainable(model)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    with eval_mode(model), _one_sample_batch_norm(model):
        for batch in data_loader:
            if seen >= num_samples:
                break
            inputs = batch[0]
            for i in range(min(inputs.shape[0], num_samples - seen)):
                with torch.no_grad():
                    probs = F.softmax(model(inputs[i : i + 1])[0], dim=-1)
                for y in range(probs.shape[0]):
                    model.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(model(inputs[i : i + 1]), torch.tensor([y]))
                    loss.backward()
                    for n, p in params.items():
                        if p.grad is not None:
                            fisher[n] += probs[y] * p.grad.detach().pow(2)
                seen += 1
    model.zero_grad(set_to_none=True)
    if seen == 0:
        raise ValueError("reference Fisher: the data yielded no samples")
    return {n: f / seen for n, f in fisher.items()}


# ---------------------------------------------------------------------------------------------
# The general Fisher estimator: every batch format, every kind, one sample at a time.
# ---------------------------------------------------------------------------------------------

FISHER_KINDS = ("empirical", "sampled", "exact")


def _row(x, i: int):
    """Row ``i`` of every tensor in a (possibly nested) batch, keeping a batch dim of one."""
    if isinstance(x, torch.Tensor):
        return x[i : i + 1]
    if isinstance(x, Mapping):
        return {k: _row(v, i) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_row(v, i) for v in x)
    return x


def _batch_len(x) -> int | None:
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for v in x:
            n = _batch_len(v)
            if n is not None:
                return n
    return None


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None:
        raise ValueError(f"reference Fisher: cannot find logits in a {type(output).__name__}")
    return logits


def default_fisher_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on logits: ``[1, C]`` with target ``[1]``, or ``[1, T, C]`` with target
    ``[1, T]`` (token-level mean over the positions whose target is not ``-100``)."""
    if output.dim() == 3:
        return F.cross_entropy(output.flatten(0, 1), target.flatten(), ignore_index=-100)
    return F.cross_entropy(output, target)


def _select_params(model: nn.Module, params) -> dict[str, nn.Parameter]:
    """``params``: None (every parameter with ``requires_grad``), a name/glob, a list of
    names/globs (``fnmatch.fnmatchcase``), or a predicate ``f(name, param) -> bool``. Only
    parameters with ``requires_grad`` are candidates; tied parameters once (first name)."""
    trainable = _trainable(model)
    if params is None:
        return trainable
    if callable(params):
        return {n: p for n, p in trainable.items() if params(n, p)}
    globs = (params,) if isinstance(params, str) else tuple(params)
    return {n: p for n, p in trainable.items() if any(fnmatch.fnmatchcase(n, g) for g in globs)}


def _seq_mean_ce(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over the valid positions of one sequence: logits ``[1, T, C]``,
    labels ``[T]``, valid ``[T]`` bool or None (all)."""
    ce = F.cross_entropy(logits[0], labels, reduction="none")
    if valid is not None:
        ce = ce[valid]
    return ce.mean()


def estimate_fisher(
    model: nn.Module,
    data: Iterable,
    *,
    loss_fn: LossFn | None = None,
    kind: str = "empirical",
    num_samples: int | None = None,
    params=None,
    generator: torch.Generator | None = None,
    top_k: int | None = None,
) -> dict[str, torch.Tensor]:
    """The truth for ``fastewc.estimate_fisher``: mean over samples of the squared per-sample
    gradient, one forward (and one backward per label) per sample, model in eval mode.

    Batches: ``(inputs, targets)``, ``(inputs,)`` (kinds ``sampled``/``exact`` only) or a dict
    called as ``model(**batch)``. A sample is row ``i`` of every tensor of the batch; the model
    sees a batch of one. The first ``num_samples`` samples (default: all) are used, in order.

    * ``empirical``: the loss with the dataset labels: ``loss_fn(output, target)``, default
      :func:`default_fisher_loss`; for dict batches ``output.loss`` (or ``loss_fn(output,
      batch["labels"])``).
    * ``sampled``: labels drawn from the model, per sample in data order, with
      ``torch.multinomial(softmax(logits[0].double(), -1), 1, generator=generator)``: one label
      (shape ``[1]``) for ``[1, C]`` logits, one per position (``[:, 0]``, shape ``[T]``) for
      ``[1, T, C]`` logits, drawn at every position, also masked ones. The loss is then
      ``loss_fn(output, labels)`` (default cross-entropy, mean over positions). Dict batches:
      logits are ``output.logits`` and the loss is the mean cross-entropy of each position
      against its own drawn label (no shift), over the positions with ``attention_mask != 0``
      (all when there is no mask; for a Hugging Face encoder-decoder given ``labels``, the decoder
      positions whose label is not ``-100``); ``loss_fn`` is not used.
    * ``exact``: ``sum_c p_c g_c^2`` with ``g_c = grad CE(logits, c)`` for ``[1, C]`` logits;
      for sequences with ``T`` valid positions ``(1/T^2) sum_t sum_c p_tc (grad CE(z_t, c))^2``
      (the cross-position terms of the square of the mean loss vanish in expectation). ``top_k``:
      only the ``k`` most probable classes of each position, with their raw (not renormalised)
      probabilities: a lower bound that reaches the exact value at ``k = C``. ``loss_fn`` is not
      used. One backward per (sample, position, class).

    Returns float tensors in the parameters' dtype, for the parameters ``params`` selects.
    """
    if kind not in FISHER_KINDS:
        raise ValueError(f"reference Fisher: unknown kind {kind!r}")
    selected = _select_params(model, params)
    if not selected:
        raise ValueError("reference Fisher: no parameter selected")
    names = list(selected)
    tensors = [selected[n] for n in names]
    fisher = {n: torch.zeros_like(p) for n, p in selected.items()}
    limit = float("inf") if num_samples is None else num_samples

    def grads(loss: torch.Tensor, retain: bool) -> list[torch.Tensor]:
        gs = torch.autograd.grad(loss, tensors, retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(gs, tensors)]

    def accumulate(gs, weight=1.0):
        for n, g in zip(names, gs):
            fisher[n] += weight * g.pow(2)

    seen = 0
    with eval_mode(model), _one_sample_batch_norm(model):
        for batch in data:
            if seen >= limit:
                break
            is_dict = isinstance(batch, Mapping)
            if is_dict:
                inputs, targets = batch, batch.get("labels")
            else:
                inputs = batch[0]
                targets = batch[1] if len(batch) > 1 else None
            if kind == "empirical" and targets is None:
                raise ValueError("reference Fisher: kind='empirical' needs labels")
            n_rows = _batch_len(inputs)
            for i in range(n_rows):
                if seen >= limit:
                    break
                x = _row(inputs, i)
                output = model(**x) if is_dict else model(x)
                if kind == "empirical":
                    target = _row(targets, i)
                    if loss_fn is not None:
                        loss = loss_fn(output, target)
                    elif is_dict:
                        loss = output.loss
                    else:
                        loss = default_fisher_loss(output, target)
                    accumulate(grads(loss, False))
                    seen += 1
                    continue
                logits = _logits(output)
                valid = None
                if is_dict and getattr(getattr(model, "config", None), "is_encoder_decoder", False) and "labels" in x:
                    # an encoder-decoder's logits are its decoder positions: those of the -100
                    # labels are left out; the encoder's attention_mask is about other positions
                    valid = x["labels"][0] != -100
                elif is_dict and "attention_mask" in x and logits.dim() == 3 and x["attention_mask"].shape[-1] == logits.shape[1]:
                    # the mask marks positions of the logits only when they have one per token
                    valid = x["attention_mask"][0] != 0
                if kind == "sampled":
                    with torch.no_grad():
                        probs = F.softmax(logits.detach()[0].double(), dim=-1)
                        drawn = torch.multinomial(probs, 1, generator=generator)
                    if logits.dim() == 3:
                        drawn = drawn[:, 0]
                    if is_dict and logits.dim() == 3:
                        loss = _seq_mean_ce(logits, drawn, valid)
                    elif is_dict:
                        loss = F.cross_entropy(logits, drawn)
                    elif loss_fn is not None:
                        loss = loss_fn(output, drawn)
                    else:
                        loss = default_fisher_loss(logits, drawn if logits.dim() == 2 else drawn[None])
                    accumulate(grads(loss, False))
                    seen += 1
                    continue
                # exact
                seq = logits if logits.dim() == 3 else logits[:, None]  # [1, T, C]
                with torch.no_grad():
                    probs = F.softmax(seq.detach()[0], dim=-1)  # [T, C]
                positions = range(seq.shape[1]) if valid is None else valid.nonzero()[:, 0].tolist()
                positions = list(positions)
                scale = 1.0 / len(positions) ** 2
                jobs = []
                for t in positions:
                    classes = range(probs.shape[1])
                    if top_k is not None:
                        classes = torch.topk(probs[t], min(top_k, probs.shape[1])).indices.tolist()
                    jobs += [(t, c) for c in classes]
                for j, (t, c) in enumerate(jobs):
                    loss = F.cross_entropy(seq[0, t : t + 1], torch.tensor([c], device=seq.device))
                    accumulate(grads(loss, j + 1 < len(jobs)), scale * probs[t, c].item())
                seen += 1
    if seen == 0:
        raise ValueError("reference Fisher: the data yielded no samples")
    return {n: f / seen for n, f in fisher.items()}


def batch_fisher_estimation(
    model: nn.Module, data_loader: Iterable, num_samples: int = 200, loss_fn: LossFn | None = None
) -> dict[str, torch.Tensor]:
    """The original code's batch-squared approximation (biased): ``sum_b B_b * grad(mean loss_b)^2 / N``.

    Not the Fisher: the square of a batch mean is not the mean of squares. Kept because the
    original code ships it and users compare against it. Whole batches are used (the original
    stops *after* the batch that crosses ``num_samples``).
    """
    loss_fn = loss_fn or F.cross_entropy
    params = _trainable(model)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    with eval_mode(model):
        for inputs, targets, *_ in data_loader:
            if seen >= num_samples:
                break
            model.zero_grad(set_to_none=True)
            loss_fn(model(inputs), targets).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().pow(2) * inputs.shape[0]
            seen += inputs.shape[0]
    model.zero_grad(set_to_none=True)
    if seen == 0:
        raise ValueError("reference Fisher: the data yielded no samples")
    return {n: f / seen for n, f in fisher.items()}
