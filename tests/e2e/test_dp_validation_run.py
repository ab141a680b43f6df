"""Model and threshold selection under DP (dp.validation), in a real 4-rank MPI run: best.pt
and a decision threshold exist, and each site's ε composes its DP-SGD steps and its noised
validation releases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_every_rank_logged, fedsilo_cli, mpirun

from fedsilo.privacy.accounting import PrivacyAccountant

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

# σ_v small against the 96 validation images (46 / 50 by class), so the noised sums keep
# both classes (the noise of a class total has std σ_v·√(bins·sites) ≈ 10) in every run:
# each run draws fresh secrets
ROUNDS, EVERY, BINS, SIGMA_V, TARGET = 4, 2, 8, 2.0, 8.0


def test_dp_run_selects_best_pt_and_a_threshold_on_noised_validation(tmp_path: Path) -> None:
    shards = tmp_path / "set"
    job = fedsilo_cli(["prep", "synthetic", "--samples", "1200", "--classes", "2", "--sites",
                       "3", "--partition", "dirichlet:0.5", "--seed", "1", "--out", str(shards)])
    assert job.returncode == 0, job.output
    run = tmp_path / "run"
    job = mpirun(4, ["train", "--set", f"data.dir={shards}", "--set", f"rounds={ROUNDS}",
                     "--set", "model.name=dp_cnn", "--set", "train.batch_size=32",
                     "--set", "dp.enabled=true", "--set", f"dp.target_epsilon={TARGET}",
                     "--set", "dp.validation.enabled=true",
                     "--set", f"dp.validation.every={EVERY}",
                     "--set", f"dp.validation.bins={BINS}",
                     "--set", f"dp.validation.noise_multiplier={SIGMA_V}",
                     "--set", "checkpoint.threshold=youden", "--out", str(run)], timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    best = summary["best"]
    assert best["metric"] == "val_auc" and 1 <= best["round"] <= ROUNDS
    edges = [round(k / BINS, 6) for k in range(1, BINS)]
    assert best["threshold"] in edges  # chosen among the histogram's edges
    card = json.loads((run / "best.json").read_text())
    assert card["round"] == best["round"] and card["threshold"]["value"] == best["threshold"]
    assert (run / "best.pt").is_file()
    assert json.loads((run / "model.json").read_text())["threshold"]["value"] in edges
    # the figures the coordinator saw are sums of noised counts: not the exact count
    assert summary["val"]["noised"] is True
    assert summary["val"]["num_samples"] != sum_val_samples(shards)
    releases = (ROUNDS - 1) // EVERY + 1  # model of round 2, and the final model
    for site, report in summary["privacy"].items():
        assert report["validation_releases"] == releases, (site, report)
        expected = PrivacyAccountant("rdp")
        expected.spend(noise_multiplier=report["noise_multiplier"],
                       sample_rate=report["sample_rate"], num_steps=report["steps"])
        training = expected.epsilon(delta=report["delta"])
        expected.spend(noise_multiplier=SIGMA_V, sample_rate=1.0, num_steps=releases)
        # the order of the mechanisms does not change an RDP composition
        assert report["epsilon"] == pytest.approx(expected.epsilon(delta=report["delta"]),
                                                  rel=1e-9)
        assert training < report["epsilon"] <= TARGET
    assert "val_per_site" not in summary  # nothing per site


def sum_val_samples(shards: Path) -> int:
    import h5py

    total = 0
    for path in sorted(shards.glob("site-*.h5")):
        with h5py.File(path, "r") as handle:
            total += int(handle["val/labels"].shape[0])
    return total


def test_noised_validation_of_a_multiclass_set_is_refused_on_every_rank(tmp_path: Path) -> None:
    shards = tmp_path / "set3"
    job = fedsilo_cli(["prep", "synthetic", "--samples", "120", "--classes", "3", "--sites", "3",
                       "--seed", "1", "--out", str(shards)])
    assert job.returncode == 0, job.output
    job = mpirun(4, ["train", "--set", f"data.dir={shards}", "--set", "rounds=1",
                     "--set", "model.name=dp_cnn", "--set", "dp.enabled=true",
                     "--set", "dp.validation.enabled=true", "--out", str(tmp_path / "run")],
                 timeout=120)
    assert job.returncode != 0
    assert_every_rank_logged(job, "dp.validation releases a histogram of p(positive class), "
                             "for binary tasks", "3 classes", ranks=4)
