"""A coordinator that runs modified code, against real participants (4-rank jobs, masks).

Each test plants one deviation on rank 0 (``inject.py``) and asserts that every rank stops,
within seconds, with a message naming what was wrong, before any update of the deviating
round leaves a participant.  Before the participants verified the coordinator's word
(fedsilo 0.1 as of the privacy issue), each of these jobs finished normally: a replayed
round reused the masks, a chosen sample put a target in a sum with one colluder, and a
weakened configuration turned secure aggregation off.  The transport-level attacks (the
CKKS decryption oracle, the joint randomness) are in ``tests/mpi/suite_secure.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import fedsilo_cli
from localjobs import local_mpirun
from test_faults import assert_agreed_failure

#: the jobs run on ranks forked in-process (tests/localjobs.py; faithful to mpirun by
#: test_local_faithful.py)
pytestmark = [pytest.mark.local, pytest.mark.slow]

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ids3(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ids3") / "keys"
    job = fedsilo_cli(["keys", "--identity", "--sites", "3", "--out", str(out)])
    assert job.returncode == 0, job.output
    return out


def deviate(shards: Path, keys: Path, out: Path, fault: str, *extra: str, rounds: int = 3):
    argv = ["train", "--set", f"data.dir={shards}", "--set", f"rounds={rounds}",
            "--set", "train.max_steps=2", "--set", "runtime.progress=off",
            "--set", "aggregation.secure=masks", "--set", f"aggregation.keys={keys}",
            *extra, "--out", str(out)]
    os.environ["FEDSILO_TEST_FAULT"] = fault
    try:
        return local_mpirun(4, argv, timeout=240, python_args=(str(HERE / "inject.py"),))
    finally:
        os.environ.pop("FEDSILO_TEST_FAULT", None)


def rounds_recorded(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(x)["round"] for x in path.read_text().splitlines()] if path.exists() \
        else []


def test_a_replayed_round_is_refused(shards3, ids3, tmp_path):
    """Round 2's plan states round 1 again: the masks (and DP noise) of round 1 would be
    drawn again for another update, and two masked vectors under one keystream give away
    their difference."""
    job = deviate(shards3, ids3, tmp_path / "run", "replay:0:1")
    assert_agreed_failure(job, "the coordinator states round 1, but this participant is at "
                               "round 2")
    assert rounds_recorded(tmp_path / "run") == [1]


def test_a_chosen_sample_is_refused(shards3, ids3, tmp_path):
    """With participation.fraction=1 every site is in every sum; the coordinator samples the
    target (site 0) with one colluder (site 1) instead, so the colluder's own update
    subtracted from the sum would leave the target's."""
    job = deviate(shards3, ids3, tmp_path / "run", "sample:0:2")
    assert_agreed_failure(job, "the coordinator samples sites [0, 1], but the participation "
                               "policy", "samples [0, 1, 2]")
    assert rounds_recorded(tmp_path / "run") == []


def test_a_site_falsely_called_out_of_budget_refuses(shards3, ids3, tmp_path):
    """The same sample, reached by listing the honest third site as out of privacy budget:
    that site knows better."""
    job = deviate(shards3, ids3, tmp_path / "run", "budget:0:2")
    assert_agreed_failure(job, "lists site 2 as out of privacy budget")


def test_a_weakened_configuration_is_refused(shards3, ids3, tmp_path):
    """The coordinator parses the configuration and broadcasts it: it turns secure
    aggregation off.  Each participant reads its own copy and compares."""
    job = deviate(shards3, ids3, tmp_path / "run", "config:0:0")
    assert_agreed_failure(job, "differs from this participant's own",
                          "aggregation.secure ('none' from the coordinator, 'masks' here)")
    assert rounds_recorded(tmp_path / "run") == []


def test_a_rolled_back_resume_is_refused(shards3, ids3, tmp_path):
    """The coordinator keeps its own checkpoints: it can drop the last three and resume from
    round 1, so that every site trains rounds 2-4 again with the same DP noise on weights of
    its choosing.  The sites saved their own state of round 4 and refuse; a legitimate
    crash (the coordinator one round behind) still resumes."""
    run = tmp_path / "run"
    argv = ["train", "--set", f"data.dir={shards3}", "--set", "rounds=4",
            "--set", "train.max_steps=2", "--set", "runtime.progress=off",
            "--set", "checkpoint.keep=10", "--set", "dp.enabled=true",
            "--set", "dp.noise_multiplier=1.0", "--set", "dp.target_epsilon=null",
            "--set", "aggregation.secure=masks", "--set", f"aggregation.keys={ids3}"]
    job = local_mpirun(4, [*argv, "--out", str(run)], timeout=240)
    assert job.returncode == 0, job.output[-3000:]
    for r in (2, 3, 4):
        (run / "checkpoints" / f"round-{r:04d}" / "coordinator.pt").unlink()
    job = local_mpirun(4, ["train", "--resume", str(run)], timeout=240)
    assert_agreed_failure(job, "refuses to resume from round 1: it saved its own state of "
                               "round 4 already")
    (run / "checkpoints" / "round-0004").rename(tmp_path / "gone")  # the crash: round 4 lost
    (run / "checkpoints" / "round-0003").rename(tmp_path / "gone3")
    job = local_mpirun(4, ["train", "--resume", str(run)], timeout=240)
    assert job.returncode == 0, job.output[-3000:]
