"""The maths of an empirical privacy audit in one training run (Steinke, Nasr & Jagielski,
"Privacy Auditing with One (1) Training Run", NeurIPS 2023).

m canaries are each included in the training data independently with probability 1/2 (the
secret bits S_i in {-1, +1}).  After the one run, an auditor scores every canary, guesses
"in" for the k+ highest scores and "out" for the k- lowest, and counts its correct guesses.
If the training is (ε, δ)-DP, the number of correct guesses among r guesses is, up to a
δ term, stochastically dominated by Binomial(r, e^ε / (1 + e^ε)) (the paper's Theorem 5.2;
:func:`p_value` is its Algorithm's test).  The largest ε that this rejects at confidence
1 - β is an empirical **lower bound** on the ε the training really has: a bound above the
ε a run reports proves the report wrong (a bug, too little noise, predictable noise).

Here the canaries are the paper's white-box "Dirac" gradient canaries (its Section 6): canary
i adds a gradient of norm C (the clipping norm) along one coordinate c_i of the model,
whenever it is in the data and Poisson sampling picks it.  The auditor reads every step's
noisy clipped sum at those coordinates, less the other records' clipped sum (it knows the
other records; their sampling is independent of the canaries, so conditioning on it leaves
the canaries' guarantee unchanged), in units of C: x_{t,i} = b_{t,i}·[S_i = +1] + σ·z_{t,i}.
A canary's score is the log-likelihood ratio of its column under "in" (each step a spike of
1 with probability q) against "out" (noise only), with σ measured from the observations
themselves (:func:`measured_noise`): under correct noise that is the Neyman-Pearson test of
the subsampled Gaussian mechanism, and noise 10× too small shows up as sharp spikes.  Any
score is sound (the bound holds for every guessing rule that does not look at S); the
choice only decides how much the audit can find.

Pure numpy and scipy: no torch, no MPI.

>>> round(epsilon_lower_bound(num_canaries=1000, num_guesses=100, num_correct=100,
...                           delta=1e-5), 2)
3.47
>>> epsilon_lower_bound(num_canaries=1000, num_guesses=100, num_correct=50, delta=1e-5)
0.0
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy import stats

#: confidence of the reported lower bound (the paper's 95 %)
CONFIDENCE = 0.95
#: guesses tried by default, as (k+, k-) fractions of the canaries; the bound is taken at
#: confidence 1 - β/len(...) for each (Bonferroni), so trying them all costs no soundness
GUESS_FRACTIONS: tuple[tuple[float, float], ...] = tuple(
    (plus, minus) for plus in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5) for minus in (0.0, plus))
#: σ is never measured below this (noise-free observations: the score stays finite)
MIN_MEASURED_SIGMA = 1e-3
#: bisection steps of the ε search (ε to about 2^-40 of the bracket)
_BISECTIONS = 40
_MAX_EPSILON = 100.0


def p_value(*, num_canaries: int, num_guesses: int, num_correct: int, epsilon: float,
            delta: float) -> float:
    """P[at least ``num_correct`` of ``num_guesses`` guesses right] for an (ε, δ)-DP run
    with ``num_canaries`` canaries (Steinke et al. 2023, Theorem 5.2 and its algorithm):
    P[Binomial(r, p) >= v] + 2mδ·max_i P[v - i <= Binomial(r, p) < v] / i, p = e^ε/(1+e^ε).

    >>> p_value(num_canaries=10, num_guesses=10, num_correct=10, epsilon=0.0, delta=0.0)
    0.0009765625
    """
    m, r, v = num_canaries, num_guesses, num_correct
    _check_counts(m, r, v)
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"p_value needs epsilon >= 0 and delta in [0, 1], got {epsilon!r} "
                         f"and {delta!r}")
    p = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = float(stats.binom.sf(v - 1, r, p))  # P[B >= v]
    alpha = 0.0
    if v > 0 and delta > 0:
        below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[B = v-1], ..., P[B = 0]
        alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(*, num_canaries: int, num_guesses: int, num_correct: int,
                        delta: float, confidence: float = CONFIDENCE) -> float:
    """The largest ε at which an (ε, δ)-DP run gets ``num_correct`` right guesses or more
    with probability under 1 - ``confidence``: with that confidence, the run is not
    (ε', δ)-DP for any ε' below it.  0 when the guesses are no better than chance.

    >>> epsilon_lower_bound(num_canaries=1000, num_guesses=200, num_correct=199,
    ...                     delta=1e-5) > epsilon_lower_bound(
    ...     num_canaries=1000, num_guesses=200, num_correct=150, delta=1e-5) > 0
    True
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    beta = 1.0 - confidence

    def rejects(epsilon: float) -> bool:
        return p_value(num_canaries=num_canaries, num_guesses=num_guesses,
                       num_correct=num_correct, epsilon=epsilon, delta=delta) < beta

    if not rejects(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejects(high):  # the p-value rises with ε: bracket, then bisect
        low, high = high, 2 * high
        if high > _MAX_EPSILON:
            return low
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        if rejects(middle):
            low = middle
        else:
            high = middle
    return low


def measured_noise(observations: np.ndarray) -> float:
    """σ of the observations (units of C), robustly: 1.4826 × their median absolute
    deviation, which the few canary spikes (a fraction ~q/2) barely move; never below
    MIN_MEASURED_SIGMA.

    >>> rng = np.random.default_rng(0)
    >>> round(measured_noise(rng.normal(0, 2.0, size=(200, 500))), 1)
    2.0
    """
    x = np.asarray(observations, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return MIN_MEASURED_SIGMA
    mad = float(np.median(np.abs(x - np.median(x))))
    return max(1.4826 * mad, MIN_MEASURED_SIGMA)


def canary_scores(observations: np.ndarray, *, sample_rate: float, sigma: float,
                  method: str = "lr") -> np.ndarray:
    """Each canary's score from its column of ``observations`` (steps × canaries, units of
    C).  ``lr``: Σ_t log(1 - q + q·exp((x_t - 1/2)/σ²)), the log-likelihood ratio of "in"
    (a spike of 1 with probability q per step, plus N(0, σ²)) against "out" (N(0, σ²));
    ``sum``: Σ_t x_t, the inner product of the summed noisy gradients with the canary.

    >>> x = np.array([[1.0, 0.0], [0.0, 0.0]])
    >>> s = canary_scores(x, sample_rate=0.1, sigma=0.5)
    >>> bool(s[0] > s[1]), canary_scores(x, sample_rate=0.1, sigma=0.5, method="sum").tolist()
    (True, [1.0, 0.0])
    """
    x = np.asarray(observations, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"observations are steps × canaries, got shape {x.shape}")
    if method == "sum":
        return x.sum(axis=0)
    if method != "lr":
        raise ValueError(f"unknown score {method!r}: known are 'lr' and 'sum'")
    if not (0 < sample_rate <= 1 and sigma > 0):
        raise ValueError(f"the lr score needs a sample_rate in (0, 1] and sigma > 0, got "
                         f"{sample_rate!r} and {sigma!r}")
    exponent = (x - 0.5) / (sigma * sigma) + math.log(sample_rate)
    if sample_rate == 1.0:
        return exponent.sum(axis=0)
    return np.logaddexp(math.log1p(-sample_rate), exponent).sum(axis=0)


def guess(scores: np.ndarray, *, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 for the ``k_plus`` highest scores, -1 for the ``k_minus`` lowest, 0 (abstain)
    for the rest; ties broken by position, so the rule never looks at the secret bits.

    >>> guess(np.array([0.3, 0.9, 0.1, 0.5]), k_plus=1, k_minus=1).tolist()
    [0, 1, -1, 0]
    """
    scores = np.asarray(scores, dtype=np.float64)
    m = scores.size
    if not (0 <= k_plus and 0 <= k_minus and k_plus + k_minus <= m):
        raise ValueError(f"k+ = {k_plus} and k- = {k_minus} guesses do not fit {m} canaries")
    order = np.argsort(scores, kind="stable")
    out = np.zeros(m, dtype=np.int8)
    out[order[m - k_plus:]] = 1
    out[order[:k_minus]] = -1
    return out


@dataclass(frozen=True)
class AuditBound:
    """The best of the guesses tried: ε_lb and what it rests on."""

    epsilon_lb: float
    confidence: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    k_plus: int
    k_minus: int
    #: how many (k+, k-) were tried: each was bounded at confidence 1 - β / tries
    tries: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit_bound(scores: np.ndarray, inclusion: np.ndarray, *, delta: float,
                confidence: float = CONFIDENCE,
                guesses: Sequence[tuple[int, int]] | None = None) -> AuditBound:
    """ε_lb of a run from the canaries' ``scores`` and their secret ``inclusion`` bits
    (+1 in, -1 out): the largest over the ``guesses`` tried, each (k+, k-) bounded at
    confidence 1 - (1 - ``confidence``)/len(guesses) so that the largest holds at
    ``confidence`` (default: GUESS_FRACTIONS of the canaries).

    >>> bits = np.array([1, -1] * 500)
    >>> perfect = audit_bound(bits.astype(float), bits, delta=1e-5)
    >>> perfect.num_correct == perfect.num_guesses, round(perfect.epsilon_lb, 2)
    (True, 5.09)
    """
    scores = np.asarray(scores, dtype=np.float64)
    inclusion = np.asarray(inclusion)
    m = scores.size
    if inclusion.shape != scores.shape or not np.isin(inclusion, (-1, 1)).all():
        raise ValueError("inclusion must hold one +1 or -1 per score")
    if guesses is None:
        guesses = sorted({(max(1, round(p * m)), round(n * m)) for p, n in GUESS_FRACTIONS
                          if max(1, round(p * m)) + round(n * m) <= m})
    if not guesses:
        raise ValueError("no guesses to try")
    level = 1.0 - (1.0 - confidence) / len(guesses)
    best: AuditBound | None = None
    for k_plus, k_minus in guesses:
        said = guess(scores, k_plus=k_plus, k_minus=k_minus)
        r = int(np.count_nonzero(said))
        v = int(np.count_nonzero(said == inclusion))
        eps = epsilon_lower_bound(num_canaries=m, num_guesses=r, num_correct=v, delta=delta,
                                  confidence=level)
        if best is None or eps > best.epsilon_lb:
            best = AuditBound(epsilon_lb=eps, confidence=confidence, num_canaries=m,
                              num_guesses=r, num_correct=v, k_plus=k_plus, k_minus=k_minus,
                              tries=len(guesses))
    assert best is not None
    return best


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
