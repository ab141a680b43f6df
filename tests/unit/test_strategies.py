"""The server strategies: hand-computed steps, limiting cases, robustness, exact resume."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsilo.aggregate import weighted_sum
from fedsilo.errors import CheckpointError, ConfigError, UpdateError
from fedsilo.strategies import STRATEGIES, Strategy, build_strategy

ALL = ["fedadagrad", "fedadam", "fedavg", "fedavgm", "fedprox", "fedyogi", "median", "scaffold",
       "trimmed_mean"]
STATEFUL = {"fedadagrad": ("m", "v"), "fedadam": ("m", "v"), "fedyogi": ("m", "v"),
            "fedavgm": ("velocity",), "scaffold": ("control",)}


def f32(*values):
    return np.array(values, dtype=np.float32)


def make(name, num_params, **options):
    strategy = build_strategy(name, options)
    strategy.setup(num_params)
    return strategy


def aggregate_of(strategy, updates, weights):
    """What the coordinator hands ``server_step``: the transport's weighted sum, or combine."""
    if strategy.linear:
        return weighted_sum(updates, weights)
    return strategy.combine(np.stack(updates), weights)


def rounds_of(num_rounds, num_params, *, seed=0, num_sites=5, scale=1.0):
    """Per round: the updates of every site (2N long for scaffold's Δc) and their weights."""
    rng = np.random.default_rng(seed)
    return [([(scale * rng.standard_normal(num_params)).astype(np.float32)
              for _ in range(num_sites)], list(rng.dirichlet(np.ones(num_sites))))
            for _ in range(num_rounds)]


def run(strategy, weights, rounds, *, in_place=False):
    for updates, p in rounds:
        aggregate = aggregate_of(strategy, updates, p)
        weights = strategy.server_step(weights, aggregate, out=weights if in_place else None)
    return weights


def vector_size(name, num_params):
    return 2 * num_params if name == "scaffold" else num_params


# -- the registry and the interface -------------------------------------------------------

def test_registry_lists_all_nine_strategies():
    # test_config registers a "test_*" strategy of its own in the same process
    assert [n for n in STRATEGIES.names() if not n.startswith("test_")] == ALL
    for name in ALL:
        strategy = build_strategy(name, {})
        assert strategy.name == name and isinstance(strategy, Strategy)


def test_flags():
    flags = {name: (build_strategy(name, {}).linear, build_strategy(name, {}).control_variates)
             for name in ALL}
    assert {n for n, (linear, _) in flags.items() if not linear} == {"median", "trimmed_mean"}
    assert {n for n, (_, cv) in flags.items() if cv} == {"scaffold"}
    assert build_strategy("fedprox", {}).proximal_mu == 0.01
    assert build_strategy("fedprox", {"mu": 0.5}).proximal_mu == 0.5
    assert all(build_strategy(n, {}).proximal_mu == 0.0 for n in ALL if n != "fedprox")
    assert all(make(n, 3).server_control is None for n in ALL if n != "scaffold")


def test_defaults():
    assert dataclasses.asdict(build_strategy("fedadam", {}).options) == {
        "server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    assert dataclasses.asdict(build_strategy("fedyogi", {}).options) == {
        "server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    assert dataclasses.asdict(build_strategy("fedadagrad", {}).options) == {
        "server_lr": 0.01, "beta1": 0.0, "tau": 1e-3}
    assert dataclasses.asdict(build_strategy("fedavgm", {}).options) == {
        "server_lr": 1.0, "momentum": 0.9}
    assert build_strategy("trimmed_mean", {}).options.trim == 0.1
    state = make("fedadam", 3, tau=0.5).state_dict()
    np.testing.assert_array_equal(state["m"], 0)
    np.testing.assert_array_equal(state["v"], 0.25)  # v₋₁ = τ²
    assert state["v"].dtype == np.float32


def test_client_weights_are_the_sample_shares():
    for name in ALL:
        assert build_strategy(name, {}).client_weights({3: 30, 7: 10}) == {3: 0.75, 7: 0.25}


# -- FedAvg and its limiting cases ---------------------------------------------------------

stacks = st.tuples(st.integers(1, 6), st.integers(1, 8)).flatmap(
    lambda shape: arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=32)))


@settings(max_examples=40, deadline=None)
@given(stacks)
def test_fedavg_with_equal_weights_steps_by_the_mean(updates):
    num_updates, num_params = updates.shape
    w = np.linspace(-1, 1, num_params, dtype=np.float32)
    new = build_strategy("fedavg", {}).server_step(
        w, weighted_sum(list(updates), [1 / num_updates] * num_updates))
    np.testing.assert_allclose(new, w + updates.astype(np.float64).mean(axis=0),
                               rtol=1e-5, atol=1e-3)


def test_fedavgm_without_momentum_is_fedavg_over_rounds():
    rounds = rounds_of(4, 50)
    w = np.ones(50, np.float32)
    fedavg = run(build_strategy("fedavg", {}), w.copy(), rounds)
    fedavgm = run(make("fedavgm", 50, momentum=0, server_lr=1), w.copy(), rounds)
    np.testing.assert_array_equal(fedavgm, fedavg)


def test_fedavgm_accumulates_velocity():
    strategy = make("fedavgm", 2, momentum=0.5, server_lr=2.0)
    w = strategy.server_step(f32(0, 0), f32(1, -2))       # v = Δ = [1, -2]; w = 2v
    np.testing.assert_allclose(w, [2, -4])
    w = strategy.server_step(w, f32(1, 0))                # v = 0.5 v + Δ = [1.5, -1]
    np.testing.assert_allclose(w, [2 + 3, -4 - 2])
    np.testing.assert_allclose(strategy.state_dict()["velocity"], [1.5, -1])


def test_fedprox_server_step_is_fedavg():
    rounds = rounds_of(3, 40)
    w = np.zeros(40, np.float32)
    np.testing.assert_array_equal(run(make("fedprox", 40, mu=0.1, server_lr=0.7), w.copy(), rounds),
                                  run(make("fedavg", 40, server_lr=0.7), w.copy(), rounds))


def test_server_lr_scales_every_step_of_the_plain_strategies():
    for name in ("fedavg", "fedprox", "median", "trimmed_mean"):
        updates = [f32(2, -4)] * 3
        strategy = build_strategy(name, {"server_lr": 0.5})
        out = strategy.server_step(f32(1, 1), aggregate_of(strategy, updates, [1 / 3] * 3))
        np.testing.assert_allclose(out, [2, -1], err_msg=name)


# -- adaptive server optimizers, against hand computation ---------------------------------
# β1 = β2 = 0.5, τ = 1 (so v₋₁ = 1), η = 1, w₀ = 0; Δ₁ = [7, −1], Δ₂ = [1, 1].
# m₁ = [3.5, −0.5] and m₂ = 0.5 m₁ + 0.5 Δ₂ = [2.25, 0.25] for all three.
ADAPTIVE = dict(server_lr=1.0, beta1=0.5, beta2=0.5, tau=1.0)
DELTAS = [f32(7, -1), f32(1, 1)]


def two_steps(name, options):
    strategy = make(name, 2, **options)
    w1 = strategy.server_step(f32(0, 0), DELTAS[0]).astype(np.float64)
    v1 = strategy.state_dict()["v"].astype(np.float64)
    w2 = strategy.server_step(w1.astype(np.float32), DELTAS[1]).astype(np.float64)
    state = strategy.state_dict()
    np.testing.assert_allclose(state["m"], [2.25, 0.25])
    return w1, v1, w2, state["v"].astype(np.float64)


def test_fedadam_first_two_steps():
    w1, v1, w2, v2 = two_steps("fedadam", ADAPTIVE)
    # v₁ = 0.5·1 + 0.5·Δ₁² = [25, 1]; v₂ = 0.5 v₁ + 0.5 Δ₂² = [13, 1]
    np.testing.assert_allclose(v1, [25, 1])
    np.testing.assert_allclose(w1, [3.5 / (5 + 1), -0.5 / (1 + 1)], rtol=1e-6)
    np.testing.assert_allclose(v2, [13, 1])
    np.testing.assert_allclose(w2 - w1, [2.25 / (math.sqrt(13) + 1), 0.25 / 2], rtol=1e-5)


def test_fedyogi_first_two_steps():
    w1, v1, w2, v2 = two_steps("fedyogi", ADAPTIVE)
    # v₁ = 1 − 0.5 Δ₁² sign(1 − Δ₁²) = [1 + 24.5, 1 − 0] (sign(0) = 0: v stays)
    np.testing.assert_allclose(v1, [25.5, 1])
    np.testing.assert_allclose(w1, [3.5 / (math.sqrt(25.5) + 1), -0.25], rtol=1e-6)
    # v₂ = v₁ − 0.5 Δ₂² sign(v₁ − Δ₂²) = [25.5 − 0.5, 1 − 0]
    np.testing.assert_allclose(v2, [25, 1])
    np.testing.assert_allclose(w2 - w1, [2.25 / 6, 0.125], rtol=1e-5)


def test_fedadagrad_first_two_steps():
    options = {k: v for k, v in ADAPTIVE.items() if k != "beta2"}
    w1, v1, w2, v2 = two_steps("fedadagrad", options)
    # v₁ = 1 + Δ₁² = [50, 2]; v₂ = v₁ + Δ₂² = [51, 3]
    np.testing.assert_allclose(v1, [50, 2])
    np.testing.assert_allclose(w1, [3.5 / (math.sqrt(50) + 1), -0.5 / (math.sqrt(2) + 1)],
                               rtol=1e-6)
    np.testing.assert_allclose(v2, [51, 3])
    np.testing.assert_allclose(w2 - w1, [2.25 / (math.sqrt(51) + 1), 0.25 / (math.sqrt(3) + 1)],
                               rtol=1e-5)


def test_fedadagrad_defaults_to_no_momentum():
    strategy = make("fedadagrad", 1, server_lr=1.0, tau=1.0)
    w = strategy.server_step(f32(0), f32(3))  # m = Δ = 3, v = 1 + 9
    np.testing.assert_allclose(w, [3 / (math.sqrt(10) + 1)], rtol=1e-6)


positive = st.floats(2.0 ** -10, 100, width=32)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, 6, elements=positive),
       arrays(np.float32, 6, elements=st.floats(-10, 10, width=32)),
       st.integers(0, 999).map(lambda k: k / 1000))
def test_yogi_and_adam_differ_as_the_formula_says(v0, delta, beta2):
    """Adam moves v towards Δ² multiplicatively; Yogi by the additive step (1 − β2) Δ²."""
    after = {}
    for name in ("fedadam", "fedyogi"):
        strategy = make(name, 6, beta2=beta2)
        strategy.load_state_dict({"m": np.zeros(6, np.float32), "v": v0})
        strategy.server_step(np.zeros(6, np.float32), delta)
        after[name] = strategy.state_dict()["v"].astype(np.float64)
    v0, d2 = v0.astype(np.float64), delta.astype(np.float64) ** 2
    # the state is float32: values below its smallest normal (Δ² of a subnormal Δ, which
    # hypothesis finds) are 0 there, so compare within that absolute floor
    tiny = float(np.finfo(np.float32).tiny)
    np.testing.assert_allclose(after["fedadam"], beta2 * v0 + (1 - beta2) * d2, rtol=1e-5,
                               atol=tiny)
    np.testing.assert_allclose(after["fedyogi"], v0 - (1 - beta2) * d2 * np.sign(v0 - d2),
                               rtol=1e-5, atol=1e-6 * d2.max() + tiny)
    # both move v towards Δ², Yogi never by more than (1 − β2) Δ²
    assert np.all(np.abs(after["fedyogi"] - v0) <= (1 - beta2) * d2 * (1 + 1e-5) + 1e-6 * (v0 + d2))


# -- robust aggregation --------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(arrays(np.float32, 7, elements=st.floats(-1e3, 1e3, width=32)), st.integers(1, 6))
def test_median_of_identical_updates_is_that_update(update, num_updates):
    stack = np.stack([update] * num_updates)
    np.testing.assert_array_equal(build_strategy("median", {}).combine(stack, [1] * num_updates),
                                  update)


@settings(max_examples=40, deadline=None)
@given(stacks, st.randoms(use_true_random=False))
def test_trimmed_mean_without_trim_is_the_unweighted_mean(updates, rnd):
    weights = [rnd.random() + 0.01 for _ in updates]  # ignored: robust aggregators are unweighted
    combined = build_strategy("trimmed_mean", {"trim": 0}).combine(updates, weights)
    np.testing.assert_allclose(combined, updates.astype(np.float64).mean(axis=0),
                               rtol=1e-6, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(stacks, st.sampled_from(["median", "trimmed_mean"]), st.randoms(use_true_random=False))
def test_robust_aggregates_are_permutation_invariant_and_within_range(updates, name, rnd):
    strategy = build_strategy(name, {"trim": 0.2} if name == "trimmed_mean" else {})
    order = list(range(len(updates)))
    rnd.shuffle(order)
    a = strategy.combine(updates, [1] * len(updates))
    # equal up to the order of a float64 sum (when nothing is trimmed)
    np.testing.assert_allclose(a, strategy.combine(updates[order], [1] * len(updates)),
                               rtol=1e-6, atol=1e-30)
    tolerance = 1e-3 * (1 + np.abs(updates).max(axis=0))
    assert np.all(a >= updates.min(axis=0) - tolerance)
    assert np.all(a <= updates.max(axis=0) + tolerance)


def test_median_resists_one_huge_outlier_among_five():
    honest = [f32(1.0, -2.0, 0.5), f32(1.2, -1.8, 0.4), f32(0.9, -2.1, 0.6), f32(1.1, -2.2, 0.5)]
    updates = honest + [f32(1e9, -1e9, 1e9)]
    p = [0.1, 0.1, 0.1, 0.1, 0.6]  # the attacker also claims most of the samples
    median = build_strategy("median", {}).combine(np.stack(updates), p)
    np.testing.assert_allclose(median, [1.1, -2.1, 0.5], rtol=1e-6)
    assert np.abs(weighted_sum(updates, p)).min() > 1e8  # what fedavg would have done


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    median = build_strategy("median", {}).combine(np.stack([f32(1), f32(2), f32(10), f32(-5)]),
                                                  [0.25] * 4)
    np.testing.assert_array_equal(median, [1.5])


def test_trimmed_mean_drops_the_extremes():
    # per coordinate: [1, 2, 3, 4, 100] and [-1e6, 5, 6, 7, 8]; trim 0.2 of 5 drops one each end
    updates = np.array([[1, 5], [100, -1e6], [3, 7], [2, 8], [4, 6]], np.float32)
    combined = build_strategy("trimmed_mean", {"trim": 0.2}).combine(updates, [0.2] * 5)
    np.testing.assert_allclose(combined, [3, 6])


def test_trimmed_mean_of_too_few_updates_trims_nothing():
    updates = np.array([[1], [2], [30]], np.float32)  # floor(0.2 · 3) = 0
    np.testing.assert_allclose(build_strategy("trimmed_mean", {"trim": 0.2}).combine(
        updates, [1 / 3] * 3), [11])


def test_trimmed_mean_that_leaves_nothing_is_an_update_error():
    from fedsilo.aggregate import coordinate_median, trimmed_mean

    with pytest.raises(UpdateError, match=r"K=4 updates with trim=0.5"):
        trimmed_mean(np.ones((4, 3), np.float32), 0.5)
    odd = np.arange(15, dtype=np.float32).reshape(5, 3) ** 2
    np.testing.assert_array_equal(trimmed_mean(odd, 0.5), coordinate_median(odd))


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_robust_combine_of_no_updates_is_an_update_error(name):
    with pytest.raises(UpdateError, match="no updates"):
        build_strategy(name, {}).combine(np.zeros((0, 3), np.float32), [])


def test_linear_combine_is_what_the_transport_sums():
    updates, p = rounds_of(1, 9)[0]
    for name in ("fedavg", "fedadam"):
        np.testing.assert_allclose(build_strategy(name, {}).combine(np.stack(updates), p),
                                   weighted_sum(updates, p), rtol=1e-6, atol=1e-7)


# -- SCAFFOLD ------------------------------------------------------------------------------

def test_scaffold_steps_w_with_server_lr_and_c_with_the_fraction():
    strategy = make("scaffold", 2, server_lr=0.5)
    np.testing.assert_array_equal(strategy.server_control, [0, 0])
    # two of four sites contributed, p = [0.75, 0.25]: uploads [Δw_k, Δc_k]
    uploads = [f32(2, -4, 1, 3), f32(6, 0, -3, 3)]
    aggregate = weighted_sum(uploads, [0.75, 0.25])           # [3, -3, 0, 3]
    w = strategy.server_step(f32(1, 1), aggregate, fraction=0.5)
    np.testing.assert_allclose(w, [1 + 0.5 * 3, 1 - 0.5 * 3])
    np.testing.assert_allclose(strategy.server_control, [0, 1.5])
    strategy.server_step(w, f32(0, 0, 2, -2), fraction=1.0)   # w still moves by 0
    np.testing.assert_allclose(strategy.server_control, [2, -0.5])


def test_scaffold_control_is_read_only_and_needs_the_2n_aggregate():
    strategy = make("scaffold", 3)
    with pytest.raises(ValueError):
        strategy.server_control[0] = 1.0
    with pytest.raises(ValueError, match="2 × 3 floats"):
        strategy.server_step(np.zeros(3, np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="fraction"):
        strategy.server_step(np.zeros(3, np.float32), np.zeros(6, np.float32), fraction=0)


# -- state, resume, in-place ---------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_resume_from_state_dict_is_bit_identical(name):
    num_params = 300
    rounds = rounds_of(4, vector_size(name, num_params), seed=1, scale=0.1)
    w0 = np.linspace(-1, 1, num_params, dtype=np.float32)

    def step(strategy, w, updates, p):
        aggregate = aggregate_of(strategy, updates, p)
        return strategy.server_step(w, aggregate, fraction=0.75)

    uninterrupted = make(name, num_params)
    w_full = w0.copy()
    for updates, p in rounds:
        w_full = step(uninterrupted, w_full, updates, p)

    first = make(name, num_params)
    w = w0.copy()
    for updates, p in rounds[:2]:
        w = step(first, w, updates, p)
    saved, saved_w = first.state_dict(), w.copy()
    assert set(saved) == set(STATEFUL.get(name, ()))
    step(first, w, *rounds[2])  # the saved state must be a copy, not a view of live buffers

    resumed = make(name, num_params)
    resumed.load_state_dict(saved)
    w = saved_w
    for updates, p in rounds[2:]:
        w = step(resumed, w, updates, p)
    np.testing.assert_array_equal(w, w_full)
    for key, value in uninterrupted.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value)
    if name in STATEFUL:  # the state matters: a fresh strategy would not match
        fresh = make(name, num_params)
        w = saved_w
        for updates, p in rounds[2:]:
            w = step(fresh, w, updates, p)
        if name == "scaffold":  # c does not enter the server's w step, only the participants'
            assert not np.array_equal(fresh.server_control, resumed.server_control)
        else:
            assert not np.array_equal(w, w_full)


@pytest.mark.parametrize("name", ALL)
def test_in_place_step_equals_a_fresh_output(name):
    # long enough to cross the block boundaries of the element-wise steps
    num_params = 2 * 65536 + 37
    rounds = rounds_of(3, vector_size(name, num_params), seed=2, num_sites=5, scale=0.1)
    w0 = np.linspace(-1, 1, num_params, dtype=np.float32)
    fresh = run(make(name, num_params), w0.copy(), rounds)
    buffer = w0.copy()
    in_place = run(make(name, num_params), buffer, rounds, in_place=True)
    assert in_place is buffer
    np.testing.assert_array_equal(in_place, fresh)
    assert not np.array_equal(fresh, w0)


def test_stateful_strategies_need_setup():
    for name in STATEFUL:
        strategy = build_strategy(name, {})
        with pytest.raises(RuntimeError, match=r"call setup\(num_params\)"):
            strategy.server_step(np.zeros(4, np.float32), np.zeros(8, np.float32))
        with pytest.raises(RuntimeError, match="setup"):
            strategy.state_dict()
    assert build_strategy("fedavg", {}).state_dict() == {}
    with pytest.raises(ValueError, match="set up for 4 parameters"):
        make("fedadam", 4).server_step(np.zeros(5, np.float32), np.zeros(5, np.float32))


def test_load_state_dict_refuses_a_mismatched_checkpoint():
    strategy = make("fedadam", 4)
    with pytest.raises(CheckpointError, match=r"keys \['velocity'\], expected \['m', 'v'\]"):
        strategy.load_state_dict({"velocity": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match=r"'v' of strategy 'fedadam' is float32 \(5,\)"):
        strategy.load_state_dict({"m": np.zeros(4, np.float32), "v": np.zeros(5, np.float32)})
    with pytest.raises(CheckpointError, match="float64"):
        strategy.load_state_dict({"m": np.zeros(4), "v": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError):
        build_strategy("fedavg", {}).load_state_dict({"m": np.zeros(4, np.float32)})
    build_strategy("fedavg", {}).load_state_dict({})


# -- options -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, options, message", [
    ("fedavgm", {"momentum": 1.0}, r"'strategy.momentum' must be in \[0, 1\), got 1.0"),
    ("fedavgm", {"momentum": -0.1}, "'strategy.momentum'"),
    ("fedadam", {"beta1": 1}, r"'strategy.beta1' must be in \[0, 1\)"),
    ("fedyogi", {"beta2": -0.5}, r"'strategy.beta2' must be in \[0, 1\)"),
    ("fedadam", {"tau": 0}, "'strategy.tau' must be a finite number > 0, got 0.0"),
    ("fedadagrad", {"tau": -1e-3}, "'strategy.tau'"),
    ("fedprox", {"mu": -0.01}, "'strategy.mu' must be a finite number >= 0"),
    ("trimmed_mean", {"trim": 0.5}, r"'strategy.trim' must be in \[0, 0.5\)"),
    ("trimmed_mean", {"trim": -0.1}, "'strategy.trim'"),
    ("median", {"server_lr": 0}, "'strategy.server_lr' must be a finite number > 0"),
    ("scaffold", {"server_lr": float("nan")}, "'strategy.server_lr'"),
    ("fedavg", {"server_lr": float("inf")}, "'strategy.server_lr'"),
    ("fedadagrad", {"beta2": 0.9}, "unknown config key 'strategy.beta2' for strategy 'fedadagrad'"),
    ("median", {"trim": 0.1}, "unknown config key 'strategy.trim'"),
    ("fedavgm", {"momentum": "high"}, "'strategy.momentum' must be a number, got str 'high'"),
    ("fedprox", {"mu": True}, "'strategy.mu' must be a number, got bool True"),
])
def test_invalid_options_name_the_key(name, options, message):
    with pytest.raises(ConfigError, match=message):
        build_strategy(name, options)


def test_options_are_validated_when_the_config_is_loaded():
    from fedsilo.config import load_config

    config = load_config(None, overrides=["strategy.name=fedyogi", "strategy.tau=0.01"])
    assert build_strategy(config.strategy.name, dict(config.strategy.options)).options.tau == 0.01
    with pytest.raises(ConfigError, match="'strategy.beta1'"):
        load_config(None, overrides=["strategy.name=fedadam", "strategy.beta1=1.5"])


def test_int_options_are_coerced_and_checked():
    class Counted(Strategy):
        name = "counted"

        @dataclasses.dataclass(frozen=True)
        class Options:
            rounds: int = 1
            rate: float = 1.0

    assert Counted.validate_options({"rounds": 3, "rate": 2}) == Counted.Options(3, 2.0)
    assert type(Counted.validate_options({"rounds": 3.0}).rounds) is int
    assert type(Counted.validate_options({"rate": 2}).rate) is float
    for bad in (2.5, True, "3"):
        with pytest.raises(ConfigError, match="'strategy.rounds' must be an integer"):
            Counted.validate_options({"rounds": bad})
