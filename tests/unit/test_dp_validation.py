"""Validation under DP (dp.validation): what a site releases is noised from its secret and
accounted in its ε, and σ of DP-SGD is planned over what the releases leave."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from fedsilo.config import SiteDP, TrainConfig
from fedsilo.privacy.accounting import PrivacyAccountant, noise_multiplier_for
from fedsilo.privacy.engine import ParticipantPrivacy
from fedsilo.privacy.secret import new_secret

N, TARGET, DELTA, SIGMA_V = 200, 2.0, 1e-5, 10.0


def engine(*, releases: int, sigma_v: float | None = SIGMA_V, rounds: int = 5,
           target: float | None = TARGET) -> ParticipantPrivacy:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    settings = SiteDP(target, None if target else 1.0, DELTA, 1.0)
    return ParticipantPrivacy(model, site=0, settings=settings,
                              mechanism="rdp", num_samples=N, train=TrainConfig(batch_size=20),
                              rounds=rounds, model_name="m", sample=torch.randn(2, 1, 2, 2),
                              mode="hooks", validation_sigma=sigma_v,
                              validation_releases=releases)


def test_releases_are_reserved_in_the_budget_and_spent_within_it():
    plain, reserved = engine(releases=0, sigma_v=None), engine(releases=3)
    assert reserved.noise_multiplier > plain.noise_multiplier  # training pays for them
    assert plain.noise_multiplier == noise_multiplier_for(
        target_epsilon=TARGET, delta=DELTA, sample_rate=plain.sample_rate,
        num_steps=5 * plain.steps_per_round)
    secret = new_secret()
    for r in range(5):
        assert reserved.round_fits()
        reserved.accountant.spend(noise_multiplier=reserved.noise_multiplier,
                                  sample_rate=reserved.sample_rate,
                                  num_steps=reserved.steps_per_round)
        if r in (1, 3, 4):
            assert reserved.release_validation(np.zeros(6), secret=secret,
                                               round_index=r) is not None
    # ε composes the training steps and the three Gaussian releases (q = 1, sensitivity 1)
    expected = PrivacyAccountant("rdp")
    for r in range(5):
        expected.spend(noise_multiplier=reserved.noise_multiplier,
                       sample_rate=reserved.sample_rate, num_steps=reserved.steps_per_round)
        if r in (1, 3, 4):
            expected.spend(noise_multiplier=SIGMA_V, sample_rate=1.0, num_steps=1)
    assert reserved.epsilon == pytest.approx(expected.epsilon(delta=DELTA), rel=1e-12)
    assert TARGET - 0.05 < reserved.epsilon <= TARGET
    report = reserved.report()
    assert report["validation_releases"] == 3
    assert report["steps"] == 5 * reserved.steps_per_round  # training steps only
    # without the releases, the same training would have cost less: they are in ε
    training_only = PrivacyAccountant("rdp")
    training_only.spend(noise_multiplier=reserved.noise_multiplier,
                        sample_rate=reserved.sample_rate,
                        num_steps=5 * reserved.steps_per_round)
    assert training_only.epsilon(delta=DELTA) < reserved.epsilon - 1e-3


def test_a_release_over_the_budget_is_withheld_and_not_spent():
    site = engine(releases=1)
    site.accountant.spend(noise_multiplier=0.5, sample_rate=1.0, num_steps=50)  # over budget
    spent = site.epsilon
    assert site.release_validation(np.ones(4), secret=new_secret(), round_index=1) is None
    assert site.epsilon == spent


def test_released_counts_are_not_the_exact_counts_and_hide_one_example():
    """An attacker who knows every validation example but one, and sees one release, tries
    to tell whether that example is in (bin 2 holds 31) or out (30).  On the exact counts
    the test is perfect; on the released counts its advantage (TPR - FPR) stays within
    what the Gaussian mechanism allows, 2Φ(1/(2σ)) - 1 (0.04 at σ = 10)."""
    site = engine(releases=0, target=None)  # no budget: the attack needs many draws
    without = np.array([12, 5, 30, 7, 1, 0, 3, 40], dtype=np.float64)
    with_one = without.copy()
    with_one[2] += 1
    assert (with_one[2] > without[2] + 0.5) and not (without[2] > without[2] + 0.5)

    def released(counts: np.ndarray, trials: int) -> np.ndarray:
        out = []
        for t in range(trials):  # each run of a site draws a fresh secret
            value = site.release_validation(counts, secret=new_secret(), round_index=t % 7)
            assert value is not None
            out.append(value)
        return np.array(out)

    trials = 1500
    a, b = released(with_one, trials), released(without, trials)
    assert not np.any(a == with_one) and not np.any(b == without)  # never an exact count
    assert np.allclose(a.mean(0), with_one, atol=4 * SIGMA_V / math.sqrt(trials))
    assert np.std(a[:, 0]) == pytest.approx(SIGMA_V, rel=0.1)
    cut = without[2] + 0.5  # the likelihood-ratio test of a Gaussian shift
    advantage = float(np.mean(a[:, 2] > cut) - np.mean(b[:, 2] > cut))
    bound = 2 * norm.cdf(1 / (2 * SIGMA_V)) - 1
    assert advantage <= bound + 4 * math.sqrt(0.5 / trials), (advantage, bound)
    assert site.validation_released == 2 * trials  # every release was accounted


def test_the_shipped_dp_recipe_deploys_a_selected_model_with_a_threshold():
    """jobs/configs/pneumoniamnist-dp.yaml: DP-SGD with noised validation, so its runs
    have a best.pt chosen on val_auc and a Youden threshold."""
    from pathlib import Path

    from fedsilo.config import load_config
    from fedsilo.roles import noised_validation
    from fedsilo.selection import resolve_best_by

    path = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "pneumoniamnist-dp.yaml"
    config = load_config(path)
    assert config.dp.enabled and noised_validation(config)
    assert config.checkpoint.threshold == "youden"
    assert resolve_best_by(config.checkpoint.best_by, private=True,
                           noised=noised_validation(config)) == "val_auc"


@pytest.mark.parametrize("key, value", [("validation_left", -1), ("validation_left", "2"),
                                        ("validation_released", 10**6),
                                        ("validation_released", True)])
def test_a_damaged_checkpoint_count_of_releases_is_refused(key, value):
    """A site's checkpoint says how many validation releases it made and has left; a
    damaged count would misstate what its ε reserves."""
    from fedsilo.errors import CheckpointError

    site = engine(releases=2)
    site.release_validation(np.zeros(4), secret=new_secret(), round_index=1)
    state = site.state_dict()
    assert (state["validation_left"], state["validation_released"]) == (1, 1)
    fresh = engine(releases=2)
    fresh.load_state_dict(state, remaining_rounds=3)
    assert (fresh.validation_left, fresh.validation_released) == (1, 1)
    assert fresh.epsilon == site.epsilon
    with pytest.raises(CheckpointError, match=key):
        engine(releases=2).load_state_dict({**state, key: value}, remaining_rounds=3)
