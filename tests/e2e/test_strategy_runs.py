"""Strategies, partial participation, stragglers, many sites per rank and dropped
participants, end to end on in-process multi-rank jobs (4 synthetic sites; 2 or 4
participant ranks)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_shards
from localjobs import local_mpirun

from fedsilo.participation import sample_sites

#: the jobs run on ranks forked in-process (tests/localjobs.py; faithful to mpirun by
#: test_local_faithful.py)
pytestmark = [pytest.mark.local, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
#: one thread per rank: thread count changes the float rounding of torch's kernels, and
#: the layout-equality test compares bits
COMMON = ("--set", "runtime.threads=1", "--set", "runtime.progress=off")


@pytest.fixture(scope="module")
def shards4(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards4") / "set", participants=4,
                       samples=1200, partition="dirichlet:0.5")


def train(shards: Path, out: Path, *extra: str, ranks: int = 3, rounds: int = 3,
          fault: str | None = None):
    argv = ["train", "--set", f"data.dir={shards}", "--set", f"rounds={rounds}", *COMMON,
            *extra, "--out", str(out)]
    env = {"FEDSILO_TEST_FAULT": fault} if fault else {}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        job = local_mpirun(ranks, argv, timeout=300,
                     python_args=(str(HERE / "inject.py"),) if fault else ("-m", "fedsilo"))
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert job.returncode == 0, job.output[-4000:]
    return job


def resume(run: Path, *extra: str, ranks: int = 3):
    job = local_mpirun(ranks, ["train", "--resume", str(run), *COMMON, *extra], timeout=300)
    assert job.returncode == 0, job.output[-4000:]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- many sites per rank -----------------------------------------------------------------


def test_four_sites_on_two_ranks_equal_four_on_four(shards4, tmp_path):
    exact = ("--set", "runtime.reduce_dtype=float64")
    two = train(shards4, tmp_path / "two", *exact, ranks=3)
    train(shards4, tmp_path / "four", *exact, ranks=5)
    assert identical(weights(tmp_path / "two"), weights(tmp_path / "four"))
    # each site trained in every round, on whichever rank
    assert all(set(r["participants"]) == {"0", "1", "2", "3"} for r in rows(tmp_path / "two"))
    assert "2 participants (4 sites)" in two.stderr


# -- partial participation ---------------------------------------------------------------


def test_partial_participation_samples_reproducibly_and_idles_the_rest(shards4, tmp_path):
    run = tmp_path / "pp"
    train(shards4, run, "--set", "participation.fraction=0.5", "--set", "participation.seed=7",
          ranks=5, rounds=4)
    metrics = rows(run)
    for row in metrics:
        expected = sample_sites(range(4), fraction=0.5, minimum=1, seed=7,
                                round_index=row["round"])
        assert row["sampled"] == expected
        assert sorted(map(int, row["participants"])) == expected  # only they trained
        # weights went to (and sums came from) the 2 sampled ranks only
        assert row["bytes"]["broadcast"] == row["bytes"]["reduce"] == 2 * 4 * _numel(run)
    assert len({tuple(r["sampled"]) for r in metrics}) > 1  # not the same pair every round


def _numel(run: Path) -> int:
    return sum(t.numel() for t in weights(run).values())


# -- stragglers ---------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["false", "true"])
def test_deadline_stops_local_training_and_records_steps(shards4, tmp_path, normalize):
    run = tmp_path / "deadline"
    # 30 local epochs of ~5 steps: seconds of work, cut at 0.3 s
    train(shards4, run, "--set", "train.epochs=30", "--set", "train.round_deadline_s=0.3",
          "--set", f"train.normalize_steps={normalize}", ranks=5, rounds=2)
    for row in rows(run):
        done = {k: (p["steps"], p["planned_steps"]) for k, p in row["participants"].items()}
        assert done, row
        assert all(0 < steps < planned for steps, planned in done.values()), done
        assert all(np.isfinite(row[k]) for k in ("acc", "loss"))


# -- a participant that fails in a round --------------------------------------------------


def test_skip_drops_a_failing_participant_and_continues(shards4, tmp_path):
    run = tmp_path / "skip"
    # rank 2 holds sites 2 and 3 (2 participant ranks): its 2nd training (round 1, site 3)
    # raises a DataError, its 3rd (round 2, site 2) produces a NaN update
    train(shards4, run, "--set", "on_participant_error=skip", ranks=3, rounds=3,
          fault="data:2:2")
    metrics = rows(run)
    assert "DataError" in metrics[0]["dropped"]["3"] and "injected" in metrics[0]["dropped"]["3"]
    assert set(metrics[0]["participants"]) == {"0", "1", "2"}
    assert metrics[1]["dropped"] == {} and set(metrics[1]["participants"]) == {"0", "1", "2", "3"}
    train(shards4, tmp_path / "nan", "--set", "on_participant_error=skip", ranks=3, rounds=2,
          fault="nan:2:3")
    metrics = rows(tmp_path / "nan")
    assert "non-finite" in metrics[1]["dropped"]["2"]
    assert np.isfinite(metrics[-1]["loss"])


def test_skip_under_dp_accounts_the_steps_taken(shards4, tmp_path):
    run = tmp_path / "dpskip"
    dp = ("--set", "dp.enabled=true", "--set", "dp.noise_multiplier=1.0",
          "--set", "dp.target_epsilon=null", "--set", "on_participant_error=skip")
    # rank 2 (sites 2, 3): its 2nd DP-SGD step fails, part-way through site 2's round 1
    train(shards4, run, *dp, ranks=3, rounds=2, fault="dpdata:2:2")
    metrics = rows(run)
    assert "DataError" in metrics[0]["dropped"]["2"]
    steps = {k: v["steps"] for k, v in json.loads((run / "summary.json").read_text())
             ["privacy"].items()}
    # site 2 took 2 steps in round 1 (the failing one counts: its gradient was computed)
    # and a full round 2: the accountant knows every step that touched its data
    assert steps["2"] == 2 + metrics[1]["participants"]["2"]["steps"], steps


# -- strategies ---------------------------------------------------------------------------


def test_fedprox_composes_with_dp(shards4, tmp_path):
    plain = tmp_path / "avg"
    prox = tmp_path / "prox"
    dp = ("--set", "dp.enabled=true", "--set", "dp.target_epsilon=8")
    train(shards4, plain, *dp, rounds=2)
    train(shards4, prox, *dp, "--set", "strategy.name=fedprox", "--set", "strategy.mu=1.0",
          rounds=2)
    # same seeds and noise: only the proximal term differs, and it pulls towards the
    # global model, so the sites' updates (and the result) differ from FedAvg's
    assert not identical(weights(plain), weights(prox))
    eps = json.loads((prox / "summary.json").read_text())["privacy"]
    assert all(v["epsilon"] <= 8.0 for v in eps.values())


@pytest.mark.parametrize("strategy", ["fedadam", "scaffold"])
def test_stateful_strategies_resume_bit_identically(shards4, tmp_path, strategy):
    """FedAdam's moments live in the coordinator's checkpoint, SCAFFOLD's control variates
    in the coordinator's (server c) and each site's (c_k) checkpoint."""
    extra = ("--set", f"strategy.name={strategy}", "--set", "train.momentum=0")
    straight = tmp_path / "straight"
    train(shards4, straight, *extra, rounds=3)
    # the same run, stopped after round 2: round 3's checkpoint never completed
    split = Path(shutil.copytree(straight, tmp_path / "split"))
    shutil.rmtree(split / "checkpoints" / "round-0003")
    (split / "model.pt").unlink()
    resume(split)
    assert identical(weights(straight), weights(split))
    assert [r["round"] for r in rows(split)] == [1, 2, 3]
    if strategy == "scaffold":
        last = rows(tmp_path / "straight")[-1]
        numel = _numel(tmp_path / "straight")
        assert last["bytes"]["reduce"] == 2 * 2 * 4 * numel  # [Δw, Δc] from 2 ranks


def test_robust_strategies_gather_every_update(shards4, tmp_path):
    run = tmp_path / "trimmed"
    train(shards4, run, "--set", "strategy.name=trimmed_mean", "--set", "strategy.trim=0.25",
          rounds=2)
    for row in rows(run):
        assert row["bytes"]["reduce"] == 4 * 4 * _numel(run)  # 4 individual updates
        assert np.isfinite(row["loss"])
