"""Checks for chapter 06's exercises: each step's function run against the reference.

A check runs the student's function on fresh random inputs (edge cases included), compares it with
the course's reference implementation, and raises :class:`CheckFailed` (an ``AssertionError``)
naming the first thing that is wrong -- "unweighted average", "clipping after noise", "eviction by
count" -- without showing the reference code; it prints a one-line success message otherwise.
The exercises are the notebooks ``notebooks/06_exercises_*.ipynb`` (generated from
``solutions/``, see :mod:`labsupport.exercises`).

* :mod:`~labsupport.checks.fedavg` -- exercise 1, FedAvg from scratch on non-IID clients.
* :mod:`~labsupport.checks.hybrid` -- exercise 4, confidence routing with a cloud fallback.
* :mod:`~labsupport.checks.short` -- one short exercise each for chapters 01, 03, 04 and 05.
"""

from ._core import CheckFailed
from .fedavg import (
    check_client_update,
    check_convergence,
    check_fedavg_round,
    check_weighted_average,
)
from .hybrid import check_answer_with_fallback, check_choose_threshold, check_offload_mask
from .short import (
    check_distillation_loss,
    check_error_feedback,
    check_lru_cache,
    check_trimmed_mean,
)

__all__ = [
    "CheckFailed",
    "check_answer_with_fallback",
    "check_choose_threshold",
    "check_client_update",
    "check_convergence",
    "check_distillation_loss",
    "check_error_feedback",
    "check_fedavg_round",
    "check_lru_cache",
    "check_offload_mask",
    "check_trimmed_mean",
    "check_weighted_average",
]
