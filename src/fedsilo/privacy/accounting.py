"""Privacy accounting: ε of a sequence of subsampled Gaussian mechanisms, and σ for a target ε.

Thin, stateful wrappers over Opacus's accountants (``opacus.accountants``): RDP (Mironov
2017; Mironov, Talwar & Zhang 2019), PRV (Gopi, Lee & Wutschitz 2021) and GDP (Dong, Roth &
Su 2019).  The state of an accountant is its *history*, a list of
``(noise_multiplier, sample_rate, num_steps)`` triples, kept as plain floats and ints so it
can sit in a participant checkpoint that ``torch.load(weights_only=True)`` reads back.

>>> acc = PrivacyAccountant("rdp")
>>> acc.spend(noise_multiplier=1.1, sample_rate=0.01, num_steps=1000)
>>> round(acc.epsilon(delta=1e-5), 2)
1.71
>>> acc.epsilon_after(noise_multiplier=1.1, sample_rate=0.01, num_steps=1000, delta=1e-5) > 1.71
True
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedsilo.errors import CheckpointError, PrivacyBudgetError
from fedsilo.registry import Registry

#: accountant names users may choose (``dp.accountant``); the values are Opacus's names
ACCOUNTANTS: Registry[str] = Registry("accountant")
for _name in ("rdp", "prv", "gdp"):
    ACCOUNTANTS.register(_name)(_name)


class PrivacyAccountant:
    """The privacy spent by one participant (or by the federation, for user-level DP)."""

    def __init__(self, mechanism: str = "rdp") -> None:
        self.mechanism = ACCOUNTANTS.get(mechanism)
        self.history: list[tuple[float, float, int]] = []

    def spend(self, *, noise_multiplier: float, sample_rate: float, num_steps: int) -> None:
        """Record ``num_steps`` steps of the subsampled Gaussian mechanism."""
        if num_steps <= 0:
            return
        entry = (float(noise_multiplier), float(sample_rate))
        if self.history and self.history[-1][:2] == entry:
            self.history[-1] = (*entry, self.history[-1][2] + int(num_steps))
        else:
            self.history.append((*entry, int(num_steps)))

    def epsilon(self, *, delta: float) -> float:
        """ε spent so far at ``delta`` (0 before the first step)."""
        return _epsilon(self.mechanism, self.history, delta)

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, num_steps: int,
                      delta: float) -> float:
        """ε this accountant would report after ``num_steps`` more steps (it is not changed)."""
        trial = PrivacyAccountant(self.mechanism)
        trial.history = list(self.history)
        trial.spend(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                    num_steps=num_steps)
        return trial.epsilon(delta=delta)

    @property
    def num_steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def state_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism,
                "history": [[s, q, n] for s, q, n in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("mechanism") != self.mechanism:
            raise CheckpointError(f"the checkpoint's privacy accountant is "
                                  f"{state.get('mechanism')!r}, the run uses {self.mechanism!r}")
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]


def _epsilon(mechanism: str, history: list[tuple[float, float, int]], delta: float) -> float:
    if not history:
        return 0.0
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def plan_steps(*, num_samples: int, batch_size: int, epochs: int, max_steps: int | None,
               rounds: int) -> tuple[float, int, int]:
    """(sample rate q, DP-SGD steps per round, steps over the job) of one participant.

    Poisson sampling draws each sample with probability q = B/N per step, and an "epoch" is
    ⌈N/B⌉ steps, as with Opacus's ``DPDataLoader``.

    >>> plan_steps(num_samples=1000, batch_size=64, epochs=2, max_steps=None, rounds=5)
    (0.064, 32, 160)
    """
    if num_samples < 1:
        raise PrivacyBudgetError("DP-SGD needs at least one training sample")
    sample_rate = min(1.0, batch_size / num_samples)
    per_round = epochs * math.ceil(num_samples / batch_size)
    if max_steps is not None:
        per_round = min(per_round, max_steps)
    return sample_rate, per_round, per_round * rounds


def noise_multiplier_for(*, target_epsilon: float, delta: float, sample_rate: float,
                         num_steps: int, mechanism: str = "rdp") -> float:
    """The smallest σ (to 0.01 in ε) that keeps ``num_steps`` steps at rate q within ε.

    >>> sigma = noise_multiplier_for(target_epsilon=8, delta=1e-5, sample_rate=0.064,
    ...                              num_steps=160)
    >>> acc = PrivacyAccountant("rdp")
    >>> acc.spend(noise_multiplier=sigma, sample_rate=0.064, num_steps=160)
    >>> 7.9 < acc.epsilon(delta=1e-5) <= 8
    True
    """
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=num_steps,
                                          accountant=ACCOUNTANTS.get(mechanism)))
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise PrivacyBudgetError(
            f"no noise multiplier reaches ε = {target_epsilon} at δ = {delta} over {num_steps} "
            f"steps at sampling rate {sample_rate:.4g} ({exc}); raise the budget or train "
            f"fewer steps") from None
