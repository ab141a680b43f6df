"""Errors fedsilo raises on purpose.

Every foreseeable problem is a :class:`FedsiloError` subclass.  The MPI layer agrees on
these across ranks at fixed points, so every rank stops with the same message; anything
that is not a ``FedsiloError`` is a bug and aborts the whole job (see ``fedsilo.comm``).
"""

from __future__ import annotations

#: the longest message an error carries: every rank prints it and MPI carries it, so a
#: 10 MB value quoted in a message must not become 40 MB of output
MAX_MESSAGE = 2000


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text``, cut in the middle when longer than ``limit`` characters.

    >>> shorten("x" * 5000, 40)
    'xxxxxxxxxxxxxxxxxxxxxxxxx [4970 characters cut] xxxxx'
    """
    if len(text) <= limit:
        return text
    head, tail = limit * 5 // 8, limit // 8
    return f"{text[:head]} [{len(text) - head - tail} characters cut] {text[-tail:]}"


class FedsiloError(Exception):
    """Base class of every error fedsilo raises deliberately (its message bounded)."""

    #: process exit status used when this error ends a command
    exit_code: int = 2

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (shorten(args[0]),)
        super().__init__(*args)


class ConfigError(FedsiloError):
    """A configuration file, override or command-line value is invalid."""


class ShardError(FedsiloError):
    """A shard file or shard set is missing, corrupt, or inconsistent."""


class DataError(FedsiloError):
    """Source data for preprocessing is unusable."""


class ModelError(FedsiloError):
    """A model cannot be built or does not fit the data."""


class UpdateError(FedsiloError):
    """A participant produced an update that cannot be aggregated (NaN/Inf, wrong size)."""


class PrivacyBudgetError(FedsiloError):
    """A differential-privacy budget is exhausted or cannot be met."""


class PolicyError(FedsiloError):
    """A participant refuses what the coordinator asks because it breaks the site's policy."""


class CommunicationError(FedsiloError):
    """The MPI job is not set up as the run needs (rank count, launcher, peers)."""


class CheckpointError(FedsiloError):
    """A checkpoint is missing, incomplete or does not match the run."""


class ReportError(FedsiloError):
    """A directory given to ``fedsilo report`` is not a run, or holds no complete round."""


class AgreedError(FedsiloError):
    """An error every rank knows about, raised on every rank at the same agreement point.

    Ranks that raise it can exit normally (all of them stop at the same place), so no rank
    is left waiting in a collective.
    """

    def __init__(self, message: str, *, exit_code: int = 2,
                 failures: tuple[tuple[int, str], ...] = ()) -> None:
        super().__init__(shorten(message, 4 * MAX_MESSAGE))
        self.exit_code = exit_code
        #: (rank, error class) of each rank that failed (what ``failed.json`` names)
        self.failures = failures


class KeyFileError(FedsiloError):
    """Homomorphic-encryption keys or parameters are missing, wrong, insecure or mismatched."""
