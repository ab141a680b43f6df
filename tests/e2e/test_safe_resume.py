"""Resume and run-directory safety (part of the no-hang issue): a refused resume changes
nothing, a checkpoint of another shape or an impossible round count is a clear error, the
manifest's figures are checked against the shards, and two jobs cannot share a run
directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import make_shards
from helpers import mpirun
from localjobs import local_mpirun
from test_faults import assert_agreed_failure

#: the jobs run on ranks forked in-process (tests/localjobs.py), but for two jobs sharing a
#: run directory (a real mpirun launched beside one)
pytestmark = [pytest.mark.local, pytest.mark.slow]


def train(shards: Path, out: Path, *extra: str, rounds: int = 2):
    return local_mpirun(4, ["train", "--set", f"data.dir={shards}", "--set", f"rounds={rounds}",
                      "--set", "train.max_steps=2", *extra, "--out", str(out)], timeout=240)


@pytest.fixture(scope="module")
def finished(shards3: Path, tmp_path_factory) -> Path:
    """A finished 2-round run (tests copy it before resuming)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    job = train(shards3, run)
    assert job.returncode == 0, job.output[-3000:]
    return run


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".fedsilo.lock"}


def test_a_refused_resume_changes_nothing(finished: Path, tmp_path: Path) -> None:
    """--resume with a model that does not fit the checkpoint, or with fewer rounds than
    done, is refused on every rank, and the run directory (config.yaml included) is byte
    for byte as it was, so a plain --resume still works."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    before = snapshot(run)
    job = local_mpirun(4, ["train", "--resume", str(run), "--set", "model.name=dp_cnn",
                     "--set", "rounds=3"], timeout=240)
    assert_agreed_failure(job, "CheckpointError", "the shard set or the model changed")
    assert snapshot(run) == before
    # a round count below the rounds already done: refused, nothing changed either
    job = local_mpirun(4, ["train", "--resume", str(run), "--set", "rounds=1"], timeout=240)
    assert_agreed_failure(job, "ConfigError", "has completed 2 rounds", "rounds >= 2")
    assert snapshot(run) == before
    job = local_mpirun(4, ["train", "--resume", str(run), "--set", "rounds=3"], timeout=240)
    assert job.returncode == 0, job.output[-3000:]
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3]


def test_a_checkpoint_of_another_shape_is_named(finished: Path, tmp_path: Path) -> None:
    """The same model on a 4-class shard set has the same parameter names but other shapes:
    a clear error naming what changed (3 -> 4 classes), not a numpy traceback.  It comes at
    configuration, from the shard set recorded in the checkpoint, before any model is built."""
    shards = make_shards(tmp_path / "four", participants=3, classes=4, samples=600)
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    job = local_mpirun(4, ["train", "--resume", str(run), "--set", f"data.dir={shards}",
                     "--set", "rounds=3"], timeout=240)
    assert_agreed_failure(job, "CheckpointError", "was trained on another shard set",
                          "num_classes 3 -> 4", "cannot change within a run")
    assert "Traceback" not in job.stderr


def test_a_changed_shard_set_is_refused_naming_what_changed(finished: Path,
                                                            tmp_path: Path) -> None:
    """--resume on another shard set of the same shapes (here 4 sites, so one added and the
    other three re-split) used to train on it silently; now every rank refuses it, naming
    the sites that changed and the one added, and the run directory stays as it was."""
    shards = make_shards(tmp_path / "four-sites", participants=4, samples=1500)
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    before = snapshot(run)
    job = local_mpirun(4, ["train", "--resume", str(run), "--set", f"data.dir={shards}",
                     "--set", "rounds=3"], timeout=240)
    assert_agreed_failure(job, "CheckpointError", "was trained on another shard set",
                          "site(s) [3] were added", "hold other data")
    assert snapshot(run) == before


def test_a_manifest_that_inflates_a_site_is_caught(shards3: Path, tmp_path: Path) -> None:
    """Site 0's train count (and class counts) multiplied by 10 in manifest.json would give
    it most of the FedAvg weight; the participant that owns the shard refuses."""
    shards = Path(shutil.copytree(shards3, tmp_path / "shards"))
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = manifest["sites"][0]
    entry["num_samples"]["train"] *= 10
    entry["class_counts"]["train"] = [c * 10 for c in entry["class_counts"]["train"]]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    job = train(shards, tmp_path / "run")
    assert_agreed_failure(job, "ShardError", "site-000.h5", "the manifest says split 'train'")


@pytest.mark.mpi
def test_two_jobs_cannot_share_a_run_directory(shards3: Path, tmp_path: Path) -> None:
    from fedsilo.launch import mpirun_command, rank_environment

    run = tmp_path / "run"
    first = subprocess.Popen(mpirun_command(4, ["train", "--set", f"data.dir={shards3}",
                                                "--set", "rounds=50", "--out", str(run)]),
                             env=rank_environment(4), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "config.yaml").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (run / "config.yaml").exists(), "the first job did not start"
        job = mpirun(4, ["train", "--resume", str(run)], timeout=240)
        assert_agreed_failure(job, "is in use by another fedsilo job")
    finally:
        import os
        import signal

        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


# -- changing the federation between launches (--sites-changed) ---------------------------


def shard_set_of(sites: list[Path], test: Path, out: Path) -> Path:
    """A shard set made of existing shard files (copied, renumbered in the given order)."""
    from fedsilo.shards import build_manifest, check_shard, write_manifest

    out.mkdir(parents=True)
    infos = []
    for k, source in enumerate(sites):
        shutil.copy(source, out / f"site-{k:03d}.h5")
        infos.append(check_shard(out / f"site-{k:03d}.h5", kind="site"))
    shutil.copy(test, out / "test.h5")
    write_manifest(out, build_manifest(sites=infos, test=check_shard(out / "test.h5", kind="test"),
                                       source={"name": "test"}, partition="custom", seed=0))
    return out


def test_a_site_leaves_and_sites_join_keeping_their_own_dp_state(shards3: Path,
                                                                  tmp_path: Path) -> None:
    """The consortium's two changes between launches, under DP-SGD: site 1 leaves (its
    state archived, its weight gone) and the others keep their accountants; then a new site
    joins, starting fresh, and site 1 comes back with the same data, resuming the privacy
    spending it had (a fresh budget for the same people would under-report ε).  Sites are
    matched by their data, not their position."""
    other = make_shards(tmp_path / "other", participants=3, samples=1500, seed=7)
    a = [shards3 / f"site-{k:03d}.h5" for k in range(3)]
    run = tmp_path / "run"
    dp = ["--set", "dp.enabled=true", "--set", "dp.target_epsilon=null",
          "--set", "dp.noise_multiplier=1.0"]
    job = local_mpirun(4, ["train", "--set", f"data.dir={shards3}", "--set", "rounds=2",
                     "--set", "train.max_steps=2", *dp, "--out", str(run)], timeout=240)
    assert job.returncode == 0, job.output[-3000:]

    def epsilons(round_index: int) -> dict[str, float]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in rows if r["round"] == round_index)["epsilon"]

    two = epsilons(2)
    # site 1 leaves: sites 0 and 2 remain (site 2 is now at index 1)
    left = shard_set_of([a[0], a[2]], shards3 / "test.h5", tmp_path / "left")
    job = local_mpirun(3, ["train", "--resume", str(run), "--set", f"data.dir={left}",
                     "--set", "rounds=3", "--sites-changed"], timeout=240)
    assert job.returncode == 0, job.output[-3000:]
    assert (run / "departed" / "site-001-round-0002.pt").is_file()
    three = epsilons(3)
    assert set(three) == {"0", "1"}
    assert three["0"] > two["0"] and three["1"] > two["2"]  # kept their spending, added to it
    # a new site joins, and site 1 comes back: both fresh
    joined = shard_set_of([a[0], a[1], a[2], other / "site-000.h5"], shards3 / "test.h5",
                          tmp_path / "joined")
    job = local_mpirun(4, ["train", "--resume", str(run), "--set", f"data.dir={joined}",
                     "--set", "rounds=4", "--sites-changed"], timeout=240)
    assert job.returncode == 0, job.output[-3000:]
    assert "site 3 joins the federation" in job.stderr
    assert "site 1 left in round 2 and comes back with the same data" in job.stderr
    four = epsilons(4)
    assert set(four) == {"0", "1", "2", "3"}
    # the newcomer: one round of spending; site 1: its two rounds before it left, and one
    # more; the site that stayed throughout: four
    assert 0 < four["3"] and four["1"] > two["1"] and two["0"] < four["0"]
    assert four["2"] > three["1"]  # site 2 (index 1 in round 3) kept its accountant
