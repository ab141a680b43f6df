"""Turn every way a rank can fail into an exit of the whole job, never a hang."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Callable

from mpi4py import MPI

from fedsilo.errors import AgreedError, FedsiloError

log = logging.getLogger("fedsilo")


def run_guarded(body: Callable[[], int]) -> int:
    """Run ``body`` on this rank and return its exit status.

    - an :class:`AgreedError` was raised on every rank at the same point: log it and
      return its status (every rank returns, so MPI finalizes cleanly);
    - any other exception happened on this rank alone: log rank and traceback, then
      ``MPI_Abort`` so that ranks blocked in a collective are ended too.
    """
    comm = MPI.COMM_WORLD
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


def abort_hung(comm: "MPI.Comm", message: str, *, stage: str, silent: list[int],
               handler: Callable[[str, list[int], str], None] | None) -> None:
    """The watchdog's end of the job: let ``handler`` check the last checkpoint and leave a
    marker, say why, and abort every rank with :data:`~fedsilo.stopping.EXIT_HUNG`."""
    from fedsilo.stopping import EXIT_HUNG

    if handler is not None:
        try:
            handler(stage, silent, message)
        except Exception as exc:  # noqa: BLE001 - the job must end whatever the handler did
            _emit(f"watchdog: while checking the run directory: {type(exc).__name__}: {exc}")
    _emit(f"[rank {comm.Get_rank()}/{comm.Get_size()}] fedsilo: error: {message}")
    _abort(comm, EXIT_HUNG)


def _emit(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _abort(comm: "MPI.Comm", code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    comm.Abort(code)
