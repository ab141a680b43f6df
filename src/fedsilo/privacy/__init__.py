"""Differential privacy: sample-level DP-SGD on participants, user-level DP-FedAvg, and the
accounting behind both (see docs/privacy.md).

``accounting`` is pure maths (no torch import of its own); ``engine`` and ``validate`` run
on the participants and need torch.
"""

from fedsilo.privacy.accounting import (ACCOUNTANTS, PrivacyAccountant, noise_multiplier_for,
                                        plan_steps)

__all__ = ["ACCOUNTANTS", "PrivacyAccountant", "noise_multiplier_for", "plan_steps"]
