"""What one sample's loss is, written once for every engine.

Every engine of :func:`~fastewc.estimate_fisher` (the rules' one batched pass, vmap, the loop)
differentiates the same per-sample loss, so the definitions live here:

* the logits of a model output, and the positions of a sequence that count (``-100`` labels
  ignored; for the sampled and exact kinds, ``attention_mask`` zeros excluded, or for an
  encoder-decoder's decoder positions the ``-100`` labels);
* the decoder inputs of an encoder-decoder, made once from its labels (:func:`with_decoder_inputs`);
* per-sample cross-entropy from a batch of logits (a sequence sample's loss is the mean over its
  valid positions);
* the model's own loss for Hugging Face style dict batches, per sample
  (:func:`model_loss_per_sample`: causal LM shift, sequence classification by
  ``config.problem_type``, token classification, masked LM), equal to ``model(**one_sample).loss``;
* the exact Fisher's cotangent columns (:func:`exact_columns`);
* labels drawn from the model (kind ``"sampled"``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import EWCInputError
from .functional import call_once
from .batches import Batch

LossFn = Callable[[object, torch.Tensor], torch.Tensor]


def logits_of(output) -> torch.Tensor:
    """The logits in a model output: the tensor itself, or ``output.logits`` (Hugging Face)."""
    if isinstance(output, torch.Tensor):
        return output
    z = getattr(output, "logits", None)
    if z is None and isinstance(output, dict):
        z = output.get("logits")
    if not isinstance(z, torch.Tensor):
        raise EWCInputError(f"the model returned {type(output).__name__} without logits; kinds 'sampled' and "
                            f"'exact' need logits (a tensor, or an output with .logits)")
    return z


def position_mask(z: torch.Tensor, inputs) -> torch.Tensor | None:
    """Which positions of the logits ``z`` ``[N, T, C]`` count (0 = excluded), or None for all.

    With ``decoder_input_ids`` in the batch the logits are an encoder-decoder's decoder positions:
    the ``-100`` labels are excluded there (else ``decoder_attention_mask``), never by the
    encoder's ``attention_mask``, which describes other positions even when it has as many.
    Otherwise ``attention_mask`` when it has one entry per position; None when it has not
    (``[N, C]`` logits of a sequence classifier: its mask concerns the input tokens only)."""
    if not isinstance(inputs, dict) or z.dim() != 3:
        return None
    if "decoder_input_ids" in inputs:
        labels = inputs.get("labels")
        if labels is not None and labels.shape == z.shape[:2] and not labels.is_floating_point():
            return labels != -100
        mask = inputs.get("decoder_attention_mask")
    else:
        mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape[1] != z.shape[1]:
        return None
    return mask


def per_sample_ce(z: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[N]`` per-sample cross-entropy: ``z`` [N, C] or [N, T, C], labels [N] / [N, T] (-100 =
    ignored), mask [N, T] or None (0 = excluded). A sequence sample's loss is the mean over its
    valid positions (0 when it has none)."""
    N, C = z.shape[0], z.shape[-1]
    ce = F.cross_entropy(z.reshape(-1, C), labels.reshape(-1), ignore_index=-100, reduction="none").view(N, -1)
    keep = (labels.reshape(N, -1) != -100).to(ce.dtype)
    if mask is not None:
        keep = keep * mask.reshape(N, -1).to(ce.dtype)
    return (ce * keep).sum(1) / keep.sum(1).clamp_min(1)


def check_scalar(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise EWCInputError(f"the loss of one sample must be a scalar; loss_fn returned {shape}. "
                            f"loss_fn(output, target) receives a batch of one sample: reduce over it "
                            f"(e.g. reduction='mean' or 'sum')")
    return loss.reshape(())


def output_rows(output, i: int, j: int, n: int):
    """Samples ``i..j`` of a model output (a tensor, a dict or a Hugging Face ``ModelOutput``):
    every tensor field whose dim 0 is the batch (``n``) is sliced, other fields kept."""
    if isinstance(output, torch.Tensor):
        return output[i:j]
    if isinstance(output, dict):
        fields = {k: (v[i:j] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v)
                  for k, v in output.items()}
        try:
            return type(output)(**fields)
        except TypeError:
            return fields
    raise EWCInputError(f"loss_fn needs the model output per sample, but the model returned "
                        f"{type(output).__name__} (expected a tensor, a dict or a ModelOutput)")


# -- the model's own loss of dict batches (Hugging Face heads) ----------------------------------
def model_head(model) -> str | None:
    """Which Hugging Face loss the model computes from ``labels``, from its class name; None when
    unknown (then the per-sample engines call the model on each sample and use ``output.loss``).
    ``check_forward`` (:mod:`.probe`) proves the guess on the first samples before the rules use it."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if name.endswith("ForConditionalGeneration") and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "seq2seq_lm"
    # Image and audio classifiers compute the sequence classifier's loss (transformers' loss
    # mapping serves all three with one function).
    if name.endswith(("ForSequenceClassification", "ForImageClassification", "ForAudioClassification")):
        return "sequence_classification"
    if name.endswith("ForTokenClassification"):
        return "token_classification"
    if name.endswith("ForMaskedLM"):
        return "masked_lm"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and callable(
            getattr(model, "get_decoder", None)):
        # An encoder-decoder named otherwise (MarianMTModel): its labels are the decoder's targets
        # as in every seq2seq LM of transformers; check_forward proves it on the first samples.
        return "seq2seq_lm"
    # A PEFT model built without task_type is a plain PeftModel whose forward is its base model's:
    # the loss is the base model's, whatever the wrapper's name.
    base = getattr(model, "get_base_model", None)
    if callable(base):
        inner = base()
        if inner is not model:
            return model_head(inner)
    return None


# The head whose Hugging Face loss upcasts the logits to float32 (transformers' ForCausalLMLoss,
# which every causal LM uses). The other heads mostly call CrossEntropyLoss / MSELoss on the
# logits as they are, and so must the per-sample form, or a float64 model's Fisher would carry
# float32 rounding that its own loss does not have (check_forward proves the form either way).
_UPCAST = ("causal_lm",)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """A causal LM's targets: position t predicts label t+1; the last position has none (-100)."""
    return F.pad(labels, (0, 1), value=-100)[..., 1:]


def problem_type(config, labels: torch.Tensor, num_labels: int) -> str:
    """A sequence classifier's loss, decided as transformers decides it: ``config.problem_type``,
    else regression for one label, single-label cross-entropy for integer labels, multi-label
    BCE otherwise. ``num_labels``: the logits' width, used where the config names none. The one
    place the per-sample loss, the label check and the tracker's weights learn it from."""
    kind = getattr(config, "problem_type", None)
    if kind is not None:
        return kind
    if getattr(config, "num_labels", num_labels) == 1:
        return "regression"
    return "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"


def model_loss_per_sample(model, head: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[N]``: what ``model(**sample).loss`` is for each sample alone, from batched logits.

    As the Hugging Face heads compute it: causal LM: logits upcast with ``.float()``, position t
    predicts label t+1, ``-100`` ignored, mean over the sample's counted tokens; the other heads
    in the logits' dtype: token classification and masked LM: the same without the shift;
    encoder-decoder LM (``seq2seq_lm``): the same over the decoder positions (the labels are the
    decoder's targets, unshifted); sequence classification by ``config.problem_type`` (or
    inferred as the model does: 1 label -> regression (MSE), integer labels -> single-label
    cross-entropy, else multi-label BCE with logits), mean over the sample's elements."""
    z = logits.float() if head in _UPCAST else logits
    N = z.shape[0]
    if head == "causal_lm":
        return per_sample_ce(z, shifted_labels(labels))
    if head in ("token_classification", "masked_lm", "seq2seq_lm"):
        return per_sample_ce(z, labels)
    kind = problem_type(getattr(model, "config", None), labels, z.shape[-1])
    if kind == "regression":
        diff = (z.reshape(N, -1) - labels.to(z.dtype).reshape(N, -1)).square()
        return diff.mean(1)
    if kind == "single_label_classification":
        return per_sample_ce(z.reshape(N, -1), labels.reshape(N))
    bce = F.binary_cross_entropy_with_logits(z, labels.to(z.dtype), reduction="none")
    return bce.reshape(N, -1).mean(1)


# -- the exact Fisher ---------------------------------------------------------------------------
def exact_columns(z: torch.Tensor, mask: torch.Tensor | None, top_k: int | None) -> torch.Tensor:
    """``[K, *z.shape]`` cotangents whose vector-Jacobian products give the exact Fisher:
    ``sum_k (J^T V_k)^2`` per sample.

    ``z``: logits ``[N, C]`` or ``[N, T, C]``; ``mask``: ``[N, T]`` (0 = position excluded) or
    None. Column ``(t, j)`` of sample ``n`` is ``w_t sqrt(p_c) (p_t - e_c)`` at position ``t``
    (zeros elsewhere), ``c`` the ``j``-th class of that position (all classes, or the ``top_k``
    most probable), ``w_t = 1 / (valid positions)``: the columns factor the output Hessian
    ``diag(p) - p p^T`` of softmax cross-entropy, and the terms of two positions vanish in
    expectation, so the sample's Fisher of its mean loss is ``sum_t sum_c w_t^2 p_c g_tc^2``
    (docs/design.md). Columns are shared by all samples, so one batched backward serves all.
    """
    zt = z.detach()
    seq = zt if zt.dim() == 3 else zt.unsqueeze(1)                        # [N, T, C]
    N, T, C = seq.shape
    p = torch.softmax(seq.to(torch.float64 if seq.dtype == torch.float64 else torch.float32), -1).to(seq.dtype)
    w = torch.ones(N, T, dtype=seq.dtype, device=seq.device) if mask is None else mask.to(seq.dtype)
    w = w / w.sum(1, keepdim=True).clamp_min(1)                           # 1/T per valid position
    k = C if top_k is None else min(top_k, C)
    if k == C:
        probs, classes = p, torch.arange(C, device=p.device).expand(N, T, C)
    else:
        probs, classes = torch.topk(p, k, -1)                             # [N, T, k]
    onehot = F.one_hot(classes, C).to(p.dtype)                            # [N, T, k, C]
    rows = (p.unsqueeze(2) - onehot) * (probs.sqrt() * w.unsqueeze(2)).unsqueeze(-1)   # [N, T, k, C]
    eye = torch.eye(T, dtype=p.dtype, device=p.device)                    # column t lives at position t
    V = eye.view(1, T, 1, T, 1) * rows.unsqueeze(3)                       # [N, Tcol, k, T, C]
    V = V.reshape(N, T * k, T, C).transpose(0, 1)                         # [K, N, T, C]
    return V.reshape(T * k, *z.shape)


@dataclass
class Problem:
    """What one per-sample loss is: the model, the kind, the loss and the selected parameters."""

    model: torch.nn.Module
    kind: str                      # "empirical" | "sampled" | "exact"
    loss_fn: LossFn | None         # user loss (empirical / sampled), or None for the default
    top_k: int | None
    selected: dict[str, torch.Tensor]  # name -> parameter (differentiated)
    frozen: dict[str, torch.Tensor]    # the model's other parameters and buffers

    def restrict(self, names) -> "Problem":
        """The same problem differentiating only ``names`` (the other selected parameters fixed)."""
        keep = {n: p for n, p in self.selected.items() if n in set(names)}
        fixed = {**self.frozen, **{n: p.detach() for n, p in self.selected.items() if n not in keep}}
        return Problem(self.model, self.kind, self.loss_fn, self.top_k, keep, fixed)

    # -- the model on one sample ----------------------------------------------------------------
    def call(self, params: dict, inputs, functional: bool = True):
        """Model output for one sample (``inputs`` without the batch axis; one is added)."""
        if isinstance(inputs, dict):
            args, kwargs = (), {k: v.unsqueeze(0) for k, v in inputs.items()}
        else:
            args, kwargs = (inputs.unsqueeze(0),), {}
        if functional:
            return call_once(self.model, {**self.frozen, **params}, args, kwargs)
        return self.model(*args, **kwargs)

    def loss(self, output, inputs, target) -> torch.Tensor:
        """Scalar loss of one sample; ``target`` without the batch axis (sampled labels for
        kind 'sampled'), or None for dict batches (the model's ``output.loss``)."""
        if self.kind == "sampled":
            if self.loss_fn is not None:
                return check_scalar(self.loss_fn(output, target.unsqueeze(0)))
            z = logits_of(output)
            return per_sample_ce(z, target.unsqueeze(0), position_mask(z, _batched(inputs)))[0]
        if self.loss_fn is not None:
            if target is None and isinstance(inputs, dict):
                target = inputs.get("labels")
            return check_scalar(self.loss_fn(output, None if target is None else target.unsqueeze(0)))
        if isinstance(inputs, dict):
            loss = getattr(output, "loss", None)
            if loss is None and isinstance(output, dict):
                loss = output.get("loss")
            if loss is None:
                raise EWCInputError("dict batch: the model output has no .loss (pass 'labels' in the batch, "
                                    "or give loss_fn)")
            return check_scalar(loss)
        return per_sample_ce(logits_of(output), target.unsqueeze(0))[0]

    # -- a batch at once ------------------------------------------------------------------------
    def batched_losses(self, output, batch: Batch, labels: torch.Tensor | None) -> torch.Tensor:
        """``[N]`` per-sample losses from one batched forward: the same numbers :meth:`loss` gives
        one sample at a time. ``labels``: the sampled labels for kind 'sampled', else None."""
        n = batch.size
        if self.kind == "sampled":
            if self.loss_fn is not None:
                return torch.stack([check_scalar(self.loss_fn(output_rows(output, i, i + 1, n), labels[i : i + 1]))
                                    for i in range(n)])
            z = logits_of(output)
            return per_sample_ce(z, labels, position_mask(z, batch.inputs))
        target = batch.labels
        if self.loss_fn is not None:
            return torch.stack([check_scalar(self.loss_fn(output_rows(output, i, i + 1, n),
                                                          None if target is None else target[i : i + 1]))
                                for i in range(n)])
        if batch.is_dict:
            head = model_head(self.model)
            if head is None:
                raise EWCInputError("no per-sample form of this model's own loss")  # callers check first
            return model_loss_per_sample(self.model, head, logits_of(output), target)
        return per_sample_ce(logits_of(output), target)


def with_decoder_inputs(model, batch: Batch) -> Batch:
    """``batch`` with the decoder inputs of an encoder-decoder made explicit: a Hugging Face
    encoder-decoder given ``labels`` and no decoder inputs shifts the labels right into
    ``decoder_input_ids``; the batched passes call the model without ``labels`` (their per-sample
    losses come from the logits), where the model would then have no decoder inputs (T5, Whisper)
    or derive them from ``input_ids`` (BART). Made once here and passed to every engine, the
    decoder inputs are the same in the batched passes, the per-sample engines and the draw of
    sampled labels, and mark the logits as decoder positions (:func:`position_mask`). Other
    batches are returned as they are.

    The model's ``prepare_decoder_input_ids_from_labels`` makes them where it has one; a model
    without it (Whisper) shifts its labels inside its forward, so that forward is run with the
    labels, without gradients, as far as its decoder's call, whose ``input_ids`` are taken."""
    inputs = batch.inputs
    if (not batch.is_dict or "labels" not in inputs or "decoder_input_ids" in inputs
            or "decoder_inputs_embeds" in inputs
            or not getattr(getattr(model, "config", None), "is_encoder_decoder", False)):
        return batch
    shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    with torch.no_grad():
        decoder_ids = shift(labels=inputs["labels"]) if shift is not None else _decoder_inputs_of(model, inputs)
    if decoder_ids is None:
        return batch
    return Batch({**inputs, "decoder_input_ids": decoder_ids}, batch.targets, batch.size, batch.index)


def untouched_rng(tensors):
    """The random states of the CPU and of the CUDA devices ``tensors`` are on, restored after the
    block: a forward run only to read something (its dropout masks) leaves the caller's stream as
    it was."""
    devices = sorted({t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


class _DecoderReached(Exception):
    """Ends the forward of :func:`_decoder_inputs_of` at its decoder's call."""


def _decoder_inputs_of(model, inputs: dict) -> torch.Tensor | None:
    """The ``input_ids`` that ``model(**inputs)`` passes to its decoder (``model.get_decoder()``),
    read from a pre-hook that ends the forward there (the decoder and the head are not run), with
    the random state restored. None where the model has no decoder to hook, or its decoder gets
    embeddings instead."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if not isinstance(decoder, nn.Module):
        return None
    seen = {}

    def reached(module, args, kwargs):
        seen["ids"] = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
        raise _DecoderReached

    handle = decoder.register_forward_pre_hook(reached, with_kwargs=True)
    try:
        with untouched_rng(inputs.values()):
            model(**inputs)
    except _DecoderReached:
        pass
    finally:
        handle.remove()
    ids = seen.get("ids")
    return ids if isinstance(ids, torch.Tensor) else None


def _batched(inputs):
    """One sample's inputs with the batch axis back (dict batches), as the model sees them."""
    return {k: v.unsqueeze(0) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs


def one_sample_grads(output: torch.Tensor, params: list, **kwargs) -> tuple:
    """``torch.autograd.grad(output, params, allow_unused=True, **kwargs)`` for one sample's loss
    (or logits), where autograd's own failure (a model whose eval-mode forward changes in place a
    tensor its backward needs, as RWKV's in transformers does) becomes an error that says so;
    running out of memory stays what it is."""
    try:
        return torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise EWCInputError(
            f"the model's backward for one sample failed ({type(e).__name__}: {first}). estimate_fisher "
            f"differentiates each sample's loss with the model in eval mode; a model whose eval-mode forward "
            f"cannot be differentiated (some update a recurrent state in place there) gives no per-sample "
            f"gradient") from e


@contextlib.contextmanager
def contiguous_norm_gradients(model: nn.Module):
    """Every batch norm of ``model`` gets its output gradient contiguous, for a backward over one
    sample. PyTorch's CPU batch norm backward (eval mode, seen in 2.13) returns wrong input,
    weight and bias gradients for a batch of one whose output gradient has a channels-last
    layout, as ``x.flatten(2).transpose(1, 2)`` after it hands back (LeViT's patch embedding):
    every layer below it then gets a wrong gradient. Batched passes are not affected."""
    handles = [m.register_forward_hook(_contiguous_gradient) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _contiguous_gradient(module, args, output):
    # A hook on the output tensor, not a module backward hook: those wrap the output in a view
    # that an in-place op after the norm (ResNet's ReLU) may not modify. A tensor hook fires with
    # the gradient of the output as the norm produced it, also after such an op.
    if isinstance(output, torch.Tensor) and output.requires_grad:
        output.register_hook(torch.Tensor.contiguous)


@contextlib.contextmanager
def plain_attention():
    """Attention as plain batched matmuls and softmax, which ``vmap`` and hooks can see through.

    scaled_dot_product_attention's fused CPU kernels have no vmap batching rule, and PyTorch's
    fused TransformerEncoderLayer / MultiheadAttention "fast path" (taken when the layer's own
    parameters do not require grad, e.g. when only some parameters are differentiated) has none
    either: torch then falls back to a slow per-sample loop, with a warning."""
    flag = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(flag)


# Labels are drawn this many bytes of float64 probabilities at a time (an LM's [N, T, vocab]
# would not fit at once).
_DRAW_BYTES = 32 * 2**20


@torch.no_grad()
def draw_labels(z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Labels drawn from logits ``z`` ``[N, C]`` / ``[N, T, C]``, one per sample (one per position),
    in data order, as ``torch.multinomial(softmax(z[n].double()), 1, generator)`` draws them one
    sample at a time (the reference loop's draw), but for many samples at once: that call is the
    race ``argmax(p / q)`` with ``q ~ Exp(1)`` drawn for every class, and on the CPU a generator
    gives the same stream whether it fills one sample's ``q`` at a time or many. So on the CPU the
    same generator gives the reference loop's labels (tested); elsewhere the same distribution."""
    n = z.shape[0]
    step = max(1, _DRAW_BYTES // max(1, 8 * z[0].numel())) if n else 1
    out = []
    for i in range(0, n, step):
        p = torch.softmax(z[i : i + step].detach().double(), -1)
        q = torch.empty_like(p).exponential_(1, generator=generator)
        out.append(p.div_(q).argmax(-1))
    return torch.cat(out) if out else torch.empty(z.shape[:-1], dtype=torch.long, device=z.device)


class SampledLabels:
    """Labels for kind 'sampled', drawn once from the logits of the first forward pass that needs
    them (the rules' own batched forward: no extra forward), then reused."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator
        self.labels: torch.Tensor | None = None

    def of(self, output) -> torch.Tensor:
        if self.labels is None:
            self.labels = draw_labels(logits_of(output), self.generator)
        return self.labels


@torch.no_grad()
def sample_labels(problem: Problem, batch: Batch, generator: torch.Generator | None) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution for ``batch`` (one forward pass)."""
    inputs = batch.model_inputs if batch.is_dict else batch.inputs
    output = problem.model(**inputs) if batch.is_dict else problem.model(inputs)
    return draw_labels(logits_of(output), generator)
