"""Turn every way a rank can fail into an exit of the whole job, never a hang."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable

from mpi4py import MPI

from fedsilo.comm.communicator import Communicator
from fedsilo.errors import AgreedError, FedsiloError

log = logging.getLogger("fedsilo")


#: the job's communicator when it is not MPI's (fedsilo.comm.local: ranks forked for tests)
_WORLD_COMM: Any = None


def use_world_comm(comm: Any) -> None:
    """Make ``comm`` (a :class:`fedsilo.comm.communicator.Communicator`) this process's
    ``COMM_WORLD`` for :class:`~fedsilo.comm.World` and :func:`run_guarded`."""
    global _WORLD_COMM
    _WORLD_COMM = comm


def world_comm() -> Any:
    """The job's communicator: ``MPI.COMM_WORLD`` unless :func:`use_world_comm` set another."""
    return MPI.COMM_WORLD if _WORLD_COMM is None else _WORLD_COMM


def run_guarded(body: Callable[[], int]) -> int:
    """Run ``body`` on this rank and return its exit status.

    - an :class:`AgreedError` was raised on every rank at the same point: log it and
      return its status (every rank returns, so MPI finalizes cleanly);
    - any other exception happened on this rank alone: log rank and traceback, then
      ``MPI_Abort`` so that ranks blocked in a collective are ended too.
    """
    comm = world_comm()
    where = f"[rank {comm.Get_rank()}/{comm.Get_size()}]"
    try:
        return body()
    except AgreedError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except FedsiloError as exc:
        _emit(f"{where} fedsilo: error: {exc}")
        _abort(comm, exc.exit_code)
    except BaseException as exc:  # noqa: BLE001 - a bug or an interrupt; the job must end
        _emit(f"{where} fedsilo: unexpected {type(exc).__name__}, aborting the job:\n"
              + "".join(traceback.format_exception(exc)))
        _abort(comm, 1)
    return 1  # only reached without MPI (Abort does not return)


def abort_hung(comm: Communicator, message: str, *, stage: str, silent: list[int],
               handler: Callable[..., None] | None,
               hosts: dict[int, str] | None = None) -> None:
    """The watchdog's end of the job: let ``handler`` check the last checkpoint and leave a
    marker, say why, and abort every rank with :data:`~fedsilo.stopping.EXIT_HUNG`.

    ``hosts`` (rank -> hostname of each silent rank) reaches the handler as a keyword, so a
    marker can say on which machines the silent ranks ran (a cut wire silences a node)."""
    from fedsilo.stopping import EXIT_HUNG

    if handler is not None:
        try:
            if hosts is None:
                handler(stage, silent, message)
            else:
                handler(stage, silent, message, hosts=hosts)
        except Exception as exc:  # noqa: BLE001 - the job must end whatever the handler did
            _emit(f"watchdog: while checking the run directory: {type(exc).__name__}: {exc}")
    _emit(f"[rank {comm.Get_rank()}/{comm.Get_size()}] fedsilo: error: {message}")
    _abort(comm, EXIT_HUNG)


def _emit(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


#: seconds MPI_Abort gets before the process ends itself with the same status
ABORT_GRACE_S = 5.0


def _abort(comm: Communicator, code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    # MPI_Abort asks the launcher to end the job; with a node cut off the launcher may wait
    # on it and the call never returns: the rank then ends itself with the same status, and
    # the launcher, seeing a rank exit non-zero, ends the others it can reach
    timer = threading.Timer(ABORT_GRACE_S, os._exit, args=(code,))
    timer.daemon = True
    timer.start()
    comm.Abort(code)


class Deadline:
    """Bounds the blocking MPI calls of one rank: a daemon thread that ends the job when the
    rank has been inside one longer than its bound.

    Open MPI's blocking collectives (its tuned Bcast and Reduce) are about twice as fast for
    large buffers as the non-blocking ones polled with ``Test`` (benchmarks/RESULTS.md,
    "Bounded waits"), and a wire cut between nodes leaves them waiting for the kernel's
    TCP retries (about 15 minutes).  So the calls stay blocking and this thread watches
    them: the caller arms the deadline (:meth:`arm`) before the call and disarms it
    (:meth:`disarm`) after (two attribute writes; mpi4py releases the GIL inside MPI, so
    the thread runs while the caller waits).  Every ``tick_s`` the thread also calls
    ``tick`` (the World answers the coordinator's pings there), and once an armed deadline
    has passed it calls ``fire(stage, waited)`` once, which must end the process
    (``MPI_Abort``).
    """

    def __init__(self, *, tick: Callable[[], None], fire: Callable[[str, float], Any],
                 tick_s: float = 0.2) -> None:
        self._tick, self._fire, self.tick_s = tick, fire, tick_s
        self._armed: tuple[int, str, float, float] | None = None  # (token, stage, start, bound)
        self._token = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedsilo-deadline", daemon=True)
        self._thread.start()
        # before mpi4py's MPI_Finalize (it runs after the atexit handlers): no MPI call from
        # this thread may overlap it
        atexit.register(self.stop)

    def arm(self, stage: str, bound: float | None) -> int:
        self._token += 1
        self._armed = None if bound is None else (self._token, stage, time.monotonic(), bound)
        return self._token

    def disarm(self, token: int) -> None:
        armed = self._armed
        if armed is not None and armed[0] == token:
            self._armed = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001 - the watch must go on
                log.debug("deadline tick: %s: %s", type(exc).__name__, exc)
            armed = self._armed
            if armed is None:
                continue
            token, stage, start, bound = armed
            waited = time.monotonic() - start
            if waited > bound and self._armed is armed:
                self._fire(stage, waited)
                return
