"""Test helpers: paths, and running real multi-rank MPI jobs with a hard time limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PNEUMONIA = SHARED / "data" / "pneumoniamnist.npz"


@dataclass
class Job:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def mpirun(num_ranks: int, argv: Sequence[str], *, timeout: float, cwd: Path | None = None,
           python_args: Sequence[str] = ("-m", "fedsilo")) -> Job:
    """Run ``python -m fedsilo ARGV`` (or another script) on ``num_ranks`` real MPI ranks.

    A job still running after ``timeout`` seconds is killed and the test fails: a hang is
    the one outcome no test may tolerate.
    """
    from fedsilo.launch import mpirun_command, rank_environment

    command = mpirun_command(num_ranks, [], mpirun=None)
    command = command[: command.index(sys.executable)] + [sys.executable, *python_args, *argv]
    env = rank_environment(num_ranks)
    env["PYTHONUNBUFFERED"] = "1"
    for attempt in range(3):
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"MPI job hung: still running after {timeout} s: {' '.join(command)}\n"
                        f"--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}")
        # Open MPI's launcher itself sometimes fails to start on a loaded machine, before
        # any rank runs (seen once in a full suite); that is not the job's failure
        if process.returncode == 0 or _LAUNCHER_FLAKE not in stderr:
            break
        time.sleep(1.0)
    return Job(process.returncode, stdout, stderr, time.monotonic() - start)


_LAUNCHER_FLAKE = "PMIx server's listener thread failed to start"


def kill_after_checkpoint(num_ranks: int, argv: Sequence[str], run: Path, round_index: int, *,
                          timeout: float = 240) -> None:
    """Start ``fedsilo ARGV`` on ``num_ranks`` real MPI ranks and SIGKILL every process of
    the job once ``run``'s checkpoint of ``round_index`` is complete (its coordinator.pt),
    before the run can finish: a crash at a known point."""
    from fedsilo.launch import mpirun_command, rank_environment

    process = subprocess.Popen(mpirun_command(num_ranks, list(argv)),
                               env=rank_environment(num_ranks), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    marker = run / "checkpoints" / f"round-{round_index:04d}" / "coordinator.pt"
    deadline = time.monotonic() + timeout
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert marker.exists(), f"no checkpoint of round {round_index} within {timeout} s"
    assert not (run / "summary.json").exists(), "the run finished before it was killed"


def assert_every_rank_logged(job: Job, *needles: str, ranks: int) -> None:
    """Every rank's first ERROR line holds every needle, and no traceback was printed."""
    error_lines = [line for line in job.stderr.splitlines() if " ERROR " in line]
    for rank in range(ranks):
        mine = [line for line in error_lines if line.startswith(f"[rank {rank}/{ranks}]")]
        assert mine, f"rank {rank} did not report the error:\n{job.stderr[-3000:]}"
        assert all(n in mine[0] for n in needles), mine[0]
    assert "Traceback" not in job.stderr, "a foreseeable error must not print a traceback"


def fedsilo_cli(argv: Sequence[str], *, timeout: float = 120, cwd: Path | None = None) -> Job:
    """Run ``python -m fedsilo ARGV`` as a plain process (no MPI launcher)."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "fedsilo", *argv], cwd=cwd, text=True,
                            capture_output=True, timeout=timeout)
    return Job(result.returncode, result.stdout, result.stderr, time.monotonic() - start)


class InProcess:
    """``fedsilo ARGV`` through ``cli.main`` in this process (no torch start-up per call;
    an exception that escapes fails the test, as a traceback would)."""

    def __init__(self, capsys) -> None:
        self.capsys = capsys

    def __call__(self, argv: list[str]) -> Job:
        from fedsilo.cli import main

        self.capsys.readouterr()
        status = main(argv)
        captured = self.capsys.readouterr()
        return Job(status, captured.out, captured.err, 0.0)
