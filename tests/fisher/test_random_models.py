"""Random models against the truth: every seeded model of tests/random_models.py (Linear, Conv1d/2d,
Embedding, LayerNorm, BatchNorm, GroupNorm, attention with the batch first or second, encoder
layers, a class token, a token broadcast or copied, a relative-position table gathered into an
attention mask, broadcast additions, tied and shared parameters, a parameter used twice, a
block on ``[T, B, d]`` with a mask, parameters joined and split, scores masked in place through a
view; the last three sometimes with a share of the output so small that their Fisher lies below
the probe's floor; a batch norm whose output becomes tokens into a residual; the batch folded
into rows sample by sample; layer outputs modified in place afterwards; a position table without
a batch axis added), in batches of 2,
3 or 4 of 5 samples (most end in a batch of one), float64, ``fastewc.estimate_fisher`` per tensor
against ``fastewc.reference.estimate_fisher``.

Each seed checks one kind (empirical, sampled, exact in turn) with ``method="auto"`` and one other
method (rules, vmap, loop in turn), so that every (kind, method) pair meets many models while the
file stays quick. The sampled kind draws with the same generator seed on both sides (the batched
draw gives the reference loop's labels on the CPU, tests/fisher/test_fisher_kinds.py)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastewc
from fastewc import EWCInputError, FisherTracker, check_tracking
from fastewc import reference as R

from random_models import Folded, InPlaceAfter, NormTokens, TableAdd, make_random

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

SEEDS = range(120)
KINDS = ["empirical", "sampled", "exact"]
OTHER = ["rules", "vmap", "loop"]
TOL = 1e-8  # float64: every engine is exact up to rounding


def relative_errors(got: dict, ref: dict) -> dict[str, float]:
    """Per tensor: the largest absolute error over the tensor's largest true entry, that entry
    floored at 1e-9 of the model's largest (an attention key bias has a Fisher of zero in theory,
    which rounding makes ~1e-30: relative to itself its error would be noise)."""
    assert set(got) == set(ref), f"names differ: extra {set(got) - set(ref)}, missing {set(ref) - set(got)}"
    largest = max(float(r.abs().max()) for r in ref.values() if r.numel())
    out = {}
    for name, r in ref.items():
        g = got[name].detach().double()
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        floor = max(float(r.abs().max()), 1e-9 * largest, 1e-300)
        out[name] = float((g - r.double()).abs().max()) / floor if r.numel() else 0.0
    return out


def test_relative_errors_flags_one_wrong_entry():
    ref = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64), "b": torch.tensor([0.0, 1e-12], dtype=torch.float64)}
    got = {"a": torch.tensor([1.0, 2.0 + 2e-7], dtype=torch.float64), "b": torch.tensor([0.0, 3e-12], dtype=torch.float64)}
    err = relative_errors(got, ref)
    assert err["a"] == pytest.approx(1e-7)
    assert err["b"] == pytest.approx(2e-12 / 2e-9)  # floored at 1e-9 of the largest entry (2.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_model_matches_reference(seed):
    model, data, desc = make_random(seed)
    kind = KINDS[seed % 3]
    params = {n: id(p) for n, p in model.named_parameters()}
    ref = R.estimate_fisher(model, data, kind=kind, generator=torch.Generator().manual_seed(seed))
    for method in ["auto", OTHER[(seed // 3) % 3]]:
        got, info = fastewc.estimate_fisher(model, data, kind=kind, method=method, return_info=True,
                                            generator=torch.Generator().manual_seed(seed))
        err = relative_errors(got, ref)
        bad = {n: f"{e:.2e}" for n, e in err.items() if not e <= TOL}
        assert not bad, f"seed {seed} ({desc}), kind {kind}, method {method}: {bad}\n{info.summary()}"
        # the model is left as it was: the same parameter objects under the same names
        assert {n: id(p) for n, p in model.named_parameters()} == params, f"seed {seed} ({desc}): {method} changed the model"


# -- the tracker ---------------------------------------------------------------------------------
TRACKED_SEEDS = range(120)
_WITH_RULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm,
               nn.Embedding, nn.MultiheadAttention)


def _train_tracked(model, data, tracker):
    with tracker:
        for x, y in data:
            model.zero_grad()
            out = model(x)
            (F.cross_entropy(out.flatten(0, 1), y.flatten()) if out.dim() == 3 else F.cross_entropy(out, y)).backward()
    return tracker


def test_random_models_tracked_match_reference():
    """``FisherTracker`` over the training steps of the random models (learning rate 0), against
    the reference loop on the same batches, every seed in one test so that the share the tracker
    takes is checked too. Its parameters: those of layers with rules and of attention modules
    (bare parameters used in a forward are refused by name). Refusals are allowed (named below
    on failure) but must stay few. Left out of the comparison: a batch norm whose output becomes
    tokens (:class:`random_models.NormTokens`) meeting a batch of one sample, where PyTorch's own
    backward of the training step is wrong (the reference works around it, the tracker rides the
    step's backward and changes nothing in it)."""
    refused, compared, folded, in_place, tables = {}, 0, 0, 0, 0
    for seed in TRACKED_SEEDS:
        model, data, desc = make_random(seed)
        ids = {id(p) for m in model.modules() if isinstance(m, _WITH_RULES) for p in m.parameters(recurse=False)}
        try:
            tracker = _train_tracked(model, data, FisherTracker(model, params=lambda n, p: id(p) in ids))
        except EWCInputError as e:
            refused[seed] = f"{desc}: {str(e)[:160]}"
            continue
        if any(isinstance(m, NormTokens) for m in model.modules()) and any(len(x) == 1 for x, _ in data):
            continue
        got = tracker.fisher()
        ref = R.estimate_fisher(model, data)
        err = relative_errors(got, {n: ref[n] for n in got})
        bad = {n: f"{e:.2e}" for n, e in err.items() if not e <= TOL}
        assert not bad, f"seed {seed} ({desc}): {bad}"
        compared += 1
        folded += any(isinstance(m, Folded) for m in model.modules())
        in_place += any(isinstance(m, InPlaceAfter) for m in model.modules())
        tables += any(isinstance(m, TableAdd) for m in model.modules())
    assert compared >= 0.6 * len(TRACKED_SEEDS) and min(folded, in_place, tables) >= 5, \
        (compared, folded, in_place, tables, refused)


# Seeds whose Folded block meets a first sample with rows all alike (which the tracker refuses to
# order), and a run of others.
CHECKED_SEEDS = [*range(40), 473, 584]


def test_random_models_every_parameter_checked_then_tracked_match_reference():
    """Every parameter (bare ones too), ``check_tracking`` on the first batch deciding what to
    leave out, then the tracker on the rest against the reference loop: left out only where the
    tracker cannot order a folded batch (seeds 473 and 584), exact everywhere else."""
    left = {}
    for seed in CHECKED_SEEDS:
        model, data, desc = make_random(seed)
        x, y = data[0]

        def step():
            out = model(x)
            return F.cross_entropy(out.flatten(0, 1), y.flatten()) if out.dim() == 3 else F.cross_entropy(out, y)

        check = check_tracking(model, step)
        if check.left_out:
            left[seed] = sorted(check.left_out)
            assert any(isinstance(m, Folded) for m in model.modules()), (seed, desc, str(check))
        if any(isinstance(m, NormTokens) for m in model.modules()) and any(len(x) == 1 for x, _ in data):
            continue  # PyTorch's own backward is wrong there (above)
        got = _train_tracked(model, data, FisherTracker(model, params=check.params)).fisher()
        ref = R.estimate_fisher(model, data)
        err = relative_errors(got, {n: ref[n] for n in check.params})
        bad = {n: f"{e:.2e}" for n, e in err.items() if not e <= TOL}
        assert not bad, f"seed {seed} ({desc}): {bad}"
    assert set(left) == {473, 584}, left
