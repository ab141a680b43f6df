"""Graceful stop on a signal, for SLURM pre-emption and time limits.

SLURM sends a warning signal before a job's time limit (``#SBATCH --signal=USR1@120``) and
SIGTERM when it pre-empts a job.  Either one sets a flag; the federation stops at the next
round boundary (after that round's checkpoint) on every rank together and exits with
:data:`EXIT_PREEMPTED`, which the batch script turns into a requeue.
"""

from __future__ import annotations

import logging
import signal
from typing import Iterable

log = logging.getLogger("fedsilo")

#: exit status of a run stopped by a signal after a complete checkpoint (sysexits EX_TEMPFAIL:
#: "try again later"); anything else means finished (0) or failed
EXIT_PREEMPTED = 75

DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")


class StopFlag:
    """Set by a signal handler; read at round boundaries."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self, names: Iterable[str] = DEFAULT_SIGNALS) -> "StopFlag":
        for name in names:
            signal.signal(getattr(signal, name), self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning("received %s: stopping after the current round's checkpoint",
                        self.signal_name)
