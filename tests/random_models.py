"""Seeded random models for the differential tests of the Fisher engines (tests/fisher/test_random_models.py).

``make_random(seed)`` returns ``(model, data, description)``: a chain of small blocks on a
sequence ``h [B, T, d]`` (Linear, Conv1d, Conv2d, LayerNorm, BatchNorm in eval mode with
non-trivial statistics, GroupNorm, MultiheadAttention and TransformerEncoderLayer with the batch
first or second, a learned class token concatenated in front (often followed by positions, as in
ViT), a token broadcast or copied before a child's output, an attention with a relative-position
table gathered into its mask (causal or not), broadcast positional additions, two parameters
added to the same sum, a parameter used twice, one block called at two places, a block taking
``[T, B, d]`` with a mask (XLNet's layout), parameters joined and split again, a table's scores
masked in place through a view, a batch norm whose output becomes tokens into a residual, the
batch folded into rows sample by sample, of single tokens or of windows, layer outputs modified
in place afterwards, a position table on ``arange(T)`` added, directly or through a Linear),
after an Embedding or a Linear stem and
before a mean-pooled, first-token or per-token head, the head's weight sometimes tied to the
embedding. Everything is drawn from the seed; the global RNG is left as it was.
"""

from __future__ import annotations

import random

import torch
import torch.nn as nn

from models import batches


class Dense(nn.Module):
    def __init__(self, d, bias):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=bias)

    def forward(self, h):
        return torch.tanh(self.lin(h))


class Conv1dBlock(nn.Module):
    """A convolution along the sequence (``[B, d, T]``), the length kept by 'same' padding."""

    def __init__(self, d, kernel, dilation, groups, bias):
        super().__init__()
        self.conv = nn.Conv1d(d, d, kernel, padding="same", dilation=dilation, groups=groups, bias=bias)

    def forward(self, h):
        return torch.tanh(self.conv(h.transpose(1, 2))).transpose(1, 2)


class Conv2dBlock(nn.Module):
    """The sequence as a one-channel image ``[B, 1, T, d]``, ``channels`` maps averaged back."""

    def __init__(self, channels, kernel, bias):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, kernel, padding="same", bias=bias)

    def forward(self, h):
        return torch.tanh(self.conv(h.unsqueeze(1))).mean(1)


class Norm(nn.Module):
    """LayerNorm on ``[B, T, d]``; BatchNorm1d / GroupNorm on ``[B, d, T]``."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, h):
        if isinstance(self.norm, nn.LayerNorm):
            return self.norm(h)
        return self.norm(h.transpose(1, 2)).transpose(1, 2)


class Attention(nn.Module):
    """Residual self-attention; ``batch_first=False`` is fed ``[T, B, d]``."""

    def __init__(self, d, heads, batch_first, bias):
        super().__init__()
        self.att = nn.MultiheadAttention(d, heads, bias=bias, batch_first=batch_first)

    def forward(self, h):
        x = h if self.att.batch_first else h.transpose(0, 1)
        y = self.att(x, x, x, need_weights=False)[0]
        return h + (y if self.att.batch_first else y.transpose(0, 1))


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, batch_first, norm_first):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=d + 3, dropout=0.1,
                                                batch_first=batch_first, norm_first=norm_first)

    def forward(self, h):
        if self.layer.self_attn.batch_first:
            return self.layer(h)
        return self.layer(h.transpose(0, 1)).transpose(0, 1)


class ClsToken(nn.Module):
    """A learned token broadcast over the batch and put in front of the sequence (ViT's pattern)."""

    def __init__(self, d):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))

    def forward(self, h):
        return torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1)


class TokenBefore(nn.Module):
    """A learned token broadcast or copied over the batch (``expand``, ``repeat``, ``tile``) before a
    child's output: a module with children, so its own parameter is followed op by op."""

    def __init__(self, d, how):
        super().__init__()
        self.how = how
        self.proj = nn.Linear(d, d)
        self.tok = nn.Parameter(torch.randn(1, d) if how == "repeat" else torch.randn(1, 1, d))

    def forward(self, h):
        b = h.shape[0]
        tok = {"expand": lambda: self.tok.expand(b, -1, -1), "repeat": lambda: self.tok.repeat(b, 1, 1),
               "tile": lambda: torch.tile(self.tok, (b, 1, 1))}[self.how]()
        return torch.cat([tok, self.proj(h)], 1)


class RelBiasAttention(nn.Module):
    """Attention with a relative-position bias gathered from a learned table and permuted (T5's and
    Swin's), optionally under a causal mask's fill, as SDPA's additive mask; a residual."""

    def __init__(self, d, heads, T, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d, 3 * d)
        self.table = nn.Parameter(0.5 * torch.randn(2 * T - 1, heads))
        self.register_buffer("rel", torch.arange(T)[None, :] - torch.arange(T)[:, None] + T - 1)

    def forward(self, h):
        b, T, d = h.shape
        q, k, v = self.qkv(h).view(b, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.table[self.rel].permute(2, 0, 1).unsqueeze(0)          # [1, H, T, T]
        if self.causal:
            bias = bias.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=h.device).tril(), float("-inf"))
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return h + o.transpose(1, 2).reshape(b, T, d)


class PosAdd(nn.Module):
    """A broadcast addition: ``[1, T, d]``, ``[T, d]``, a longer table sliced to ``T``, or ``[d]``."""

    def __init__(self, T, d, form):
        super().__init__()
        self.form = form
        shape = {"full": (1, T, d), "2d": (T, d), "table": (T + 3, d), "vector": (d,)}[form]
        self.pos = nn.Parameter(torch.randn(*shape))

    def forward(self, h):
        return h + (self.pos[: h.shape[1]] if self.form == "table" else self.pos)


class PairAdd(nn.Module):
    """``h + a + b`` with ``a``, ``b`` of the sample's shape ``[T, d]``: for a sample alone autograd
    gives both the same buffer (the output gradient reshaped), so a square in place would
    square it twice."""

    def __init__(self, T, d):
        super().__init__()
        self.a = nn.Parameter(torch.randn(T, d))
        self.b = nn.Parameter(torch.randn(T, d))

    def forward(self, h):
        return torch.tanh(h + self.a + self.b)


class UsedTwice(nn.Module):
    """One parameter used twice in one forward: ``tanh(h * g) + g``."""

    def __init__(self, d):
        super().__init__()
        self.g = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, h):
        return torch.tanh(h * self.g) + self.g


class SequenceFirst(nn.Module):
    """XLNet's layout: the block takes ``[T, B, d]`` and a mask beside it, its own parameters
    used op by op, no rule. ``gain`` scales its share (small: its Fisher far below the model's
    largest entry, where the probe cannot tell a wrong value)."""

    def __init__(self, d, gain):
        super().__init__()
        self.gain = gain
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.u = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, h):
        T = h.shape[1]
        x = h.transpose(0, 1)
        scores = torch.einsum("ind,jnd->nij", x @ self.w, x).masked_fill(
            torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1), -1e4)
        return h + self.gain * (torch.einsum("nij,jnd->ind", scores.softmax(-1), x) * self.u).transpose(0, 1)


class Split(nn.Module):
    """Two parameters joined and split again before they meet the batch (attention modules'
    ``torch.cat(biases).chunk(3)``), around a child; ``gain`` as :class:`SequenceFirst`'s."""

    def __init__(self, d, how, gain):
        super().__init__()
        self.how, self.gain = how, gain
        self.lin = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.rand(d) + 0.5)
        self.shift = nn.Parameter(0.3 * torch.randn(d))

    def forward(self, h):
        both = torch.cat([self.scale, self.shift])
        a, b = both.chunk(2) if self.how == "chunk" else both.view(2, -1).unbind(0)
        return torch.tanh(self.lin(h) * (1 + self.gain * a) + self.gain * b)


class MaskedAfter(nn.Module):
    """A learned table meeting the batch in ``einsum``, the result masked in place through a view
    (Funnel's relative attention); ``gain`` as :class:`SequenceFirst`'s."""

    def __init__(self, d, T, gain):
        super().__init__()
        self.gain = gain
        self.table = nn.Parameter(torch.randn(T, d) / d**0.5)

    def forward(self, h):
        T = h.shape[1]
        scores = torch.einsum("bid,jd->bij", h, self.table[:T])
        scores.view(scores.shape[0], -1)[:, ::2] *= 0.5
        return h + self.gain * (scores.softmax(-1) @ h)


class NormTokens(nn.Module):
    """The sequence as a feature map ``[B, d, T, 1]`` through BatchNorm2d (eval mode, non-trivial
    statistics), back to tokens (``flatten(2).transpose(1, 2)``) into a residual, as LeViT's patch
    embedding: on a batch of one sample PyTorch's batch norm backward gets a channels-last output
    gradient there."""

    def __init__(self, d):
        super().__init__()
        self.bn = nn.BatchNorm2d(d)
        self.lin = nn.Linear(d, d)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.randn(d) * 0.5)
            self.bn.running_var.copy_(torch.rand(d) + 0.5)

    def forward(self, h):
        b, T, d = h.shape
        t = self.bn(h.transpose(1, 2).reshape(b, d, T, 1).contiguous()).flatten(2).transpose(1, 2)
        return torch.tanh(self.lin(t)) + t


class Folded(nn.Module):
    """The batch folded into rows sample by sample around a Linear and a LayerNorm: OPT's
    feed-forward block on ``[B*T, d]`` (``window`` 0, or one that does not divide the length), or
    Swin's windows ``[B*windows, window, d]``, whose shapes read as a sequence-first ``[T, B, d]``
    where the window has as many tokens as the batch has samples."""

    def __init__(self, d, window, bias):
        super().__init__()
        self.window = window
        self.lin = nn.Linear(d, d, bias=bias)
        self.norm = nn.LayerNorm(d)

    def forward(self, h):
        b, T, d = h.shape
        w = self.window
        rows = h.reshape(b * (T // w), w, d) if w and T % w == 0 else h.reshape(b * T, d)
        return h + torch.tanh(self.norm(self.lin(rows))).reshape(b, T, d)


class InPlaceAfter(nn.Module):
    """Layer outputs modified in place afterwards: a query scaled (Longformer's ``query /=
    sqrt(d)``) and a residual added to a projection (``out += h``)."""

    def __init__(self, d, bias):
        super().__init__()
        self.q = nn.Linear(d, d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)

    def forward(self, h):
        q = self.q(h)
        q /= 2.0
        out = self.proj(torch.tanh(q))
        out += h
        return out


class TableAdd(nn.Module):
    """A position table looked up on ``arange(T)``, without a batch axis, added to the sequence
    (BART's positions), or through a Linear first (SwinV2's position-bias MLP, in one layer)."""

    def __init__(self, T, d, through):
        super().__init__()
        self.table = nn.Embedding(T + 2, d)
        self.mix = nn.Linear(d, d) if through else None

    def forward(self, h):
        t = self.table(torch.arange(h.shape[1], device=h.device))
        if self.mix is not None:
            t = self.mix(torch.tanh(t))
        return h + t


class RandomModel(nn.Module):
    def __init__(self, stem, chain, head, pool):
        super().__init__()
        self.stem = stem
        self.chain = nn.ModuleList(chain)  # may hold one block twice: shared parameters
        self.head = head
        self.pool = pool

    def forward(self, x):
        h = self.stem(x)
        for block in self.chain:
            h = block(h)
        if self.pool == "mean":
            h = h.mean(1)
        elif self.pool == "first":
            h = h[:, 0]
        return self.head(h)


def _block(rng: random.Random, d: int, T: int, heads: int):
    """One random block and the sequence length after it."""
    kind = rng.choice(["dense", "conv1d", "conv2d", "layernorm", "batchnorm", "groupnorm", "attention",
                       "encoder", "cls", "pos", "pair", "twice", "token", "relbias", "seqfirst", "split",
                       "masked", "normtokens", "folded", "inplace", "tableadd"])
    bias = rng.random() < 0.7
    if kind == "dense":
        return Dense(d, bias), T
    if kind == "conv1d":
        groups = rng.choice([g for g in (1, 2, d) if d % g == 0])
        return Conv1dBlock(d, rng.choice([1, 2, 3]), rng.choice([1, 2]), groups, bias), T
    if kind == "conv2d":
        return Conv2dBlock(rng.choice([1, 2]), rng.choice([1, 3, (3, 1)]), bias), T
    if kind == "layernorm":
        return Norm(nn.LayerNorm(d, elementwise_affine=rng.random() < 0.8, bias=bias)), T
    if kind == "batchnorm":
        bn = nn.BatchNorm1d(d, affine=rng.random() < 0.8)
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(d) * 0.5)
            bn.running_var.copy_(torch.rand(d) + 0.5)
        return Norm(bn), T
    if kind == "groupnorm":
        return Norm(nn.GroupNorm(rng.choice([g for g in (1, 2) if d % g == 0]), d)), T
    if kind == "attention":
        return Attention(d, heads, rng.random() < 0.5, bias), T
    if kind == "encoder":
        return EncoderLayer(d, heads, rng.random() < 0.5, rng.random() < 0.5), T
    if kind == "cls":
        return ClsToken(d), T + 1
    if kind == "pos":
        return PosAdd(T, d, rng.choice(["full", "2d", "table", "vector"])), T
    if kind == "pair":
        return PairAdd(T, d), T
    if kind == "token":
        return TokenBefore(d, rng.choice(["expand", "repeat", "tile"])), T + 1
    if kind == "relbias":
        return RelBiasAttention(d, heads, T, rng.random() < 0.5), T
    gain = rng.choice([1.0, 1e-5])
    if kind == "seqfirst":
        return SequenceFirst(d, gain), T
    if kind == "split":
        return Split(d, rng.choice(["chunk", "unbind"]), gain), T
    if kind == "masked":
        return MaskedAfter(d, T, gain), T
    if kind == "normtokens":
        return NormTokens(d), T
    if kind == "folded":
        return Folded(d, rng.choice([0, 1, 2]), bias), T
    if kind == "inplace":
        return InPlaceAfter(d, bias), T
    if kind == "tableadd":
        return TableAdd(T, d, rng.random() < 0.5), T
    return UsedTwice(d), T


def make_random(seed: int, n: int = 5, dtype=torch.float64):
    """``(model, data, description)`` for ``seed``: a model in eval mode and ``n`` samples in
    batches of 2, 3 or 4 (drawn; with ``n = 5`` two of three end in a batch of one sample)
    (``(inputs, targets)``; targets ``[n]``, or ``[n, T]`` for a per-token head)."""
    rng = random.Random(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        d, heads = rng.choice([(4, 2), (6, 2), (6, 3), (8, 2)])
        T0 = T = rng.choice([2, 3, 4])  # the input's length; T follows the blocks (a class token adds one)
        tokens = rng.random() < 0.5
        vocab = 5
        stem = nn.Embedding(vocab, d) if tokens else nn.Linear(5, d)
        chain, names = [], []
        for _ in range(rng.randint(1, 4)):
            if chain and rng.random() < 0.15:  # a block called again later: its parameters shared
                block = rng.choice(chain)
                if isinstance(block, (ClsToken, TokenBefore, PosAdd, PairAdd, RelBiasAttention, MaskedAfter,
                                      TableAdd)):
                    continue  # would change the length or meet a table of another length
            else:
                block, T = _block(rng, d, T, heads)
            chain.append(block)
            names.append(type(block).__name__ + ("(again)" if chain.count(block) > 1 else ""))
            if isinstance(block, ClsToken) and rng.random() < 0.5:
                # ViT's pattern: the positions added right after the class token (the token's
                # gradient is then a view of the buffer the positions' gradient comes from)
                chain.append(PosAdd(T, d, rng.choice(["full", "2d"])))
                names.append("PosAdd")
        pool = rng.choice(["mean", "first", "tokens"])
        tied = tokens and rng.random() < 0.4
        classes = vocab if tied else 3
        head = nn.Linear(d, classes, bias=not tied and rng.random() < 0.8)
        if tied:
            head.weight = stem.weight  # the embedding's table is the output layer
        model = RandomModel(stem, chain, head, pool).to(dtype).eval()
        x = torch.randint(0, vocab, (n, T0)) if tokens else torch.randn(n, T0, 5, dtype=dtype)
        y = torch.randint(0, classes, (n, T) if pool == "tokens" else (n,))
    desc = (f"{'tokens' if tokens else 'features'} d={d} -> " + " -> ".join(names or ["-"])
            + f" -> {pool}{' tied' if tied else ''}")
    batch_size = rng.choice([2, 3, 4])
    desc += f" (batches of {batch_size})"
    return model, batches(x, y, batch_size=batch_size), desc

