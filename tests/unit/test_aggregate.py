import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsilo.aggregate import (_BLOCK, adaptive_server_step, add_scaled, coordinate_median,
                               count_nonfinite, fedavg_weights, momentum_step, num_trimmed,
                               trimmed_mean, weighted_sum)
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
