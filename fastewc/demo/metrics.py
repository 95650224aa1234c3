"""Summaries of a continual-learning accuracy matrix.

``R[t][s]`` is the accuracy on task ``s`` after training on tasks ``0..t`` (T x T, values in
[0, 1]); only the lower triangle and the last row are needed.
"""

from __future__ import annotations

from typing import Sequence


def _square(matrix: Sequence[Sequence[float]]) -> list[list[float]]:
    rows = [list(map(float, r)) for r in matrix]
    if not rows or any(len(r) != len(rows) for r in rows):
        shape = f"{len(rows)} rows of lengths {[len(r) for r in rows]}"
        raise ValueError(f"accuracy matrix must be T x T with T >= 1; got {shape}")
    return rows


def average_accuracy(matrix: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over all tasks after the last one: ``mean_s R[T-1][s]``."""
    rows = _square(matrix)
    return sum(rows[-1]) / len(rows)


def average_forgetting(matrix: Sequence[Sequence[float]]) -> float:
    """Mean over the first T-1 tasks of the best accuracy ever reached minus the final one.

    ``f_s = max_{t < T-1} R[t][s] - R[T-1][s]`` for ``s < T-1`` (Chaudhry et al., 2018), averaged;
    0.0 for a single task. Negative values (backward transfer) are kept, not clipped.
    """
    rows = _square(matrix)
    T = len(rows)
    if T == 1:
        return 0.0
    drops = [max(rows[t][s] for t in range(s, T - 1)) - rows[-1][s] for s in range(T - 1)]
    return sum(drops) / len(drops)
