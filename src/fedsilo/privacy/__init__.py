"""Differential privacy: sample-level DP-SGD on participants, user-level DP-FedAvg, and the
accounting behind both (see docs/privacy.md).

``userlevel`` and ``secret`` are pure (numpy, cryptography).  ``accounting`` wraps Opacus's
accountants, so importing it imports torch; ``engine`` and ``validate`` run DP-SGD.  The
names below are loaded on first use, so importing a pure submodule stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ACCOUNTANTS", "PrivacyAccountant", "noise_multiplier_for", "plan_steps"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("fedsilo.privacy.accounting"), name)
    raise AttributeError(f"module 'fedsilo.privacy' has no attribute {name!r}")
