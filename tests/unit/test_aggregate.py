import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsilo.aggregate import (
    _BLOCK,
    adaptive_server_step,
    add_scaled,
    contribution_factor,
    coordinate_median,
    count_nonfinite,
    fedavg_weights,
    momentum_step,
    num_trimmed,
    renormalization,
    step_normalized,
    trimmed_mean,
    weighted_sum,
    weighted_validation,
)
from fedsilo.errors import ConfigError, UpdateError
from fedsilo.strategies import STRATEGIES, build_strategy

counts = st.dictionaries(st.integers(0, 50), st.integers(1, 10_000), min_size=1, max_size=12)


@given(counts)
def test_fedavg_weights_are_proportional_and_sum_to_one(num_samples):
    weights = fedavg_weights(num_samples)
    assert set(weights) == set(num_samples)
    assert sum(weights.values()) == pytest.approx(1.0)
    total = sum(num_samples.values())
    for k, n in num_samples.items():
        assert weights[k] == pytest.approx(n / total)


def test_fedavg_weights_refuse_an_empty_round():
    with pytest.raises(UpdateError):
        fedavg_weights({1: 0})


vectors = st.integers(1, 6).flatmap(lambda k: st.lists(
    arrays(np.float32, 5, elements=st.floats(-1e3, 1e3, width=32)), min_size=k, max_size=k))


@settings(max_examples=50)
@given(vectors, st.randoms())
def test_weighted_sum_is_permutation_invariant(updates, rnd):
    weights = [rnd.random() for _ in updates]
    order = list(range(len(updates)))
    rnd.shuffle(order)
    a = weighted_sum(updates, weights)
    b = weighted_sum([updates[i] for i in order], [weights[i] for i in order])
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-3)


@settings(max_examples=50)
@given(vectors)
def test_equal_weights_give_the_mean(updates):
    mean = np.mean(np.stack(updates).astype(np.float64), axis=0)
    np.testing.assert_allclose(weighted_sum(updates, [1 / len(updates)] * len(updates)), mean,
                               rtol=1e-5, atol=1e-3)


def test_fedavg_step_is_the_weighted_average_of_models():
    w = np.array([1.0, 1.0], dtype=np.float32)
    models = {0: np.array([3.0, 1.0], np.float32), 1: np.array([1.0, 5.0], np.float32)}
    strategy = build_strategy("fedavg", {})
    weights = strategy.client_weights({0: 30, 1: 10})
    aggregate = weighted_sum([models[k] - w for k in (0, 1)], [weights[0], weights[1]])
    np.testing.assert_allclose(strategy.server_step(w, aggregate), [2.5, 2.0], rtol=1e-6)


def test_server_learning_rate_scales_the_step():
    strategy = build_strategy("fedavg", {"server_lr": 0.5})
    out = strategy.server_step(np.zeros(2, np.float32), np.array([2.0, -4.0], np.float32))
    np.testing.assert_allclose(out, [1.0, -2.0])


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown strategy 'fedmagic'; known: fedadagrad, "
                                          "fedadam, fedavg, fedavgm, fedprox, fedyogi, median"):
        STRATEGIES.get("fedmagic")


def test_unknown_strategy_option_is_refused():
    with pytest.raises(ConfigError, match="strategy.momentum"):
        build_strategy("fedavg", {"momentum": 0.9})


def test_count_nonfinite():
    v = np.ones(10, dtype=np.float32)
    assert count_nonfinite(v) == 0
    v[3], v[7] = np.nan, np.inf
    assert count_nonfinite(v) == 2


# -- the block-wise server steps against whole-vector numpy --------------------------------

LONG = 3 * _BLOCK + 5  # several blocks and a ragged last one


def _random(*shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("rule", ["adagrad", "adam", "yogi"])
def test_adaptive_step_equals_the_whole_vector_formula(rule):
    w, delta, m0 = _random(LONG, seed=1), _random(LONG, seed=2), _random(LONG, seed=3)
    v0 = np.abs(_random(LONG, seed=4))
    b1, b2, eta, tau = np.float32(0.9), np.float32(0.99), np.float32(0.01), np.float32(1e-3)
    m, v = m0.copy(), v0.copy()
    out = adaptive_server_step(w, delta, m, v, rule=rule, lr=0.01, beta1=0.9, beta2=0.99,
                               tau=1e-3)
    m_ref = b1 * m0 + np.float32(1 - 0.9) * delta
    square = delta * delta
    v_ref = {"adagrad": v0 + square,
             "adam": b2 * v0 + np.float32(1 - 0.99) * square,
             "yogi": v0 - np.float32(1 - 0.99) * square * np.sign(v0 - square)}[rule]
    w_ref = w + eta * (m_ref / (np.sqrt(v_ref) + tau))
    np.testing.assert_allclose(m, m_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(v, v_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out, w_ref, rtol=1e-6, atol=1e-6)


def test_momentum_and_scaled_steps_equal_the_whole_vector_formula():
    w, delta, v = _random(LONG, seed=5), _random(LONG, seed=6), _random(LONG, seed=7)
    v_ref = np.float32(0.9) * v + delta
    out = momentum_step(w, delta, v, lr=0.5, momentum=0.9)
    np.testing.assert_array_equal(v, v_ref)
    np.testing.assert_array_equal(out, w + np.float32(0.5) * v_ref)
    np.testing.assert_array_equal(add_scaled(w, delta, scale=0.3), w + np.float32(0.3) * delta)
    np.testing.assert_array_equal(add_scaled(w, delta, out=w.copy()), w + delta)
    with pytest.raises(ValueError, match="update has shape"):
        add_scaled(w, delta[:-1])


def test_robust_aggregates_equal_the_whole_stack_formula():
    updates = _random(5, LONG, seed=8)
    np.testing.assert_array_equal(coordinate_median(updates), np.median(updates, axis=0))
    kept = np.sort(updates, axis=0)[1:4]
    np.testing.assert_array_equal(trimmed_mean(updates, 0.2),
                                  kept.mean(axis=0, dtype=np.float64).astype(np.float32))


def test_num_trimmed():
    assert [num_trimmed(k, 0.2) for k in (1, 4, 5, 9, 10)] == [0, 0, 1, 1, 2]
    assert num_trimmed(100, 0.29) == 29 and num_trimmed(10, 0.0) == 0
    with pytest.raises(ValueError, match="trim"):
        num_trimmed(5, 0.6)


# -- the round's weighting: contribution factors and the renormalization ----------------


@st.composite
def contributors(draw):
    """Planned weights of the sites that contributed (a sample of a federation whose weights
    sum to one), their updates, and the steps each did of its plan."""
    k = draw(st.integers(1, 6))
    planned = draw(st.lists(st.integers(1, 50), min_size=k, max_size=k))
    steps = [draw(st.integers(1, n)) for n in planned]
    weights = draw(st.lists(st.floats(0.01, 1.0), min_size=k, max_size=k))
    scale = draw(st.floats(1.0, 3.0))  # the absent sites' share of the weight
    weights = [w / (sum(weights) * scale) for w in weights]
    seed = draw(st.integers(0, 2**32 - 1))
    updates = np.random.default_rng(seed).standard_normal((k, 5))
    return weights, updates, steps, planned


def _site_sum(weights, updates, steps, planned, *, normalize_steps):
    """What the transport delivers: Σ p_k f_k Δ_k, as each site weights its own update."""
    return sum(p * contribution_factor(s, n, normalize_steps=normalize_steps) * u
               for p, u, s, n in zip(weights, updates, steps, planned))


@settings(max_examples=200, deadline=None)
@given(contributors())
def test_renormalized_full_rounds_are_the_weighted_mean_over_contributors(case):
    weights, updates, _, planned = case
    total = _site_sum(weights, updates, planned, planned, normalize_steps=False)
    scale = renormalization(weights, planned, planned, normalize_steps=False)
    np.testing.assert_allclose(total * scale, np.average(updates, axis=0, weights=weights),
                               rtol=1e-9, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(contributors())
def test_renormalized_sum_weighs_a_straggler_by_the_steps_it_did(case):
    weights, updates, steps, planned = case
    total = _site_sum(weights, updates, steps, planned, normalize_steps=False)
    scale = renormalization(weights, steps, planned, normalize_steps=False)
    effective = [p * s / n for p, s, n in zip(weights, steps, planned)]
    np.testing.assert_allclose(total * scale, np.average(updates, axis=0, weights=effective),
                               rtol=1e-9, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(contributors(), st.integers(1, 40))
def test_equal_steps_under_normalize_steps_is_fedavg(case, tau):
    weights, updates, _, _ = case
    steps = [tau] * len(weights)
    nova = _site_sum(weights, updates, steps, steps, normalize_steps=True) \
        * renormalization(weights, steps, steps, normalize_steps=True)
    avg = _site_sum(weights, updates, steps, steps, normalize_steps=False) \
        * renormalization(weights, steps, steps, normalize_steps=False)
    np.testing.assert_allclose(nova, avg, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(nova, np.average(updates, axis=0, weights=weights),
                               rtol=1e-9, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(contributors())
def test_normalize_steps_is_the_per_step_mean_times_the_mean_steps(case):
    """FedNova: Σ p_k Δ_k / τ_k renormalized, times τ_eff = Σ p_k τ_k / Σ p_k."""
    weights, updates, steps, planned = case
    nova = _site_sum(weights, updates, steps, planned, normalize_steps=True) \
        * renormalization(weights, steps, planned, normalize_steps=True)
    per_step = np.average(updates / np.array(steps)[:, None], axis=0, weights=weights)
    tau_eff = np.average(steps, weights=weights)
    np.testing.assert_allclose(nova, per_step * tau_eff, rtol=1e-9, atol=1e-12)
    # the rows of the robust strategies are scaled to the same common step count
    rows = step_normalized(updates.astype(np.float32), weights, steps)
    np.testing.assert_allclose(np.average(rows, axis=0, weights=weights), nova, rtol=1e-4,
                               atol=1e-5)


def test_renormalization_refuses_no_weight():
    with pytest.raises(UpdateError, match="sum to 0"):
        renormalization([0.0], [1], [1], normalize_steps=False)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 5), st.floats(0, 1),
                          st.integers(1, 1000)), min_size=1, max_size=6))
def test_weighted_validation_is_the_sample_weighted_mean(sites):
    metrics = [{"acc": a, "loss": loss, "auc": auc, "num_samples": n}
               for a, loss, auc, n in sites]
    out = weighted_validation(metrics)
    n = np.array([m["num_samples"] for m in metrics], dtype=float)
    assert out["num_samples"] == n.sum()
    for key in ("acc", "loss", "auc"):
        assert out[key] == pytest.approx(np.average([m[key] for m in metrics], weights=n))


def test_weighted_validation_skips_undefined_auc_and_empty_sites():
    assert weighted_validation([]) == {}
    out = weighted_validation([{"acc": 1.0, "loss": 0.0, "auc": float("nan"), "num_samples": 2}])
    assert "auc" not in out and out["acc"] == 1.0
