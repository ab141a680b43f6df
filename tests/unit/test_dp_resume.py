"""Resuming DP-SGD with more rounds plans σ over what the budget has left (privacy/engine.py)."""

from __future__ import annotations

import pytest
import torch

from fedsilo.config import SiteDP, TrainConfig
from fedsilo.privacy import PrivacyAccountant


def engine(*, rounds: int, target: float = 3.0):
    from fedsilo.privacy.engine import ParticipantPrivacy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    return ParticipantPrivacy(model, site=0, settings=SiteDP(target, None, 1e-5, 1.0),
                              mechanism="rdp", num_samples=500,
                              train=TrainConfig(batch_size=50, max_steps=5), rounds=rounds,
                              model_name="toy", sample=torch.randn(2, 1, 4, 4))


def after_rounds(first, rounds: int) -> dict:
    """The checkpoint state of ``first`` after ``rounds`` rounds at its own σ."""
    first.accountant.spend(noise_multiplier=first.noise_multiplier,
                           sample_rate=first.sample_rate,
                           num_steps=rounds * first.steps_per_round)
    return first.state_dict()


def test_an_unchanged_resume_keeps_sigma_bit_for_bit() -> None:
    state = after_rounds(engine(rounds=10), 4)
    resumed = engine(rounds=10)
    resumed.load_state_dict(state, remaining_rounds=6)
    assert resumed.noise_multiplier == state["noise_multiplier"]


def test_more_rounds_spend_the_remaining_budget_without_exceeding_it() -> None:
    """Target 3 over 10 rounds, then resumed for 20: σ must rise for the last 10 so that all
    20 fit (the old code recomputed σ for 20 rounds as if none had run: too little noise for
    the history, so the budget ran out and sites stopped early)."""
    first = engine(rounds=10)
    state = after_rounds(first, 10)
    assert first.epsilon == pytest.approx(3.0, abs=0.02)
    resumed = engine(rounds=20)
    resumed.load_state_dict(state, remaining_rounds=10)
    assert resumed.noise_multiplier > state["noise_multiplier"]
    # ... enough to fit, and no more than needed (to 0.01 in ε)
    final = resumed.accountant.epsilon_after(
        noise_multiplier=resumed.noise_multiplier, sample_rate=resumed.sample_rate,
        num_steps=10 * resumed.steps_per_round, delta=1e-5)
    assert 3.0 - 0.02 <= final <= 3.0
    # the whole history, as an independent accountant adds it up
    check = PrivacyAccountant("rdp")
    check.spend(noise_multiplier=state["noise_multiplier"], sample_rate=resumed.sample_rate,
                num_steps=10 * resumed.steps_per_round)
    check.spend(noise_multiplier=resumed.noise_multiplier, sample_rate=resumed.sample_rate,
                num_steps=10 * resumed.steps_per_round)
    assert check.epsilon(delta=1e-5) == pytest.approx(final, rel=1e-9)
    assert resumed.round_fits()


def test_a_spent_budget_keeps_sigma_and_stops_the_site() -> None:
    first = engine(rounds=10)
    state = after_rounds(first, 12)  # more than planned: over budget already
    resumed = engine(rounds=20)
    resumed.load_state_dict(state, remaining_rounds=8)
    assert resumed.noise_multiplier == state["noise_multiplier"]
    assert not resumed.round_fits()
