"""Fault injection: every foreseeable error ends every rank quickly with one clear message;
anything else aborts the whole job.  Never a hang (helpers.mpirun fails a test on timeout)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import assert_every_rank_logged, fedsilo_cli, mpirun
from localjobs import local_mpirun

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
#: generous for a loaded 2-core CI machine; a job that starts 4 Python processes with torch
#: takes 5-15 s there.  What matters is that it ends: a hang fails after the mpirun timeout.
LIMIT_S = 60


@pytest.fixture
def shards(shards3: Path, tmp_path: Path) -> Path:
    """A private copy of the 3-site shard set, free to break."""
    return Path(shutil.copytree(shards3, tmp_path / "shards"))


def train(shards: Path, out: Path, *extra: str, ranks: int = 4, verify: bool = True,
          launch=local_mpirun):
    """A job on in-process ranks (``launch=mpirun`` for a real one): the errors agreed by
    every rank are the round's logic, the same under either launcher."""
    args = ["train", "--set", f"data.dir={shards}", "--set", "rounds=2", *extra, "--out", str(out)]
    if not verify:
        args[1:1] = ["--set", "data.verify_hashes=false"]
    return launch(ranks, args, timeout=240)


def assert_agreed_failure(job, *needles: str, ranks: int = 4) -> None:
    """Non-zero exit, fast, and every rank logged the same error naming the cause."""
    assert job.returncode != 0, job.output[-3000:]
    assert job.seconds < LIMIT_S, f"took {job.seconds:.1f} s"
    for needle in needles:
        assert needle in job.stderr, f"{needle!r} not in:\n{job.stderr[-3000:]}"
    assert_every_rank_logged(job, *needles, ranks=ranks)


def site(shards: Path, k: int) -> Path:
    return shards / f"site-{k:03d}.h5"


# -- configuration and launch ------------------------------------------------------------


def test_unknown_config_key(shards, tmp_path):
    # under a real mpirun: bad input ends a real launch within seconds on every rank
    job = train(shards, tmp_path / "run", "--set", "train.epochz=2", launch=mpirun)
    assert_agreed_failure(job, "unknown config key 'train.epochz'", "coordinator")


def test_ill_typed_config_key(shards, tmp_path):
    job = train(shards, tmp_path / "run", "--set", "train.batch_size=big")
    assert_agreed_failure(job, "'train.batch_size' must be an integer")


def test_too_few_ranks(shards, tmp_path):
    job = train(shards, tmp_path / "run", ranks=1)
    assert job.returncode != 0 and job.seconds < LIMIT_S
    assert "needs at least 2 MPI ranks" in job.stderr, job.stderr[-2000:]


def test_more_participant_ranks_than_sites(shards, tmp_path):
    job = train(shards, tmp_path / "run", ranks=5)
    assert_agreed_failure(job, "has 3 sites, so the job needs at most 4 MPI ranks", ranks=5)


def test_missing_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    job = train(tmp_path / "empty", tmp_path / "run", ranks=2)
    assert_agreed_failure(job, "no shard-set manifest", ranks=2)


def test_out_naming_a_file(shards, tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    job = train(shards, tmp_path / "taken", ranks=2)
    assert_agreed_failure(job, "is an existing file, not a directory", ranks=2)
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_corrupt_manifest(shards, tmp_path):
    (shards / "manifest.json").write_text("{ not json")
    job = train(shards, tmp_path / "run")
    assert_agreed_failure(job, "is not valid JSON")


def test_existing_run_is_never_overwritten(shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    job = train(shards, run)
    assert_agreed_failure(job, "already holds a run")
    assert (run / "metrics.jsonl").read_text() == '{"round": 1}\n'


# -- shards ------------------------------------------------------------------------------


def test_missing_shard(shards, tmp_path):
    site(shards, 1).unlink()
    job = train(shards, tmp_path / "run")
    assert_agreed_failure(job, "shard file not found", "site-001.h5", "participant 2")


def test_shard_hash_differs_from_manifest(shards, tmp_path):
    with h5py.File(site(shards, 0), "r+") as f:  # still a valid file, different content
        f["train/images"][0, 0, 0, 0] ^= 0xFF
    job = train(shards, tmp_path / "run")
    assert_agreed_failure(job, "site-000.h5", "sha256 mismatch", "participant 1")


def test_corrupt_shard(shards, tmp_path):
    site(shards, 2).write_bytes(os.urandom(4096))
    job = train(shards, tmp_path / "run", verify=False)
    assert_agreed_failure(job, "site-002.h5", "not a readable HDF5 file")


def test_truncated_shard(shards, tmp_path):
    data = site(shards, 1).read_bytes()
    site(shards, 1).write_bytes(data[: len(data) // 2])
    job = train(shards, tmp_path / "run", verify=False)
    assert_agreed_failure(job, "site-001.h5")
    assert "HDF5" in job.stderr or "corrupt" in job.stderr


def test_image_shape_differs_across_shards(shards, tmp_path):
    from fedsilo.shards import write_shard
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (20, 1, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 3, 20)
    write_shard(site(shards, 1), kind="site", num_classes=3,
                splits={"train": (images, labels), "val": (images[:4], labels[:4])})
    job = train(shards, tmp_path / "run", verify=False)
    assert_agreed_failure(job, "site-001.h5", "image shape is 1x32x32 but 1x28x28 was expected")


def test_class_count_differs(shards, tmp_path):
    with h5py.File(site(shards, 2), "r+") as f:
        f.attrs["num_classes"] = 5
    job = train(shards, tmp_path / "run", verify=False)
    assert_agreed_failure(job, "site-002.h5", "num_classes is 5 in the file but 3 was expected")


def test_labels_out_of_range(shards, tmp_path):
    with h5py.File(site(shards, 0), "r+") as f:
        f["train/labels"][3] = 7
    job = train(shards, tmp_path / "run", verify=False)
    assert_agreed_failure(job, "site-000.h5", "labels out of range [0, 3): found 7")


def test_nan_pixels(shards, tmp_path):
    with h5py.File(site(shards, 1), "r+") as f:
        images = f["train/images"][...].astype(np.float32) / 255
        images[5, 0, 3, 3] = np.nan
        del f["train/images"]
        f["train"].create_dataset("images", data=images)
    job = train(shards, tmp_path / "run", verify=False)
    assert_agreed_failure(job, "site-001.h5", "non-finite pixel values")


def test_empty_shard(shards, tmp_path):
    from fedsilo.shards import write_shard
    empty = np.zeros((0, 1, 28, 28), np.uint8), np.zeros(0, np.int64)
    write_shard(site(shards, 0), kind="site", num_classes=3, splits={"train": empty, "val": empty})
    job = train(shards, tmp_path / "run", verify=False)
    assert_agreed_failure(job, "site-000.h5", "training split is empty")


def test_several_failing_ranks_are_all_named(shards, tmp_path):
    site(shards, 0).unlink()
    site(shards, 2).unlink()
    job = train(shards, tmp_path / "run")
    assert_agreed_failure(job, "failed on 2 of 4 ranks", "site-000.h5", "site-002.h5")


# -- during training ---------------------------------------------------------------------


def test_nan_update_is_rejected_naming_the_participant(shards, tmp_path):
    job = train(shards, tmp_path / "run", "--set", "train.lr=1e30", "--set", "train.momentum=0")
    assert_agreed_failure(job, "round 1 failed", "non-finite values (NaN/Inf)", "participant 0")
    assert not (tmp_path / "run" / "model.pt").exists()
    # the ending's marker, by the coordinator: the failing rank(s), the cause, no checkpoint
    failed = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert failed["ending"] == "failed" and failed["written_by"] == 0 and failed["agreed"]
    assert 1 in failed["ranks"] and "UpdateError" in failed["errors"], failed
    assert "non-finite values" in failed["message"] and failed["exit_status"] == job.returncode
    assert failed["last_checkpoint_round"] is None and not failed["resumable"]


def run_with_fault(fault: str, shards: Path, out: Path, *extra: str):
    """A 4-rank, 3-round training with a fault planted by tests/e2e/inject.py."""
    env_before = os.environ.get("FEDSILO_TEST_FAULT")
    os.environ["FEDSILO_TEST_FAULT"] = fault
    try:
        return mpirun(4, ["train", "--set", f"data.dir={shards}", "--set", "rounds=3",
                          *extra, "--out", str(out)], timeout=240,
                      python_args=(str(HERE / "inject.py"),))
    finally:
        if env_before is None:
            del os.environ["FEDSILO_TEST_FAULT"]
        else:
            os.environ["FEDSILO_TEST_FAULT"] = env_before


def test_unexpected_exception_aborts_the_job(shards, tmp_path):
    job = run_with_fault("raise:2:3", shards, tmp_path / "run")
    assert job.returncode != 0 and job.seconds < LIMIT_S, job.output[-3000:]
    assert "[rank 2/4] fedsilo: unexpected RuntimeError, aborting the job" in job.stderr
    assert "injected failure in local training" in job.stderr  # with its traceback
    # round 1's checkpoint survives the abort intact.  Round 2's record (evaluation, then
    # checkpoint) runs while the participants train round 3 (runtime.overlap_eval), so the
    # abort may come before it is written: on a loaded machine it did.  It is joined before
    # round 3's outcome, so round 1's is always complete here.
    from fedsilo.rundir import RunDir
    complete = RunDir(tmp_path / "run").complete_rounds()
    assert complete in ([1], [1, 2]), (
        sorted(str(p) for p in (tmp_path / "run").rglob("*")), job.stderr[-4000:])
    # the rank that failed says so before the abort: its rank, the class, where to resume
    failed = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert failed["written_by"] == 2 and failed["ranks"] == [2], failed
    assert failed["errors"] == ["RuntimeError"] and not failed["agreed"]
    assert "injected failure" in failed["message"] and failed["exit_status"] == 1
    # the last complete checkpoint the failing rank saw: round 1 at least
    assert failed["last_checkpoint_round"] in (1, 2) and failed["resumable"], failed


def test_a_rank_that_dies_ends_the_job(shards, tmp_path):
    job = run_with_fault("exit:3:1", shards, tmp_path / "run")
    assert job.returncode != 0 and job.seconds < LIMIT_S, job.output[-3000:]


def test_resume_without_participant_checkpoint(shards, tmp_path):
    run = tmp_path / "run"
    assert train(shards, run).returncode == 0
    (run / "checkpoints" / "round-0002" / "site-001.pt").unlink()
    job = local_mpirun(4, ["train", "--resume", str(run)], timeout=240)
    assert_agreed_failure(job, "site-001.pt is missing", "participant 2")


def test_resume_of_a_directory_that_is_not_a_run(tmp_path):
    job = local_mpirun(2, ["train", "--resume", str(tmp_path)], timeout=240)
    assert_agreed_failure(job, "no config.yaml there", ranks=2)


# -- the watchdog: a rank that stops without failing --------------------------------------


def test_a_silent_participant_is_named_and_the_run_resumes(shards, tmp_path):
    """SIGSTOP of participant 2 in round 2, the stall that used to idle every rank until
    SIGCONT: the coordinator's watchdog names rank 2 and where it was last seen, checks the
    round-1 checkpoint, leaves hung.json, and every rank ends with EXIT_HUNG; the run then
    resumes to the end."""
    import json

    from fedsilo.stopping import EXIT_HUNG

    run = tmp_path / "run"
    job = run_with_fault("stall:2:2", shards, run, "--set", "runtime.hang_timeout_s=3")
    assert job.returncode == EXIT_HUNG, job.output[-3000:]
    assert job.seconds < LIMIT_S, f"took {job.seconds:.1f} s"
    assert "watchdog: waited 3 s for the local work of round 2" in job.stderr, job.stderr[-3000:]
    assert "rank 2 (participant 2) last arrived at 'the start of round 2'" in job.stderr
    assert "the last complete checkpoint is round 1 (it loads)" in job.stderr
    hung = json.loads((run / "hung.json").read_text())
    assert hung["silent_ranks"] == [2] and hung["last_checkpoint_round"] == 1
    assert hung["exit_status"] == EXIT_HUNG
    # the resume is the round's logic: on in-process ranks
    resumed = local_mpirun(4, ["train", "--resume", str(run)], timeout=240)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == 3
    assert not (run / "hung.json").exists()


@pytest.mark.parametrize("secure", ["none", "masks"])
def test_a_rank_lost_mid_reduce_ends_the_job_and_it_resumes_bit_exactly(shards, tmp_path,
                                                                        secure):
    """Participant 3 stops (SIGSTOP) inside round 2's reduction of the updates, plain or
    masked, while the others are in it: the watchdog bounds the collective, hung.json names
    rank 3 and the stage, every rank ends with EXIT_HUNG, and the resumed run ends with the
    weights of a run that was never interrupted (the masks cancel exactly)."""
    import torch

    from fedsilo.stopping import EXIT_HUNG

    extra: list[str] = ["--set", "runtime.threads=1"]
    if secure == "masks":
        keys = tmp_path / "keys"
        made = fedsilo_cli(["keys", "--identity", "--sites", "3", "--out", str(keys)])
        assert made.returncode == 0, made.output
        extra += ["--set", "aggregation.secure=masks", "--set", f"aggregation.keys={keys}"]
    run = tmp_path / "run"
    job = run_with_fault("stallreduce:3:2", shards, run, "--set", "runtime.hang_timeout_s=3",
                         *extra)
    assert job.returncode == EXIT_HUNG, job.output[-3000:]
    assert job.seconds < LIMIT_S, f"took {job.seconds:.1f} s"
    hung = json.loads((run / "hung.json").read_text())
    assert hung["silent_ranks"] == [3], hung
    assert "reduction of the" in hung["stage"] and "round 2" in hung["stage"], hung
    assert hung["last_checkpoint_round"] == 1 and hung["exit_status"] == EXIT_HUNG, hung
    resumed = local_mpirun(4, ["train", "--resume", str(run)], timeout=240)
    assert resumed.returncode == 0, resumed.output[-3000:]
    whole = tmp_path / "whole"
    reference = local_mpirun(4, ["train", "--set", f"data.dir={shards}", "--set", "rounds=3",
                                 "--set", "runtime.hang_timeout_s=3", *extra,
                                 "--out", str(whole)], timeout=240)
    assert reference.returncode == 0, reference.output[-3000:]
    got = torch.load(run / "model.pt", weights_only=True)
    want = torch.load(whole / "model.pt", weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_a_silent_coordinator_ends_every_participant(shards, tmp_path):
    """SIGSTOP of the coordinator at the end of round 2: the participants, waiting for round
    3, give up after their longer allowance (1.5 x 3 s + 10 s) and end the job."""
    from fedsilo.stopping import EXIT_HUNG

    job = run_with_fault("stall:0:2", shards, tmp_path / "run", "--set",
                         "runtime.hang_timeout_s=3")
    assert job.returncode == EXIT_HUNG, job.output[-3000:]
    assert job.seconds < LIMIT_S, f"took {job.seconds:.1f} s"
    assert "s for the start of round 3; the coordinator or another rank is silent" \
        in job.stderr, job.stderr[-3000:]
    assert "[rank 1/4] fedsilo: error: watchdog: rank 1 waited 1" in job.stderr
