"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``: per-sample gradients of every weight from one batched
recomputation of the recurrence.

The generic module-local rule cannot replay these modules (their fused kernel has no ``vmap``
rule), and it could not read them anyway: a ``batch_first=False`` call has the samples on axis 1
of its input and output, and ``h_n`` / ``c_n`` always have them on axis 1.

Recording (:func:`rnn_record`). The call is kept in batch-first layout: the input, the initial
state and every output (``output``, ``h_n`` and LSTM's ``c_n``) are moved so that the samples are
on axis 0, as views, decided from the module's ``batch_first`` and never from a size (a sequence
as long as the batch is common in tests and probes). The engine then differentiates the loss
with respect to those views, the rest of the model gets them moved back, and everything
downstream (slicing chunks of samples, the tracker's subset of samples) reads axis 0 as for any
module. A ``PackedSequence`` is recorded padded (samples first, in the caller's order, zeros past
each length, and the lengths as a per-sample tensor); the rest of the model gets the packed rows
gathered from the padded output, so the gradient of the padded output is that of the packed
rows, and zero past each length.

The maths (:func:`rnn_blocks`). Every weight of a recurrent layer enters through two affine maps
per step: the input side ``gi_t = x_t W_ih^T + b_ih`` and the hidden side ``gh_t = h_{t-1}
W_hh^T + b_hh`` (LSTM with ``proj_size``: a third, ``h_t = u_t W_hr^T`` with ``u_t = o_t *
tanh(c_t)``). As for a Linear layer applied at every step, sample ``n``'s gradient of ``W_ih``
is ``sum_t dgi_t^T x_t`` over that sample's steps, of ``W_hh`` ``sum_t dgh_t^T h_{t-1}``, of the
biases ``sum_t dgi_t`` and ``sum_t dgh_t``, and of ``W_hr`` ``sum_t dh_t^T u_t``, where ``dgi``,
``dgh`` and ``dh`` are the gradients of the loss with respect to those pre-activations and
projected states: total derivatives, through every later step, layer and output. The samples do
not mix, so one batched recomputation gives them for all samples at once: the recurrence is
rerun in Python for the chunk of samples, layer by layer and direction by direction, with the
module's weights detached, keeping ``gi`` (all steps at once) and each step's ``gh_t`` (and
projected ``h_t``) in the autograd graph; one ``torch.autograd.grad`` of the recomputed outputs
against the recorded output gradients gives all of them, and the per-sample weight gradients are
batched matrix products over the steps. The formulas are PyTorch's: LSTM gates in the order
``i, f, g, o``; GRU ``r, z, n`` with ``n = tanh(gi_n + r * gh_n)`` and ``h = (1 - z) * n + z *
h_{t-1}``; RNN ``tanh`` or ``relu``. A reverse direction runs from each sample's last step to its
first; with packed input, steps past a sample's length leave its state unchanged, so its reverse
direction starts at its own last step.

Covered: any number of layers, bidirectional, ``batch_first`` either way, with or without bias,
``proj_size``, an initial state or none, a loss through ``output`` and/or ``h_n`` / ``c_n``,
``PackedSequence`` input (sorted or not). Not covered (the record is the generic one and the
parameters go per sample, as before): unbatched (2-D) input, dropout between layers in training
mode, weights that are not the module's own plain parameters (parametrized, renamed), a call
computed in another dtype than its weights (autocast), a subclass of these modules. The probe
checks the result against the per-sample loop like any rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.utils._pytree import tree_flatten

from .local import Recorded

_MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


@dataclass(frozen=True)
class _Layout:
    """The first leaf of a recorded RNN call: marks the record as this file's batch-first layout
    (``rnn_blocks`` reads no other), and says what the leaves after it are: the input ``[n, T,
    F]``, ``states`` initial-state tensors ``[n, layers x directions, size]``, and, for packed
    input, the lengths ``[n]``. Not a tensor, so the generic replay, which would call the module
    with these leaves, fails instead of misreading them."""

    packed: bool
    states: int


def _weight_names(m: nn.RNNBase) -> list[str]:
    """PyTorch's names of the module's weights, in its order."""
    names = []
    for layer in range(m.num_layers):
        for sfx in ("", "_reverse")[: 2 if m.bidirectional else 1]:
            names += [f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}"]
            if m.bias:
                names += [f"bias_ih_l{layer}{sfx}", f"bias_hh_l{layer}{sfx}"]
            if m.proj_size > 0:
                names.append(f"weight_hr_l{layer}{sfx}")
    return names


def _covered(m: nn.Module) -> bool:
    if type(m) not in (nn.LSTM, nn.GRU, nn.RNN) or m.mode not in _MODES:
        return False
    if m.training and m.dropout > 0 and m.num_layers > 1:
        return False  # dropout between layers: a replay would draw other masks
    if parametrize.is_parametrized(m):
        return False
    names = _weight_names(m)
    return list(m._flat_weights_names) == names and all(m._parameters.get(a) is not None for a in names)


def _call_arguments(args, kwargs):
    """``(input, hx)`` of a call ``forward(input, hx=None)``, or None for any other call."""
    if set(kwargs) - {"input", "hx"} or len(args) + len(kwargs) not in (1, 2):
        return None
    named = dict(zip(("input", "hx"), args), **kwargs)
    return (named["input"], named.get("hx")) if "input" in named else None


def rnn_record(module: nn.Module, args, kwargs, output, n: int) -> tuple[Recorded, Callable] | None:
    """The call in batch-first layout, and ``to_module(k, t)``: the tensor the rest of the model
    gets for recorded output ``k`` when the recorder hands on ``t`` (a view or copy of it) in
    its place. None for a call this file does not cover: the generic record then takes it."""
    if not _covered(module):
        return None
    got = _call_arguments(args, kwargs)
    if got is None:
        return None
    x, hx = got
    dtype = getattr(module, _weight_names(module)[0]).dtype
    lstm = module.mode == "LSTM"
    states = (list(hx) if isinstance(hx, tuple) else [hx]) if hx is not None else []
    if len(states) not in (0, 2 if lstm else 1) or not all(
            isinstance(s, torch.Tensor) and s.dim() == 3 and s.shape[1] == n and s.dtype == dtype for s in states):
        return None
    seq, last = output if isinstance(output, tuple) and len(output) == 2 else (None, None)
    finals = (list(last) if lstm and isinstance(last, tuple) else [last])
    if len(finals) != (2 if lstm else 1) or not all(isinstance(t, torch.Tensor) for t in finals):
        return None
    packed = isinstance(x, PackedSequence)
    axis, rows = (0 if module.batch_first else 1), None
    if packed:
        if not isinstance(seq, PackedSequence):
            return None
        padded, lengths = pad_packed_sequence(x, batch_first=True)
        x_first, seq_tensor = padded, seq.data
        out_first = pad_packed_sequence(seq, batch_first=True)[0]
        rows = _packed_rows(seq, out_first.device)
        extra = [lengths.to(padded.device)]
    else:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not isinstance(seq, torch.Tensor):
            return None  # unbatched input: the generic rule's business
        x_first, seq_tensor, out_first, extra = x.movedim(axis, 0), seq, seq.movedim(axis, 0), []
    if x_first.shape[0] != n or x_first.dtype != dtype or seq_tensor.dtype != dtype:
        return None
    leaves = [_Layout(packed, len(states)), x_first, *[s.movedim(1, 0) for s in states], *extra]
    out_leaves, _ = tree_flatten(output)
    targets = [seq_tensor, *finals]
    out_index = [next((k for k, t in enumerate(out_leaves) if t is want), None) for want in targets]
    if None in out_index:
        return None
    recorded = [out_first, *[t.movedim(1, 0) for t in finals]]

    def to_module(k: int, t: torch.Tensor) -> torch.Tensor:
        if k == 0:
            return t[rows] if packed else t.movedim(0, axis)
        return t.movedim(0, 1)

    # every leaf but the layout holds the samples (the input, the states, the lengths)
    rec = Recorded(leaves, tree_flatten((tuple(leaves), {}))[1], recorded, out_index, n,
                   per_sample=list(range(1, len(leaves))))
    return rec, to_module


def _packed_rows(seq: PackedSequence, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sample, step)`` of each row of ``seq.data``, samples in the caller's order: the packed
    rows are, step by step, the first ``batch_sizes[t]`` samples in sorted order."""
    sizes = seq.batch_sizes.tolist()
    steps = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ranks = torch.cat([torch.arange(s) for s in sizes])
    samples = ranks if seq.sorted_indices is None else seq.sorted_indices.cpu()[ranks]
    return samples.to(device), steps.to(device)



def _in_graph(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor whose gradient autograd can be asked for (the first layer's and first
    step's pre-activations are computed from detached tensors only)."""
    return t if t.requires_grad else t.requires_grad_(True)


@dataclass
class _Taps:
    """What one layer and direction of the recomputation keeps for its weights' gradients."""

    x: torch.Tensor          # the layer's input [b, T, F]
    gi: torch.Tensor         # input-side pre-activations [b, T, G*H], in the graph
    gh: list                 # hidden-side pre-activations of each step [b, G*H], in the graph
    h_prev: list             # the state each step started from [b, P]
    h: list                  # LSTM with projection: each step's projected state [b, P], in the graph
    u: list                  # and its unprojected o * tanh(c) [b, H]


def _step(mode: str, gi_t, gh_t, h, c, w_hr):
    """One step of PyTorch's cell: ``(h_new, c_new, u)`` (``u``: the LSTM's state before its
    projection, None otherwise)."""
    if mode == "LSTM":
        i, f, g, o = (gi_t + gh_t).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        u = torch.sigmoid(o) * torch.tanh(c)
        return (u if w_hr is None else F.linear(u, w_hr)), c, u
    if mode == "GRU":
        ir, iz, inn = gi_t.chunk(3, 1)
        hr, hz, hn = gh_t.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        new = torch.tanh(inn + r * hn)
        return (1 - z) * new + z * h, None, None
    pre = gi_t + gh_t
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None, None


def _recompute(m: nn.RNNBase, x, states, lengths):
    """The module's forward on batch-first ``x`` (``[b, T, F]``), in Python: ``(outputs,
    taps)``, ``outputs`` as recorded (output, h_n, and c_n for an LSTM, samples first) and
    ``taps`` per (layer, direction)."""
    b, T = x.shape[0], x.shape[1]
    dirs = 2 if m.bidirectional else 1
    lstm = m.mode == "LSTM"
    size = m.proj_size if m.proj_size > 0 else m.hidden_size
    h0 = states[0] if states else x.new_zeros(b, m.num_layers * dirs, size)
    c0 = (states[1] if states else x.new_zeros(b, m.num_layers * dirs, m.hidden_size)) if lstm else None
    masks = None if lengths is None else [(t < lengths).unsqueeze(1) for t in range(T)]
    taps, h_n, c_n = {}, [], []
    layer_in = x
    for layer in range(m.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = {a: getattr(m, a + sfx).detach() for a in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
                 if hasattr(m, a + sfx)}
            tap = _Taps(layer_in.detach(), _in_graph(F.linear(layer_in, w["weight_ih"], w.get("bias_ih"))),
                        [], [], [], [])
            h, c = h0[:, layer * dirs + d], c0[:, layer * dirs + d] if lstm else None
            out = [None] * T
            for t in (range(T - 1, -1, -1) if d else range(T)):
                gh = _in_graph(F.linear(h, w["weight_hh"], w.get("bias_hh")))
                tap.gh.append(gh)
                tap.h_prev.append(h.detach())
                h_new, c_new, u = _step(m.mode, tap.gi[:, t], gh, h, c, w.get("weight_hr"))
                if "weight_hr" in w:
                    tap.h.append(h_new)
                    tap.u.append(u.detach())
                if masks is None:
                    out[t], h, c = h_new, h_new, c_new
                else:  # past a sample's length its state stays, and its output is padding
                    keep = masks[t]
                    out[t] = torch.where(keep, h_new, 0.0)
                    h = torch.where(keep, h_new, h)
                    c = torch.where(keep, c_new, c) if lstm else None
            outs.append(torch.stack(out, 1))
            h_n.append(h)
            c_n.append(c)
            taps[(layer, d)] = tap
        layer_in = torch.cat(outs, 2) if dirs == 2 else outs[0]
    outputs = [layer_in, torch.stack(h_n, 1)]
    if lstm:
        outputs.append(torch.stack(c_n, 1))
    return outputs, taps


def rnn_blocks(module: nn.Module, attrs: list[str], rec: Recorded, grads: list, i: int, j: int) -> dict | None:
    """Per-sample gradients ``{attr: [j - i, *shape]}`` of the module's weights ``attrs`` for
    samples ``i..j`` of one call recorded by :func:`rnn_record` (``grads``: the gradient of each
    recorded output, all samples), or None for any other record or configuration."""
    layout = rec.leaves[0] if rec.leaves else None
    if not isinstance(layout, _Layout) or not _covered(module) or len(grads) != len(rec.outputs):
        return None
    if not set(attrs) <= set(_weight_names(module)):
        return None
    x = rec.leaves[1][i:j].detach()
    states = [s[i:j].detach() for s in rec.leaves[2 : 2 + layout.states]]
    lengths = rec.leaves[-1][i:j] if layout.packed else None
    with torch.enable_grad():
        outputs, taps = _recompute(module, x, states, lengths)
        order = sorted(taps)
        wrt = [t for k in order for t in (taps[k].gi, *taps[k].gh, *taps[k].h)]
        got = torch.autograd.grad(outputs, wrt, [g[i:j].to(o.dtype) for g, o in zip(grads, outputs)],
                                  allow_unused=True)
    got = iter([torch.zeros_like(t) if g is None else g for g, t in zip(got, wrt)])
    result = {}
    for key in order:  # the gradients come in the order of wrt
        tap = taps[key]
        d_gi = next(got)
        d_gh = torch.stack([next(got) for _ in tap.gh], 1)
        d_h = [next(got) for _ in tap.h]
        sfx = f"_l{key[0]}" + ("_reverse" if key[1] else "")
        want = {a: a + sfx for a in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
                if a + sfx in attrs}
        if "weight_ih" in want:
            result[want["weight_ih"]] = torch.bmm(d_gi.transpose(1, 2), tap.x)
        if "weight_hh" in want:
            result[want["weight_hh"]] = torch.bmm(d_gh.transpose(1, 2), torch.stack(tap.h_prev, 1))
        if "bias_ih" in want:
            result[want["bias_ih"]] = d_gi.sum(1)
        if "bias_hh" in want:
            result[want["bias_hh"]] = d_gh.sum(1)
        if "weight_hr" in want:
            result[want["weight_hr"]] = torch.bmm(torch.stack(d_h, 2), torch.stack(tap.u, 1))
    return result if set(result) == set(attrs) else None
