"""The per-layer rule engine against reference.estimate_fisher in float64: every rule on
random shapes, weight sharing over sequences and space, mixed models, the three kinds, the probe
that drops what a rule cannot prove, hooks and flags restored."""

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastewc
from fastewc import reference as R

from models import assert_fisher_close, batches, rebatch

D = torch.float64


def _run(model, data, **kw):
    got, info = fastewc.estimate_fisher(model, data, method="rules", return_info=True, **kw)
    return got, info


class Head(nn.Module):
    """``body`` then flatten and a linear head to 3 classes (so any body gives [N, 3] logits)."""

    def __init__(self, body, features):
        super().__init__()
        self.body = body
        self.head = nn.Linear(features, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)).flatten(1))


def _randomise_bn(m):
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                mod.running_mean.copy_(torch.randn_like(mod.running_mean))
                mod.running_var.copy_(torch.rand_like(mod.running_var) + 0.5)
                mod.weight.copy_(torch.rand_like(mod.weight) + 0.5)
                mod.bias.copy_(torch.randn_like(mod.bias))
    return m


# body, input shape (without N), expected rule of the body
CASES = {
    "linear2d": (lambda: nn.Linear(7, 5), (7,), "linear"),
    "linear_seq": (lambda: nn.Linear(7, 5), (4, 7), "linear"),
    "linear_nobias_4d": (lambda: nn.Linear(7, 5, bias=False), (2, 3, 7), "linear"),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), (3, 6, 5), "conv2d"),
    "conv2d_strided_dilated_groups": (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), dilation=(1, 2), padding=1,
                                                        groups=2), (4, 7, 6), "conv2d"),
    "conv2d_same_reflect": (lambda: nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"), (2, 5, 5), "conv2d"),
    "conv2d_circular_nobias": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False),
                               (2, 4, 5), "conv2d"),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), (3, 11), "conv1d"),
    "layernorm": (lambda: nn.LayerNorm(6), (4, 6), "layernorm"),
    "layernorm_2d_nobias": (lambda: nn.LayerNorm((3, 4), bias=False), (3, 4), "layernorm"),
    "batchnorm1d": (lambda: _randomise_bn(nn.BatchNorm1d(5)), (5,), "batchnorm"),
    "batchnorm1d_seq": (lambda: _randomise_bn(nn.BatchNorm1d(5)), (5, 3), "batchnorm"),
    "batchnorm2d": (lambda: _randomise_bn(nn.BatchNorm2d(3)), (3, 4, 2), "batchnorm"),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (4, 3, 2), "groupnorm"),
}
if hasattr(nn, "RMSNorm"):
    CASES["rmsnorm"] = (lambda: nn.RMSNorm(6), (3, 6), "rmsnorm")


def _affine_random(m):
    for name, p in m.named_parameters():
        if name.endswith("weight") and p.dim() == 1 or isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            with torch.no_grad():
                p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_rule_matches_reference(case):
    make, shape, rule = CASES[case]
    body = _affine_random(make())
    with torch.no_grad():
        out = body.eval()(torch.randn(2, *shape))
    model = Head(body, out[0].numel()).to(D)
    x = torch.randn(9, *shape, dtype=D)
    y = torch.randint(0, 3, (9,))
    data = batches(x, y, batch_size=4)
    got, info = _run(model, data)
    assert info.rules["body"] == rule and info.rules["head"] == "linear", info
    assert not info.vmap_params and not info.loop_params, info
    assert_fisher_close(got, R.estimate_fisher(model, data))


def test_embedding_rule_with_padding_and_repeats():
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4, padding_idx=0)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.emb(x)).sum(1))

    model = Emb().to(D)
    x = torch.randint(0, 4, (10, 6))  # few tokens: repeats within a sample, and padding (0)
    x[0] = 2                          # one sample of a single repeated token
    data = batches(x, torch.randint(0, 3, (10,)), batch_size=3)
    got, info = _run(model, data)
    assert info.rules == {"emb": "embedding", "head": "linear"}
    assert_fisher_close(got, R.estimate_fisher(model, data))
    assert float(got["emb.weight"][0].abs().max()) == 0.0  # the padding row gets no gradient


@pytest.mark.parametrize("subset", [False, True])
def test_embedding_sums_add_into_running_sums(subset):
    # alpha times the squared per-sample gradients, each sample's scaled by its weight, over the
    # picked samples, added in place into a running sum (the tracker's and estimate_fisher's
    # route); the padding row untouched. Truth: one sample at a time through F.embedding's
    # backward.
    import dataclasses

    from fastewc.fisher.rules.registry import add_sq_sums, rule_for

    torch.manual_seed(0)
    m = nn.Embedding(9, 5, padding_idx=0).to(D)
    A = torch.randint(0, 6, (4, 7))
    A[1] = 3  # one token repeated: its rows add up before the square
    G = torch.randn(4, 7, 5, dtype=D)
    picks, w = (torch.tensor([3, 1]), torch.tensor([0.5, 2.0], dtype=D)) if subset else (None, None)
    want = torch.zeros(9, 5, dtype=D)
    for r, wt in zip(*(([3, 1], [0.5, 2.0]) if subset else (range(4), [1.0] * 4))):
        W = m.weight.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad((F.embedding(A[r], W, padding_idx=0) * G[r]).sum() * wt, W)
        want += g.square()
    rule, _ = rule_for(m)
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("into"))
        return rule.sq_sum(*args, **kwargs)

    start = torch.rand(9, 5, dtype=D)
    totals = {"weight": start.clone()}
    add_sq_sums(dataclasses.replace(rule, sq_sum=spy), m, A, [G], totals, alpha=0.3, picks=picks, weights=w)
    assert seen == [totals]  # int64 indices, float64 sums: still added in place
    torch.testing.assert_close(totals["weight"] - start, 0.3 * want)
    assert torch.equal(totals["weight"][0], start[0])


def test_sequence_linear_does_not_take_the_2d_shortcut():
    """Weight shared over positions: the 2-D formula (G^2)^T (A^2) would be far off; the engine
    must form per-sample gradients and agree with the loop."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    model = nn.Sequential(lin, nn.Flatten(1), nn.Linear(4 * 5, 3)).to(D)
    x = torch.randn(8, 5, 6, dtype=D)
    y = torch.randint(0, 3, (8,))
    ref = R.estimate_fisher(model, [(x, y)])
    got, info = _run(model, [(x, y)])
    assert info.rules["0"] == "linear"
    assert_fisher_close(got, ref)
    # The shortcut on the same data: what a wrong engine would report.
    A = x.reshape(-1, 6)
    with torch.enable_grad():
        h = lin(x)
        out = model[2](model[1](h))
        G, = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), h)
    shortcut = (G.reshape(-1, 4).square().t() @ A.square()) / 8
    rel = float((shortcut - ref["0.weight"]).abs().sum() / ref["0.weight"].abs().sum())
    assert rel > 0.2, rel  # it would be wrong by this much; the engine is not


@pytest.mark.parametrize("path", ["chunked", "per-sample"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("n", [0, 1, 7])
def test_linear_sums_of_squares_both_paths(path, transposed, n, monkeypatch):
    """Both routes of the sequence Linear sum (small gradients a chunk at a time, with a short
    last chunk; large ones one sample at a time), several exact-Fisher columns, HF's transposed
    layout and an empty chunk, against per-sample gradients formed one by one."""
    from fastewc.fisher.rules import linear

    if path == "chunked":  # 3 samples per chunk: 7 = 3 + 3 + 1
        monkeypatch.setattr(linear, "_CHUNK_BYTES", 3 * 5 * 4 * 8)
    else:
        monkeypatch.setattr(linear, "_SMALL_BLOCK_BYTES", 0)
    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, 6, 4, dtype=D, generator=g)
    Gs = [torch.randn(n, 6, 5, dtype=D, generator=g) for _ in range(3)]
    got = linear.sq_sum_linear(A, Gs, bias=True, transposed=transposed)
    w = sum((torch.einsum("nto,nti->noi", G, A) ** 2).sum(0) for G in Gs)
    b = sum((G.sum(1) ** 2).sum(0) for G in Gs)
    torch.testing.assert_close(got["weight"], w.t() if transposed else w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["bias"], b if n else torch.zeros(5, dtype=D), rtol=1e-12, atol=1e-12)


def test_conv_weight_shared_over_space_is_exact():
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(1), nn.Linear(3 * 3 * 3, 3)).to(D)
    x, y = torch.randn(6, 2, 4, 4, dtype=D), torch.randint(0, 3, (6,))
    got, info = _run(model, [(x, y)])
    assert info.rules["0"] == "conv2d"
    assert_fisher_close(got, R.estimate_fisher(model, [(x, y)]))


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((2, 3), (2, 1), (0, 2), (1, 1)), ((3, 2), (1, 3), (2, 1), (2, 3)),
    ((1, 1), (1, 1), (0, 0), (1, 1)), ((5, 4), (3, 2), (1, 0), (1, 2))])
@pytest.mark.parametrize("n", [0, 1, 3])
def test_conv_im2col_equals_unfold(kernel, stride, padding, dilation, n):
    from fastewc.fisher.rules.conv import _im2col

    A = torch.randn(n, 2, 9, 7, dtype=D, generator=torch.Generator().manual_seed(n))
    want = F.unfold(A, kernel, dilation=dilation, padding=padding, stride=stride)
    torch.testing.assert_close(_im2col(A, kernel, dilation, padding, stride), want, rtol=0, atol=0)


@pytest.mark.parametrize("conv,shape", [
    (lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=1), (3, 9, 8)),
    (lambda: nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect", groups=2), (4, 7, 6)),
    (lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=2), (2, 11))])
def test_conv_rule_on_strided_dilated_grouped_padded_convolutions(conv, shape):
    torch.manual_seed(0)
    body = conv().to(D)
    features = body(torch.zeros(1, *shape, dtype=D)).numel()
    model = nn.Sequential(body, nn.Tanh(), nn.Flatten(1), nn.Linear(features, 3)).to(D)
    x, y = torch.randn(5, *shape, dtype=D), torch.randint(0, 3, (5,))
    got, info = _run(model, batches(x, y, batch_size=3))
    assert info.rules["0"] in ("conv1d", "conv2d") and not info.vmap_params and not info.loop_params
    assert_fisher_close(got, R.estimate_fisher(model, batches(x, y, batch_size=3)), rtol=1e-10)


class Mixed(nn.Module):
    """Rules for the embedding, norms and linears; none for attention and a raw parameter."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.pos = nn.Parameter(0.1 * torch.randn(5, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.ff = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.emb(x) + self.pos
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(torch.relu(self.ff(h)).mean(1))


@pytest.mark.parametrize("kind", ["empirical", "sampled", "exact"])
def test_mixed_model_rules_module_local_and_op_local(kind):
    model = Mixed().to(D)
    x, y = torch.randint(0, 11, (7, 5)), torch.randint(0, 4, (7,))
    data = batches(x, y, batch_size=3)
    gen = (lambda: torch.Generator().manual_seed(3)) if kind == "sampled" else (lambda: None)
    got, info = _run(model, data, kind=kind, generator=gen())
    assert_fisher_close(got, R.estimate_fisher(model, data, kind=kind, generator=gen()))
    # nn.MultiheadAttention (its out_proj used by its forward without a call) by the module-local
    # rule; the bare positional parameter by the op-local rule; nothing per sample.
    assert info.rules == {"emb": "embedding", "norm": "layernorm", "ff": "linear", "head": "linear",
                          "attn": "module-local", "<ops>": "op-local"}
    assert not info.vmap_params and not info.loop_params
    assert info.methods["pos"] == "op-local" and info.methods["attn.out_proj.weight"] == "module-local"
    assert "outside any module" in info.notes["pos"]
    assert "no rule for MultiheadAttention" in info.notes["attn.in_proj_weight"]


def test_auto_covers_attention_and_bare_parameters_without_vmap():
    model = Mixed().to(D)
    data = [(torch.randint(0, 11, (4, 5)), torch.randint(0, 4, (4,)))]
    got, info = fastewc.estimate_fisher(model, data, return_info=True)
    assert set(info.rule_params) == set(dict(model.named_parameters())) and not info.vmap_params
    assert_fisher_close(got, R.estimate_fisher(model, data))


def test_auto_uses_rules_on_a_fully_covered_model():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(D)
    data = [(torch.randn(6, 5, dtype=D), torch.randint(0, 3, (6,)))]
    got, info = fastewc.estimate_fisher(model, data, return_info=True)
    assert info.rules == {"0": "linear", "2": "linear"} and not info.vmap_params
    assert_fisher_close(got, R.estimate_fisher(model, data))


@pytest.mark.parametrize("top_k", [None, 2])
def test_exact_through_the_rules(top_k):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(1), nn.Linear(27, 5), nn.Tanh(),
                          nn.Linear(5, 4)).to(D)
    data = batches(torch.randn(7, 2, 4, 4, dtype=D), torch.randint(0, 4, (7,)), batch_size=4)
    got, info = _run(model, data, kind="exact", top_k=top_k)
    assert set(info.rules.values()) == {"conv2d", "linear"} and not info.vmap_params
    assert_fisher_close(got, R.estimate_fisher(model, data, kind="exact", top_k=top_k))


def test_sampled_same_labels_as_reference_and_batch_size_invariant():
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 4)).to(D)
    data = batches(torch.randn(11, 5, dtype=D), torch.randint(0, 4, (11,)), batch_size=4)
    ref = R.estimate_fisher(model, data, kind="sampled", generator=torch.Generator().manual_seed(5))
    for bs in (1, 3, 11):
        got, _ = _run(model, rebatch(data, bs), kind="sampled", generator=torch.Generator().manual_seed(5))
        assert_fisher_close(got, ref)


def test_sequence_outputs_and_ignored_positions():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 6)
            self.lin = nn.Linear(6, 5)

        def forward(self, x):
            return self.lin(torch.tanh(self.emb(x)))  # [N, T, 5]

    model = Tagger().to(D)
    x, y = torch.randint(0, 9, (6, 4)), torch.randint(0, 5, (6, 4))
    y[1, 2:] = -100
    got, info = _run(model, batches(x, y, batch_size=4))
    assert info.rules == {"emb": "embedding", "lin": "linear"}
    assert_fisher_close(got, R.estimate_fisher(model, batches(x, y, batch_size=4)))


# -- the probe drops what a rule cannot prove ----------------------------------------------------

class SideUse(nn.Module):
    """``fc.weight`` is used by fc's forward AND directly: the rule sees only the first use."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) + x @ self.fc.weight.t() * 0.5)


class Twice(nn.Module):
    """One layer applied twice: its per-sample gradient is the sum of both uses."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.fc(torch.tanh(self.fc(x))))


class InPlace(nn.Module):
    """ReLU(inplace=True) overwrites the Linear's output: the engine keeps the original."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))

    def forward(self, x):
        return self.net(x)


class BatchMixing(nn.Module):
    """Subtracts the batch mean: samples are not independent in a batch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc(x)
        return h - 0.5 * h.mean(0, keepdim=True)


@pytest.mark.parametrize("cls,dropped,why", [
    (SideUse, "fc.weight", "disagreed with the per-sample loop"),
    (BatchMixing, "fc.weight", "mixes samples"),
])
def test_probe_sends_unprovable_layers_per_sample(cls, dropped, why):
    model = cls().to(D)
    data = batches(torch.randn(8, 5, dtype=D), torch.randint(0, 3, (8,)), batch_size=4)
    got, info = _run(model, data)
    assert dropped in info.vmap_params and why in info.reasons[dropped], info
    assert_fisher_close(got, R.estimate_fisher(model, data))


def test_module_called_twice_sums_both_uses_per_sample():
    model = Twice().to(D)
    data = batches(torch.randn(8, 5, dtype=D), torch.randint(0, 3, (8,)), batch_size=4)
    got, info = _run(model, data)
    assert info.rules == {"fc": "linear", "head": "linear"} and not info.vmap_params, info
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)


def test_inplace_activation_after_a_ruled_layer():
    model = InPlace().to(D)
    data = batches(torch.randn(8, 5, dtype=D), torch.randint(0, 3, (8,)), batch_size=4)
    got, info = _run(model, data)
    assert info.rules == {"net.0": "linear", "net.2": "linear"}, info
    assert_fisher_close(got, R.estimate_fisher(model, data))


@pytest.mark.parametrize("chunk", ["two samples", "whole batch"])
@pytest.mark.parametrize("add_into", [True, False])
def test_tied_weights_sum_both_uses_before_squaring(add_into, chunk, monkeypatch):
    # The dense blocks' route, which the tied-head sum (tests/fisher/test_tied_head.py) takes over
    # for a Linear head and embeddings, and which serves every other shared parameter: here it is
    # made to serve by recognising no embedding use as a lookup of rows. add_into: the embedding
    # adds its rows into the tied Linear's dense block in place; without it, each use forms its
    # own block and they are added. Chunks of two samples (the last one short) are squared sample
    # by sample, a whole batch of six at once.
    import dataclasses

    from fastewc.fisher import engine, sums
    from fastewc.fisher.rules import registry
    from models import Tied

    monkeypatch.setattr(engine, "tied_uses", lambda *a: None)
    added = []
    rule = registry.rule_for(nn.Embedding(3, 2))[0]

    def spy(*a):
        added.append(rule.add_into(*a))
        return added[-1]

    monkeypatch.setitem(registry._BY_TYPE, nn.Embedding, dataclasses.replace(rule, add_into=spy if add_into else None))
    if chunk == "two samples":  # the tied table is 11 x 6 float64 per sample
        monkeypatch.setattr(sums, "BLOCK_BYTES", 4 * 2 * 11 * 6 * 8)
    model = Tied().to(D)
    data = batches(torch.randint(0, 11, (6, 3)), torch.randint(0, 11, (6,)),
                   batch_size=3 if chunk == "two samples" else 6)
    got, info = _run(model, data)
    assert bool(added) == add_into and all(added)
    assert info.methods["emb.weight"] == "embedding+linear" and "tied" in info.notes["emb.weight"]
    assert info.rules == {"emb": "embedding", "mid": "linear", "out": "linear"} and not info.vmap_params
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)


def test_ruled_type_in_an_unsupported_configuration_goes_module_local():
    # scale_grad_by_freq scales by the token counts of the whole batch: no batched formula, but
    # the module-local rule replays each sample alone.
    model = nn.Sequential(nn.Embedding(7, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(8, 3)).to(D)
    data = [(torch.randint(0, 7, (5, 2)), torch.randint(0, 3, (5,)))]
    got, info = _run(model, data)
    assert info.rules == {"0": "module-local", "2": "linear"} and not info.vmap_params
    assert info.notes["0.weight"] == "no rule for Embedding in this configuration"
    assert_fisher_close(got, R.estimate_fisher(model, data))


def test_subclass_with_its_own_forward_gets_no_rule():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    model = nn.Sequential(Scaled(4, 3)).to(D)
    data = [(torch.randn(5, 4, dtype=D), torch.randint(0, 3, (5,)))]
    got, info = _run(model, data)
    assert info.rules == {"0": "module-local"} and "no rule for Scaled" in info.notes["0.weight"]
    assert_fisher_close(got, R.estimate_fisher(model, data))


# -- hooks, flags, errors, report ------------------------------------------------------------------

def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules())


def test_hooks_removed_and_flags_restored_also_on_error():
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Linear(6, 3)).to(D)
    model.train()
    model[1].eval()
    data = [(torch.randn(4, 5, dtype=D), torch.randint(0, 3, (4,)))]
    fastewc.estimate_fisher(model, data, method="rules")
    assert _hook_count(model) == 0 and model.training and model[0].training and not model[1].training

    calls = []

    def bad_loss(out, t):
        calls.append(1)
        if len(calls) > 30:  # passes the probe, fails in the main pass
            raise ValueError("boom")
        return F.cross_entropy(out, t)

    with pytest.raises(ValueError, match="boom"):
        fastewc.estimate_fisher(model, data * 20, method="rules", loss_fn=bad_loss)
    assert _hook_count(model) == 0 and model.training and model[0].training and not model[1].training


def test_nan_sample_is_named_under_the_rules():
    model = nn.Sequential(nn.Linear(5, 3)).to(D)
    x = torch.randn(8, 5, dtype=D)
    x[6, 2] = float("nan")
    with pytest.raises(fastewc.EWCInputError, match=r"'0\.weight'.*sample 6"):
        fastewc.estimate_fisher(model, batches(x, torch.randint(0, 3, (8,)), batch_size=4), method="rules")


def test_report_and_log_line(caplog):
    model = Mixed().to(D)
    data = [(torch.randint(0, 11, (4, 5)), torch.randint(0, 4, (4,)))]
    with caplog.at_level(logging.INFO, logger="fastewc.fisher"):
        _, info = _run(model, data)
    line = caplog.records[-1].getMessage()
    assert "4 samples" in line and "linear: 4 params (ff.weight, ff.bias, head.weight, ...)" in line
    assert "module-local: 4 params" in line and "op-local: 1 param (pos)" in line and "probe " in line
    assert repr(info).startswith("FisherReport(")
    assert set(info.rule_params) == set(dict(model.named_parameters())) and info.probe_seconds > 0


def test_report_groups_parameters_by_method_and_reason():
    # Every parameter of a sample-mixing model goes per sample for the same reason: one line
    # for all of them, the full reason per parameter in report.reasons.
    class Center(nn.Module):
        def forward(self, h):
            return h - 0.5 * h.mean(0, keepdim=True)

    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)], Center()).to(D)
    data = [(torch.randn(5, 4, dtype=D), torch.randint(0, 3, (5,)))]
    got, info = _run(model, data)
    assert len(info.vmap_params) == 12 and len(set(info.reasons.values())) == 1
    assert "mixes samples" in info.reasons["0.weight"]
    assert info.summary().count("mixes samples") == 1 and "vmap: 12 params (0.weight, 0.bias, 1.weight, ...)" in info.summary()
    assert_fisher_close(got, R.estimate_fisher(model, data))


def test_custom_loss_fn_through_the_rules():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).to(D)
    x, y = torch.randn(6, 5, dtype=D), torch.randn(6, 2, dtype=D)

    def mse(out, t):
        return ((out - t) ** 2).sum()

    got, info = _run(model, [(x, y)], loss_fn=mse)
    assert info.rules == {"0": "linear", "2": "linear"}
    assert_fisher_close(got, R.estimate_fisher(model, [(x, y)], loss_fn=mse))


class LateTrouble(nn.Module):
    """On batches of 3 samples only, the input of ``fc`` is modified in place after the call (by
    x1, so the values stay): the rules drop ``fc`` mid-batch, from that chunk on."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        z = x * 1.0
        h = torch.tanh(self.fc(z))
        if z.shape[0] == 3:
            z.mul_(1.0)
        return self.head(h + z)


def test_a_site_dropped_mid_batch_is_not_counted_twice():
    model = LateTrouble().to(D)
    data = batches(torch.randn(7, 5, dtype=D), torch.randint(0, 3, (7,)), batch_size=7)
    got, info = _run(model, data, chunk_size=4)  # chunks of 4 and 3: fc drops in the second
    assert "fc.weight" in info.vmap_params and "modified in place" in info.reasons["fc.weight"]
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)


@pytest.mark.parametrize("samples_per_chunk", [1, 3, 5, 7])
def test_squares_of_uses_adds_uses_before_squaring(samples_per_chunk):
    """The loop shared by the engine and the tracker, with the chunk size injected: a view and a
    buffer handed to two names are copied before another use adds into them, an add-into use
    lands in the block it found, and chunks of few and of many samples square alike."""
    from fastewc.fisher.sums import squares_of_uses

    g = torch.Generator().manual_seed(samples_per_chunk)
    n = 7
    u1, u2, u3 = (torch.randn(n, 4, dtype=D, generator=g) for _ in range(3))
    shared = torch.randn(n, 4, dtype=D, generator=g)
    base = torch.randn(n, 8, dtype=D, generator=g)

    def blocks(use, i, j):
        if use == "a":   # "w" as a view of a larger tensor; "b" and "c" one fresh buffer for two names
            buf = shared[i:j].clone()
            return {"w": base[i:j, :4], "b": buf, "c": buf}
        if use == "b":
            return {"w": u1[i:j], "b": u2[i:j]}
        raise AssertionError("use c adds into existing blocks")

    def add_into(use, i, j, acc):
        if use != "c":
            return False
        acc["c"].add_(u3[i:j])
        return True

    before = (base.clone(), shared.clone())
    totals = {}
    squares_of_uses(["a", "b", "c"], n, 4 * 8, add_into, blocks, totals, chunk_bytes=samples_per_chunk * 4 * 8)
    torch.testing.assert_close(totals["w"], ((base[:, :4] + u1) ** 2).sum(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(totals["b"], ((shared + u2) ** 2).sum(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(totals["c"], ((shared + u3) ** 2).sum(0), rtol=1e-13, atol=0)
    assert torch.equal(base, before[0]) and torch.equal(shared, before[1])  # the caller's tensors untouched


# -- PyTorch's batch norm backward on one sample ----------------------------------------------------
class ConvTokens(nn.Module):
    """LeViT's patch embedding: convolution, batch norm (eval mode), then the feature map as
    tokens (``flatten(2).transpose(1, 2)``) into a residual block, whose backward hands the batch
    norm an output gradient with a channels-last layout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()

    def forward(self, x):
        tokens = self.bn(self.conv(F.hardswish(x))).flatten(2).transpose(1, 2)
        h = torch.tanh(self.mix(tokens)) + tokens   # a residual: its gradient reaches the tokens as is
        return self.head(torch.tanh(h).sum(1))


def _two_copies_truth(model, x, y):
    """Each sample's squared gradient, from a batch of two copies of it with the loss of the first
    only: a batch of two, where PyTorch's batch norm backward is right."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(x.shape[0]):
        out = model(x[i : i + 1].expand(2, -1, -1, -1))
        gs = torch.autograd.grad(F.cross_entropy(out[:1], y[i : i + 1]), list(params.values()))
        for n, g in zip(params, gs):
            total[n] += g * g
    return {n: t / x.shape[0] for n, t in total.items()}


@pytest.mark.parametrize("method", ["reference", "auto", "vmap", "loop"])
def test_a_batch_norm_before_tokens_on_one_sample(method):
    """PyTorch's CPU batch norm backward (eval mode) returns wrong input, weight and bias
    gradients for a batch of one whose output gradient has a channels-last layout: the
    reference loop, the loop engine and the rules on a batch of one sample were wrong for LeViT
    (the rules and vmap on larger batches were right). Each batch norm now gets its output
    gradient made contiguous on those paths; every method matches a truth formed on batches of
    two copies of each sample."""
    torch.manual_seed(18)
    model = ConvTokens().to(D).eval()
    x, y = torch.randn(4, 3, 8, 8, dtype=D), torch.randint(0, 3, (4,))
    want = _two_copies_truth(model, x, y)
    data = [(x[:3], y[:3]), (x[3:], y[3:])]  # the last batch holds one sample
    fastewc.fisher.clear_plan_cache()
    got = (R.estimate_fisher(model, data) if method == "reference"
           else fastewc.estimate_fisher(model, data, method=method))
    assert_fisher_close(got, want, rtol=1e-10)
