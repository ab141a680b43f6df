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
