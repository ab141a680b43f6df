"""Sample-level DP end to end, as real 4-rank jobs: ε reported per site and round, per-site
overrides, budgets that run out mid-job (stop and abort), and resume after a kill."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_every_rank_logged
from localjobs import local_mpirun

from fedsilo.privacy import PrivacyAccountant, plan_steps

#: the jobs run on ranks forked in-process (tests/localjobs.py; faithful to mpirun by
#: test_local_faithful.py)
pytestmark = [pytest.mark.local, pytest.mark.slow]

ROUNDS, BATCH, MAX_STEPS, SIGMA = 4, 32, 3, 1.0


def dp_args(shards: Path, out: Path, *extra: str, rounds: int = ROUNDS) -> list[str]:
    return ["train", "--set", f"data.dir={shards}", "--set", f"rounds={rounds}",
            "--set", "train.lr=0.05", "--set", f"train.batch_size={BATCH}",
            "--set", f"train.max_steps={MAX_STEPS}", "--set", "dp.enabled=true", *extra,
            "--out", str(out)]


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def site_epsilon(shards: Path, site: int, rounds: int, sigma: float = SIGMA) -> float:
    """ε of ``site`` after ``rounds`` rounds, computed here from first principles."""
    manifest = json.loads((shards / "manifest.json").read_text())
    n = manifest["sites"][site]["num_samples"]["train"]
    q, steps, _ = plan_steps(num_samples=n, batch_size=BATCH, epochs=1, max_steps=MAX_STEPS,
                             rounds=rounds)
    acc = PrivacyAccountant("rdp")
    acc.spend(noise_multiplier=sigma, sample_rate=q, num_steps=steps * rounds)
    return acc.epsilon(delta=1e-5)


def budget_after_two_rounds(shards: Path) -> float:
    """A budget for site 1 that pays for two rounds of σ = 1 but not three."""
    return (site_epsilon(shards, 1, 2) + site_epsilon(shards, 1, 3)) / 2


def test_dp_training_reports_epsilon_with_site_overrides(shards3: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = local_mpirun(4, dp_args(shards3, run, "--set", "dp.target_epsilon=8",
                            "--set", "dp.sites.2.target_epsilon=3", rounds=2), timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    rows = rows_of(run)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert set(row["epsilon"]) == {"0", "1", "2"}
        assert all(row["participants"][k]["epsilon"] == row["epsilon"][k] for k in "012")
        assert row["stopped"] == {} and row["sat_out"] == []
        # least metadata: nothing computed on a site's private data without noise (loss,
        # validation metrics, update norm, timings that follow the Poisson batch sizes)
        assert "val" not in row
        assert not {"local_train_max", "local_val_max", "local_compute_max", "local",
                    "coordination"} & set(row["seconds"])
        assert row["seconds"]["round"] == round(row["seconds"]["round"])  # whole seconds
        for site in row["participants"].values():
            assert set(site) == {"num_samples", "steps", "planned_steps", "epsilon"}, site
    assert all(rows[1]["epsilon"][k] > rows[0]["epsilon"][k] > 0 for k in "012")
    assert not {"val", "val_per_site"} & set(json.loads((run / "summary.json").read_text()))
    summary = json.loads((run / "summary.json").read_text())["privacy"]
    # σ is chosen to spend the whole budget over the planned job, and never more
    for site, target in (("0", 8.0), ("1", 8.0), ("2", 3.0)):
        assert target - 0.02 <= summary[site]["epsilon"] <= target, summary[site]
        assert summary[site]["epsilon"] == rows[-1]["epsilon"][site]
        assert summary[site]["delta"] == 1e-5 and summary[site]["stopped_round"] is None
        # the reported ε is what Opacus's accountant says for the σ, q and steps used
        acc = PrivacyAccountant("rdp")
        acc.spend(noise_multiplier=summary[site]["noise_multiplier"],
                  sample_rate=summary[site]["sample_rate"], num_steps=summary[site]["steps"])
        assert acc.epsilon(delta=1e-5) == pytest.approx(summary[site]["epsilon"], rel=1e-12)
    assert summary["2"]["noise_multiplier"] > summary["1"]["noise_multiplier"]
    assert rows[-1]["auc"] > 0.6  # it still learns (chance is 0.5)


def crash_copy(run: Path, out: Path, *, after_round: int) -> Path:
    """A copy of ``run`` as a kill during round ``after_round + 1`` leaves it: the later
    rounds' commit points, metrics rows, model and summary gone, the participants' files of
    the interrupted round still there (they write theirs before the coordinator)."""
    import shutil

    shutil.copytree(run, out)
    for entry in (out / "checkpoints").iterdir():
        number = int(entry.name.split("-")[1])
        if number > after_round + 1:
            shutil.rmtree(entry)
        elif number == after_round + 1:
            (entry / "coordinator.pt").unlink()
    for name in ("model.pt", "summary.json"):
        (out / name).unlink()
    rows = rows_of(run)[:after_round]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_budget_stop_and_resume_after_a_kill(shards3: Path, tmp_path: Path) -> None:
    """Site 1 can afford two rounds: it stops from round 3 and the federation goes on without
    it; the same run killed during round 3 and resumed restores every site's secret, reports
    the same ε and ends bit-identical."""
    budget = budget_after_two_rounds(shards3)
    extra = ["--set", f"dp.noise_multiplier={SIGMA}", "--set", "dp.target_epsilon=1000",
             "--set", f"dp.sites.1.target_epsilon={budget}", "--set", "checkpoint.keep=10"]
    reference = tmp_path / "reference"
    job = local_mpirun(4, dp_args(shards3, reference, *extra), timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    assert "participant 1 has spent its privacy budget" in job.stderr
    assert "stops contributing from round 3; 2 participant(s) continue" in job.stderr
    rows = rows_of(reference)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[1]["participants"]) == {"0", "1", "2"}
    for row in rows[2:]:
        assert set(row["participants"]) == {"0", "2"} and row["stopped"] == {"1": 3}
        assert row["epsilon"]["1"] == rows[1]["epsilon"]["1"]  # spends nothing more
    assert rows[1]["epsilon"]["1"] == pytest.approx(site_epsilon(shards3, 1, 2), rel=1e-12)
    assert all(r["epsilon"]["1"] <= budget for r in rows)
    assert rows[3]["epsilon"]["0"] == pytest.approx(site_epsilon(shards3, 0, 4), rel=1e-12)
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["stopped"] == {"1": 3} and summary["privacy"]["1"]["stopped_round"] == 3
    assert summary["privacy"]["1"]["epsilon"] <= budget
    # each site's secret is in its own checkpoint, and differs between sites
    secrets = [torch.load(reference / "checkpoints" / "round-0002" / f"site-00{k}.pt",
                          weights_only=True)["secret"] for k in range(3)]
    assert all(s.dtype == torch.uint8 and s.numel() == 32 for s in secrets)
    assert len({bytes(s.tolist()) for s in secrets}) == 3
    assert all((reference / "checkpoints" / "round-0002" / f"site-00{k}.pt").stat().st_mode
               & 0o077 == 0 for k in range(3))

    crashed = crash_copy(reference, tmp_path / "crashed", after_round=2)
    state = torch.load(crashed / "checkpoints" / "round-0002" / "site-001.pt", weights_only=True)
    assert state["privacy"]["accountant"]["history"][0][2] >= 2 * MAX_STEPS
    job = local_mpirun(4, ["train", "--resume", str(crashed)], timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    resumed = rows_of(crashed)
    assert [r["epsilon"] for r in resumed] == [r["epsilon"] for r in rows]
    assert [r["acc"] for r in resumed] == [r["acc"] for r in rows]
    assert json.loads((crashed / "summary.json").read_text())["stopped"] == {"1": 3}
    a = torch.load(reference / "model.pt", weights_only=True)
    b = torch.load(crashed / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed DP run differs"


def test_budget_abort_ends_every_rank(shards3: Path, tmp_path: Path) -> None:
    budget = budget_after_two_rounds(shards3)
    job = local_mpirun(4, dp_args(shards3, tmp_path / "run",
                                  "--set", f"dp.noise_multiplier={SIGMA}",
                                  "--set", "dp.target_epsilon=1000",
                                  "--set", "dp.budget_policy=abort",
                                  "--set", f"dp.sites.1.target_epsilon={budget}"), timeout=300)
    assert job.returncode != 0
    assert_every_rank_logged(job, "participant 1 (site-001) would exceed its privacy budget "
                             "in round 3", "PrivacyBudgetError", ranks=4)
    assert [r["round"] for r in rows_of(tmp_path / "run")] == [1, 2]


# -- user-level DP (DP-FedAvg) -------------------------------------------------------------


def initial_and_round1(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat global weights before training (seed 0) and after round 1."""
    from fedsilo.models import build_model
    from fedsilo.weights import WeightLayout

    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, num_classes=3, image_size=(28, 28))
    start = torch.from_numpy(WeightLayout.of(model).flatten(model).copy())
    state = torch.load(run / "checkpoints" / "round-0001" / "coordinator.pt", weights_only=True)
    return start, state["weights"]


@pytest.mark.parametrize("noise, sigma", [("central", 0.1), ("distributed", 3.0)])
def test_user_level_dp(shards3: Path, tmp_path: Path, noise: str, sigma: float) -> None:
    """The noise has the planned scale σ·C·max_k w_k on the sum, whoever adds it; user ε is
    reported per round and per site (test_dp_attacks.py removes the noise with the secrets
    and checks the clipped signal against the sensitivity)."""
    run, clip = tmp_path / "run", 0.01
    job = local_mpirun(4, ["train", "--set", f"data.dir={shards3}", "--set", "rounds=2",
                     "--set", "train.max_steps=2", "--set", "checkpoint.keep=3",
                     "--set", "dp.user.enabled=true", "--set", f"dp.user.clip_norm={clip}",
                     "--set", f"dp.user.noise_multiplier={sigma}",
                     "--set", f"dp.user.noise={noise}",
                     "--out", str(run)], timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    rows = rows_of(run)
    for r, row in enumerate(rows, start=1):
        acc = PrivacyAccountant("rdp")
        acc.spend(noise_multiplier=sigma, sample_rate=1.0, num_steps=r)
        assert row["user_epsilon"] == pytest.approx(acc.epsilon(delta=1e-5), rel=1e-12)
        assert "epsilon" not in row  # sample-level DP is off: no sample-level ε
        assert row["user_epsilon_per_site"] == {k: row["user_epsilon"] for k in "012"}
        # nothing un-noised about a site's data: no update norm, loss, validation, timing
        assert "val" not in row and "local_train_max" not in row["seconds"]
        for site in row["participants"].values():
            assert set(site) == {"num_samples", "steps", "planned_steps"}, site
    summary = json.loads((run / "summary.json").read_text())["user_privacy"]
    assert summary["noise"] == noise and summary["rounds"] == 2
    assert summary["rounds_per_site"] == {"0": 2, "1": 2, "2": 2}
    assert summary["sampling_amplification"] is False
    if noise == "central":  # the coordinator adds the noise, so it has no guarantee
        assert summary["epsilon_coordinator"] is None
    else:  # each share alone is σ/√3 in a plain Reduce
        acc = PrivacyAccountant("rdp")
        acc.spend(noise_multiplier=sigma / math.sqrt(3), sample_rate=1.0, num_steps=2)
        assert summary["epsilon_coordinator"] == pytest.approx(acc.epsilon(delta=1e-5))
    start, after = initial_and_round1(run)
    moved = float((after - start).norm())
    manifest = json.loads((shards3 / "manifest.json").read_text())
    counts = [s["num_samples"]["train"] for s in manifest["sites"]]
    expected = sigma * clip * max(counts) / sum(counts) * math.sqrt(start.numel())
    assert moved == pytest.approx(expected, rel=0.05)  # the clipped signal is ≤ C = 0.01
