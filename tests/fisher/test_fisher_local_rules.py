"""Module-local and op-local rules, shared and tied parameters, batch-free modules and the public
rule registry, each against the per-sample reference loop in float64."""

import gc

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastewc
from fastewc import reference as R

from models import Attention, Scale, assert_fisher_close, batches, spy

D = torch.float64


def _run(model, data, **kw):
    return fastewc.estimate_fisher(model, data, method="rules", return_info=True, **kw)


class KwargsBlock(nn.Module):
    """No rule: keyword tensor arguments, a tuple output, its own parameters and a child Linear
    (``child``; else the same map as a parameter of its own, so that it has no child)."""

    def __init__(self, d, child=True):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(d) + 0.5)
        if child:
            self.mix = nn.Linear(d, d)
        else:
            self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x, *, gate=None, offset=0.0):
        mixed = self.mix(x) if hasattr(self, "mix") else x @ self.w.t()
        h = torch.tanh(mixed * self.scale + offset)
        if gate is not None:
            h = h * gate
        return h, h.square().mean(-1)


class WithBlock(nn.Module):
    def __init__(self, d=5, seq=4, child=True):
        super().__init__()
        self.emb = nn.Linear(3, d)
        self.pos = nn.Parameter(0.3 * torch.randn(seq + 2, d))     # sliced before it meets the batch
        self.block = KwargsBlock(d, child)
        self.head = nn.Linear(d + 1, 3)

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]] * 2.0
        gate = torch.sigmoid(h.sum(-1, keepdim=True))
        h, energy = self.block(h, gate=gate, offset=0.1)
        return self.head(torch.cat([h.mean(1), energy.mean(1, keepdim=True)], -1))


@pytest.mark.parametrize("kind", ["empirical", "sampled", "exact"])
@pytest.mark.parametrize("child", [True, False], ids=["composite", "leaf"])
def test_module_local_with_keywords_and_op_local_through_a_slice(kind, child):
    """A module without a rule called with keywords: a leaf module is replayed module-local; one
    with a child (whose rule takes the child's parameters) has its own parameters followed op by
    op inside its forward, so that no replay reruns the child."""
    torch.manual_seed(3)
    model = WithBlock(child=child).to(D)
    data = batches(torch.randn(7, 4, 3, dtype=D), torch.randint(0, 3, (7,)), batch_size=3)
    gen = (lambda: torch.Generator().manual_seed(2)) if kind == "sampled" else (lambda: None)
    got, info = _run(model, data, kind=kind, generator=gen())
    own = ["block.scale"] + ([] if child else ["block.w"])
    assert {p: info.methods[p] for p in own} == {p: "op-local" if child else "module-local" for p in own}, info
    assert info.methods["pos"] == "op-local"
    if child:
        assert info.methods["block.mix.weight"] == "linear"
    assert not info.vmap_params and not info.loop_params, info
    assert_fisher_close(got, R.estimate_fisher(model, data, kind=kind, generator=gen()), rtol=1e-10)


class ThreeUses(nn.Module):
    """One weight used by two modules (tied) and once more directly by an operation."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.w2 = nn.Parameter(torch.randn(4, 3) * 0.5)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.head(h @ self.w2 + x[..., :3])


def test_tied_weight_and_a_bare_parameter_sum_every_use_per_sample():
    torch.manual_seed(4)
    model = ThreeUses().to(D)
    data = batches(torch.randn(9, 4, dtype=D), torch.randint(0, 2, (9,)), batch_size=4)
    got, info = _run(model, data)
    assert info.methods["a.weight"] == "linear" and "tied" in info.notes["a.weight"]
    assert info.methods["w2"] == "op-local"
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)


class Offsets(nn.Module):
    """Bare parameters added or subtracted with broadcasting, on either side, through a
    batch-free chain (``table[:T] * 0.5``), twice (``shift``) and in place (``h += up``, as
    BigBird's embeddings add their positions)."""

    def __init__(self, d=5, seq=4):
        super().__init__()
        self.lin = nn.Linear(3, d)
        self.pos = nn.Parameter(0.3 * torch.randn(seq, d))
        self.row = nn.Parameter(0.3 * torch.randn(1, seq, 1))
        self.shift = nn.Parameter(0.3 * torch.randn(d))
        self.gap = nn.Parameter(0.3 * torch.randn(d))
        self.table = nn.Parameter(0.3 * torch.randn(seq + 2, d))
        self.up = nn.Parameter(0.3 * torch.randn(seq, d))
        self.down = nn.Parameter(0.3 * torch.randn(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.lin(x) + self.pos
        h = self.row + torch.tanh(h)
        h = torch.sub(h, self.shift)
        h = self.gap - torch.tanh(h)
        h = torch.tanh(h) - self.table[: x.shape[1]] * 0.5
        h = torch.tanh(h).add(self.shift) * 1.5
        h += self.up
        h = torch.tanh(h) * 2.0
        h.sub_(self.down)
        return self.head(torch.tanh(h).mean(1))


def _spy_closed_form(monkeypatch, local) -> list:
    """Whether each operation's per-sample gradients came in closed form (True) or went to the
    ``vmap`` replay (False)."""
    taken = []
    real = local._closed_form_blocks

    def spy(*a):
        got = real(*a)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(local, "_closed_form_blocks", spy)
    return taken


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_broadcast_additions_of_bare_parameters_in_closed_form(kind, monkeypatch):
    from fastewc.fisher.rules import local

    taken = _spy_closed_form(monkeypatch, local)
    torch.manual_seed(5)
    model = Offsets().to(D)
    data = batches(torch.randn(7, 4, 3, dtype=D), torch.randint(0, 3, (7,)), batch_size=3)
    got, info = _run(model, data, kind=kind)
    assert all(info.methods[p] == "op-local" for p in ("pos", "row", "shift", "gap", "table", "up", "down")), \
        info.methods
    assert taken and all(taken), taken  # no operation went to the vmap replay
    assert_fisher_close(got, R.estimate_fisher(model, data, kind=kind), rtol=1e-10)


class Tokens(nn.Module):
    """ViT's and DeiT's embeddings: class (and distillation) tokens spread over the batch and put
    before the patches, on either side of a keyword ``dim``, then a position table added; two
    tokens stored transposed: a view that is not the parameter element for element, with as many
    rows as the probe has samples (a size that must not be taken for a batch axis); and tokens
    copied over the batch (``repeat``, ``tile``) rather than broadcast."""

    def __init__(self, d=6, T=4):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.dist = nn.Parameter(torch.randn(1, d))
        self.mix = nn.Parameter(torch.randn(d, 2))
        self.rep = nn.Parameter(torch.randn(1, d))
        self.tiled = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, T + 6, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        n = x.shape[0]
        h = torch.cat((self.cls.expand(n, -1, -1), x), 1)
        h = torch.cat([h, self.dist.expand(n, 1, -1), self.mix.t().expand(n, -1, -1)], dim=-2)
        # copied rather than broadcast over the batch: every row the same values in their own memory
        h = torch.cat([self.rep.repeat(n, 1, 1), h, torch.tile(self.tiled, (n, 1, 1))], 1) + self.pos
        return self.head(h.tanh().mean(1))


def _padded(p, padding_idx=None, max_norm=None):
    return F.embedding(torch.tensor([[2, 0], [1, 2]]), p.view(3, 2), padding_idx=padding_idx, max_norm=max_norm)


@pytest.mark.parametrize("build,selects", [
    (lambda p: p, True), (lambda p: p.expand(5, -1, -1)[:1], True), (lambda p: p[None], True),
    (lambda p: p.transpose(-2, -1), True), (lambda p: p[:, :1], True), (lambda p: p.reshape(-1), True),
    (lambda p: p.flip(-1).contiguous(), True), (lambda p: p[0, torch.tensor([[2, 0], [2, 1]])].permute(2, 0, 1), True),
    (lambda p: torch.cat([p, p[:, 1:]], 1).unsqueeze(0), True), (_padded, True),
    (lambda p: torch.cat([p, torch.zeros(1, 1, 2, dtype=D)], 1), True),
    (lambda p: torch.where(torch.eye(3, 2, dtype=torch.bool), p, -1e4), True),
    (lambda p: p.masked_fill(torch.eye(3, 2, dtype=torch.bool), float("-inf")).repeat(1, 2, 1), True),
    (lambda p: p * 1, False), (lambda p: p.float(), False), (lambda p: p.exp(), False),
    (lambda p: torch.where(torch.eye(3, 2, dtype=torch.bool), p, p.flip(-1)) + 0, False),
    (lambda p: torch.cat([p, torch.ones(1, 1, 2, dtype=D)], 1) * 2, False),
    (lambda p: _padded(p, padding_idx=0), False), (lambda p: _padded(p.clone(), max_norm=0.5), False),
    (lambda p: p[p > 0], False)])
def test_a_rebuilt_argument_that_selects_elements_of_its_parameter_is_pulled_back_by_index(build, selects):
    """Where the chain that rebuilds an argument from its parameter only selects elements of it
    or constants (views, gathers, concatenations, masks' fills, an embedding without a padding
    row), each sample's pull-back is one ``index_add``: it equals autograd's; anything else is
    left to the ``vjp``."""
    from fastewc.fisher.rules.local import _selection

    p = torch.randn(1, 3, 2, dtype=D, generator=torch.Generator().manual_seed(0))
    got = _selection(lambda s: build(s["p"]), {"p": p}, build(p.clone()))  # as a pass computed it
    assert (got is not None) == selects
    assert _selection(lambda s: s["p"] + s["q"], {"p": p, "q": p}, p + p) is None
    if got is not None:  # an argument the parameter's values do not give is no such selection
        assert _selection(lambda s: build(s["p"]), {"p": p}, build(p.clone()) + 1) is None
    if got is not None:
        name, where = got
        leaf = p.clone().requires_grad_()
        out = build(leaf)
        g = torch.randn(4, *out.shape, dtype=D)
        want = torch.stack([torch.autograd.grad(out, leaf, gk, retain_graph=True)[0] for gk in g])
        pulled = g.new_zeros(4, p.numel() + 1).index_add_(1, where, g.reshape(4, -1))[:, :-1].reshape(4, *p.shape)
        assert name == "p" and torch.equal(pulled, want)


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_tokens_concatenated_before_the_samples_in_closed_form(kind, monkeypatch):
    """The per-sample gradient of a token spread over the batch and concatenated is the output
    gradient's slice where it was put: no ``vmap`` replay of the concatenation, and each token
    pulled back by index, also where two tokens meet in one concatenation (DeiT's class and
    distillation tokens), with no ``vjp`` of the chain that spread it."""
    from fastewc.fisher.rules import local

    taken = _spy_closed_form(monkeypatch, local)
    pulled = []
    real_vjp = local.vjp
    monkeypatch.setattr(local, "vjp", lambda *a, **k: pulled.append(a) or real_vjp(*a, **k))
    torch.manual_seed(6)
    model = Tokens().to(D)
    data = batches(torch.randn(7, 4, 6, dtype=D), torch.randint(0, 3, (7,)), batch_size=3)
    got, info = _run(model, data, kind=kind)
    assert all(info.methods[p] == "op-local" for p in ("cls", "dist", "mix", "rep", "tiled", "pos")), info.methods
    assert taken and all(taken), taken
    assert not pulled, f"{len(pulled)} arguments rebuilt through a vjp"
    assert_fisher_close(got, R.estimate_fisher(model, data, kind=kind), rtol=1e-10)


class BiasedAttention(nn.Module):
    """Attention with a learned relative position bias, shaped as T5's and Swin's: the bias table is
    looked up by relative position (no batch axis) and reaches the scores either as SDPA's
    additive ``attn_mask`` or through ``torch.where`` with the padding mask (T5's encoder).
    ``windows > 1``: each sample's tokens are cut into that many windows, attended separately with
    the batch folded into rows (Swin's), and ``"cat"`` puts a learned token first in each window."""

    def __init__(self, how: str, vocab=11, d=8, heads=2, seq=5, windows=1):
        super().__init__()
        self.how, self.heads, self.windows = how, heads, windows
        self.tok = nn.Embedding(vocab, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.qkv = nn.Linear(d, 3 * d)
        self.table = nn.Parameter(0.5 * torch.randn(2 * seq - 1, heads))
        self.head = nn.Linear(d, 3)
        rel = torch.arange(seq)[None, :] - torch.arange(seq)[:, None] + seq - 1
        self.register_buffer("rel", rel)

    def forward(self, xm):  # tokens and padding mask stacked: [N, 2, windows * T]
        n = xm.shape[0]
        h = self.tok(xm[:, 0]).reshape(n * self.windows, -1, self.qkv.in_features)
        mask = xm[:, 1].reshape(n * self.windows, -1)
        rows, T = mask.shape
        if self.how == "cat":
            h = torch.cat((self.cls.expand(rows, -1, -1), h[:, 1:]), 1)
        q, k, v = self.qkv(h).view(rows, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.table[self.rel[:T, :T]].permute(2, 0, 1).unsqueeze(0)         # [1, H, T, T]
        if self.how == "where":
            keep = mask[:, None, None, :].bool()                                   # [rows, 1, 1, T]
            bias = torch.where(keep.expand(rows, 1, T, T), bias, -1e4)
        if self.how == "shifted":  # Swin's shifted windows: a fixed mask per window, copied per sample
            shift = torch.zeros(self.windows, 1, T, T, dtype=bias.dtype, device=h.device)
            shift[-1, :, : T // 2, T // 2:] = -1e4
            bias = bias + shift.unsqueeze(0).expand(n, -1, -1, -1, -1).reshape(rows, 1, T, T)
        if self.how == "causal":  # a causal mask folded into the bias, as Hugging Face's decoders do
            bias = bias.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=h.device).tril(), float("-inf"))
        scale = 0.7 if self.how == "scaled" else None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        return self.head(o.transpose(1, 2).reshape(n, self.windows * T, -1).mean(1))


@pytest.mark.parametrize("how", ["mask", "causal", "scaled", "where", "cat", "shifted"])
@pytest.mark.parametrize("kind", ["empirical", "exact"])
@pytest.mark.parametrize("windows", [1, 3])
def test_learned_attention_bias_in_closed_form(how, kind, windows, monkeypatch):
    # The bias table's per-sample gradient through SDPA's attn_mask (or torch.where) in closed
    # form, also where each sample is several rows of the batch, none of it through the vmap
    # replay, and equal to the loop's.
    from fastewc.fisher.rules import local

    taken = _spy_closed_form(monkeypatch, local)
    torch.manual_seed(6)
    model = BiasedAttention(how, windows=windows).to(D)
    # Batches of 3: in a batch of one sample, the bias (one row) could not be told from a batch.
    x, mask = torch.randint(0, 11, (6, 5 * windows)), torch.ones(6, 5 * windows, dtype=torch.long)
    mask[1, 3:5] = 0
    mask[4, 4:5] = 0
    y = torch.randint(0, 3, (6,))
    data = batches(torch.stack([x, mask], 1), y, batch_size=3)
    got, info = _run(model, data, kind=kind)
    assert info.methods["table"] == "op-local", info.methods
    assert how != "cat" or info.methods["cls"] == "op-local", info.methods
    assert taken and all(taken), taken
    assert_fisher_close(got, R.estimate_fisher(model, data, kind=kind), rtol=1e-10)


@pytest.mark.parametrize("seq", [2, 3])
def test_a_module_buffer_with_as_many_rows_as_the_probes_samples_holds_none(seq):
    # A relative-position index [T, T] with T = 2, the probe's sample count: the module's own
    # buffer, so no samples whatever its rows; before, the table's gather was taken for a batched
    # operation and the table went per sample. T = 3: as many rows as the later passes' samples,
    # which take the layout the probe proved without looking for the model's buffers.
    fastewc.fisher.clear_plan_cache()
    torch.manual_seed(6)
    model = BiasedAttention("mask", seq=seq).to(D)
    x, mask = torch.randint(0, 11, (6, seq)), torch.ones(6, seq, dtype=torch.long)
    data = batches(torch.stack([x, mask], 1), torch.randint(0, 3, (6,)), batch_size=3)
    got, info = _run(model, data)
    assert info.methods["table"] == "op-local", info
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)


class BiasMLP(nn.Module):
    """SwinV2's continuous position bias: an MLP on a fixed table of relative coordinates (a
    buffer, no batch axis) whose last Linear has as many output rows as heads (2, the probe's
    sample count), the bias added to each sample's attention scores."""

    def __init__(self, d=4, T=3, heads=2):
        super().__init__()
        self.heads = heads
        self.register_buffer("coords", torch.randn(1, T, T, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, heads, bias=False))
        self.qk = nn.Linear(d, 2 * heads * 3)
        self.head = nn.Linear(heads, 3)

    def forward(self, x):
        q, k = self.qk(x).unflatten(-1, (2, self.heads, 3)).permute(2, 0, 3, 1, 4)   # [N, heads, T, 3] each
        bias = self.mlp(self.coords).permute(0, 3, 1, 2)                            # [1, heads, T, T]
        scores = torch.softmax(q @ k.transpose(-1, -2) + bias, -1)
        return self.head(scores.mean((2, 3)))


def test_a_weight_with_as_many_rows_as_the_probes_samples_holds_none():
    """The position-bias MLP's last weight has 2 rows, as many as the probe's samples: a model
    parameter holds no samples whatever its rows, so its product with the batch-free table is
    followed, not taken for an operation that meets the batch (which sent the MLP to vmap)."""
    fastewc.fisher.clear_plan_cache()
    torch.manual_seed(8)
    model = BiasMLP().to(D)
    data = batches(torch.randn(7, 3, 4, dtype=D), torch.randint(0, 3, (7,)), batch_size=4)
    got, info = _run(model, data)
    assert {info.methods[p] for p in ("mlp.0.weight", "mlp.0.bias", "mlp.2.weight")} == {"linear"}, info.methods
    assert not info.vmap_params and not info.loop_params
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)


class PositionTable(nn.Module):
    """A learned position table called on positions only (no batch axis), broadcast-added."""

    def __init__(self, vocab=9, d=6, seq=5):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.posemb = nn.Embedding(seq, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)        # [1, T]: no batch axis
        h = self.norm(self.tok(ids) + self.posemb(positions))
        return self.head(h.mean(1))


def test_batch_free_module_is_followed_into_the_operation_that_meets_the_batch():
    model = PositionTable().to(D)
    data = batches(torch.randint(0, 9, (7, 5)), torch.randint(0, 3, (7,)), batch_size=4)
    got, info = _run(model, data)
    assert info.methods["posemb.weight"] == "embedding" and "returns no batch axis" in info.notes["posemb.weight"]
    assert not info.vmap_params
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)


class Followed(nn.Module):
    """A position table (batch-free) looked up inside a block's forward, and what may become of it
    there: used inside only (Swin's relative position bias), returned to the caller, kept on the
    block for the caller to read, or looked up by the caller itself."""

    def __init__(self, how, vocab=9, d=6, seq=5):
        super().__init__()
        self.how = how
        self.tok = nn.Embedding(vocab, d)
        self.block = nn.Module()
        self.block.posemb = nn.Embedding(seq, d)
        self.block.lin = nn.Linear(d, d)
        self.block.forward = self._block
        self.head = nn.Linear(d, 3)

    def _block(self, h):
        b = self.block
        table = b.posemb(torch.arange(h.shape[1])) if self.how != "outside" else self.table
        if self.how == "returned":
            return b.lin(h + table), table * 2
        if self.how == "kept":
            b.kept = table.flip(0)
        return b.lin(h + table)

    def forward(self, ids):
        h = self.tok(ids)
        if self.how == "outside":
            self.table = self.block.posemb(torch.arange(ids.shape[1]))
        out = self.block(h)
        h = out[0] + out[1] if self.how == "returned" else out + self.block.kept if self.how == "kept" else out
        return self.head(h.tanh().mean(1))


@pytest.mark.parametrize("how", ["inside", "returned", "kept", "outside"])
def test_a_batch_free_output_is_followed_wherever_it_goes(how):
    """The op recorder follows a batch-free module's output into every operation that uses it,
    in the forward of the module that called it or anywhere else (returned, kept on the module
    for later, or the module called by another): exact in every case, by its rule."""
    fastewc.fisher.clear_plan_cache()
    torch.manual_seed(7)
    model = Followed(how).to(D)
    data = batches(torch.randint(0, 9, (7, 5)), torch.randint(0, 3, (7,)), batch_size=4)
    got, info = _run(model, data)
    note = info.notes["block.posemb.weight"]
    assert info.methods["block.posemb.weight"] == "embedding" and "returns no batch axis" in note, note
    assert not info.vmap_params and not info.loop_params
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)


@pytest.mark.parametrize("make", [lambda: WithBlock(child=False), lambda: Followed("kept")],
                         ids=["op-local", "batch-free"])
def test_a_pass_leaves_no_tensor_to_the_cycle_collector(make):
    """What a rules pass recorded (every layer's input and output) is freed when the pass ends,
    not when Python's cycle collector next runs: a reference cycle between the recorder, the op
    recorder and the watched tensors kept a batch's activations alive across later batches."""
    torch.manual_seed(0)
    model = make().to(D)
    data = batches(torch.randint(0, 9, (7, 5)) if isinstance(model, Followed) else torch.randn(7, 4, 3, dtype=D),
                   torch.randint(0, 3, (7,)), batch_size=4)
    got, info = _run(model, data)  # the plan proven (the probe's passes are not the point)
    assert info.methods and not info.vmap_params and not info.loop_params
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        again = fastewc.estimate_fisher(model, data, method="rules")
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    assert left == []
    assert all(type(t) is torch.Tensor for t in again.values())  # no recorder's tensor type handed out
    assert_fisher_close(again, got, rtol=1e-12)


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5)])
def test_hf_conv1d_rule_on_random_shapes(shape):
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(5)
    model = nn.Sequential(Conv1D(7, 5), nn.Tanh(), Conv1D(3, 7)).to(D)
    head = nn.Sequential(model, nn.Flatten(1), nn.LazyLinear(4)).to(D)
    head(torch.randn(1, *shape, dtype=D))
    data = batches(torch.randn(6, *shape, dtype=D), torch.randint(0, 4, (6,)), batch_size=4)
    got, info = _run(head, data)
    assert info.rules["0.0"] == "hf_conv1d" and info.rules["0.2"] == "hf_conv1d" and not info.vmap_params
    assert_fisher_close(got, R.estimate_fisher(head, data), rtol=1e-10)
    assert transformers is not None


class MyRMSNorm(nn.Module):
    """An RMSNorm-style scale as other libraries write it (float32 inside, cast back)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.variance_epsilon = eps

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


def test_rmsnorm_style_rule_matches_in_float32():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 6), MyRMSNorm(6), nn.Linear(6, 3))
    data = batches(torch.randn(8, 4, 5), torch.randint(0, 3, (8, 4)), batch_size=3)
    got, info = _run(model, data)
    assert info.rules["1"] == "rmsnorm_style"
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=2e-5, atol_rel=1e-6)


def test_register_rule_is_used_and_proven():
    calls = []

    @fastewc.register_rule(Scale)
    def scale_rule(module, A, G):
        calls.append(A.shape[0])
        return {"weight": (G * A).reshape(A.shape[0], -1, A.shape[-1]).sum(1)}

    try:
        model = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3)).to(D)
        data = batches(torch.randn(7, 2, 4, dtype=D), torch.randint(0, 3, (7, 2)), batch_size=4)
        fastewc.fisher.clear_plan_cache()
        got, info = _run(model, data)
        assert info.rules["1"] == "scale_rule" and calls
        assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)
    finally:
        fastewc.fisher.unregister_rule(Scale)


def test_a_wrong_registered_rule_is_caught_by_the_probe():
    fastewc.register_rule(Scale, lambda module, A, G: {"weight": (G * A).reshape(A.shape[0], -1, A.shape[-1]).sum(1) * 2})
    try:
        model = nn.Sequential(Scale(4), nn.Linear(4, 3)).to(D)
        data = batches(torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,)), batch_size=3)
        fastewc.fisher.clear_plan_cache()
        got, info = _run(model, data)
        assert "0.weight" in info.vmap_params and "disagreed" in info.reasons["0.weight"]
        assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)
    finally:
        fastewc.fisher.unregister_rule(Scale)


def test_a_wrong_rule_on_a_parameter_with_a_small_fisher_is_caught_in_float32():
    """The probe compares entries far below the model's largest on that largest's scale (a key
    bias's Fisher is rounding noise): a wrong rule on a parameter whose Fisher is ~1e-7 of the
    largest passed in float32 when that floor was rtol^2 (4e-6); the floor is 1e-9 there now."""
    fastewc.register_rule(Scale, lambda module, A, G: {"weight": (G * A).reshape(A.shape[0], -1, A.shape[-1]).sum(1) * 2})
    try:
        torch.manual_seed(14)
        model = nn.Sequential(nn.Linear(4, 4), Scale(4), nn.Linear(4, 3))
        with torch.no_grad():
            model[0].weight.mul_(3e-4)
            model[0].bias.zero_()
        data = batches(torch.randn(6, 4), torch.randint(0, 3, (6,)), batch_size=3)
        fastewc.fisher.clear_plan_cache()
        got, info = _run(model, data)
        ref = R.estimate_fisher(model, data)
        small = float(ref["1.weight"].max()) / max(float(t.max()) for t in ref.values())
        assert 1e-9 < small < 4e-6, small  # between the two floors
        assert "1.weight" in info.vmap_params and "disagreed" in info.reasons["1.weight"], info
        assert_fisher_close(got, ref, rtol=1e-4)
    finally:
        fastewc.fisher.unregister_rule(Scale)


@pytest.mark.parametrize("where", ["per_sample", "sq_sum"])
def test_a_registered_rule_that_raises_costs_its_own_parameters_only(where):
    def broken(module, A, G):
        raise ValueError("this rule cannot take that input")

    kw = {"sq_sum": lambda m, A, Gs: broken(m, A, Gs)} if where == "sq_sum" else {}
    fastewc.register_rule(Scale, broken, **kw)
    try:
        model = nn.Sequential(Scale(4), nn.Linear(4, 3)).to(D)
        data = batches(torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,)), batch_size=3)
        fastewc.fisher.clear_plan_cache()
        got, info = _run(model, data)
        assert "0.weight" in info.vmap_params and "cannot take that input" in info.reasons["0.weight"], info
        assert info.methods["1.weight"] == "linear", info
        assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)
    finally:
        fastewc.fisher.unregister_rule(Scale)


def test_register_rule_rejects_what_is_not_a_module_type():
    with pytest.raises(TypeError, match="not an nn.Module subclass"):
        fastewc.register_rule(int, lambda m, A, G: {})
    with pytest.raises(TypeError, match="per_sample must be callable"):
        fastewc.register_rule(Scale, 3)
    with pytest.raises(TypeError, match="sums_into=True needs the sq_sum it describes"):
        fastewc.register_rule(Scale, lambda m, A, G: {}, sums_into=True)


@pytest.mark.parametrize("module", ["linear", "norm"])
@pytest.mark.parametrize("dtype", [D, torch.float32])
def test_add_sq_sums_adds_alpha_times_the_sums_into_running_sums(module, dtype):
    # Through the rule's own sq_sum where it adds into running sums of the input's dtype (the
    # Linear), else its sums added (the LayerNorm's, or running sums of another dtype).
    from fastewc.fisher.rules import add_sq_sums, rule_for, sq_sum_of

    torch.manual_seed(0)
    m = (nn.Linear(5, 4) if module == "linear" else nn.LayerNorm(5)).to(D)
    A, G = torch.randn(3, 2, 5, dtype=D), torch.randn(3, 2, 4 if module == "linear" else 5, dtype=D)
    rule, _ = rule_for(m)
    want = sq_sum_of(rule, m, A, [G])
    start = {a: torch.rand(t.shape, dtype=dtype) for a, t in want.items()}
    totals = {a: t.clone() for a, t in start.items()}
    add_sq_sums(rule, m, A, [G], totals, alpha=0.3)
    for a in want:
        torch.testing.assert_close(totals[a], (start[a].double() + 0.3 * want[a]).to(dtype))


@pytest.mark.parametrize("inputs", ["self", "cross"])
@pytest.mark.parametrize("path", ["sums", "in-graph", "replay", "replay-sums"])
@pytest.mark.parametrize("mask", ["bool", "float", "causal", "none"])
def test_multihead_attention_without_per_sample_replay(mask, path, inputs, monkeypatch):
    # "sums": the module runs in the open during the batched pass and its projections are summed
    # like Linear layers (parameters used there only); "in-graph": the same pass, per-sample
    # blocks (as for a shared parameter); "replay": the open path is refused, and one batched
    # replay with the projections as leaves gives per-sample blocks; "replay-sums": that replay,
    # summed like Linear layers. "cross": query and key/value differ.
    from fastewc.fisher.rules import attention, replay

    torch.manual_seed(8)
    calls = []

    def spying(real):
        def spy(*a):
            got = real(*a)
            calls.append(got is not None)
            return got
        return spy

    if path == "sums":
        monkeypatch.setattr(attention.RecordingAttention, "sq_sums", spying(attention.RecordingAttention.sq_sums))
    elif path == "in-graph":
        monkeypatch.setattr(attention.RecordingAttention, "sq_sums", lambda self, *a: None)
        monkeypatch.setitem(replay.LOCAL_SQ_SUMS, nn.MultiheadAttention, lambda *a: None)
        monkeypatch.setattr(attention.RecordingAttention, "blocks", spying(attention.RecordingAttention.blocks))
    elif path == "replay":
        monkeypatch.setattr(attention.RecordingAttention, "sq_sums", lambda self, *a: None)
        monkeypatch.setitem(replay.LOCAL_SQ_SUMS, nn.MultiheadAttention, lambda *a: None)
        monkeypatch.setattr(attention.RecordingAttention, "blocks", lambda self, *a: None)
        monkeypatch.setitem(replay.LOCAL_REPLAYS, nn.MultiheadAttention, spying(attention.mha_blocks))
    else:
        monkeypatch.setattr(attention.RecordingAttention, "sq_sums", lambda self, *a: None)
        monkeypatch.setitem(replay.LOCAL_SQ_SUMS, nn.MultiheadAttention, spying(attention.mha_sq_sums))

    # the weights used by the loss (computed in the open) or not (the fused attention)
    weights = "none" if path.startswith("replay") or (path == "sums" and mask in ("float", "none")) else "averaged"
    model = Attention(inputs, mask, weights).to(D)
    ids = torch.randint(1, 11, (7, 5))
    ids[::2, -2:] = 0
    data = batches(ids, torch.randint(0, 3, (7,)), batch_size=4)
    got, info = _run(model, data)
    assert info.rules["attn"] == "module-local" and not info.vmap_params
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)
    assert calls and all(calls), calls


def test_attention_sums_with_part_of_its_parameters_frozen(monkeypatch):
    """Only the selected attention parameters are summed (``in_proj_weight`` and ``out_proj.bias``
    frozen), through the Linear-style sums, against the loop."""
    from fastewc.fisher.rules import attention

    got_attrs = []
    real = attention.RecordingAttention.sq_sums

    def spy(self, c, attrs, *a):
        got = real(self, c, attrs, *a)
        got_attrs.append(None if got is None else sorted(got))
        return got

    monkeypatch.setattr(attention.RecordingAttention, "sq_sums", spy)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, ids):
            h = self.emb(ids)
            out, _ = self.attn(h, h, h, need_weights=False)
            return self.head(out.mean(1))

    torch.manual_seed(9)
    model = Attn().to(D)
    model.attn.in_proj_weight.requires_grad_(False)
    model.attn.out_proj.bias.requires_grad_(False)
    data = batches(torch.randint(0, 11, (9, 5)), torch.randint(0, 3, (9,)), batch_size=5)
    got, info = _run(model, data)
    assert "attn.in_proj_weight" not in got and "attn.out_proj.bias" not in got
    assert got_attrs and all(a == ["in_proj_bias", "out_proj.weight"] for a in got_attrs), got_attrs
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)


class Folded(nn.Module):
    """Layers fed the batch flattened with the sequence (OPT's feed-forward) or with windows
    (Swin's attention: a learned bias added to ``[N*windows, ...]`` scores), in the given order:
    ``"sample"``-major (the rows of one sample together) or ``"time"``-major."""

    def __init__(self, order: str, d=6, seq=4):
        super().__init__()
        self.order = order
        self.emb = nn.Linear(3, d)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)     # a rule without sequence axes, on rows
        self.bias = nn.Parameter(0.3 * torch.randn(2, d))
        self.head = nn.Linear(d * seq, 3)

    def forward(self, x):
        h = self.emb(x)                                          # [N, T, d]
        n, t, d = h.shape
        rows = h.reshape(n * t, d) if self.order == "sample" else h.transpose(0, 1).reshape(t * n, d)
        rows = rows + self.fc(self.norm(rows)).tanh()
        rows = rows + self.conv(rows.unsqueeze(1)).sum(1)         # [N*T, 1, d] -> [N*T, 2, d] -> [N*T, d]
        win = rows.reshape(-1, 2, d) + self.bias                 # two rows per window, a bias per row
        rows = win.reshape(-1, d)
        h = rows.view(n, t, d) if self.order == "sample" else rows.view(t, n, d).transpose(0, 1)
        return self.head(h.reshape(n, t * d))


@pytest.mark.parametrize("order", ["sample", "time"])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_batch_folded_into_rows(order, n):
    """Sample-major rows go by rules (the rule's sequence form, rows added up for the convolution,
    the op-local rule for the bias added to windows); time-major rows must not pass as samples:
    either way the values equal the per-sample loop's."""
    torch.manual_seed(1)
    model = Folded(order).to(D)
    x, y = torch.randn(n + 3, 4, 3, dtype=D), torch.randint(0, 3, (n + 3,))
    data = batches(x, y, batch_size=n)
    got, info = fastewc.estimate_fisher(model, data, return_info=True)
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)
    if order == "sample":
        assert not info.vmap_params and not info.loop_params, info.reasons
        assert info.methods["fc.weight"] == "linear" and info.methods["conv.weight"] == "conv1d"
        assert info.methods["bias"] == "op-local"


# -- nn.Embedding subclasses with a forward of their own ------------------------------------------
class ScaledEmbedding(nn.Embedding):
    """Hugging Face's scaled word embedding (BART, Gemma): the looked-up rows times a scale."""

    def __init__(self, v, d, padding_idx=None):
        super().__init__(v, d, padding_idx=padding_idx)
        self.embed_scale = 1.7

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


class OffsetPositions(nn.Embedding):
    """A learned position table looking up positions computed from its input (BART's, with an
    offset), reading the weight's device to build them."""

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=self.weight.device).expand(ids.shape[0], -1)
        return super().forward(pos + 2)


class NormedEmbedding(nn.Embedding):
    """Looks its rows up in a normalised copy of its weight: another use of the weight."""

    def forward(self, ids):
        return nn.functional.embedding(ids, nn.functional.normalize(self.weight, dim=-1))


class TwiceEmbedding(nn.Embedding):
    """Two lookups of its weight."""

    def forward(self, ids):
        return super().forward(ids) + 0.5 * super().forward(ids.flip(1))


class OwnForwardLM(nn.Module):
    def __init__(self, word, tied):
        super().__init__()
        self.emb = word
        self.pos = OffsetPositions(9, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids) + self.pos(ids)))
        return self.head(h.mean(1))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("word,method", [(lambda: ScaledEmbedding(11, 6, padding_idx=0), "embedding (own forward)"),
                                         (lambda: NormedEmbedding(11, 6), "module-local"),
                                         (lambda: TwiceEmbedding(11, 6), "module-local")],
                         ids=["scaled", "normed", "twice"])
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_embedding_subclass_with_its_own_forward(word, method, tied, kind):
    """A subclass that looks its rows up with one F.embedding of its weight goes by the embedding
    rule through one replay of its forward (padding row, scale and offset positions included),
    alone or tied to a head; one that uses its weight otherwise is module-local. Against the loop."""
    torch.manual_seed(5)
    model = OwnForwardLM(word(), tied).to(D)
    ids = torch.randint(1, 11, (7, 5))
    ids[::3, -2:] = 0
    data = batches(ids, torch.randint(0, 11, (7,)), batch_size=4)
    got, info = _run(model, data, kind=kind)
    assert info.rules["pos"] == "embedding (own forward)"
    assert info.rules["emb"] == method, info
    assert not info.vmap_params and not info.loop_params, info
    assert_fisher_close(got, R.estimate_fisher(model, data, kind=kind), rtol=1e-10)


def test_embedding_subclass_under_the_tracker_is_module_local():
    """The tracker checks no call before its rules serve: such a subclass is module-local there,
    and still exact."""
    torch.manual_seed(6)
    model = OwnForwardLM(ScaledEmbedding(11, 6, padding_idx=0), True).to(D)
    ids = torch.randint(1, 11, (6, 5))
    data = batches(ids, torch.randint(0, 11, (6,)), batch_size=3)
    tracker = fastewc.FisherTracker(model)
    assert tracker.rules["pos.weight"] == "module-local" and "module-local" in tracker.rules["emb.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with tracker:
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
    assert_fisher_close(tracker.fisher(), R.estimate_fisher(model, data), rtol=1e-10)


# -- sequence-first attention (batch_first=False, PyTorch's default) -------------------------------
@pytest.mark.parametrize("inputs", ["self", "cross"])
@pytest.mark.parametrize("weights", ["none", "averaged", "per-head"])
@pytest.mark.parametrize("mask", ["bool", "causal"])
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_sequence_first_attention_is_recorded_samples_first(inputs, weights, mask, kind, monkeypatch):
    """The samples of a ``batch_first=False`` attention are on axis 1: its call is recorded with
    them moved to axis 0 and replayed once, batched (the loss using its weights or not), in
    ``estimate_fisher`` and in the tracker; against the loop."""
    from fastewc.fisher.rules import attention, replay

    recorded = spy(monkeypatch, replay.RECORDS, nn.MultiheadAttention, attention.mha_record)
    torch.manual_seed(9)
    model = Attention(inputs, mask, weights, batch_first=False).to(D).eval()
    ids = torch.randint(1, 11, (7, 5))
    ids[::2, -2:] = 0
    data = batches(ids, torch.randint(0, 3, (7,)), batch_size=4)
    got, info = _run(model, data, kind=kind)
    assert info.rules["attn"] == "module-local" and not info.vmap_params and not info.loop_params, info
    assert_fisher_close(got, R.estimate_fisher(model, data, kind=kind), rtol=1e-10)
    if kind == "exact":  # its columns summed; the tracker's Fisher is the empirical one
        return
    want = R.estimate_fisher(model, data)
    tracker = fastewc.FisherTracker(model)
    with tracker:
        for x, y in data:
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
    assert_fisher_close(tracker.fisher(), want, rtol=1e-10)
    assert recorded and all(recorded), recorded


def test_sequence_first_transformer_encoder_layer():
    """PyTorch's default ``nn.TransformerEncoderLayer`` (sequence first): its attention by the
    samples-first replay; its Linear and LayerNorm layers, fed ``[T, N, E]``, by their rules on the
    samples' axis, which the probe finds (the inner axis with the batch's size, where the first has
    another) and proves against the loop before any pass uses it. Exact throughout."""
    torch.manual_seed(10)

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
            self.head = nn.Linear(8, 3)

        def forward(self, ids):
            h = self.layer(self.emb(ids).transpose(0, 1), src_key_padding_mask=ids == 0)
            return self.head(h.mean(0))

    model = Enc().to(D).eval()
    ids = torch.randint(1, 11, (6, 5))
    ids[1::2, -1] = 0
    data = batches(ids, torch.randint(0, 3, (6,)), batch_size=3)
    got, info = fastewc.estimate_fisher(model, data, return_info=True)
    assert not info.vmap_params and not info.loop_params, info
    assert info.rules["layer.self_attn"] == "module-local" and info.rules["layer.linear1"] == "linear"
    assert info.rules["layer.norm1"] == "layernorm"
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)
    # a batch whose size equals the sequence length: the proven axis holds, no size is guessed again
    square = batches(ids[:5], torch.randint(0, 3, (5,)), batch_size=5)
    got, info = fastewc.estimate_fisher(model, square, return_info=True)
    assert not info.vmap_params and not info.loop_params, info
    assert_fisher_close(got, R.estimate_fisher(model, square), rtol=1e-10)
    # a sequence as long as the probe's sample count: the probe cannot tell the axes apart, so
    # those layers go per sample; still exact
    fastewc.fisher.clear_plan_cache()
    short = batches(ids[:, :2], torch.randint(0, 3, (6,)), batch_size=3)
    got, info = fastewc.estimate_fisher(model, short, return_info=True)
    assert "layer.linear1.weight" in info.vmap_params and info.rules["layer.self_attn"] == "module-local", info
    assert_fisher_close(got, R.estimate_fisher(model, short), rtol=1e-10)


# -- nn.EmbeddingBag ------------------------------------------------------------------------------
class Bags(nn.Module):
    """An ``nn.EmbeddingBag`` fed a padded ``[N, L]`` batch (-1: no token) as a 2-D input, or flat
    with ``offsets`` (empty bags included), optionally tied to the head."""

    def __init__(self, mode, layout, weighted, padding_idx, tied, last):
        super().__init__()
        self.layout, self.weighted, self.last = layout, weighted, last
        self.bag = nn.EmbeddingBag(12, 6, mode=mode, padding_idx=padding_idx, include_last_offset=last)
        self.head = nn.Linear(6, 12, bias=False)
        if tied:
            self.head.weight = self.bag.weight

    def forward(self, ids):
        psw = (ids.clamp(min=0).to(self.bag.weight.dtype) + 1) / 7 if self.weighted else None
        if self.layout == "2d":
            return self.head(torch.tanh(self.bag(ids.clamp(min=0), per_sample_weights=psw)))
        keep = ids >= 0
        lengths = keep.sum(1)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[: None if self.last else -1]])
        out = self.bag(ids[keep], offsets, per_sample_weights=None if psw is None else psw[keep])
        return self.head(torch.tanh(out))


@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("layout,last", [("2d", False), ("flat", False), ("flat", True)])
@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("tied", [False, True])
def test_embedding_bag(mode, weighted, layout, last, padding_idx, tied, monkeypatch):
    """Bags laid out samples-first and summed by sample and token (or added into a tied head's
    blocks), in ``estimate_fisher`` and in the tracker (a subset of each batch too); against the loop."""
    from fastewc.fisher.rules import embedding_bag, replay

    served = spy(monkeypatch, replay.RECORDS, nn.EmbeddingBag, embedding_bag.bag_record)
    torch.manual_seed(11)
    model = Bags(mode, layout, weighted, padding_idx, tied, last).to(D).eval()
    ids = torch.randint(0, 12, (8, 5))
    ids[1::3, -2:] = -1 if layout == "flat" else 0
    if layout == "flat":
        ids[5] = -1  # an empty bag
    data = batches(ids, torch.randint(0, 12, (8,)), batch_size=4)
    got, info = _run(model, data)
    assert info.rules["bag"] == "module-local" and not info.vmap_params and not info.loop_params, info
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)
    assert served and all(served), served
    tracker = fastewc.FisherTracker(model, fraction=0.5, seed=1)
    with tracker:
        for x, y in data:
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
    g = torch.Generator().manual_seed(1)
    subset = [(x[i], y[i]) for x, y in data for i in [torch.randperm(len(y), generator=g)[:2].sort().values]]
    assert_fisher_close(tracker.fisher(), R.estimate_fisher(model, subset), rtol=1e-10)


def test_embedding_bag_max_mode_is_left_to_the_generic_replay():
    torch.manual_seed(12)
    model = Bags("max", "2d", False, None, False, False).to(D).eval()
    data = batches(torch.randint(0, 12, (6, 4)), torch.randint(0, 12, (6,)), batch_size=3)
    got, info = _run(model, data)
    assert "bag.weight" in info.rule_params and not info.loop_params, info
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)


# -- which arguments of a module-local call hold the samples ------------------------------------------
class Angles(nn.Module):
    """No rule (module-local): scales its input by a parameter and by a table of angles ``[T, d]``
    that is the same for every sample, optionally masked per sample."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x, table, keep=None):
        y = x * self.scale * table
        return y if keep is None else y * keep[..., None]


class WithAngles(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.rot = Angles()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        T = x.shape[1]
        table = torch.cos(torch.arange(T, dtype=x.dtype)[:, None] * torch.arange(1, 7, dtype=x.dtype)[None])
        # a mask from the data, passed only when some sample has a zero first feature
        keep = (x[..., 0] != 0).to(x.dtype) if bool((x[..., 0] == 0).any()) else None
        return self.head(self.rot(self.inp(x), table, keep).mean(1))


def test_a_call_the_probe_did_not_see_goes_per_sample():
    """A later batch calls the module-local module with an argument the probe's batch did not
    have (a per-sample mask): nothing proved which of its arguments hold the samples, so its
    parameters go per sample, exactly."""
    torch.manual_seed(1)
    model = WithAngles().to(D)
    x, y = torch.randn(8, 5, 3, dtype=D), torch.randint(0, 2, (8,))
    x[6, 2:, 0] = 0.0  # the second batch has a sample with a masked tail
    data = batches(x, y, batch_size=4)
    got, info = fastewc.estimate_fisher(model, data, return_info=True)
    # per sample: the loop here, since the model's forward branches on the data (no vmap)
    assert "rot.scale" in info.loop_params and "probe did not see" in info.reasons["rot.scale"], info
    assert info.rules["inp"] == "linear"
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)


class ScaledTable(nn.Module):
    """A fixed ``[T, d]`` table (a buffer) scaled by a parameter, then added to every sample: the
    operation on the parameter meets no batch, whatever T is."""

    def __init__(self, d=3, seq=4):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.scale = nn.Parameter(torch.rand(d) + 0.5)
        self.register_buffer("table", torch.randn(seq, d))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.inp(x) + self.table * self.scale).mean(1))


@pytest.mark.parametrize(("make", "name", "rule"), [("angles", "rot.scale", "module-local"),
                                                    ("scaled table", "scale", "op-local")])
def test_a_table_with_as_many_rows_as_samples_is_not_split_between_them(make, name, rule):
    """The probe (2 samples) sees a table of T = 4 rows: not per sample. A later batch of 4
    samples must pass it whole to every sample too, not split it because its size now matches:
    the module-local call's arguments (rotary angles) and the operation's (``table * scale``) hold
    the samples where the probe saw them, not where a size says. Split, the angles' ``rot.scale``
    came out 0.59 off."""
    torch.manual_seed(0)
    model = {"angles": WithAngles, "scaled table": ScaledTable}[make]().to(D)
    x, y = torch.randn(8, 4, 3, dtype=D), torch.randint(0, 2, (8,))
    data = batches(x, y, batch_size=4)
    got, info = _run(model, data)
    assert info.methods[name] == rule and not info.vmap_params, info
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)


class Fused(torch.autograd.Function):
    """``h * s`` whose backward PyTorch's torch-function modes never see inside (``torch.func``
    can replay it: its vmap rule is generated)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h, s):
        return h * s

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        h, s = ctx.saved_tensors
        return g * s, (g * h).sum_to_size(s.shape)


class Gated(nn.Module):
    """A module without a rule, with a child Linear and its own parameters: ``pos`` added (followed
    op by op), ``s`` through a custom autograd Function, which the op recorder cannot follow."""

    def __init__(self, d=4, custom=False):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.pos = nn.Parameter(torch.randn(5, d) * 0.3)
        self.s = nn.Parameter(torch.rand(d) + 0.5)
        self.custom = custom

    def forward(self, x):
        h = self.lin(x) + self.pos[: x.shape[1]]
        return Fused.apply(h, self.s) if self.custom else h * self.s


class Checkpointed(nn.Module):
    """A block under ``torch.utils.checkpoint`` (non-reentrant): a composite module after a first
    layer (as a model's checkpointed layers follow its embeddings), or a block that holds the
    model's first layer itself."""

    def __init__(self, first_inside: bool):
        super().__init__()
        self.first_inside = first_inside
        self.first, self.gated, self.head = nn.Linear(4, 4), Gated(), nn.Linear(12, 3)

    def block(self, x):
        return self.gated(self.first(x)) if self.first_inside else self.gated(x)

    def forward(self, x):
        x = x if self.first_inside else self.first(x)
        return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False).flatten(1))


@pytest.mark.parametrize("kind", ["empirical", "exact"])
@pytest.mark.parametrize("first_inside", [False, True], ids=["after the first layer", "first layer inside"])
def test_a_checkpointed_block_is_recorded_once_and_recomputed_alike(first_inside, kind):
    """Recomputed in the backward, the block's calls and operations are not recorded a second
    time (nor is the op recorder entered there), and the recomputation hands on what the forward
    did: a first layer's output made to require grad, or the checkpoint finds other tensors
    saved and refuses (every parameter then went to the loop)."""
    torch.manual_seed(5)
    model = Checkpointed(first_inside).to(D)
    data = batches(torch.randn(7, 3, 4, dtype=D), torch.randint(0, 3, (7,)), batch_size=4)
    got, info = _run(model, data, kind=kind)
    assert info.methods["gated.pos"] == "op-local" and info.methods["gated.s"] == "op-local", info
    assert info.methods["first.weight"] == "linear" and not info.loop_params, info
    assert_fisher_close(got, R.estimate_fisher(model, data, kind=kind), rtol=1e-10)


@pytest.mark.parametrize("custom", [False, True], ids=["operations", "custom function"])
def test_a_composite_module_s_own_parameters_follow_its_operations_or_go_module_local(custom):
    """Its own parameters are followed op by op inside its forward (its child Linear is not
    replayed); one that goes through what the recorder cannot follow disagrees with the loop on
    the probe and goes module-local, that one only, never per sample."""
    torch.manual_seed(4)
    model = nn.Sequential(Gated(custom=custom), nn.Flatten(), nn.Linear(12, 3)).to(D)
    data = batches(torch.randn(7, 3, 4, dtype=D), torch.randint(0, 3, (7,)), batch_size=4)
    got, info = _run(model, data)
    want = {"0.pos": "op-local", "0.s": "module-local" if custom else "op-local"}
    assert {p: info.methods[p] for p in want} == want, info
    assert info.methods["0.lin.weight"] == "linear" and not info.vmap_params and not info.loop_params, info
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)


def _chain(*steps, spread=False):
    """A :class:`Rebuild` chain from the parameter ``p``: ``(func, *other arguments)`` per step."""
    from torch.utils._pytree import tree_flatten

    from fastewc.fisher.rules.local import ParamLeaf, Rebuild

    build = ParamLeaf("p")
    for k, (func, *args) in enumerate(steps):
        leaves, spec = tree_flatten(((torch.zeros(()), *args), {}))
        build = Rebuild(func, leaves, spec, {0: build}, 1 if spread and k == len(steps) - 1 else 0)
    return build


def _check_selection(build, p: torch.Tensor, by_position: bool) -> None:
    """``build`` (from the parameter ``p``) is taken by position or not as expected; its selection
    is the general finding's, and pulls sample gradients back as autograd does."""
    from fastewc.fisher.rules.local import _by_position, _selection

    assert _by_position(build) == by_position
    actual = build({"p": p})
    got, general = _selection(build, {"p": p}, actual), _selection(lambda s: build(s), {"p": p}, actual)
    if not by_position:  # the general finding serves, as before
        assert (got is None) == (general is None)
        assert got is None or (got[0] == general[0] and torch.equal(got[1], general[1]))
        return
    name, where = got
    assert name == "p" and general is not None and torch.equal(where, general[1])
    leaf = p.clone().requires_grad_()
    out = build({"p": leaf})
    g = torch.randn(3, *out.shape, dtype=D)
    want = torch.stack([torch.autograd.grad(out, leaf, gk, retain_graph=True)[0] for gk in g])
    pulled = g.new_zeros(3, p.numel() + 1).index_add_(1, where, g.reshape(3, -1))[:, :-1].reshape(3, *p.shape)
    assert torch.equal(pulled, want)


@pytest.mark.parametrize("steps,spread,by_position", [
    ([(torch.Tensor.expand, 5, -1, -1)], True, True),
    ([(torch.Tensor.transpose, -2, -1), (torch.Tensor.expand, 4, -1, -1)], True, True),
    ([(torch.Tensor.__getitem__, (slice(None), slice(1, None))), (torch.Tensor.flip, -1)], False, True),
    ([(torch.Tensor.reshape, (-1,)), (torch.Tensor.repeat, 2), (torch.Tensor.view, (3, 4))], False, True),
    ([(torch.Tensor.permute, 2, 0, 1), (torch.Tensor.contiguous,), (torch.Tensor.unsqueeze, 0)], False, True),
    ([(torch.Tensor.__getitem__, (0, torch.tensor([[2, 0], [2, 1]])))], False, False),  # a tensor index
    ([(torch.Tensor.view, torch.int64)], False, False),                                  # its bits
    ([(torch.Tensor.mul, 2.0)], False, False),
    ([(torch.Tensor.expand, 5, -1, -1), (torch.Tensor.exp,)], False, False),
])
def test_a_chain_of_positional_operations_is_pulled_back_by_index_without_rebuilding_it_with_gradients(
        steps, spread, by_position):
    """The op recorder's chains of views, expansions, slices, flips and copies on one parameter,
    with no tensor among their other arguments, select by position: what a rebuild of the
    positions gives is the selection, without the graph walk and the shifted rebuild that an
    arbitrary chain needs; the same as those find, and autograd's pull-back."""
    p = torch.randn(1, 3, 2, dtype=D, generator=torch.Generator().manual_seed(0))
    _check_selection(_chain(*steps, spread=spread), p, by_position)


def _embedding(**kwargs):
    return nn.Embedding(6, 2, **kwargs).to(D)


class _OwnLookup(nn.Embedding):
    def forward(self, idx):
        return super().forward(idx) * 2


@pytest.mark.parametrize("make,by_position", [
    (_embedding, True),
    (lambda: _embedding(padding_idx=0), False),      # the padding row's gradient is kept at zero
    (lambda: _embedding(scale_grad_by_freq=True), False),
    (lambda: _embedding(max_norm=1.0), False),       # renormalises the weight in place
    (lambda: _OwnLookup(6, 2).to(D), False),         # a forward of its own
])
def test_an_embeddings_lookup_of_fixed_rows_selects_by_position(make, by_position):
    """A module called without a batch axis is rebuilt by calling it again (T5's relative position
    bias: an ``nn.Embedding`` of bucket indices, permuted and unsqueezed). A plain embedding's
    lookup of fixed indices selects by position, the chain above it too: one rebuild of the
    positions gives the selection, the same as the general finding and autograd's pull-back; the
    lookups that are not plain selections go the general way, and indices changed in place since
    the call are not taken by position."""
    from torch.utils._pytree import tree_flatten

    from fastewc.fisher.rules.local import ModuleCall, Rebuild, _by_position

    torch.manual_seed(0)
    m = make()
    idx = torch.tensor([[0, 3, 5], [3, 3, 1]])
    build = ModuleCall(m, {"weight": "p"}, (idx,), {}, 0)
    for func, *args in [(torch.Tensor.permute, 2, 0, 1), (torch.Tensor.unsqueeze, 0)]:
        leaves, spec = tree_flatten(((torch.zeros(()), *args), {}))
        build = Rebuild(func, leaves, spec, {0: build})
    _check_selection(build, m.weight.detach().clone(), by_position)
    if not by_position:
        return
    idx[0, 0] = 4  # changed in place after the call: the recorded lookup is no longer what a rebuild gives
    assert not _by_position(build)


_MASK = torch.tensor([[True, False, True], [False, True, True]])


@pytest.mark.parametrize("func,args,slot,by_position", [
    (torch.where, (_MASK, None, -1e9), 1, True),                   # a causal mask's fill
    (torch.where, (_MASK, float("-inf"), None), 2, True),
    (torch.Tensor.masked_fill, (None, ~_MASK, 0.0), 0, True),
    (torch.where, (_MASK, None, torch.tensor(-1e9, dtype=D)), 1, False),   # a tensor fill
    (torch.Tensor.masked_fill, (None, ~_MASK, torch.tensor(0.0, dtype=D)), 0, False),
])
def test_a_chain_that_fills_a_fixed_mask_with_a_number_selects_by_position(func, args, slot, by_position):
    """``torch.where(mask, bias, min)`` (a causal mask laid over a position bias) and
    ``masked_fill``: each element is the parameter's at its position or the constant, found from
    the positions and the positions shifted, without the graph walk; the same as the general
    finding and autograd's pull-back. A mask changed in place since the call is not taken so."""
    from torch.utils._pytree import tree_flatten

    from fastewc.fisher.rules.local import ParamLeaf, Rebuild, _by_position

    p = torch.randn(2, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    mask = args[0 if func is torch.where else 1].clone()
    args = tuple(mask if k == (0 if func is torch.where else 1) else a for k, a in enumerate(args))
    leaves, spec = tree_flatten((tuple(torch.zeros(()) if a is None else a for a in args), {}))
    build = Rebuild(func, leaves, spec, {slot: ParamLeaf("p")})
    _check_selection(build, p, by_position)
    if not by_position:
        return
    mask.logical_not_()  # changed in place after the call
    assert not _by_position(build)



class RelativeKeys(nn.Module):
    """DeBERTa's pattern, written plainly: a relative-position table ``[2k, d]`` projected by a
    Linear called without a batch axis (and, with ``shared``, by the same Linear that projects
    the queries), split into heads, repeated over the batch folded with the heads into
    ``[N*heads, ...]`` rows (``repeat``: copies, not a broadcast; ``broadcast``: the first head's
    keys expanded over every row instead), and multiplied with the queries by ``torch.bmm``
    (either side of it)."""

    def __init__(self, shared: bool, keys_first: bool, broadcast: bool = False, d=8, heads=2, span=4, vocab=11):
        super().__init__()
        self.shared, self.keys_first, self.heads, self.broadcast = shared, keys_first, heads, broadcast
        self.emb = nn.Embedding(vocab, d)
        self.table = nn.Embedding(2 * span, d)
        self.norm = nn.LayerNorm(d)
        self.query = nn.Linear(d, d)
        self.pos = self.query if shared else nn.Linear(d, d)
        self.head = nn.Linear(2 * span, 3)

    def _split(self, t):  # [B, L, d] -> [B*heads, L, d / heads]
        B, L, _ = t.shape
        return t.view(B, L, self.heads, -1).permute(0, 2, 1, 3).reshape(B * self.heads, L, -1)

    def forward(self, x):
        n = x.shape[0]
        q = self._split(self.query(torch.tanh(self.emb(x))))                            # [n*h, T, dh]
        keys = self._split(self.pos(self.norm(self.table.weight).unsqueeze(0)))        # [h, 2k, dh]
        keys = keys[:1].expand(n * self.heads, -1, -1) if self.broadcast else keys.repeat(n, 1, 1)  # [n*h, 2k, dh]
        scores = torch.bmm(keys, q.transpose(1, 2)).transpose(1, 2) if self.keys_first else \
            torch.bmm(q, keys.transpose(1, 2))                                          # [n*h, T, 2k]
        return self.head(torch.tanh(scores).view(n, self.heads, *scores.shape[1:]).mean((1, 2)))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("keys_first", [False, True])
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_a_table_repeated_over_a_batch_folded_with_the_heads_by_rules(shared, keys_first, broadcast, kind, monkeypatch):
    """The table's per-sample gradient at the bmm in closed form (one sample's rows of it, no vmap
    replay; summed over them where one row was broadcast over all, which went to vmap before),
    back through the repeat, the head split, the Linear (shared with the queries' or its own)
    and the LayerNorm, and equal to the loop's."""
    from fastewc.fisher.rules import local

    taken = _spy_closed_form(monkeypatch, local)
    torch.manual_seed(7)
    model = RelativeKeys(shared, keys_first, broadcast).to(D)
    # batches of 3: in a batch of one, a table repeated once cannot be told from the batch (the
    # vmap replay serves there, as the probe proved it)
    data = batches(torch.randint(0, 11, (6, 5)), torch.randint(0, 3, (6,)), batch_size=3)
    got, info = _run(model, data, kind=kind)
    assert not info.vmap_params and not info.loop_params, info.summary()
    assert taken and all(taken), taken
    assert_fisher_close(got, R.estimate_fisher(model, data, kind=kind), rtol=1e-10)


# -- operations with several results, and operations that meet the batch on another axis ----------
class SplitTable(nn.Module):
    """Parameters joined and split again before they meet the batch, as attention modules pass
    their projections' biases (``torch.cat(biases).chunk(3)``): each part is followed on."""

    def __init__(self, how, d=6):
        super().__init__()
        self.how = how
        self.emb = nn.Embedding(9, d)
        self.scale = nn.Parameter(torch.rand(d) + 0.5)
        self.shift = nn.Parameter(0.3 * torch.randn(d))
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        both = torch.cat([self.scale, self.shift])
        if self.how == "chunk":
            a, b = both.chunk(2)
        elif self.how == "split":
            a, b = torch.split(both, [6, 6])
        else:
            a, b = both.view(2, -1).unbind(0)
        h = self.emb(ids) * a + b
        return self.head(h.tanh().mean(1))


@pytest.mark.parametrize("how", ["chunk", "split", "unbind"])
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_an_operation_with_several_results_is_followed_into_each(how, kind):
    torch.manual_seed(11)
    model = SplitTable(how).to(D)
    data = batches(torch.randint(0, 9, (7, 5)), torch.randint(0, 3, (7,)), batch_size=4)
    got, info = _run(model, data, kind=kind)
    assert info.methods["scale"] == info.methods["shift"] == "op-local", info
    assert not info.vmap_params and not info.loop_params, info
    assert_fisher_close(got, R.estimate_fisher(model, data, kind=kind), rtol=1e-10)


class JoinedProjections(nn.Module):
    """WavLM's attention: its projections are never called; their weights, and their biases
    joined, go to ``F.multi_head_attention_forward`` on the input made sequence-first,
    ``[T, N, d]``. ``gain`` scales the query weight."""

    def __init__(self, d, heads, gain):
        super().__init__()
        self.heads, self.gain = heads, gain
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, nn.Linear(d, d))

    def forward(self, x):
        h = x.transpose(0, 1)
        out, _ = F.multi_head_attention_forward(
            h, h, h, h.shape[-1], self.heads, None, torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            None, None, False, 0.0, self.out_proj.weight, self.out_proj.bias, training=False,
            use_separate_proj_weight=True, q_proj_weight=self.q_proj.weight * self.gain,
            k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight)
        return out.transpose(0, 1)


class SequenceFirstUse(nn.Module):
    """Parameters meeting the batch on axis 1 (``[T, N, d]``, a sequence-first layout) outside
    their modules: a weight of the model's own in ``F.linear``, or inside WavLM's attention
    (:class:`JoinedProjections`). ``gain`` scales their share of the output: small, their Fisher
    lies far below the model's largest entry, where the probe's comparison cannot tell a wrong
    value from a right one."""

    def __init__(self, how, gain, d=6, heads=2):
        super().__init__()
        self.how, self.gain = how, gain
        self.emb = nn.Embedding(9, d)
        if how == "linear":
            self.w = nn.Parameter(torch.randn(d, d) / d**0.5)
        else:
            self.attn = JoinedProjections(d, heads, gain)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        h = self.emb(ids)
        if self.how == "linear":
            h = h.transpose(0, 1)  # [T, N, d]
            h = (h + self.gain * F.linear(h, self.w)).transpose(0, 1)
        else:
            h = h + self.attn(h)
        return self.head(h.tanh().mean(1))


@pytest.mark.parametrize("how", ["linear", "attention"])
@pytest.mark.parametrize("gain", [1.0, 1e-5])
def test_a_parameter_meeting_the_samples_on_another_axis_is_never_taken_for_a_table(how, gain):
    """The op recorder took an operation whose other arguments hold the samples on axis 1 for
    one without a batch axis, rebuilding its result from the whole batch: the query and key
    projections of WavLM got a Fisher of 0, below the probe's floor, so nothing caught it. Such an
    operation now sends its parameters module-local (or per sample at the root): exact, whatever
    the scale."""
    fastewc.fisher.clear_plan_cache()
    torch.manual_seed(12)
    model = SequenceFirstUse(how, gain).to(D)
    data = batches(torch.randint(0, 9, (7, 5)), torch.randint(0, 3, (7,)), batch_size=4)
    got, info = fastewc.estimate_fisher(model, data, return_info=True)
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10, atol_rel=1e-12)
    if how == "attention":
        assert {info.methods[f"attn.{p}_proj.{t}"] for p in ("q", "k", "v", "out") for t in ("weight", "bias")} == {"module-local"}, info
    else:
        assert "w" in info.vmap_params, info
    assert info.methods["head.weight"] == "linear", info


class SequenceFirstBlock(nn.Module):
    """A module without a rule, called with ``[T, N, d]`` and a mask (XLNet's attention): no
    output has the samples first, yet it is no position table, since its input comes from the
    batch."""

    def __init__(self, d, gain):
        super().__init__()
        self.gain = gain
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.u = nn.Parameter(torch.randn(d))

    def forward(self, h, mask):
        scores = torch.einsum("ind,jnd->nij", h @ self.w, h).masked_fill(mask, -1e4)
        return h + self.gain * torch.einsum("nij,jnd->ind", scores.softmax(-1), h) * self.u


class WithSequenceFirstBlock(nn.Module):
    """The block after an embedding, or first, on the model's own float input."""

    def __init__(self, gain, first, d=6):
        super().__init__()
        self.first = first
        if not first:
            self.emb = nn.Embedding(9, d)
        self.block = SequenceFirstBlock(d, gain)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        T = x.shape[1]
        h = self.block((x if self.first else self.emb(x)).transpose(0, 1), torch.ones(T, T, dtype=torch.bool).triu(1))
        return self.head(h.tanh().mean(0))


@pytest.mark.parametrize("gain", [1.0, 1e-5])
@pytest.mark.parametrize("first", [False, True], ids=["after-embedding", "first"])
def test_a_module_fed_the_samples_on_another_axis_is_never_taken_for_a_position_table(gain, first):
    """A module whose outputs have no batch axis first was taken for a position table and
    rebuilt from the whole batch for every sample (XLNet's second layer: its attention's Fisher
    off by 100%, below the probe's floor). When an input comes from the batch, the module goes
    per sample instead: exact, whatever the scale; also as the model's first module, fed the
    model's own float input (which the rules pass makes require grad to tell)."""
    fastewc.fisher.clear_plan_cache()
    torch.manual_seed(13)
    model = WithSequenceFirstBlock(gain, first).to(D)
    x = torch.randn(7, 5, 6, dtype=D) if first else torch.randint(0, 9, (7, 5))
    data = batches(x, torch.randint(0, 3, (7,)), batch_size=4)
    got, info = fastewc.estimate_fisher(model, data, return_info=True)
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10, atol_rel=1e-12)
    assert {"block.w", "block.u"} <= set(info.vmap_params), info
    assert "another axis" in info.reasons["block.w"], info.reasons
    assert info.methods["head.weight"] == "linear" and (first or info.methods["emb.weight"] == "embedding"), info


class ChangesItsInput(nn.Module):
    """A model that clamps its float input in place before its first layer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x.clamp_(-1.0, 1.0))


def test_a_model_that_modifies_its_input_in_place():
    """The rules pass hands the model a copy of its float input that requires grad: an in-place
    change of it is no in-place change of a leaf, which autograd refuses."""
    torch.manual_seed(17)
    model = ChangesItsInput().to(D)
    data = batches(torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,)), batch_size=3)
    got, info = _run(model, data)
    assert info.methods["lin.weight"] == "linear" and not info.vmap_params, info
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)
