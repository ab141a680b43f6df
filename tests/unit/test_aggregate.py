import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsilo.aggregate import count_nonfinite, fedavg_weights, weighted_sum
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
