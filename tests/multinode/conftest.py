"""Fixtures for multi-node jobs on one host (network namespaces, ``netbed.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import Job, fedsilo_cli  # noqa: E402
from netbed import NetBed, unavailable  # noqa: E402

MPIRUN = str(Path(sys.executable).parent / "mpirun")


@pytest.fixture(scope="session")
def namespaces() -> None:
    """Skips the test, saying why, where network namespaces cannot be made."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"multi-node test bed unavailable: {reason}")
    if not Path(MPIRUN).exists():
        pytest.skip(f"no Open MPI launcher beside this Python ({MPIRUN})")


@pytest.fixture
def bed(namespaces: None) -> Iterator[Callable[..., NetBed]]:
    """``bed(K, hostnames=None)``: K simulated nodes, removed at teardown even on failure."""
    made: list[NetBed] = []

    def make(num_nodes: int, **kwargs: object) -> NetBed:
        netbed = NetBed(num_nodes, tag=f"fs{os.getpid() % 10000}{len(made)}", **kwargs)
        netbed.__enter__()
        made.append(netbed)
        return netbed

    yield make
    for netbed in made:
        netbed.close()


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("multinode") / "shards"
    job = fedsilo_cli(["prep", "synthetic", "--samples", "600", "--classes", "3", "--sites", "3",
                       "--partition", "iid", "--seed", "0", "--out", str(out)])
    assert job.returncode == 0, job.output
    return out


def train_args(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--set", f"data.dir={shards}", "--set", "rounds=3",
            "--set", "train.max_steps=2", "--set", "runtime.progress=off",
            "--set", "runtime.reduce_dtype=fixed", "--set", "runtime.device=cpu",
            "--set", "runtime.threads=1",
            "--out", str(run), *extra]


def start(netbed: NetBed, ranks_per_node: Sequence[int], argv: Sequence[str], *,
          keepalive: tuple[int, int, int] | None = None) -> subprocess.Popen:
    """``python -m fedsilo ARGV`` across the nodes (stdout and stderr to files)."""
    command = netbed.mpirun(ranks_per_node, [sys.executable, "-m", "fedsilo", *argv],
                            mpirun=MPIRUN, keepalive=keepalive)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    out = open(netbed.dir / "stdout", "w")
    err = open(netbed.dir / "stderr", "w")
    return subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True,
                            start_new_session=True)


def finish(netbed: NetBed, process: subprocess.Popen, *, timeout: float,
           started: float | None = None) -> Job:
    """Wait for ``process``; a job still running after ``timeout`` fails the test."""
    started = time.monotonic() if started is None else started
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
        netbed.kill_all()
        stdout, stderr = (netbed.dir / "stdout").read_text(), (netbed.dir / "stderr").read_text()
        pytest.fail(f"multi-node job hung: still running after {timeout} s\n--- stdout\n"
                    f"{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}")
    stdout, stderr = (netbed.dir / "stdout").read_text(), (netbed.dir / "stderr").read_text()
    return Job(process.returncode, stdout, stderr, time.monotonic() - started)


def run(netbed: NetBed, ranks_per_node: Sequence[int], argv: Sequence[str], *,
        timeout: float = 60) -> Job:
    started = time.monotonic()
    return finish(netbed, start(netbed, ranks_per_node, argv), timeout=timeout, started=started)
