"""``fedsilo budget``: the offline planning answer equals Opacus's own accounting."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from fedsilo.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["budget", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_noise_multiplier_for_a_target(capsys):
    code, out, _ = run(capsys, "--samples", "1500", "--batch-size", "64", "--epochs", "2",
                       "--rounds", "5", "--delta", "1e-5", "--target-epsilon", "4", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["sample_rate"] == 64 / 1500 and plan["total_steps"] == 5 * 2 * 24
    acc = RDPAccountant()
    for _ in range(plan["total_steps"]):
        acc.step(noise_multiplier=plan["noise_multiplier"], sample_rate=64 / 1500)
    assert 3.99 <= acc.get_epsilon(delta=1e-5) <= 4.0
    assert plan["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
    assert len(plan["epsilon_per_round"]) == 5
    assert plan["epsilon_per_round"] == sorted(plan["epsilon_per_round"])


def test_epsilon_for_a_noise_multiplier_as_a_table(capsys):
    code, out, _ = run(capsys, "--samples", "1000", "--batch-size", "50", "--rounds", "4",
                       "--max-steps", "10", "--noise-multiplier", "1.2")
    assert code == 0
    acc = RDPAccountant()
    for _ in range(40):
        acc.step(noise_multiplier=1.2, sample_rate=0.05)
    assert f"epsilon           {acc.get_epsilon(delta=1e-5):.4f} at delta 1e-05" in out
    assert "steps             10 per round, 40 in all" in out
    assert out.strip().splitlines()[-1].split()[0] == "4"


@pytest.mark.parametrize("argv, message", [
    (["--samples", "100"], "give exactly one of --target-epsilon and --noise-multiplier"),
    (["--samples", "100", "--target-epsilon", "1", "--noise-multiplier", "1"], "exactly one"),
    (["--samples", "0", "--noise-multiplier", "1"], "--samples must be >= 1"),
    (["--samples", "100", "--delta", "2", "--noise-multiplier", "1"],
     "--delta must be a finite number in (0, 1), got 2"),
    (["--samples", "100", "--max-steps", "0", "--noise-multiplier", "1"],
     "--max-steps must be >= 1, got 0"),
])
def test_bad_arguments(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err


EPS_RANGE, SIGMA_RANGE = "must be a finite number in (0, 10000]", \
    "must be a finite number in [0.01, 10000]"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("argv, message", [
    (["--target-epsilon", "1e308"], f"--target-epsilon {EPS_RANGE}, got 1e+308"),
    (["--target-epsilon", "1e15"], f"--target-epsilon {EPS_RANGE}, got 1e+15"),
    (["--target-epsilon", "nan"], f"--target-epsilon {EPS_RANGE}, got nan"),
    (["--target-epsilon=-inf"], f"--target-epsilon {EPS_RANGE}, got -inf"),
    (["--noise-multiplier", "inf"], f"--noise-multiplier {SIGMA_RANGE}, got inf"),
    (["--noise-multiplier", "nan"], f"--noise-multiplier {SIGMA_RANGE}, got nan"),
    (["--noise-multiplier", "1e-300"], f"--noise-multiplier {SIGMA_RANGE}, got 1e-300"),
    (["--noise-multiplier", "1", "--delta", "nan"],
     "--delta must be a finite number in (0, 1), got nan"),
])
def test_out_of_range_numbers_are_refused_quickly(capsys, argv, message):
    code, _, err = run(capsys, "--samples", "1500", *argv)
    assert code == 2 and message in err


def test_gdp_cannot_plan_for_a_target(capsys):
    code, _, err = run(capsys, "--samples", "1500", "--accountant", "gdp",
                       "--target-epsilon", "3")
    assert code == 2 and "GDP" in err and "use --accountant rdp or prv" in err
    code, out, _ = run(capsys, "--samples", "1500", "--accountant", "gdp",
                       "--noise-multiplier", "1.0", "--json")
    assert code == 0 and json.loads(out)["epsilon"] > 0


def write_config(path, text: str):
    path.write_text(text)
    return str(path)


def rdp_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=sample_rate)
    return acc.get_epsilon(delta=delta)


def test_config_supplies_the_training_plan(capsys, tmp_path):
    # every value differs from the flags' defaults, so an ignored --config fails here
    cfg = write_config(tmp_path / "c.yaml", "rounds: 3\n"
                       "train: {batch_size: 50, epochs: 2, max_steps: 10}\n"
                       "dp: {noise_multiplier: 1.3, delta: 1.0e-6}\n")
    code, out, _ = run(capsys, "--config", cfg, "--samples", "1000", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["sample_rate"] == 0.05 and plan["total_steps"] == 30
    assert plan["noise_multiplier"] == 1.3 and plan["delta"] == 1e-6
    assert plan["target_epsilon"] is None and plan["site"] is None
    assert plan["epsilon"] == pytest.approx(rdp_epsilon(1.3, 0.05, 30, 1e-6), rel=1e-12)


def test_flags_override_the_config(capsys, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", "rounds: 3\ntrain: {batch_size: 50, max_steps: 10}\n"
                       "dp: {noise_multiplier: 1.3, accountant: prv}\n")
    code, out, _ = run(capsys, "--config", cfg, "--samples", "1000", "--rounds", "5",
                       "--batch-size", "100", "--accountant", "rdp", "--target-epsilon", "3",
                       "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["total_steps"] == 50 and plan["sample_rate"] == 0.1 and plan["accountant"] == "rdp"
    # the flag's target replaces the config's sigma (exactly one of the two is planned for)
    assert plan["target_epsilon"] == 3 and 2.99 <= plan["epsilon"] <= 3.0


def test_samples_come_from_the_manifest_of_data_dir(capsys, tmp_path):
    from fedsilo.prep.pipeline import prepare_shards
    from fedsilo.prep.synthetic import make_synthetic

    shards = tmp_path / "shards"
    manifest = prepare_shards(make_synthetic(num_samples=400, seed=0), out_dir=shards,
                              participants=3, partition="quantity:2.0", seed=1)
    train = [entry.num_samples["train"] for entry in manifest.sites]
    smallest = train.index(min(train))
    other = (smallest + 1) % 3
    cfg = write_config(tmp_path / "c.yaml", f"data: {{dir: {shards}}}\ntrain: {{batch_size: 16}}\n"
                       f"dp: {{target_epsilon: 5, sites: {{{other}: {{target_epsilon: 2}}}}}}\n")
    code, out, _ = run(capsys, "--config", cfg, "--json")
    assert code == 0
    plan = json.loads(out)
    assert (plan["site"], plan["num_samples"]) == (smallest, train[smallest])
    assert plan["sample_rate"] == 16 / train[smallest] and plan["target_epsilon"] == 5
    code, out, _ = run(capsys, "--config", cfg, "--site", str(other), "--json")
    plan = json.loads(out)
    assert code == 0 and plan["num_samples"] == train[other] and plan["target_epsilon"] == 2
    code, out, _ = run(capsys, "--config", cfg)
    assert code == 0 and f"site {smallest}: {train[smallest]} training samples" in out
    code, _, err = run(capsys, "--config", cfg, "--site", "3")
    assert code == 2 and "has sites 0..2" in err


def test_config_errors_name_their_cause(capsys, tmp_path):
    code, _, err = run(capsys, "--config", str(tmp_path / "missing.yaml"), "--samples", "10")
    assert code == 2 and "cannot read config file" in err and "missing.yaml" in err
    cfg = write_config(tmp_path / "c.yaml", f"data: {{dir: {tmp_path / 'none'}}}\n")
    code, _, err = run(capsys, "--config", cfg)
    assert code == 2 and "holds no shard set" in err and "give --samples N" in err
    code, _, err = run(capsys, "--noise-multiplier", "1")
    assert code == 2 and "give --samples N" in err
    cfg = write_config(tmp_path / "n.yaml", "dp: {target_epsilon: null}\n")
    code, _, err = run(capsys, "--config", cfg, "--samples", "100")
    assert code == 2 and "sets neither dp.target_epsilon nor dp.noise_multiplier" in err


def test_budget_plans_the_noised_validation_as_training_does(capsys, tmp_path):
    """With dp.validation, fedsilo budget gives the σ a site trains with: planned over what
    the validation releases leave, and ε counting them."""
    from fedsilo.config import SiteDP, TrainConfig
    from fedsilo.privacy.engine import ParticipantPrivacy

    cfg = write_config(tmp_path / "c.yaml", "rounds: 6\ntrain: {batch_size: 50}\n"
                       "dp: {enabled: true, target_epsilon: 2.0, validation: "
                       "{enabled: true, noise_multiplier: 8.0, every: 2}}\n")
    code, out, _ = run(capsys, "--config", cfg, "--samples", "1000", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["validation"] == {"noise_multiplier": 8.0, "releases": 3}
    import torch
    from torch import nn

    engine = ParticipantPrivacy(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), site=0,
                                settings=SiteDP(2.0, None, 1e-5, 1.0), mechanism="rdp",
                                num_samples=1000, train=TrainConfig(batch_size=50), rounds=6,
                                model_name="m", sample=torch.randn(2, 1, 2, 2), mode="hooks",
                                validation_sigma=8.0, validation_releases=3)
    assert plan["noise_multiplier"] == engine.noise_multiplier
    assert 1.99 <= plan["epsilon"] <= 2.0
    code, out, _ = run(capsys, "--config", cfg, "--samples", "1000")
    assert "3 noised releases at sigma 8 (dp.validation)" in out
