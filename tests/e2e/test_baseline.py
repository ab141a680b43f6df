"""The centralized baseline against real federated runs (MPI jobs), the report of both, and a
site's personal model from a real federated run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import fedsilo_cli
from localjobs import local_mpirun

#: the jobs run on ranks forked in-process (tests/localjobs.py; faithful to mpirun by
#: test_local_faithful.py)
pytestmark = [pytest.mark.local, pytest.mark.slow]

#: one recipe for both: a federated round and a baseline round are the same local training
RECIPE = ["--set", "rounds=2", "--set", "train.lr=0.05", "--set", "train.batch_size=32",
          "--set", "model.name=dp_cnn"]


def test_a_one_site_federation_is_the_baseline(shards1: Path, tmp_path: Path) -> None:
    """With one site, FedAvg's global model is that site's model: the baseline of the same
    config must give the same weights (up to float32 rounding of w + (w_k − w)) and the same
    test metrics, round by round."""
    fed, base = tmp_path / "fed", tmp_path / "base"
    job = local_mpirun(2, ["train", "--set", f"data.dir={shards1}", *RECIPE, "--out", str(fed)],
                 timeout=240)
    assert job.returncode == 0, job.output[-4000:]
    job = fedsilo_cli(["baseline", "--set", f"data.dir={shards1}", *RECIPE, "--out", str(base)],
                      timeout=240)
    assert job.returncode == 0, job.output[-4000:]
    a = torch.load(fed / "model.pt", weights_only=True)
    b = torch.load(base / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-4), name
    fed_rows = [json.loads(line) for line in (fed / "metrics.jsonl").open()]
    base_rows = [json.loads(line) for line in (base / "metrics.jsonl").open()]
    for f, c in zip(fed_rows, base_rows, strict=True):
        assert f["round"] == c["round"]
        assert c["acc"] == pytest.approx(f["acc"], abs=0.01)
        assert c["loss"] == pytest.approx(f["loss"], rel=1e-3)


def test_baseline_report_and_personal_models_of_a_federation(shards3: Path,
                                                            tmp_path: Path) -> None:
    fed, base, cmp = tmp_path / "fed", tmp_path / "base", tmp_path / "cmp"
    job = local_mpirun(4, ["train", "--set", f"data.dir={shards3}", *RECIPE, "--out", str(fed)],
                 timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    job = fedsilo_cli(["baseline", "--set", f"data.dir={shards3}", *RECIPE, "--out", str(base)],
                      timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    job = fedsilo_cli(["report", str(fed), str(base), "--out", str(cmp)])
    assert job.returncode == 0, job.output[-3000:]
    page = (cmp / "report.html").read_text()
    assert "gap to the centralized baseline (fed vs base)" in page
    fed_acc = json.loads((fed / "summary.json").read_text())["test"]["acc"]
    base_acc = json.loads((base / "summary.json").read_text())["test"]["acc"]
    assert f'class="gap-acc" data-value="{base_acc - fed_acc!r}"' in page
    assert (cmp / "gap.png").is_file()

    # each site's personal model, from the federation's released model.pt and card
    federated_val = json.loads((fed / "summary.json").read_text())["val_per_site"]
    for site in range(3):
        out = tmp_path / f"site{site}.pt"
        job = fedsilo_cli(["personalize", str(fed), "--site", str(site), "--out", str(out)])
        assert job.returncode == 0, job.output[-3000:]
        card = json.loads(out.with_suffix(".json").read_text())["personalized"]
        # the global model on the site's val split is what the site reported at the end
        assert card["validation"]["global"]["acc"] == pytest.approx(
            federated_val[str(site)]["acc"])
        assert card["validation"]["global"]["num_samples"] == \
            federated_val[str(site)]["num_samples"]


def test_a_dp_baseline_is_dp_sgd_on_the_pooled_set(shards3: Path, tmp_path: Path) -> None:
    base = tmp_path / "dp"
    job = fedsilo_cli(["baseline", "--set", f"data.dir={shards3}", *RECIPE,
                       "--set", "dp.enabled=true", "--set", "dp.target_epsilon=8",
                       "--set", "train.max_steps=4", "--out", str(base)], timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    rows = [json.loads(line) for line in (base / "metrics.jsonl").open()]
    eps = [r["epsilon"]["0"] for r in rows]
    assert 0 < eps[0] < eps[1] <= 8
    assert all("val" not in r and "train" not in r for r in rows)  # as a DP federation's
    privacy = json.loads((base / "summary.json").read_text())["privacy"]["0"]
    assert privacy["steps"] == 8 and privacy["target_epsilon"] == 8
    manifest = json.loads((shards3 / "manifest.json").read_text())
    pooled = sum(s["num_samples"]["train"] for s in manifest["sites"])
    assert privacy["sample_rate"] == pytest.approx(32 / pooled)
