"""Chapter 02: privacy. What one shared gradient leaks, DP-SGD, accounting, and user-level DP for FL.

* :mod:`~labsupport.privacy.leakage` -- gradient inversion (DLG / Inverting Gradients) and membership
  inference (loss threshold, LiRA), the attacks DP is measured against;
* :mod:`~labsupport.privacy.dpsgd` -- DP-SGD (Abadi et al. 2016): the naive batch-clipping
  counter-example, our own per-example ``torch.func`` version, and Opacus's;
* :mod:`~labsupport.privacy.accounting` -- ε from RDP, PRV and PLD accountants, the :class:`Epsilon`
  result type and the :class:`PrivacyLedger` budget;
* :mod:`~labsupport.privacy.dpfedavg` -- DP-FedAvg (McMahan et al. 2018) as update transforms.
"""

from . import accounting, dpfedavg, dpsgd, leakage
from .accounting import (
    BudgetExceeded,
    Epsilon,
    PrivacyLedger,
    calibrate_noise,
    compare_accountants,
    compute_epsilon,
    naive_epsilon,
)
from .dpsgd import DPSGD, dp_sgd_client, per_sample_grads, train_dp_sgd

__all__ = [
    "DPSGD",
    "BudgetExceeded",
    "Epsilon",
    "PrivacyLedger",
    "accounting",
    "calibrate_noise",
    "compare_accountants",
    "compute_epsilon",
    "dp_sgd_client",
    "dpfedavg",
    "dpsgd",
    "leakage",
    "naive_epsilon",
    "per_sample_grads",
    "train_dp_sgd",
]
