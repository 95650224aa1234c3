"""A weight shared by a Linear head and lookups of its rows (``fastewc.fisher.rules.tied_head``):
the sum against a per-sample loop in float64, directly and through ``estimate_fisher``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fastewc import reference as R
from fastewc.fisher import engine
from fastewc.fisher.rules import tied_head
from models import Tied, assert_fisher_close, batches
from test_fisher_local_rules import OwnForwardLM, ScaledEmbedding
from test_fisher_rules import _run

D = torch.float64


def per_sample_loop(A, Gs, lookups, V):
    """The definition: each sample's dense gradient, its looked-up rows added, squared; summed
    over the columns."""
    n, d = A.shape[0], A.shape[-1]
    total = torch.zeros(V, d, dtype=D)
    for c, G in enumerate(Gs):
        for k in range(n):
            g = G[k].reshape(-1, V).double().t() @ A[k].reshape(-1, d).double()
            for idx, rows in lookups:
                g.index_add_(0, idx[k].reshape(-1), rows[c][k].reshape(-1, d).double())
            total += g * g
    return total


@pytest.mark.parametrize("kernel", ["auto", None], ids=["kernel", "products"])
@pytest.mark.parametrize("columns", [1, 3])
@pytest.mark.parametrize("n,positions,lookup_lengths", [
    (5, (4,), (3, 6)),        # two lookups (encoder and decoder embeddings), tokens repeated
    (3, (), (2,)),            # a head on one vector per sample
    (4, (2, 3), (1,)),        # a head over a 2-D grid of positions
    (1, (5,), (7,)),          # one sample
    (0, (3,), (2,)),          # no sample
])
def test_sum_matches_the_per_sample_loop(n, positions, lookup_lengths, columns, kernel):
    # columns: the exact Fisher's, each with its own output gradient and rows' gradients
    torch.manual_seed(n + len(positions) + columns)
    V, d = 9, 7
    A = torch.randn(n, *positions, d, dtype=D)
    Gs = [torch.randn(n, *positions, V, dtype=D) for _ in range(columns)]
    lookups = []
    for L in lookup_lengths:
        idx = torch.randint(0, V, (n, L))
        if L > 1 and n:
            idx[:, 1] = idx[:, 0]  # a token twice in a sample: its rows add before squaring
        lookups.append((idx, [torch.randn(n, L, d, dtype=D) for _ in range(columns)]))
    extra = {} if kernel == "auto" else {"kernel": None}
    got = tied_head.head_and_rows_sq_sum(A, Gs, lookups, **extra)
    want = per_sample_loop(A, Gs, lookups, V)
    assert got.shape == (V, d)
    assert float((got - want).abs().max()) <= 1e-12 * max(float(want.abs().max()), 1.0)


@pytest.mark.parametrize("kernel", ["auto", None], ids=["kernel", "products"])
@pytest.mark.parametrize("scale", ["number", "per sample", "0-d"])
@pytest.mark.parametrize("positions", [(4,), ()], ids=str)
def test_a_scale_on_the_head_gradients_is_applied_where_they_are_read(scale, positions, kernel):
    # The tracker's factor (a mean loss's 1/N, each sample's share of a token mean, a scaler's
    # 1/scale) on the head's output gradients, given as scale=: the definition on the gradients
    # scaled beforehand, the lookups' rows carrying their factor already.
    torch.manual_seed(len(positions))
    n, V, d = 5, 9, 7
    A = torch.randn(n, *positions, d, dtype=D)
    G = torch.randn(n, *positions, V, dtype=D)
    idx = torch.randint(0, V, (n, 3))
    idx[:, 1] = idx[:, 0]
    rows = torch.randn(n, 3, d, dtype=D)
    s = {"number": 0.3, "per sample": torch.rand(n, dtype=D) + 0.5, "0-d": torch.tensor(0.7, dtype=D)}[scale]
    per = (s if isinstance(s, torch.Tensor) and s.dim() else torch.full((n,), float(s), dtype=D))
    scaled = G * per.view(-1, *[1] * (G.dim() - 1))
    extra = {} if kernel == "auto" else {"kernel": None}
    before = G.clone()
    got = tied_head.head_and_rows_sq_sum(A, [G], [(idx, [rows])], scale=s, **extra)
    want = per_sample_loop(A, [scaled], [(idx, [rows])], V)
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())
    assert torch.equal(G, before)  # read where it is, not scaled in place


def _spy_sum(monkeypatch) -> list:
    taken = []
    real = engine.head_and_rows_sq_sum

    def spy(*a, **k):
        taken.append(True)
        return real(*a, **k)

    monkeypatch.setattr(engine, "head_and_rows_sq_sum", spy)
    return taken


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_estimate_fisher_sums_a_tied_head_without_blocks(kind, monkeypatch):
    taken = _spy_sum(monkeypatch)
    torch.manual_seed(3)
    model = Tied().to(D)
    data = batches(torch.randint(0, 11, (7, 4)), torch.randint(0, 11, (7,)), batch_size=3)
    got, info = _run(model, data, kind=kind)
    assert taken and info.methods["emb.weight"] == "embedding+linear"
    assert_fisher_close(got, R.estimate_fisher(model, data, kind=kind), rtol=1e-10)


def test_a_scaled_embedding_subclass_tied_to_the_head(monkeypatch):
    # BART's and Gemma's case: the lookups come from replays of the subclass's own forward, the
    # padding row gets nothing; the exact Fisher's 11 columns share one replay per call, so it
    # replays no more often than the empirical Fisher.
    from fastewc.fisher import clear_plan_cache
    from fastewc.fisher.rules import embedding

    taken = _spy_sum(monkeypatch)
    replays = []
    real = embedding._replay
    monkeypatch.setattr(embedding, "_replay", lambda *a: replays.append(1) or real(*a))
    torch.manual_seed(4)
    model = OwnForwardLM(ScaledEmbedding(11, 6, padding_idx=0), True).to(D)
    ids = torch.randint(1, 11, (6, 5))
    ids[::2, -2:] = 0
    data = batches(ids, torch.randint(0, 11, (6,)), batch_size=3)
    count = {}
    for kind in ("empirical", "exact"):
        clear_plan_cache()
        replays.clear()
        got, info = _run(model, data, kind=kind)
        count[kind] = len(replays)
        assert taken and info.rules["emb"] == "embedding (own forward)"
        assert_fisher_close(got, R.estimate_fisher(model, data, kind=kind), rtol=1e-10)
    assert count["exact"] == count["empirical"] > 0, count


class TwoHeads(nn.Module):
    """A weight used by two Linear layers and an embedding: not the tied-head case (two dense uses)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.a = nn.Linear(6, 11, bias=False)
        self.b = nn.Linear(6, 11, bias=False)
        self.a.weight = self.b.weight = self.emb.weight

    def forward(self, x):
        h = self.emb(x).mean(1)
        return self.a(h) + self.b(torch.tanh(h))


def test_two_dense_uses_go_by_blocks(monkeypatch):
    taken = _spy_sum(monkeypatch)
    torch.manual_seed(5)
    model = TwoHeads().to(D)
    data = batches(torch.randint(0, 11, (6, 3)), torch.randint(0, 11, (6,)), batch_size=3)
    got, _ = _run(model, data)
    assert not taken
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_the_tracker_sums_a_tied_head_without_blocks(fraction, monkeypatch):
    # A training step with learning rate 0 over a tied model: the tracked Fisher takes the
    # tied-head sum and equals estimate_fisher over the same samples.
    from fastewc import FisherTracker, estimate_fisher
    from fastewc.fisher import tracked_step

    taken = []
    real = tracked_step.head_and_rows_sq_sum
    monkeypatch.setattr(tracked_step, "head_and_rows_sq_sum", lambda *a, **k: taken.append(True) or real(*a, **k))
    torch.manual_seed(6)
    model = Tied().to(D).eval()
    data = batches(torch.randint(0, 11, (8, 4)), torch.randint(0, 11, (8,)), batch_size=4)
    tracker = FisherTracker(model, fraction=fraction, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with tracker:
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    g = torch.Generator().manual_seed(2)
    k = int(4 * fraction)
    subset = data if fraction == 1.0 else [(x[i], y[i]) for x, y in data
                                            for i in [torch.randperm(len(y), generator=g)[:k].sort().values]]
    assert taken
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, subset), rtol=1e-10)
