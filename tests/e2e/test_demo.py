"""``fedsilo demo``: three hospitals on real chest X-rays (the packaged PneumoniaMNIST), with
secure aggregation and with DP, each one short run (fewer rounds and images than the
default demo, whose time docs/model.md records)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import fedsilo_cli

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

QUICK = ["--rounds", "2", "--samples", "600"]


def test_the_demo_data_ships_with_its_attribution() -> None:
    from fedsilo.demo import demo_data

    assert demo_data().is_file()
    note = (demo_data().parent / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in note and "Yang" in note and "Kermany" in note


def test_demo_with_secure_aggregation_selects_a_best_model(tmp_path: Path) -> None:
    job = fedsilo_cli(["demo", *QUICK, "--secure", "--out", str(tmp_path)], timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    run = tmp_path / "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["aggregation"]["secure"] == "masks" and config["checkpoint"]["best_by"] == "auto"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("masks" in r for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["metric"] == "val_loss" and (run / "best.pt").is_file()
    card = json.loads((run / "model.json").read_text())
    assert card["class_names"] == ["normal", "pneumonia"] and card["image_shape"] == [1, 28, 28]
    assert f"final model (round 2): test accuracy {summary['test']['acc']:.4f}" in job.stdout
    assert "best model by federated validation (val_loss" in job.stdout
    assert "run report: " in job.stdout
    assert "3 hospitals" in job.stdout and "pneumonia" in job.stdout


def test_demo_with_dp_spends_a_budget_and_selects_nothing(tmp_path: Path) -> None:
    job = fedsilo_cli(["demo", *QUICK, "--dp", "--out", str(tmp_path)], timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    epsilons = [p["epsilon"] for p in summary["privacy"].values()]
    assert len(epsilons) == 3 and all(0 < e <= 8.0 for e in epsilons)
    # under DP no site releases validation metrics: no selection, no val in the summary
    assert "best" not in summary and "val" not in summary and not (run / "best.pt").exists()
    assert "privacy spent per hospital" in job.stdout and "no best model" in job.stdout
    assert json.loads((run / "model.json").read_text())["model"]["name"] == "dp_cnn"
