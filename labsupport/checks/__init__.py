"""Checks for chapter 06's exercises: each step's function run against the reference.

A check runs the student's function on fresh random inputs (edge cases included), compares it with
the course's reference implementation, and raises :class:`CheckFailed` (an ``AssertionError``)
naming the first thing that is wrong -- "unweighted average", "clipping after noise", "eviction by
count" -- without showing the reference code; it prints a one-line success message otherwise.
The exercises are the notebooks ``notebooks/06_exercises_*.ipynb`` (generated from
``solutions/``, see :mod:`labsupport.exercises`).

* :mod:`~labsupport.checks.fedavg` -- exercise 1, FedAvg from scratch on non-IID clients.
* :mod:`~labsupport.checks.dpsgd` -- exercise 2, DP-SGD and the privacy-utility trade-off.
* :mod:`~labsupport.checks.edge` -- exercise 3, quantize, export and measure on the local CPU.
* :mod:`~labsupport.checks.hybrid` -- exercise 4, confidence routing with a cloud fallback.
* :mod:`~labsupport.checks.short` -- one short exercise each for chapters 01 to 05.
* :mod:`~labsupport.checks.capstones` -- capstone 1, cross-silo FL for hospitals (DP, SecAgg,
  FedProx, a privacy audit); capstone 2, a one-thread IoT device with a cloud fallback.
"""

from ._core import CheckFailed
from .capstones import (
    check_deployment_report,
    check_distill,
    check_export_int8,
    check_hospital_clients,
    check_privacy_audit,
    check_private_secure_transforms,
)
from .dpsgd import (
    check_clip_and_sum,
    check_dp_gradient,
    check_epsilon_spent,
    check_poisson_batch,
    check_privacy_utility,
)
from .edge import (
    check_calibration_reader,
    check_evaluate_deployment,
    check_latency_ms,
    check_make_session,
    check_model_size,
)
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
    check_pairwise_masks,
    check_trimmed_mean,
)

__all__ = [
    "CheckFailed",
    "check_answer_with_fallback",
    "check_calibration_reader",
    "check_choose_threshold",
    "check_client_update",
    "check_clip_and_sum",
    "check_convergence",
    "check_deployment_report",
    "check_distill",
    "check_distillation_loss",
    "check_dp_gradient",
    "check_epsilon_spent",
    "check_error_feedback",
    "check_evaluate_deployment",
    "check_export_int8",
    "check_fedavg_round",
    "check_hospital_clients",
    "check_latency_ms",
    "check_lru_cache",
    "check_make_session",
    "check_model_size",
    "check_offload_mask",
    "check_pairwise_masks",
    "check_poisson_batch",
    "check_privacy_audit",
    "check_privacy_utility",
    "check_private_secure_transforms",
    "check_trimmed_mean",
    "check_weighted_average",
]
