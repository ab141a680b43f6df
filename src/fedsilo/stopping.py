"""Graceful stop on a signal, for SLURM pre-emption and time limits.

SLURM sends a warning signal before a job's time limit (``#SBATCH --signal=USR1@120``) and
SIGTERM when it pre-empts a job.  Either one sets a flag; the federation stops at the next
round boundary (after that round's checkpoint) on every rank together and exits with
:data:`EXIT_PREEMPTED`, which the batch script turns into a requeue.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import Callable, Iterable

log = logging.getLogger("fedsilo")

#: exit status of a run stopped by a signal after a complete checkpoint (sysexits EX_TEMPFAIL:
#: "try again later"); anything else means finished (0) or failed
EXIT_PREEMPTED = 75
#: exit status of a run the watchdog ended because a rank fell silent (sysexits EX_PROTOCOL);
#: the last complete checkpoint was checked first, so ``--resume`` continues from it
EXIT_HUNG = 76

DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")


class StopFlag:
    """Set by a signal handler; read at round boundaries."""

    def __init__(self, on_signal: Callable[[str], None] | None = None) -> None:
        self.signal_name: str | None = None
        #: called once, at the signal (the coordinator leaves stopped.json at once: when
        #: SIGTERM reached mpirun, Open MPI may kill the ranks before the round ends)
        self.on_signal = on_signal

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
            if self.on_signal is not None:
                try:
                    self.on_signal(self.signal_name)
                except Exception as exc:  # noqa: BLE001 - never fail inside a handler
                    log.error("while recording the stop: %s: %s", type(exc).__name__, exc)


#: automatic watchdog: at least this long, and this many times the slowest round so far
AUTO_MIN_S, AUTO_FACTOR = 300.0, 10.0
#: with train.round_deadline_s: the local work may overrun its deadline by one step in
#: flight; the wait is bounded by deadline + max(this, deadline)
DEADLINE_GRACE_S = 60.0


@dataclass
class WaitPolicy:
    """How long a rank waits at a watched point before the watchdog ends the job.

    The coordinator waits ``round_timeout`` (``local_timeout`` for the local work, bounded
    by the round deadline when there is one); a participant waits longer
    (:meth:`for_participant`), so the coordinator, which knows who arrived, speaks first.

    >>> policy = WaitPolicy(hang_timeout_s=None, first_round_s=1800.0, deadline_s=None)
    >>> policy.round_timeout()  # the first round after a (re)start
    1800.0
    >>> policy.observe(40.0); policy.round_timeout()  # then 10x the slowest round, >= 300 s
    400.0
    >>> WaitPolicy(hang_timeout_s=30.0, first_round_s=1800.0, deadline_s=5.0,
    ...            rounds_seen=1).local_timeout()
    30.0
    >>> WaitPolicy(hang_timeout_s=None, first_round_s=1800.0, deadline_s=5.0).local_timeout()
    65.0
    >>> WaitPolicy.for_participant(400.0)
    610.0
    """

    hang_timeout_s: float | None
    first_round_s: float
    deadline_s: float | None
    slowest_round_s: float = 0.0
    rounds_seen: int = 0

    def observe(self, round_seconds: float) -> None:
        """A round finished after ``round_seconds`` (coordinator)."""
        self.slowest_round_s = max(self.slowest_round_s, round_seconds)
        self.rounds_seen += 1

    def round_timeout(self) -> float:
        if self.rounds_seen == 0:
            return self.first_round_s
        if self.hang_timeout_s is not None:
            return self.hang_timeout_s
        return max(AUTO_MIN_S, AUTO_FACTOR * self.slowest_round_s)

    def local_timeout(self) -> float:
        """The wait for the local work: the round timeout, or the deadline and its grace."""
        timeout = self.round_timeout()
        if self.deadline_s is not None:
            timeout = min(timeout, self.deadline_s + max(DEADLINE_GRACE_S, self.deadline_s))
        return timeout

    @staticmethod
    def for_participant(timeout: float) -> float:
        """A participant's wait where the coordinator waits ``timeout``."""
        return 1.5 * timeout + 10.0
