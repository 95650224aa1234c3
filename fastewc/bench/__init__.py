"""``fastewc bench``: fastewc timed against the naive implementations on the user's hardware, on
the public API only: the penalty step against the reference loop and the ``torch._foreach``
baseline (:mod:`.penalty`), Fisher estimation against the per-sample loop (:mod:`.fisher`), with
the models (:mod:`.models`), side-by-side timing (:mod:`.timing`) and hand-written baselines
(:mod:`.baselines`) they use. A user feature (it ships in the wheel); nothing in
:mod:`fastewc.fisher` or :mod:`fastewc.penalty` imports it. Other libraries' adapters, the scale
curves and the figures live in the repository's ``benchmarks/``."""

from .device import BenchSizeError, check_fits, resolve_device
from .fisher import fisher_benchmark, format_fisher
from .penalty import FLOOR_BYTES_PER_PARAM, format_penalty, penalty_benchmark

__all__ = ["penalty_benchmark", "fisher_benchmark", "format_penalty", "format_fisher",
           "resolve_device", "check_fits", "BenchSizeError", "FLOOR_BYTES_PER_PARAM"]
