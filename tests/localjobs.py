"""Multi-rank ``fedsilo`` jobs without ``mpirun``: the in-process tier's launcher.

``local_mpirun(N, argv, ...)`` takes the arguments of :func:`helpers.mpirun` and returns the
same :class:`helpers.Job`, but its ranks are forked (``fedsilo.comm.local.launch``) from a
job server started once per test session, which imported torch, fedsilo and the libraries
a rank needs and then ran nothing.  Each job is a fresh process tree (its own working
directory, environment, RNG state and signal handlers, as under ``mpirun``); it only skips
the Python start and the imports, about 4.5 s a rank on two cores.

The server runs in a process of its own, not in pytest's: pytest has run torch's thread
pools and changed module state by the time a test launches a job, and a forked rank would
inherit all of it.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Sequence

import pytest

TESTS = Path(__file__).resolve().parent
_server: tuple[subprocess.Popen, Connection] | None = None


def local_mpirun(num_ranks: int, argv: Sequence[str], *, timeout: float, cwd: Path | None = None,
                 python_args: Sequence[str] = ("-m", "fedsilo")):
    """``python -m fedsilo ARGV`` (or the script in ``python_args``) on ``num_ranks`` forked
    ranks over :class:`fedsilo.comm.local.LocalComm`; a job still running after ``timeout``
    seconds is killed and the test fails, as with :func:`helpers.mpirun`."""
    from helpers import Job

    from fedsilo.launch import rank_environment

    _, conn = _start()
    env = rank_environment(num_ranks)
    env["PYTHONUNBUFFERED"] = "1"
    with tempfile.TemporaryDirectory(prefix="fedsilo-local-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        umask = os.umask(0o077)
        os.umask(umask)
        start = time.monotonic()
        conn.send({"umask": umask, "size": num_ranks, "argv": [str(a) for a in argv],
                   "cwd": str(cwd or os.getcwd()), "env": env,
                   "python_args": [str(a) for a in python_args],
                   "stdout": str(out), "stderr": str(err)})
        _, leader = conn.recv()
        if not conn.poll(timeout):
            os.killpg(leader, signal.SIGKILL)
            conn.recv()
            pytest.fail(f"local job hung: still running after {timeout} s: {list(argv)}\n"
                        f"--- stdout\n{_read(out)[-3000:]}\n--- stderr\n{_read(err)[-3000:]}")
        _, code = conn.recv()
        return Job(code, _read(out), _read(err), time.monotonic() - start)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _start() -> tuple[subprocess.Popen, Connection]:
    global _server
    if _server is not None and _server[0].poll() is None:
        return _server
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    process = subprocess.Popen(
        [sys.executable, "-c", f"import localjobs; localjobs.serve({theirs.fileno()})"],
        pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    theirs.close()
    conn = Connection(ours.detach())
    _server = (process, conn)
    atexit.register(_stop)
    return _server


def _stop() -> None:
    if _server is not None:
        process, conn = _server
        conn.close()  # the server ends at EOF
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


# -- the server's side ----------------------------------------------------------------------


def serve(fd: int) -> None:
    """Import what ranks need, then run each job asked for over ``fd``, one at a time."""
    import mpi4py

    mpi4py.rc.finalize = False  # the server initializes MPI (singleton) only for its types
    import h5py  # noqa: F401
    import opacus  # noqa: F401
    import tenseal  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401
    from mpi4py import MPI  # noqa: F401

    import fedsilo.cli  # noqa: F401
    import fedsilo.coordinator  # noqa: F401
    import fedsilo.federation  # noqa: F401
    import fedsilo.participant  # noqa: F401
    import fedsilo.training  # noqa: F401

    conn = Connection(fd)
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        leader = os.fork()
        if leader == 0:
            code = 1
            try:
                os.setsid()
                conn.close()
                code = _lead(request)
            finally:
                os._exit(code)
        conn.send(("started", leader))
        _, raw = os.waitpid(leader, 0)
        conn.send(("ended", os.waitstatus_to_exitcode(raw)))


def _lead(request: dict[str, Any]) -> int:
    from fedsilo.comm.local import launch

    os.chdir(request["cwd"])
    os.umask(request["umask"])  # what a process launched from the test would inherit
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(target, fd)
        os.close(target)
    size = request["size"]

    def environment(rank: int) -> dict[str, str]:
        return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(size),
                "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
                "OMPI_COMM_WORLD_LOCAL_SIZE": str(size)}

    def body(rank: int) -> int:
        import io
        import runpy

        for name, fd in (("stdout", 1), ("stderr", 2)):  # unbuffered, as PYTHONUNBUFFERED
            setattr(sys, name, io.TextIOWrapper(open(fd, "wb", buffering=0, closefd=False),
                                                write_through=True))
        args = [*request["python_args"], *request["argv"]]
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = args
            runpy.run_path(args[0], run_name="__main__")
        return 0

    return launch(size, body, environment=environment)
