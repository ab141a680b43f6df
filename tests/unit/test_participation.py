"""Site placement, participant sampling, and the configuration of #7's round options."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.config import load_config
from fedsilo.errors import ConfigError
from fedsilo.participation import assign_sites, rank_of_sites, sample_sites, sample_size


@given(sites=st.integers(1, 200), ranks=st.integers(1, 64))
@settings(max_examples=60, deadline=None)
def test_sites_are_placed_in_contiguous_balanced_blocks(sites, ranks):
    if ranks > sites:
        with pytest.raises(ConfigError, match="at least one site"):
            assign_sites(num_sites=sites, num_ranks=ranks)
        return
    blocks = assign_sites(num_sites=sites, num_ranks=ranks)
    assert [s for block in blocks for s in block] == list(range(sites))  # in order
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1 and min(map(len, blocks)) >= 1
    owner = rank_of_sites(num_sites=sites, num_ranks=ranks)
    assert all(owner[s] == r + 1 for r, block in enumerate(blocks) for s in block)


def test_one_site_per_rank_is_the_identity_placement():
    assert assign_sites(num_sites=4, num_ranks=4) == [[0], [1], [2], [3]]


@given(n=st.integers(1, 100), fraction=st.floats(0.01, 1.0), minimum=st.integers(1, 10),
       seed=st.integers(0, 2**31), round_index=st.integers(1, 500))
@settings(max_examples=80, deadline=None)
def test_sampling_is_reproducible_sized_and_within_the_available(n, fraction, minimum, seed,
                                                                 round_index):
    available = list(range(0, 2 * n, 2))  # site ids need not be contiguous
    chosen = sample_sites(available, fraction=fraction, minimum=minimum, seed=seed,
                          round_index=round_index)
    assert chosen == sample_sites(available, fraction=fraction, minimum=minimum, seed=seed,
                                  round_index=round_index)
    assert chosen == sorted(set(chosen)) and set(chosen) <= set(available)
    assert len(chosen) == sample_size(n, fraction=fraction, minimum=minimum)
    assert min(n, minimum) <= len(chosen) <= n


def test_sampling_differs_between_rounds_and_covers_every_site():
    seen = [tuple(sample_sites(range(10), fraction=0.3, minimum=1, seed=0, round_index=r))
            for r in range(1, 41)]
    assert len(set(seen)) > 10
    assert {s for pick in seen for s in pick} == set(range(10))
    assert sample_size(10, fraction=0.3, minimum=1) == 3
    assert sample_size(10, fraction=0.05, minimum=2) == 2


@pytest.mark.parametrize("override, message", [
    ("participation.fraction=0", "'participation.fraction' must be in (0, 1]"),
    ("participation.fraction=1.5", "'participation.fraction' must be in (0, 1]"),
    ("participation.min=0", "'participation.min' must be >= 1"),
    ("train.round_deadline_s=0", "'train.round_deadline_s' must be > 0"),
    ("on_participant_error=retry", "'on_participant_error' must be one of abort, skip"),
    ("runtime.reduce_dtype=float16", "'runtime.reduce_dtype' must be one of float32, float64"),
])
def test_round_options_are_validated(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides=[override])
    assert message in str(info.value)


@pytest.mark.parametrize("overrides, message", [
    (["strategy.name=median", "he.enabled=true"], "needs each participant's update"),
    (["strategy.name=trimmed_mean", "he.enabled=true"], "aggregation.secure=none"),
    (["strategy.name=median", "aggregation.secure=masks"], "needs each participant.s update"),
    (["strategy.name=median", "dp.user.enabled=true"], "combines updates non-linearly"),
    (["strategy.name=scaffold", "train.optimizer=adam"], "set train.optimizer=sgd"),
])
def test_incompatible_combinations_are_refused_up_front(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides=overrides)


def test_round_options_load_from_yaml_and_round_trip(tmp_path):
    from fedsilo.config import dump_config

    path = tmp_path / "c.yaml"
    path.write_text("participation: {fraction: 0.25, min: 2, seed: 5}\n"
                    "on_participant_error: skip\n"
                    "train: {round_deadline_s: 30, normalize_steps: true}\n"
                    "strategy: {name: fedadam, server_lr: 0.01, beta1: 0.9}\n")
    config = load_config(path)
    assert (config.participation.fraction, config.participation.min) == (0.25, 2)
    assert config.train.round_deadline_s == 30.0 and config.train.normalize_steps
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))
    assert load_config(again) == config


def test_gradient_corrections_add_the_proximal_and_drift_terms_before_the_step():
    import torch

    from fedsilo.training import gradient_corrections

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    b = torch.nn.Parameter(torch.tensor([0.5]))
    drift = torch.tensor([0.1, 0.2, 0.3, -1.0])  # flat: w at offset 0, b at offset 3
    optimizer = torch.optim.SGD([w, b], lr=0.1)
    optimizer.register_step_pre_hook(
        gradient_corrections([(w, 0, 3), (b, 3, 1)], mu=2.0, drift=drift))
    for _ in range(2):  # the anchor stays the weights the hook was made with
        optimizer.zero_grad()
        loss = (w ** 2).sum() + 3 * b.sum()
        loss.backward()
        before_w, before_b = w.detach().clone(), b.detach().clone()
        optimizer.step()
        anchor_w, anchor_b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5])
        expect_w = before_w - 0.1 * (2 * before_w + 2.0 * (before_w - anchor_w) + drift[:3])
        expect_b = before_b - 0.1 * (3 + 2.0 * (before_b - anchor_b) + drift[3:])
        assert torch.allclose(w, expect_w) and torch.allclose(b, expect_b)


def test_secure_modes_refuse_a_federation_below_the_contributor_floor():
    """One site's 'sum' is its update: a secure mode needs min_contributors sites in the
    set and in every round's sample (checked before any rank loads data)."""
    from types import SimpleNamespace

    from fedsilo.federation import _check_secure_floor

    masks = load_config(None, overrides=["aggregation.secure=masks"])
    with pytest.raises(ConfigError, match="needs at least aggregation.min_contributors = 2 "
                                          "sites, but the shard set has 1"):
        _check_secure_floor(masks, SimpleNamespace(num_sites=1))
    sampled = load_config(None, overrides=["aggregation.secure=ckks",
                                           "participation.fraction=0.1"])
    with pytest.raises(ConfigError, match="samples 1 of 5 sites per round"):
        _check_secure_floor(sampled, SimpleNamespace(num_sites=5))
    _check_secure_floor(load_config(None, overrides=["participation.fraction=0.1"]),
                        SimpleNamespace(num_sites=5))  # plaintext: no floor
    _check_secure_floor(masks, SimpleNamespace(num_sites=2))
