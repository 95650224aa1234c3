"""nn.LSTM, nn.GRU and nn.RNN by their batched recomputation (fastewc/fisher/rules/rnn.py), in
float64 against the per-sample reference loop: every layout, depth, direction, bias, projection,
initial state, packed input and output the loss reads; the FisherTracker on an LSTM; and the
replay itself against per-sample autograd, sample by sample."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastewc
from fastewc import EWCInputError, FisherTracker
from fastewc import reference as R
from fastewc.fisher.rules.local import record
from fastewc.fisher.rules.rnn import rnn_blocks, rnn_record

D = torch.float64
FEATURES, HIDDEN, CLASSES = 3, 5, 3


class Recurrent(nn.Module):
    """Batches ``[B, T, FEATURES]`` (zeros past a sample's length when ``packed``) through one
    recurrent layer to logits. ``use``: which outputs the logits read: ``o`` (the sequence
    output), ``h`` (``h_n``), ``c`` (LSTM's ``c_n``). ``hx``: an initial state computed from the
    sample's first step. ``packed``: "sorted" or "unsorted" packs the batch by its lengths."""

    def __init__(self, cell, *, batch_first=True, use="o", hx=False, packed=None, **kw):
        super().__init__()
        self.rnn = cell(FEATURES, HIDDEN, batch_first=batch_first, **kw).to(D)
        self.use, self.hx, self.packed = use, hx, packed
        dirs = 2 if self.rnn.bidirectional else 1
        self.states = self.rnn.num_layers * dirs
        self.size = getattr(self.rnn, "proj_size", 0) or HIDDEN
        self.h0 = nn.Linear(FEATURES, self.states * self.size, dtype=D)
        self.c0 = nn.Linear(FEATURES, self.states * HIDDEN, dtype=D)
        self.from_out = nn.Linear(dirs * self.size, CLASSES, dtype=D)
        self.from_h = nn.Linear(self.size, CLASSES, dtype=D)
        self.from_c = nn.Linear(HIDDEN, CLASSES, dtype=D)

    def _initial(self, x):
        if not self.hx:
            return None
        # [layers x directions, B, size], as the module takes it whatever batch_first says
        h0 = torch.tanh(self.h0(x[:, 0])).unflatten(1, (self.states, self.size)).transpose(0, 1)
        if not isinstance(self.rnn, nn.LSTM):
            return h0
        c0 = self.c0(x[:, 0]).unflatten(1, (self.states, HIDDEN)).transpose(0, 1)
        return h0, c0

    def forward(self, x):
        bf = self.rnn.batch_first
        seq = x if bf else x.transpose(0, 1)
        if self.packed:
            lengths = (x != 0).any(-1).sum(1).cpu()
            seq = pack_padded_sequence(seq, lengths, batch_first=bf, enforce_sorted=self.packed == "sorted")
        out, last = self.rnn(seq, self._initial(x))
        if self.packed:
            out = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]
        elif not bf:
            out = out.transpose(0, 1)
        h_n, c_n = last if isinstance(last, tuple) else (last, None)
        z = torch.zeros(x.shape[0], CLASSES, dtype=D)
        if "o" in self.use:
            z = z + self.from_out(out.mean(1) + out[:, -1])
        if "h" in self.use:
            z = z + self.from_h(h_n[-1]) + h_n.square().sum((0, 2))[:, None]
        if "c" in self.use:
            z = z + self.from_c(c_n.sin().sum(0))
        return z


def _data(n=5, steps=4, packed=False, sizes=(3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, steps, FEATURES, generator=g, dtype=D)
    if packed:
        lengths = torch.randint(1, steps + 1, (n,), generator=g)
        lengths[0] = steps
        if packed == "sorted":
            lengths = lengths.sort(descending=True).values
        for b in range(n):
            x[b, lengths[b]:] = 0
    y = torch.randint(0, CLASSES, (n,), generator=g)
    out, i = [], 0
    for s in sizes:
        out.append((x[i:i + s], y[i:i + s]))
        i += s
    assert i == n
    return out


def _max_rel_errors(got, ref):
    assert set(got) == set(ref)
    return {k: float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-300)) for k in ref}


# id -> (cell, model options, data options); batch_first=False feeds the module [T, B, F].
CONFIGS = {
    "lstm-output": (nn.LSTM, dict(use="o"), {}),
    "lstm-h_n-only-time-major": (nn.LSTM, dict(use="h", batch_first=False), {}),
    "lstm-c_n-only": (nn.LSTM, dict(use="c"), {}),
    "lstm-2-layers-bidirectional-hx-time-major": (
        nn.LSTM, dict(use="ohc", batch_first=False, hx=True, num_layers=2, bidirectional=True), {}),
    "lstm-proj-2-layers-bidirectional-hx": (
        nn.LSTM, dict(use="ohc", hx=True, num_layers=2, bidirectional=True, proj_size=2), {}),
    "lstm-no-bias": (nn.LSTM, dict(use="oh", bias=False), {}),
    "lstm-packed-unsorted-bidirectional-proj": (
        nn.LSTM, dict(use="ohc", hx=True, num_layers=2, bidirectional=True, proj_size=2, packed="unsorted"),
        dict(packed="unsorted")),
    # T == batch size == layers x directions == the probe's sample count: a mix-up of axes would pass
    # unnoticed on sizes, not on the values
    "lstm-time-major-T-equals-batch": (
        nn.LSTM, dict(use="oh", batch_first=False, bidirectional=True, hx=True), dict(n=4, steps=2, sizes=(2, 2))),
    "gru-2-layers-bidirectional-time-major": (
        nn.GRU, dict(use="oh", batch_first=False, num_layers=2, bidirectional=True), {}),
    "gru-hx-no-bias": (nn.GRU, dict(use="oh", hx=True, bias=False), {}),
    "gru-packed-sorted-time-major": (
        nn.GRU, dict(use="oh", batch_first=False, bidirectional=True, packed="sorted"), dict(packed="sorted")),
    "rnn-tanh-h_n-only": (nn.RNN, dict(use="h", hx=True), {}),
    "rnn-relu-2-layers-bidirectional-time-major": (
        nn.RNN, dict(use="oh", batch_first=False, num_layers=2, bidirectional=True, nonlinearity="relu"),
        dict(n=4, steps=2, sizes=(2, 2))),
}


@pytest.mark.parametrize("kind", ["empirical", "sampled", "exact"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_every_recurrent_weight_by_the_rule(config, kind):
    cell, options, data_options = CONFIGS[config]
    torch.manual_seed(5)
    model = Recurrent(cell, **options).eval()
    data = _data(**data_options)
    gen = (lambda: torch.Generator().manual_seed(2)) if kind == "sampled" else (lambda: None)
    ref = R.estimate_fisher(model, data, kind=kind, generator=gen())
    got, info = fastewc.estimate_fisher(model, data, kind=kind, generator=gen(), return_info=True)
    assert not info.vmap_params and not info.loop_params, info.reasons
    assert all(info.methods[f"rnn.{a}"] == "module-local" for a, _ in model.rnn.named_parameters())
    errors = _max_rel_errors(got, ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-10, (worst, errors[worst])


# -- the tracker ----------------------------------------------------------------------------------
class Classifier(nn.Module):
    """A two-layer bidirectional LSTM fed time-major (samples on axis 1), or packed by lengths."""

    def __init__(self, packed=False):
        super().__init__()
        self.rnn = nn.LSTM(FEATURES, HIDDEN, num_layers=2, bidirectional=True, dropout=0.3, dtype=D)
        self.head = nn.Linear(2 * HIDDEN, CLASSES, dtype=D)
        self.packed = packed

    def forward(self, x):
        if self.packed:
            lengths = (x != 0).any(-1).sum(1).cpu()
            _, (h_n, _) = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            return self.head(torch.cat([h_n[-2], h_n[-1]], -1))
        out, _ = self.rnn(x.transpose(0, 1))
        return self.head(out[-1])


@pytest.mark.parametrize("packed", [False, True], ids=["time-major", "packed"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_tracker_on_an_lstm_equals_estimate_fisher(fraction, packed):
    torch.manual_seed(0)
    model = Classifier(packed).eval()  # eval mode: the dropout between layers is off
    data = _data(n=8, steps=3, sizes=(4, 4), packed="unsorted" if packed else False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tracker = FisherTracker(model, fraction=fraction, seed=3)
    with tracker:
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    subset = data
    if fraction < 1:
        g = torch.Generator().manual_seed(3)
        subset = [(x[i], y[i]) for x, y in data for i in [torch.randperm(len(y), generator=g)[:2].sort().values]]
    assert tracker.samples_seen == sum(len(y) for _, y in subset)
    errors = _max_rel_errors(tracker.fisher(), fastewc.estimate_fisher(model, subset, kind="empirical"))
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-10, (worst, errors[worst])


def test_tracker_refuses_dropout_between_layers_in_training():
    model = Classifier().train()
    x, y = _data(n=4, steps=3, sizes=(4,))[0]
    with FisherTracker(model), pytest.raises(EWCInputError, match=r"rnn\) is active"):
        F.cross_entropy(model(x), y).backward()


# -- the replay itself ----------------------------------------------------------------------------
def _per_sample_truth(module, x, states, grads_out, batch_first):
    """Each sample alone through the module, autograd of its outputs against its slice of the
    output gradients (samples first): ``{name: [n, *shape]}``."""
    names = [a for a, _ in module.named_parameters()]
    rows = {a: [] for a in names}
    for s in range(x.shape[0]):
        xs = x[s:s + 1] if batch_first else x[s:s + 1].transpose(0, 1)
        hx = None
        if states:
            one = [h[s:s + 1].transpose(0, 1).contiguous() for h in states]
            hx = tuple(one) if isinstance(module, nn.LSTM) else one[0]
        out, last = module(xs, hx)
        outs = [out if batch_first else out.transpose(0, 1)] + [t.transpose(0, 1) for t in
                                                                 (last if isinstance(last, tuple) else (last,))]
        got = torch.autograd.grad(outs, list(module.parameters()), [g[s:s + 1] for g in grads_out])
        for a, t in zip(names, got):
            rows[a].append(t)
    return {a: torch.stack(v) for a, v in rows.items()}


@pytest.mark.parametrize("cell,options", [
    (nn.LSTM, dict(num_layers=2, bidirectional=True, proj_size=3)),
    (nn.LSTM, dict(batch_first=False, bias=False)),
    (nn.GRU, dict(num_layers=3, bidirectional=True, batch_first=False)),
    (nn.RNN, dict(num_layers=2, nonlinearity="relu")),
], ids=["lstm-proj", "lstm-time-major-no-bias", "gru-3-layers", "rnn-relu"])
@pytest.mark.parametrize("n,i,j", [(7, 2, 5), (1, 0, 1), (7, 6, 7)], ids=["middle", "one-sample", "last"])
def test_replay_equals_per_sample_autograd(cell, options, n, i, j):
    torch.manual_seed(1)
    module = cell(3, 7, dtype=D, **{"batch_first": True, **options})
    batch_first = module.batch_first
    steps, states = 6, module.num_layers * (2 if module.bidirectional else 1)
    x = torch.randn(n, steps, 3, dtype=D)
    size = getattr(module, "proj_size", 0) or 7
    initial = [torch.randn(n, states, size, dtype=D)]  # samples first, as the truth below takes them
    if cell is nn.LSTM:
        initial.append(torch.randn(n, states, 7, dtype=D))
    hx = tuple(h.transpose(0, 1) for h in initial)
    hx = hx if cell is nn.LSTM else hx[0]
    call_x = x if batch_first else x.transpose(0, 1)
    output = module(call_x, hx)
    rec, _ = rnn_record(module, (call_x, hx), {}, output, n)
    grads = [torch.randn_like(t) for t in rec.outputs]
    names = [a for a, _ in module.named_parameters()]
    got = rnn_blocks(module, names, rec, grads, i, j)
    truth = _per_sample_truth(module, x, initial, grads, batch_first)
    assert set(got) == set(names)
    for a in names:
        assert got[a].shape == (j - i, *module.get_parameter(a).shape)
        torch.testing.assert_close(got[a], truth[a][i:j], rtol=1e-10, atol=1e-12)
    # a subset of the weights gives just those
    assert set(rnn_blocks(module, names[1:2], rec, grads, i, j)) == {names[1]}


def test_packed_replay_equals_each_sample_alone():
    torch.manual_seed(2)
    module = nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=D)
    lengths = torch.tensor([2, 5, 1, 5, 3])
    padded = torch.randn(5, 5, 3, dtype=D)
    packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
    output = module(packed)
    rec, _ = rnn_record(module, (packed,), {}, output, 5)
    grads = [torch.randn_like(t) for t in rec.outputs]
    grads[0] = grads[0] * (torch.arange(5)[None, :] < lengths[:, None])[..., None]  # nothing past a length
    names = [a for a, _ in module.named_parameters()]
    got = rnn_blocks(module, names, rec, grads, 1, 4)
    for s in range(1, 4):
        out, (h_n, c_n) = module(padded[s:s + 1, :lengths[s]].transpose(0, 1))
        truth = torch.autograd.grad([out.transpose(0, 1), h_n.transpose(0, 1), c_n.transpose(0, 1)],
                                    list(module.parameters()),
                                    [grads[0][s:s + 1, :lengths[s]], grads[1][s:s + 1], grads[2][s:s + 1]])
        for a, t in zip(names, truth):
            torch.testing.assert_close(got[a][s - 1], t, rtol=1e-10, atol=1e-12)


# -- what the rule leaves to the generic path -----------------------------------------------------
class Subclassed(nn.LSTM):
    pass


@pytest.mark.parametrize("case", ["unbatched", "dropout-in-training", "subclass", "parametrized", "autocast"])
def test_uncovered_calls_get_the_generic_record(case):
    module = nn.LSTM(3, 4, num_layers=2, dtype=D).eval()
    x = torch.randn(5, 2, 3, dtype=D)  # [T, B, F]
    n = 2
    if case == "unbatched":
        x, n = x[:, 0], 5
    elif case == "dropout-in-training":
        module = nn.LSTM(3, 4, num_layers=2, dropout=0.5, dtype=D).train()
    elif case == "subclass":
        module = Subclassed(3, 4, dtype=D)
    elif case == "parametrized":
        module = nn.utils.parametrizations.weight_norm(module, "weight_hh_l0")
    if case == "autocast":  # computed in bfloat16 from float32 weights: a float32 replay would differ
        module, x = module.float(), x.float()
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = module(x)
        except RuntimeError as e:  # oneDNN has no bfloat16 LSTM on some CPUs: torch itself cannot run it
            pytest.skip(f"torch cannot run a bfloat16 LSTM on this CPU ({str(e)[:80]})")
        assert output[0].dtype == torch.bfloat16
    else:
        output = module(x)
    assert rnn_record(module, (x,), {}, output, n) is None
    # and the replay declines a generic record instead of misreading it
    generic = record((x,), {}, output, n)
    assert rnn_blocks(module, ["weight_ih_l0"], generic, [torch.zeros_like(t) for t in generic.outputs], 0, 1) is None


def test_a_batch_first_false_call_is_recorded_samples_first():
    """The batch axis comes from the module, not from a size: with T == n the record must still
    take the samples from axis 1 of the input and output, and from axis 1 of h_n / c_n."""
    module = nn.LSTM(3, 4, bidirectional=True, dtype=D)  # h_n: [2, n, 4]
    x = torch.randn(2, 2, 3, dtype=D)  # [T=2, n=2, F]
    output = module(x)
    rec, to_module = rnn_record(module, (x,), {}, output, 2)
    out, (h_n, c_n) = output
    assert torch.equal(rec.leaves[1], x.transpose(0, 1))
    assert [torch.equal(a, b.transpose(0, 1)) for a, b in zip(rec.outputs, (out, h_n, c_n))] == [True] * 3
    assert torch.equal(to_module(0, rec.outputs[0]), out) and torch.equal(to_module(2, rec.outputs[2]), c_n)
