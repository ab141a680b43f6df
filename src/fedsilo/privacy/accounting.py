"""Privacy accounting: ε of a sequence of subsampled Gaussian mechanisms, and σ for a target ε.

Thin, stateful wrappers over Opacus's accountants (``opacus.accountants``): RDP (Mironov
2017; Mironov, Talwar & Zhang 2019), PRV (Gopi, Lee & Wutschitz 2021) and GDP (Dong, Roth &
Su 2019).  The state of an accountant is its *history*, a list of
``(noise_multiplier, sample_rate, num_steps)`` triples, kept as plain floats and ints so it
can sit in a participant checkpoint that ``torch.load(weights_only=True)`` reads back.

GDP is composed here over the whole history (Opacus's ``GaussianAccountant`` reads only its
last entry).  It remains a CLT approximation that can under-report ε, so the configuration
accepts it for reporting only, never to enforce a budget.  PRV's ε is RDP's where PRV's grid
would be too large to compute in seconds (_PRV_MAX_POINTS: ε in the hundreds, or far over
10⁶ steps).  The σ search is fedsilo's own, bounded one (Opacus's ``get_noise_multiplier``
does not end for very large targets).

>>> acc = PrivacyAccountant("rdp")
>>> acc.spend(noise_multiplier=1.1, sample_rate=0.01, num_steps=1000)
>>> round(acc.epsilon(delta=1e-5), 2)
1.71
>>> acc.epsilon_after(noise_multiplier=1.1, sample_rate=0.01, num_steps=1000, delta=1e-5) > 1.71
True
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.analysis.gdp import compute_mu_poisson, delta_eps_mu, eps_from_mu
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

from fedsilo.config import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER
from fedsilo.errors import CheckpointError, PrivacyBudgetError
from fedsilo.registry import Registry

#: accountant names users may choose (``dp.accountant``); the values are Opacus's names
ACCOUNTANTS: Registry[str] = Registry("accountant")
for _name in ("rdp", "prv", "gdp"):
    ACCOUNTANTS.register(_name)(_name)

#: the σ search stops once ε is this close below the target (as Opacus's get_noise_multiplier)
EPSILON_TOLERANCE = 0.01
#: the σ search starts here, then doubles or halves within [MIN, MAX]_NOISE_MULTIPLIER (at
#: most 14 steps up or 7 down) and bisects geometrically, at most this many times
_SEARCH_START, _MAX_BISECTIONS = 1.0, 60
#: Opacus's eps_from_mu solves for ε in [0, 500]; GDP ε beyond is reported as infinite
_GDP_MAX_EPSILON = 500.0
#: what Opacus's accountants raise for a σ they cannot evaluate (tiny σ: overflow, PRV's
#: discretisation fails or asks numpy for petabytes); the search treats such σ as too small
_UNEVALUABLE = (ValueError, ArithmeticError, RuntimeError, MemoryError)
#: PRV's cost is about 1 µs per point of its grid, which grows with ε·sqrt(steps) (ε = 1e4
#: over 240 steps: 1e8 points, minutes; at σ → 0 numpy is asked for petabytes).  Past this
#: many points (~10 s; ε ≈ 8 over 10⁶ steps needs 9e6) ε is RDP's, also a sound upper bound
_PRV_MAX_POINTS = 1e7


class PrivacyAccountant:
    """The privacy spent by one participant (or by the federation, for user-level DP)."""

    def __init__(self, mechanism: str = "rdp") -> None:
        self.mechanism = ACCOUNTANTS.get(mechanism)
        self.history: list[tuple[float, float, int]] = []

    def spend(self, *, noise_multiplier: float, sample_rate: float, num_steps: int) -> None:
        """Record ``num_steps`` steps of the subsampled Gaussian mechanism."""
        if num_steps <= 0:
            return
        if not (0 < noise_multiplier < math.inf and 0 < sample_rate <= 1):
            # an infinite σ would make Opacus's RDP series loop forever at the next epsilon()
            raise ValueError(f"spend needs a finite noise_multiplier > 0 and a sample_rate in "
                             f"(0, 1], got {noise_multiplier!r} and {sample_rate!r}")
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
        return self._after(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                           num_steps=num_steps).epsilon(delta=delta)

    def _after(self, *, noise_multiplier: float, sample_rate: float,
               num_steps: int) -> PrivacyAccountant:
        trial = PrivacyAccountant(self.mechanism)
        trial.history = list(self.history)
        trial.spend(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                    num_steps=num_steps)
        return trial

    @property
    def num_steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def state_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism,
                "history": [[s, q, n] for s, q, n in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise CheckpointError("the checkpoint's privacy accountant is not an object")
        if state.get("mechanism") != self.mechanism:
            raise CheckpointError(f"the checkpoint's privacy accountant is "
                                  f"{state.get('mechanism')!r}, the run uses {self.mechanism!r}")
        self.history = read_history(state.get("history"))


#: a saved history longer than this is not one fedsilo wrote (one segment per σ change)
_MAX_SEGMENTS = 1_000_000


def read_history(saved: Any) -> list[tuple[float, float, int]]:
    """A saved accountant history, checked: a list of [σ, q, steps] with σ > 0 finite,
    0 < q <= 1 and 0 <= steps < 2^53 (a damaged or edited entry would misstate ε: σ = inf
    or steps < 0 would spend less than was spent).

    >>> read_history([[1.1, 0.01, 20]])
    [(1.1, 0.01, 20)]
    >>> read_history([[1.1, 0.01, -5]])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fedsilo.errors.CheckpointError: the checkpoint's privacy history, segment 0: steps must ...
    """
    if not isinstance(saved, list) or len(saved) > _MAX_SEGMENTS:
        raise CheckpointError("the checkpoint's privacy history is not a list of "
                              "[noise multiplier, sample rate, steps] segments")
    history = []
    for index, segment in enumerate(saved):
        where = f"the checkpoint's privacy history, segment {index}"
        if not isinstance(segment, (list, tuple)) or len(segment) != 3:
            raise CheckpointError(f"{where}: not [noise multiplier, sample rate, steps]")
        sigma, rate, steps = segment
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) \
                or not (math.isfinite(sigma) and sigma > 0):
            raise CheckpointError(f"{where}: the noise multiplier must be a finite number "
                                  f"> 0, got {sigma!r}")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) \
                or not (math.isfinite(rate) and 0 < rate <= 1):
            raise CheckpointError(f"{where}: the sample rate must be in (0, 1], got {rate!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 2**53:
            raise CheckpointError(f"{where}: steps must be a whole number >= 0, got {steps!r}")
        history.append((float(sigma), float(rate), int(steps)))
    return history


def _epsilon(mechanism: str, history: list[tuple[float, float, int]], delta: float) -> float:
    if not history:
        return 0.0
    if mechanism == "gdp":
        return _gdp_epsilon(history, delta)
    if mechanism == "prv" and _prv_grid_points(history, delta) > _PRV_MAX_POINTS:
        mechanism = "rdp"
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def _gdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε of the composed history under Poisson sampling: segments of μ_i-GDP compose to
    sqrt(Σ μ_i²)-GDP (Dong, Roth & Su 2019, Corollary 3.3); one segment is exactly Opacus's
    ``compute_eps_poisson``.  Past Opacus's bracket ε is 0 or ∞ rather than an error.

    >>> _gdp_epsilon([(1.0, 0.05, 100), (2.0, 0.05, 100)], 1e-5) > _gdp_epsilon(
    ...     [(2.0, 0.05, 100)], 1e-5)
    True
    """
    with np.errstate(over="ignore"):  # σ → 0: exp(1/σ²) overflows to inf, μ = inf
        mus = [compute_mu_poisson(steps=n, noise_multiplier=s, sample_rate=q)
               for s, q, n in history]
    mu = mus[0] if len(mus) == 1 else math.sqrt(math.fsum(m * m for m in mus))
    if mu <= 0:
        return 0.0
    if not math.isfinite(mu) or delta_eps_mu(eps=_GDP_MAX_EPSILON, mu=mu) > delta:
        return math.inf
    if delta_eps_mu(eps=0.0, mu=mu) <= delta:
        return 0.0
    return float(eps_from_mu(mu=mu, delta=delta))


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
    """The smallest σ (to 0.01 in ε, never over) that keeps ``num_steps`` steps at rate q
    within ε; searched in [MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER] of ``fedsilo.config``
    (MIN_NOISE_MULTIPLIER when even that spends less than ε).

    >>> sigma = noise_multiplier_for(target_epsilon=8, delta=1e-5, sample_rate=0.064,
    ...                              num_steps=160)
    >>> acc = PrivacyAccountant("rdp")
    >>> acc.spend(noise_multiplier=sigma, sample_rate=0.064, num_steps=160)
    >>> 7.99 <= acc.epsilon(delta=1e-5) <= 8
    True
    """
    return noise_multiplier_for_remaining(
        accountant=PrivacyAccountant(mechanism), target_epsilon=target_epsilon, delta=delta,
        sample_rate=sample_rate, num_steps=num_steps)


def noise_multiplier_for_remaining(*, accountant: PrivacyAccountant, target_epsilon: float,
                                   delta: float, sample_rate: float, num_steps: int) -> float:
    """The smallest σ (to 0.01 in ε, never over) for ``num_steps`` more steps at rate q such
    that ``accountant`` ends within ε, counting what its history has already spent (a run
    resumed with other settings).  The accountant is not changed.

    >>> acc = PrivacyAccountant("rdp")
    >>> acc.spend(noise_multiplier=0.8, sample_rate=0.064, num_steps=80)
    >>> sigma = noise_multiplier_for_remaining(accountant=acc, target_epsilon=8, delta=1e-5,
    ...                                        sample_rate=0.064, num_steps=80)
    >>> sigma > 0.8, 7.99 <= acc.epsilon_after(noise_multiplier=sigma, sample_rate=0.064,
    ...                                        num_steps=80, delta=1e-5) <= 8
    (True, True)
    """
    _check_search(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                  num_steps=num_steps)
    spent = accountant.epsilon(delta=delta)
    if spent > target_epsilon:
        raise PrivacyBudgetError(
            f"the privacy budget ε = {target_epsilon:g} is already spent: the "
            f"{accountant.num_steps} steps taken so far cost ε = {spent:.4g} at δ = {delta:g}, "
            f"so no noise multiplier allows {num_steps} more")

    def epsilon_at(sigma: float) -> float:
        return _trial_epsilon(accountant, noise_multiplier=sigma, sample_rate=sample_rate,
                              num_steps=num_steps, delta=delta)

    sigma, eps_max = _smallest_sigma(epsilon_at, target_epsilon=target_epsilon)
    if sigma is None:
        so_far = f"after ε = {spent:.4g} already spent, " if accountant.history else ""
        raise PrivacyBudgetError(
            f"no noise multiplier reaches ε = {target_epsilon:g} at δ = {delta:g} over "
            f"{num_steps} steps at sampling rate {sample_rate:.4g}: {so_far}even σ = "
            f"{MAX_NOISE_MULTIPLIER:g} ends at ε = {eps_max:.4g}; raise the budget or train "
            f"fewer steps")
    return sigma


def _trial_epsilon(accountant: PrivacyAccountant, *, noise_multiplier: float,
                   sample_rate: float, num_steps: int, delta: float) -> float:
    """ε after ``num_steps`` more steps, as the σ search sees it (∞ where Opacus cannot
    evaluate it: too little noise)."""
    trial = accountant._after(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                              num_steps=num_steps)
    try:
        epsilon = trial.epsilon(delta=delta)
    except _UNEVALUABLE:
        return math.inf
    return math.inf if math.isnan(epsilon) else epsilon


def _prv_grid_points(history: list[tuple[float, float, int]], delta: float) -> float:
    """Points of the grid Opacus's ``PRVAccountant.get_epsilon`` discretises ``history`` on
    (its ``_get_domain`` at the default eps_error = 0.01, delta_error = δ/1000)."""
    eps_error, delta_error = 0.01, delta / 1000
    steps = [n for _, _, n in history]
    half_width = compute_safe_domain_size(
        prvs=[PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history],
        max_self_compositions=steps, eps_error=eps_error, delta_error=delta_error)
    mesh = eps_error / math.sqrt(sum(steps) * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh


def _check_search(*, target_epsilon: float, delta: float, sample_rate: float,
                  num_steps: int) -> None:
    # the configuration and ``fedsilo budget`` refuse these first, naming the key or flag
    arguments = {"target_epsilon": (target_epsilon, 0 < target_epsilon < math.inf, "(0, inf)"),
                 "delta": (delta, 0 < delta < 1, "(0, 1)"),
                 "sample_rate": (sample_rate, 0 < sample_rate <= 1, "(0, 1]"),
                 "num_steps": (num_steps, num_steps >= 0, ">= 0")}
    for name, (value, ok, expected) in arguments.items():
        if not ok:
            raise ValueError(f"noise multiplier search: {name} must be in {expected}, "
                             f"got {value!r}")


def _smallest_sigma(epsilon_at: Callable[[float], float], *,
                    target_epsilon: float) -> tuple[float | None, float]:
    """(σ, ε(σ)): the smallest σ in [MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER] with
    ε(σ) <= target, to EPSILON_TOLERANCE in ε; σ is None when not even the largest σ fits.

    ε falls as σ grows.  The search brackets by doubling or halving from 1, then bisects in
    log σ (σ spans six orders of magnitude), keeping ε(low) > target >= ε(high); every loop
    is bounded, so it ends even where ε(σ) is flat, infinite or not monotone.
    """
    high, eps_high = _SEARCH_START, epsilon_at(_SEARCH_START)
    low = high
    while eps_high > target_epsilon:  # too little noise: double (at most 14 times)
        if high >= MAX_NOISE_MULTIPLIER:
            return None, eps_high
        low, high = high, min(2 * high, MAX_NOISE_MULTIPLIER)
        eps_high = epsilon_at(high)
    while low == high:  # enough noise at the start: halve (at most 7 times)
        if high <= MIN_NOISE_MULTIPLIER:
            return high, eps_high
        low = max(high / 2, MIN_NOISE_MULTIPLIER)
        eps_low = epsilon_at(low)
        if eps_low <= target_epsilon:
            high, eps_high = low, eps_low
    for _ in range(_MAX_BISECTIONS):
        if target_epsilon - eps_high <= EPSILON_TOLERANCE or high / low <= 1 + 1e-12:
            break
        middle = math.sqrt(low * high)
        eps_middle = epsilon_at(middle)
        if eps_middle <= target_epsilon:
            high, eps_high = middle, eps_middle
        else:
            low = middle
    return high, eps_high
