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
from test_faults import assert_agreed_failure

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


def train(shards: Path, out: Path, *extra: str, rounds: int = 2):
    return mpirun(4, ["train", "--set", f"data.dir={shards}", "--set", f"rounds={rounds}",
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
    job = mpirun(4, ["train", "--resume", str(run), "--set", "model.name=dp_cnn",
                     "--set", "rounds=3"], timeout=240)
    assert_agreed_failure(job, "CheckpointError", "the shard set or the model changed")
    assert snapshot(run) == before
    # a round count below the rounds already done: refused, nothing changed either
    job = mpirun(4, ["train", "--resume", str(run), "--set", "rounds=1"], timeout=240)
    assert_agreed_failure(job, "ConfigError", "has completed 2 rounds", "rounds >= 2")
    assert snapshot(run) == before
    job = mpirun(4, ["train", "--resume", str(run), "--set", "rounds=3"], timeout=240)
    assert job.returncode == 0, job.output[-3000:]
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3]


def test_a_checkpoint_of_another_shape_is_named(finished: Path, tmp_path: Path) -> None:
    """The same model on a 4-class shard set has the same parameter names but other shapes:
    a clear error naming both sizes, not a numpy traceback."""
    shards = make_shards(tmp_path / "four", participants=3, classes=4, samples=600)
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    job = mpirun(4, ["train", "--resume", str(run), "--set", f"data.dir={shards}",
                     "--set", "rounds=3"], timeout=240)
    assert_agreed_failure(job, "CheckpointError", "the shard set or the model changed")
    assert "Traceback" not in job.stderr


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
