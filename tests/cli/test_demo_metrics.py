"""Continual-learning summaries on hand-made accuracy matrices."""

import pytest

from fastewc.demo import average_accuracy, average_forgetting
from fastewc.demo.run import sweep_score

# R[t][s]: accuracy on task s after training task t.
R = [
    [0.90, 0.10, 0.20],
    [0.60, 0.80, 0.15],
    [0.30, 0.70, 0.95],
]


def test_average_accuracy_is_the_last_row_mean():
    assert average_accuracy(R) == pytest.approx((0.30 + 0.70 + 0.95) / 3)


def test_forgetting_uses_the_best_earlier_accuracy():
    # task 0: best 0.90 (after task 0) -> 0.30 = 0.60; task 1: best 0.80 -> 0.70 = 0.10
    assert average_forgetting(R) == pytest.approx((0.60 + 0.10) / 2)


def test_forgetting_peak_after_later_task_and_backward_transfer():
    m = [[0.5, 0.0], [0.7, 0.9]]  # task 0 improved while learning task 1: negative forgetting kept
    assert average_forgetting(m) == pytest.approx(0.5 - 0.7)
    m3 = [[0.5, 0, 0], [0.8, 0.9, 0], [0.6, 0.9, 1.0]]  # best of task 0 came after task 1
    assert average_forgetting(m3) == pytest.approx(((0.8 - 0.6) + (0.9 - 0.9)) / 2)


def test_single_task_and_bad_shapes():
    assert average_forgetting([[0.7]]) == 0.0
    assert average_accuracy([[0.7]]) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="T x T"):
        average_accuracy([[0.1, 0.2]])
    with pytest.raises(ValueError, match="T x T"):
        average_forgetting([])


def test_sweep_score_is_the_seed_criterion():
    assert sweep_score(R) == pytest.approx(0.95 + (0.30 + 0.70) / 2)
