"""``fastewc bench``: the benchmark models, side-by-side timing, and the baselines it times
fastewc against. A user feature (it ships in the wheel); nothing in :mod:`fastewc.fisher` or
:mod:`fastewc.penalty` imports it."""

from .run import (
    FLOOR_BYTES_PER_PARAM, BenchSizeError, check_fits, fisher_benchmark, format_fisher, format_penalty,
    penalty_benchmark, plot_bench, resolve_device,
)

__all__ = ["penalty_benchmark", "fisher_benchmark", "format_penalty", "format_fisher", "plot_bench",
           "resolve_device", "check_fits", "BenchSizeError", "FLOOR_BYTES_PER_PARAM"]
