"""``fedsilo audit``: the one-run audit's bound (privacy/audit.py, Steinke, Nasr & Jagielski
2023) and the canary run on fedsilo's own DP-SGD (privacy/canaries.py), which must catch
broken noise and must not accuse correct noise."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedsilo.cli import main
from fedsilo.privacy.audit import (
    audit_bound,
    canary_scores,
    epsilon_lower_bound,
    guess,
    measured_noise,
    p_value,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO_DATA = ROOT / "src" / "fedsilo" / "demo_data" / "pneumoniamnist.npz"

# -- the bound -----------------------------------------------------------------------------


def test_all_correct_without_delta_is_the_closed_form():
    """δ = 0, v = r: P[Binomial(r, p) >= r] = p^r = β  ⇔  ε = -ln(β^(-1/r) - 1)."""
    for r in (10, 100, 500):
        expected = -math.log(0.05 ** (-1 / r) - 1)
        got = epsilon_lower_bound(num_canaries=1000, num_guesses=r, num_correct=r, delta=0.0)
        assert got == pytest.approx(expected, abs=1e-6)


def test_p_value_is_the_binomial_tail_plus_the_delta_term():
    tail = stats.binom.sf(69, 100, 1 / (1 + math.exp(-0.5)))
    assert p_value(num_canaries=1000, num_guesses=100, num_correct=70, epsilon=0.5,
                   delta=0.0) == pytest.approx(tail)
    with_delta = p_value(num_canaries=1000, num_guesses=100, num_correct=70, epsilon=0.5,
                         delta=1e-5)
    assert tail < with_delta < tail + 2 * 1000 * 1e-5  # α <= 1


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 400), data=st.data())
def test_more_correct_guesses_never_lower_the_bound(r, data):
    v = data.draw(st.integers(0, r - 1))
    low = epsilon_lower_bound(num_canaries=1000, num_guesses=r, num_correct=v, delta=1e-5)
    high = epsilon_lower_bound(num_canaries=1000, num_guesses=r, num_correct=v + 1,
                               delta=1e-5)
    assert 0 <= low <= high


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 1000))
def test_guesses_at_chance_give_no_bound(r):
    assert epsilon_lower_bound(num_canaries=1000, num_guesses=r, num_correct=r // 2,
                               delta=1e-5) == 0.0


@settings(max_examples=30, deadline=None)
@given(r=st.integers(1, 300), frac=st.floats(0.5, 1.0), eps=st.floats(0.0, 6.0))
def test_p_value_rises_with_epsilon(r, frac, eps):
    v = round(frac * r)
    a = p_value(num_canaries=1000, num_guesses=r, num_correct=v, epsilon=eps, delta=1e-5)
    b = p_value(num_canaries=1000, num_guesses=r, num_correct=v, epsilon=eps + 0.5,
                delta=1e-5)
    assert 0 <= a <= b <= 1


def test_higher_confidence_means_a_lower_bound():
    kwargs = dict(num_canaries=1000, num_guesses=200, num_correct=180, delta=1e-5)
    assert epsilon_lower_bound(**kwargs, confidence=0.99) < epsilon_lower_bound(
        **kwargs, confidence=0.95) < epsilon_lower_bound(**kwargs, confidence=0.5)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="correct <= guesses"):
        p_value(num_canaries=10, num_guesses=5, num_correct=6, epsilon=1.0, delta=0.0)
    with pytest.raises(ValueError, match="do not fit"):
        guess(np.zeros(3), k_plus=2, k_minus=2)


# -- scores and guesses --------------------------------------------------------------------


def test_guess_marks_the_top_and_bottom_scores():
    said = guess(np.array([5.0, 1.0, 3.0, 4.0, 2.0]), k_plus=2, k_minus=1)
    assert said.tolist() == [1, -1, 0, 1, 0]


def test_measured_noise_ignores_rare_spikes():
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 0.7, size=(300, 400))
    x[rng.random(x.shape) < 0.02] += 1.0  # the canaries' spikes, q/2 of the entries
    assert measured_noise(x) == pytest.approx(0.7, rel=0.05)
    assert measured_noise(np.zeros((3, 3))) > 0  # noise-free: finite scores still


def test_the_lr_score_separates_sampled_canaries():
    x = np.zeros((50, 2))
    x[7, 0] = 1.0
    lr = canary_scores(x, sample_rate=0.05, sigma=0.1)
    assert lr[0] > lr[1]
    assert canary_scores(x, sample_rate=0.05, sigma=0.1, method="sum").tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown score"):
        canary_scores(x, sample_rate=0.05, sigma=0.1, method="max")


def _gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact ε(δ) of one Gaussian mechanism of sensitivity 1 (Balle & Wang 2018)."""
    def delta_at(eps):
        return (stats.norm.cdf(0.5 / sigma - eps * sigma)
                - math.exp(eps) * stats.norm.cdf(-0.5 / sigma - eps * sigma))
    low, high = 0.0, 50.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
    return high


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_simulated_gaussian_mechanism_is_never_accused(sigma):
    """Soundness on a mechanism whose ε is known exactly: every canary goes through one
    Gaussian mechanism (q = 1); the bound stays below the true ε, and rises as σ falls."""
    rng = np.random.default_rng(int(sigma * 10))
    bits = rng.integers(0, 2, 1000) * 2 - 1
    x = (bits > 0) + rng.normal(0.0, sigma, size=(1, 1000))
    bound = audit_bound(canary_scores(x, sample_rate=1.0, sigma=sigma), bits, delta=1e-5)
    assert 0 <= bound.epsilon_lb <= _gaussian_epsilon(sigma, 1e-5)
    if sigma == 0.5:
        assert bound.epsilon_lb > 1.0  # the audit has power, not just soundness


def test_the_maths_imports_no_torch():
    probe = ("import sys, fedsilo.privacy.audit, fedsilo.audit_cli, fedsilo.cli\n"
             "fedsilo.cli.build_parser()\n"
             "print(sorted(m for m in ('torch', 'opacus', 'mpi4py') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


# -- the canary run on fedsilo's DP-SGD ----------------------------------------------------


def test_canaries_see_exactly_their_own_spikes_under_a_known_secret():
    """The hooks: with the noise regenerated from a known secret and the other records' sum
    taken away, each observation is exactly 0 or 1 (a canary that was in and sampled), on
    steps with a Poisson batch and on empty ones (the engine then skips the clipped sum)."""
    import torch

    from fedsilo.config import SiteDP, TrainConfig
    from fedsilo.loading import TensorSplit
    from fedsilo.privacy.canaries import CanaryPrivacy, _Canaries, public_secret
    from fedsilo.training import make_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    data = TensorSplit(torch.randn(200, 1, 4, 4), torch.randint(0, 2, (200,)))
    train = TrainConfig(batch_size=2, max_steps=60, lr=0.1)  # q = 0.01: 13 % empty batches
    engine = CanaryPrivacy(model, site=0, settings=SiteDP(None, 1.0, 1e-5, 0.5),
                           mechanism="rdp", num_samples=200, train=train, rounds=1,
                           model_name="toy", sample=data.sample(2))
    canaries = _Canaries(engine.params, num_canaries=20, sample_rate=0.3, clip=0.5,
                         expected_batch=2.0, rng=np.random.default_rng(0))
    secret = public_secret(0)
    canaries.public_noise = (secret, 1.0 * 0.5)
    engine.canaries = canaries
    optimizer = make_optimizer(model, train)
    optimizer.register_step_pre_hook(lambda *_: canaries.observe(engine.params))
    steps, samples, *_ = engine.train_round(data, optimizer=optimizer, secret=secret,
                                            round_index=1)
    x = np.stack(canaries.observations)
    assert x.shape == (steps, 20) and steps == 60 and samples > 0
    assert np.abs(x - np.round(x)).max() < 1e-4
    spikes = np.round(x)
    assert set(spikes.ravel().tolist()) <= {0.0, 1.0}
    assert (spikes[:, canaries.inclusion < 0] == 0).all()
    assert 0.15 < spikes[:, canaries.inclusion > 0].mean() < 0.45  # sampled at rate 0.3
    empty = [step for step in range(steps) if not engine._poisson(secret, 1, step).size]
    assert empty, "no empty Poisson batch: the test would miss that path"



@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "shards"
    assert main(["prep", "medmnist", "--source", str(DEMO_DATA), "--sites", "3",
                 "--partition", "iid", "--seed", "0", "--out", str(out)]) == 0
    return out


def audit(shards: Path, *extra: str, epsilon: float = 2.0) -> list[str]:
    return ["audit", "--set", f"data.dir={shards}", "--set", "model.name=dp_cnn",
            "--set", "dp.enabled=true", "--set", f"dp.target_epsilon={epsilon}",
            "--set", "runtime.threads=1", "--set", "runtime.device=cpu",
            "--steps", "100", "--canaries", "1000", "--site", "1", *extra]


@pytest.mark.slow
def test_correct_noise_is_not_accused(shards, tmp_path, capsys):
    record = tmp_path / "audit.json"
    assert main(audit(shards, "--seed", "3", "--out", str(record))) == 0
    result = json.loads(record.read_text())
    assert result["reported_epsilon"] == pytest.approx(2.0, abs=0.02)
    assert result["steps"] == 100 and result["num_canaries"] == 1000
    assert 0 <= result["epsilon_lb"] <= result["reported_epsilon"]
    assert not result["violation"]
    # the canaries see the engine's real noise: σ as claimed
    assert result["measured_noise_multiplier"] == pytest.approx(result["noise_multiplier"],
                                                                rel=0.05)
    assert "no violation found" in capsys.readouterr().out
    # a record is never overwritten, and the refusal comes before any training
    assert main(audit(shards, "--out", str(record))) == 2
    assert "already exists" in capsys.readouterr().err
    assert json.loads(record.read_text()) == result


@pytest.mark.slow
def test_noise_ten_times_too_small_is_caught(shards, capsys):
    assert main(audit(shards, "--seed", "4", "--json", "--debug-noise-scale", "0.1")) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["reported_epsilon"] == pytest.approx(2.0, abs=0.02)  # the false claim
    assert result["epsilon_lb"] > result["reported_epsilon"] + 1.0
    assert result["violation"]
    assert result["measured_noise_multiplier"] < 0.2 * result["noise_multiplier"]


@pytest.mark.slow
def test_noise_from_a_public_seed_is_caught(shards, capsys):
    assert main(audit(shards, "--seed", "5", "--json", "--debug-public-seed")) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["epsilon_lb"] > result["reported_epsilon"] + 1.0
    # the regenerated noise cancels the engine's to float precision: only the spikes remain
    assert result["measured_noise_multiplier"] < 0.01
    # every wrong guess is an "in" canary Poisson sampling never picked ((1 - q)^100 ≈ 2 %)
    assert result["num_correct"] >= 0.98 * result["num_guesses"]


@pytest.mark.parametrize("extra, message", [
    (["--site", "9"], "--site 9: the shard set"),
    (["--canaries", "0"], "--canaries must be at least 1"),
    (["--canaries", "10000000"], "trainable parameters"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--debug-noise-scale", "0"], "--debug-noise-scale must be > 0"),
    (["--set", "dp.enabled=false"], "dp.enabled: false"),
])
def test_bad_input_is_one_clear_line(shards, capsys, extra, message):
    assert main(audit(shards, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1
