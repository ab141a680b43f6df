"""Every way a job ends leaves one true marker, written by a party that knows what happened
and never overwritten by the teardown after it (docs/training.md, "How a job ends"):
finished (summary.json), stopped for a requeue (stopped.json, 75), hung (hung.json, 76),
budget spent (summary.json saying so, 0).  And no rank outlives its launcher."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import mpirun
from localjobs import local_mpirun

from fedsilo.privacy import PrivacyAccountant, plan_steps
from fedsilo.stopping import EXIT_HUNG

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
STEPS = 2


def args(shards: Path, out: Path, *extra: str, rounds: int = 3) -> list[str]:
    return ["train", "--set", f"data.dir={shards}", "--set", f"rounds={rounds}",
            "--set", f"train.max_steps={STEPS}", *extra, "--out", str(out)]


def with_fault(fault: str, argv: list[str], *, timeout: float = 90):
    os.environ["FEDSILO_TEST_FAULT"] = fault
    try:
        return mpirun(4, argv, timeout=timeout, python_args=(str(HERE / "inject.py"),))
    finally:
        del os.environ["FEDSILO_TEST_FAULT"]


def markers(run: Path) -> set[str]:
    return {name for name in ("summary.json", "stopped.json", "hung.json")
            if (run / name).is_file()}


# -- hung ---------------------------------------------------------------------------------


def test_a_stalled_coordinator_is_recorded_by_the_participants(shards3, tmp_path):
    """SIGSTOP of the coordinator at the end of round 2.  The first participant whose
    watchdog fires writes hung.json naming rank 0; the teardown's SIGCONT + SIGTERM to the
    coordinator must leave neither a stopped.json (a batch script would requeue) nor a
    verdict of its own naming the healthy participants."""
    run = tmp_path / "run"
    job = with_fault("stall:0:2", args(shards3, run, "--set", "runtime.hang_timeout_s=3"))
    assert job.returncode == EXIT_HUNG, job.output[-3000:]
    time.sleep(1.0)  # a coordinator continued by the teardown would write now
    assert markers(run) == {"hung.json"}, job.output[-3000:]
    hung = json.loads((run / "hung.json").read_text())
    assert hung["silent_ranks"] == [0], hung
    assert hung["exit_status"] == EXIT_HUNG and hung["last_checkpoint_round"] >= 1
    assert hung["written_by"] in (1, 2, 3), hung
    assert "the start of round 3" in hung["stage"], hung


def test_a_participant_stalled_in_round_1_with_only_hang_timeout(shards3, tmp_path):
    """runtime.hang_timeout_s: 3 and first_round_timeout_s left at its default: the first
    round is watched on the scale the user asked for, not 1800 s."""
    run = tmp_path / "run"
    job = with_fault("stall:2:1", args(shards3, run, "--set", "runtime.hang_timeout_s=3"),
                     timeout=60)
    assert job.returncode == EXIT_HUNG, job.output[-3000:]
    assert markers(run) == {"hung.json"}
    hung = json.loads((run / "hung.json").read_text())
    assert hung["silent_ranks"] == [2], hung
    assert "the local work of round 1" in hung["stage"]


# -- no rank outlives the launcher --------------------------------------------------------


def _tagged(tag: str) -> list[int]:
    """The processes whose environment holds ``tag`` (this test's ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_no_rank_outlives_mpirun(shards3, tmp_path, kill):
    """A participant stopped in round 1, the others waiting for it; then the launcher is
    ended the way ``timeout`` (SIGTERM) or an OOM killer (SIGKILL) ends it.  Every rank is
    gone within a few seconds, whatever it was doing."""
    from fedsilo.launch import mpirun_command, rank_environment

    tag = f"FEDSILO_TEST_TAG={uuid.uuid4().hex}"
    command = mpirun_command(4, [], mpirun=None)
    command = command[: command.index(sys.executable)] + [
        sys.executable, str(HERE / "inject.py"), *args(shards3, tmp_path / "run")]
    env = rank_environment(4)
    env["FEDSILO_TEST_FAULT"] = "stall:2:1"
    env[tag.split("=")[0]] = tag.split("=")[1]
    log = (tmp_path / "job.log").open("w")
    launcher = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        give_up = time.monotonic() + 60
        while not any(_state(pid) == "T" for pid in _tagged(tag)):
            assert time.monotonic() < give_up, (tmp_path / "job.log").read_text()[-3000:]
            assert launcher.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # the others are waiting at the local work's barrier
        launcher.send_signal(kill)
        deadline = time.monotonic() + 5.0
        while _tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [(pid, _state(pid)) for pid in _tagged(tag)]
        assert not left, f"still running 5 s after {kill.name} to mpirun: {left}\n" + \
            (tmp_path / "job.log").read_text()[-3000:]
    finally:
        for pid in _tagged(tag):
            with _ignored():
                os.kill(pid, signal.SIGKILL)
        with _ignored():
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        log.close()


class _ignored:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


# -- budget spent -------------------------------------------------------------------------


def _site_epsilon(shards: Path, site: int, rounds: int, planned: int) -> float:
    manifest = json.loads((shards / "manifest.json").read_text())
    n = manifest["sites"][site]["num_samples"]["train"]
    q, steps, _ = plan_steps(num_samples=n, batch_size=32, epochs=1, max_steps=STEPS,
                             rounds=planned)
    acc = PrivacyAccountant("rdp")
    acc.spend(noise_multiplier=1.0, sample_rate=q, num_steps=steps * rounds)
    return acc.epsilon(delta=1e-5)


def test_every_budget_spent_ends_the_job_cleanly(shards3, tmp_path):
    """Every site can afford two of four rounds: the job ends after round 2 as finished
    (status 0, model.pt, summary.json saying that every budget is spent), not as a
    pre-emption a requeueing batch script would loop on."""
    run = tmp_path / "run"
    extra = ["--set", "dp.enabled=true", "--set", "train.batch_size=32",
             "--set", "dp.noise_multiplier=1.0", "--set", "dp.target_epsilon=1000"]
    for k in range(3):
        budget = (_site_epsilon(shards3, k, 2, 4) + _site_epsilon(shards3, k, 3, 4)) / 2
        extra += ["--set", f"dp.sites.{k}.target_epsilon={budget}"]
    job = local_mpirun(4, args(shards3, run, *extra, rounds=4), timeout=120)
    assert job.returncode == 0, job.output[-3000:]
    assert markers(run) == {"summary.json"}, job.output[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["rounds"] == 4
    assert summary["ending"] == "budget spent", summary
    assert summary["stopped"] == {"0": 3, "1": 3, "2": 3}
    assert json.loads((run / "model.json").read_text())["round"] == 2
    assert "every participant has spent its privacy budget" in job.stderr
    assert "Traceback" not in job.stderr


# -- resume from a damaged checkpoint -----------------------------------------------------


def test_a_truncated_last_checkpoint_falls_back_to_the_previous_round(shards3, tmp_path):
    """coordinator.pt of the last round cut in half: --resume says so, keeps it aside and
    continues from the previous complete round.  File modes: checkpoints 0600, the
    released files follow the umask."""
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        job = local_mpirun(4, args(shards3, run), timeout=120)
    finally:
        os.umask(old)
    assert job.returncode == 0, job.output[-3000:]
    for name in ("summary.json", "metrics.jsonl", "config.yaml", "model.pt", "model.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name
    for path in (run / "checkpoints").rglob("*.pt"):
        assert path.stat().st_mode & 0o777 == 0o600, path

    last = run / "checkpoints" / "round-0003" / "coordinator.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    job = local_mpirun(4, ["train", "--resume", str(run)], timeout=120)
    assert job.returncode == 0, job.output[-3000:]
    assert "round-0003/coordinator.pt cannot be read" in job.stderr, job.stderr[-3000:]
    assert "resuming from round 2, the previous complete checkpoint" in job.stderr
    kept = run / "checkpoints" / "round-0003.unreadable" / "coordinator.pt"
    assert kept.read_bytes() == data[: len(data) // 2]
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert math.isfinite(rows[-1]["acc"])
    assert (run / "checkpoints" / "round-0003" / "coordinator.pt").stat().st_size > len(data) // 2
    shutil.rmtree(run)
