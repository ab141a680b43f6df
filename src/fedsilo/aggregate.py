"""Aggregation maths: numpy in, numpy out, no transport (as Flower's ``strategy/aggregate.py``).

FedAvg is from McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS 2017): the new global model is the sample-weighted average of
the participants' models, i.e. ``w + Σ_k (n_k / Σn) (w_k − w)``.

Participants pre-weight their update by ``n_k / Σn`` before sending it, so that the
transport (an MPI ``Reduce``, or an encrypted sum) only has to *add* vectors.

>>> fedavg_weights({1: 30, 2: 10})
{1: 0.75, 2: 0.25}
>>> weighted_sum([np.array([1.0, 2.0]), np.array([3.0, 6.0])], [0.75, 0.25]).tolist()
[1.5, 3.0]

The server steps of the other strategies live here too, as functions of plain arrays:
FedAvgM (Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", arXiv:1909.06335, 2019), FedAdagrad / FedAdam / FedYogi
(Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2), and the robust
coordinate-wise median and trimmed mean (Yin et al., "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018).

The model vectors are long (11M floats for the largest model), so the element-wise steps
run block by block: every temporary is one block, not one model, and ``out`` may be the
input itself.  State buffers (momentum, moments) are float32 and updated in place.
"""

from __future__ import annotations

import math
from typing import Iterator, Literal, Mapping, Sequence

import numpy as np

from fedsilo.errors import UpdateError


def fedavg_weights(num_samples: Mapping[int, int]) -> dict[int, float]:
    """Weights ``n_k / Σ n`` for the participants of a round (keys are participant ids)."""
    total = sum(num_samples.values())
    if total <= 0:
        raise UpdateError(f"cannot weight a round with no samples: {dict(num_samples)}")
    return {k: n / total for k, n in num_samples.items()}


def weighted_sum(updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``Σ_k weights[k] · updates[k]`` in float64, returned as float32."""
    if len(updates) != len(weights) or not updates:
        raise ValueError(f"need as many weights as updates, got {len(weights)} and {len(updates)}")
    total = np.zeros(updates[0].shape, dtype=np.float64)
    for update, weight in zip(updates, weights):
        total += weight * update.astype(np.float64, copy=False)
    return total.astype(np.float32)


def count_nonfinite(vector: np.ndarray) -> int:
    """How many entries are NaN or ±Inf (cheap check before an update leaves a rank)."""
    # A finite sum proves every element finite; an infinite one (NaN/Inf, or a float32
    # overflow of finite values) falls through to the exact count.  float32 is 4x faster.
    if np.isfinite(vector.sum(dtype=np.float32)):
        return 0
    return int(vector.size - np.count_nonzero(np.isfinite(vector)))


def weighted_mean(updates: Sequence[np.ndarray] | np.ndarray,
                  weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """``Σ_k w_k u_k / Σ_k w_k``, float32: the aggregate a linear strategy's sum produces.

    >>> weighted_mean(np.array([[1.0, 2.0], [3.0, 6.0]], np.float32), [3, 1]).tolist()
    [1.5, 3.0]
    """
    total = float(np.sum(weights))
    if not total > 0:
        raise UpdateError(f"cannot average updates whose weights sum to {total}")
    return weighted_sum(list(updates), [float(w) / total for w in weights])


# -- one round's weighting: what the sites send and what the coordinator rescales --------


def contribution_factor(steps: int, planned_steps: int, *, normalize_steps: bool) -> float:
    """The factor ``f_k`` a site multiplies its weighted update by: the share of its planned
    local steps it did (a straggler cut by a deadline counts for what it did), or under
    ``normalize_steps`` (FedNova) ``1 / τ_k``, an update per step.

    >>> (contribution_factor(5, 10, normalize_steps=False),
    ...  contribution_factor(4, 10, normalize_steps=True))
    (0.5, 0.25)
    """
    return 1.0 / steps if normalize_steps else steps / planned_steps


def renormalization(weights: Sequence[float], steps: Sequence[int], planned_steps: Sequence[int],
                    *, normalize_steps: bool) -> float:
    """The factor that turns the contributors' sum ``Σ p_k f_k Δ_k`` into their weighted mean.

    ``p_k`` are the planned weights of the sites that contributed (they sum to less than
    one when planned sites sat out, were dropped or stopped early) and ``f_k`` is
    :func:`contribution_factor`.  Without ``normalize_steps`` the result is
    ``Σ p_k f_k Δ_k / Σ p_k f_k``; with it (FedNova, Wang et al. 2020), the per-step mean
    scaled by the weighted mean number of steps, ``τ_eff = Σ p_k τ_k / Σ p_k``.

    >>> renormalization([0.25, 0.25], [10, 10], [10, 10], normalize_steps=False)
    2.0
    >>> renormalization([0.5, 0.5], [4, 8], [10, 10], normalize_steps=True)
    6.0
    """
    total = sum(weights)
    if not total > 0:
        raise UpdateError(f"cannot renormalize over contributors whose weights sum to {total}")
    if normalize_steps:
        tau = sum(p * s for p, s in zip(weights, steps)) / total
        return tau / total
    return 1.0 / sum(p * s / n for p, s, n in zip(weights, steps, planned_steps))


def step_normalized(rows: np.ndarray, weights: Sequence[float], steps: Sequence[int]) -> np.ndarray:
    """FedNova for the non-linear strategies: each unweighted update ``Δ_k`` (a row) scaled
    in place to ``τ_eff Δ_k / τ_k``, so a robust combination sees per-step updates at the
    common scale.  Returns ``rows``.

    >>> step_normalized(np.ones((2, 1), np.float32), [0.5, 0.5], [2, 6]).ravel().tolist()
    [2.0, 0.6666666865348816]
    """
    total = sum(weights)
    tau = sum(p * s for p, s in zip(weights, steps)) / total
    tau_k = np.array(steps, dtype=np.float32)
    rows *= (np.float32(tau) / tau_k)[:, None]
    return rows


def weighted_validation(metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Federated validation: the sample-weighted mean of the sites' own validation metrics
    (acc, loss; AUC over the sites where it is defined), and the samples counted.

    >>> weighted_validation([{"acc": 1.0, "loss": 0.5, "auc": float("nan"), "num_samples": 1},
    ...                      {"acc": 0.5, "loss": 0.25, "auc": 0.75, "num_samples": 3}])
    {'acc': 0.625, 'loss': 0.3125, 'auc': 0.75, 'num_samples': 4}
    """
    total = sum(m["num_samples"] for m in metrics)
    if not total:
        return {}
    out: dict[str, float] = {}
    for key in ("acc", "loss"):
        out[key] = sum(m[key] * m["num_samples"] for m in metrics) / total
    aucs = [(m["auc"], m["num_samples"]) for m in metrics if not np.isnan(m["auc"])]
    if aucs:
        out["auc"] = sum(a * n for a, n in aucs) / sum(n for _, n in aucs)
    out["num_samples"] = total
    return out


# 64K float32 = 256 KB per temporary: it stays in cache, and 11M floats take ~170 blocks.
_BLOCK = 1 << 16


def _blocks(size: int) -> Iterator[slice]:
    return (slice(lo, min(lo + _BLOCK, size)) for lo in range(0, size, _BLOCK))


def _check_vectors(reference: np.ndarray, **others: np.ndarray) -> None:
    if reference.ndim != 1:
        raise ValueError(f"expected a flat vector, got shape {reference.shape}")
    for name, other in others.items():
        if other.shape != reference.shape:
            raise ValueError(f"{name} has shape {other.shape}, expected {reference.shape}")


def _output(weights: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return np.empty_like(weights)
    _check_vectors(weights, out=out)
    return out


def add_scaled(weights: np.ndarray, update: np.ndarray, *, scale: float = 1.0,
               out: np.ndarray | None = None) -> np.ndarray:
    """``weights + scale · update``: the FedAvg server step (``scale`` = server learning rate).

    ``out`` may be ``weights`` itself.

    >>> w = np.array([1.0, 2.0], np.float32)
    >>> add_scaled(w, np.array([4.0, -2.0], np.float32), scale=0.5, out=w).tolist(), w.tolist()
    ([3.0, 1.0], [3.0, 1.0])
    """
    _check_vectors(weights, update=update)
    out = _output(weights, out)
    if scale == 1.0:
        return np.add(weights, update, out=out)
    factor = np.float32(scale)
    for block in _blocks(weights.size):
        np.add(weights[block], factor * update[block], out=out[block])
    return out


def momentum_step(weights: np.ndarray, update: np.ndarray, velocity: np.ndarray, *,
                  lr: float, momentum: float, out: np.ndarray | None = None) -> np.ndarray:
    """FedAvgM (Hsu et al. 2019): ``v ← β v + Δ`` (in place), then ``w + η v``.

    ``Δ`` is the weighted mean update (new models minus the global one), so with
    ``β = 0, η = 1`` this is exactly FedAvg.

    >>> v = np.zeros(2, np.float32)
    >>> w = momentum_step(np.zeros(2, np.float32), np.ones(2, np.float32), v, lr=1.0, momentum=0.5)
    >>> w = momentum_step(w, np.ones(2, np.float32), v, lr=1.0, momentum=0.5)
    >>> v.tolist(), w.tolist()
    ([1.5, 1.5], [2.5, 2.5])
    """
    _check_vectors(weights, update=update, velocity=velocity)
    out = _output(weights, out)
    beta, eta = np.float32(momentum), np.float32(lr)
    for block in _blocks(weights.size):
        v = velocity[block]
        v *= beta
        v += update[block]
        np.add(weights[block], eta * v, out=out[block])
    return out


AdaptiveRule = Literal["adagrad", "adam", "yogi"]


def adaptive_server_step(weights: np.ndarray, update: np.ndarray, m: np.ndarray, v: np.ndarray,
                         *, rule: AdaptiveRule, lr: float, beta1: float, beta2: float,
                         tau: float, out: np.ndarray | None = None) -> np.ndarray:
    """One server step of FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2).

    With ``Δ`` the weighted mean update (the negative pseudo-gradient)::

        m ← β1 m + (1 − β1) Δ
        v ← v + Δ²                                  (adagrad)
        v ← β2 v + (1 − β2) Δ²                      (adam)
        v ← v − (1 − β2) Δ² sign(v − Δ²)            (yogi)
        w ← w + η m / (√v + τ)

    As in the paper there is no bias correction, and ``v`` should start at ``τ²``
    (the paper asks for ``v₋₁ ≥ τ²``) and ``m`` at zero.  ``m`` and ``v`` are updated in
    place, in float32; ``out`` may be ``weights``.

    >>> tau = 3.0
    >>> m, v = np.zeros(1, np.float32), np.full(1, tau**2, np.float32)
    >>> adaptive_server_step(np.zeros(1, np.float32), np.full(1, 4.0, np.float32), m, v,
    ...                      rule="adagrad", lr=1.0, beta1=0.5, beta2=0.0, tau=tau).tolist()
    [0.25]
    >>> m.tolist(), v.tolist()
    ([2.0], [25.0])
    """
    if rule not in ("adagrad", "adam", "yogi"):
        raise ValueError(f"unknown adaptive rule {rule!r}; known: adagrad, adam, yogi")
    _check_vectors(weights, update=update, m=m, v=v)
    out = _output(weights, out)
    b1, c1 = np.float32(beta1), np.float32(1.0 - beta1)
    b2, c2 = np.float32(beta2), np.float32(1.0 - beta2)
    eta, eps = np.float32(lr), np.float32(tau)
    for block in _blocks(weights.size):
        delta, mb, vb = update[block], m[block], v[block]
        mb *= b1
        mb += c1 * delta
        square = delta * delta
        if rule == "adagrad":
            vb += square
        elif rule == "adam":
            vb *= b2
            square *= c2
            vb += square
        else:
            sign = np.sign(vb - square)
            square *= c2
            square *= sign
            vb -= square
        step = np.sqrt(vb)
        step += eps
        np.divide(mb, step, out=step)
        step *= eta
        np.add(weights[block], step, out=out[block])
    return out


def _check_stack(updates: np.ndarray) -> int:
    if updates.ndim != 2:
        raise ValueError(f"expected updates of shape (K, N), got {updates.shape}")
    if updates.shape[0] == 0:
        raise UpdateError("no updates to aggregate: no participant contributed this round")
    return updates.shape[0]


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of ``K`` updates (rows of ``updates``), as float32.

    Unweighted: a robust aggregator must not let one participant's claimed sample count
    decide the result.  With an even ``K`` it is the mean of the two middle values.

    >>> coordinate_median(np.array([[1, 10], [2, -5], [1000, 0]], np.float32)).tolist()
    [2.0, 0.0]
    """
    num_updates = _check_stack(updates)
    middle, odd = divmod(num_updates, 2)
    out = np.empty(updates.shape[1], dtype=np.float32)
    for block in _blocks(updates.shape[1]):
        # sorting the K rows of a block is as fast as np.median here (K is small)
        ranked = np.sort(updates[:, block], axis=0)
        if odd:
            out[block] = ranked[middle]
        else:
            np.add(ranked[middle - 1], ranked[middle], out=out[block])
            out[block] /= np.float32(2)
    return out


def num_trimmed(num_updates: int, trim: float) -> int:
    """How many updates the trimmed mean drops from *each* end: ``floor(trim · K)``.

    A relative allowance of 1e-9 keeps products such as ``0.29 · 100`` (28.999…) from
    rounding down a whole update.

    >>> num_trimmed(5, 0.2), num_trimmed(100, 0.29), num_trimmed(3, 0.2)
    (1, 29, 0)
    """
    if not 0 <= trim <= 0.5:
        raise ValueError(f"trim must be in [0, 0.5], got {trim}")
    return math.floor(trim * num_updates * (1 + 1e-9))


def trimmed_mean(updates: np.ndarray, trim: float) -> np.ndarray:
    """Coordinate-wise β-trimmed mean of ``K`` updates (Yin et al. 2018), as float32.

    For every coordinate the ``floor(trim · K)`` largest and as many smallest values are
    dropped and the rest averaged (unweighted, as the median).  ``trim = 0`` is the plain
    mean; ``trim = 0.5`` with an odd ``K`` is the median.  Fails with
    :class:`~fedsilo.errors.UpdateError` when nothing would remain (``2 floor(trim K) ≥ K``).

    >>> updates = np.array([[1, 0], [2, 0], [3, 0], [4, 0], [-1000, 90]], np.float32)
    >>> trimmed_mean(updates, 0.2).tolist()
    [2.0, 0.0]
    """
    num_updates = _check_stack(updates)
    cut = num_trimmed(num_updates, trim)
    if 2 * cut >= num_updates:
        raise UpdateError(f"trimmed mean of K={num_updates} updates with trim={trim} drops "
                          f"{cut} from each end and leaves nothing to average")
    out = np.empty(updates.shape[1], dtype=np.float32)
    for block in _blocks(updates.shape[1]):
        kept = updates[:, block]
        if cut:
            kept = np.sort(kept, axis=0)[cut:num_updates - cut]
        out[block] = kept.mean(axis=0, dtype=np.float64)
    return out
