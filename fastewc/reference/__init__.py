"""The truth: the EWC algorithms of the original reference code, written plainly.

fastewc is a drop-in for a plain-PyTorch reference implementation of EWC (its names and
arguments are described in :mod:`fastewc.compat`). Everything in fastewc is tested and
benchmarked against the functions in this module, which do what that reference code does, in
the same way: Python loops over samples, tasks and parameters, one ``backward()`` per sample.
Nothing here is meant to be fast. The maths is written up in ``docs/design.md``.

Deliberate differences from the original code, each a bug there that the fast paths must not
copy:

* The Fisher loops put the model in ``eval()`` mode and restore every module's training flag
  afterwards. The original calls ``model.train()``, which makes dropout add noise to the Fisher
  and makes BatchNorm normalise a single sample by its own statistics (or raise, for BatchNorm1d).
* ``ReferenceOnlineEWC.register_task`` clones its inputs. The original stores the caller's dict
  and then adds into it in place, silently changing the caller's Fisher tensors.
* ``ReferenceOnlineEWC`` takes the Online-EWC decay ``gamma`` (Schwarz et al. 2018,
  ``F~ <- gamma * F~ + F_t``); ``gamma=1`` is the original's plain accumulation.
"""

from __future__ import annotations

from .fisher import (FISHER_KINDS, batch_fisher_estimation, compute_exact_fisher, compute_fisher, compute_true_fisher,
                     default_fisher_loss, estimate_fisher)
from .penalty import ReferenceEWC, ReferenceOnlineEWC, ewc_penalty_loop, layer_scales

__all__ = [
    "estimate_fisher",
    "compute_fisher",
    "compute_true_fisher",
    "compute_exact_fisher",
    "batch_fisher_estimation",
    "ewc_penalty_loop",
    "ReferenceEWC",
    "ReferenceOnlineEWC",
    "layer_scales",
    "FISHER_KINDS",
    "default_fisher_loss",
]
