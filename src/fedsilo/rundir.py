"""The run directory: resolved config, metrics, checkpoints, final model and summary.

Layout::

    RUN_DIR/config.yaml            fully resolved configuration
    RUN_DIR/metrics.jsonl          one JSON object per round
    RUN_DIR/checkpoints/round-0007/site-001.pt   participant 1's own state after round 7
    RUN_DIR/checkpoints/round-0007/coordinator.pt   global weights + server state (commit point)
    RUN_DIR/model.pt               final global model, a plain state_dict (card: model.json)
    RUN_DIR/best.pt                the model selected on federated validation (card: best.json)
    RUN_DIR/summary.json

A round's checkpoint is *complete* when ``coordinator.pt`` exists: participants write theirs
before the round's aggregation, the coordinator writes its file last.  Every file is written
to a temporary name and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from fedsilo.errors import CheckpointError

CHECKPOINTS = "checkpoints"
COORDINATOR_FILE = "coordinator.pt"
_ROUND_DIR = re.compile(r"^round-(\d{4,})$")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary file in the same directory, fsynced and renamed
    into place on success; on an exception the temporary file goes and ``path`` is intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"no space left on the device (or quota) while writing "
                                  f"{path}; free space there and resume the run") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text.encode())


class _Writes:
    """The file torch's zip writer writes to, keeping the OSError it reports only as
    ``enforce fail at inline_container.cc``."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` through :func:`atomic_file`; a full disk is named as such (ENOSPC
    from the file, not torch's zip-writer error, where the cause is lost)."""
    import torch  # the run directory's other files need no torch

    with atomic_file(path) as handle:
        writes = _Writes(handle)
        try:
            torch.save(obj, writes)
        except RuntimeError:
            if writes.error is not None:
                raise writes.error from None
            raise


def load_torch(path: Path) -> Any:
    """Load a checkpoint without unpickling arbitrary objects."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is missing") from None
    except Exception as exc:  # corrupt or not a checkpoint
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    model = property(lambda self: self.root / "model.pt")
    #: the global model with the best federated validation metric (checkpoint.best_by)
    best = property(lambda self: self.root / "best.pt")
    summary = property(lambda self: self.root / "summary.json")
    checkpoints = property(lambda self: self.root / CHECKPOINTS)
    #: written by the coordinator when a signal stops the run early (for batch scripts)
    stopped = property(lambda self: self.root / "stopped.json")
    #: written by the watchdog when a rank fell silent (fedsilo.comm.World.quiet_barrier)
    hung = property(lambda self: self.root / "hung.json")

    def round_dir(self, round_index: int) -> Path:
        return self.checkpoints / f"round-{round_index:04d}"

    def coordinator_checkpoint(self, round_index: int) -> Path:
        return self.round_dir(round_index) / COORDINATOR_FILE

    def participant_checkpoint(self, round_index: int, site: int) -> Path:
        return self.round_dir(round_index) / f"site-{site:03d}.pt"

    def lock(self, *, wait_s: float = 5.0) -> "BinaryIO":
        """Lock the run directory for this process (``.fedsilo.lock``, an exclusive
        ``flock`` released when the returned file is closed or the process ends); a
        second job on the same directory gets a CheckpointError instead of a shared run.

        It tries for ``wait_s`` seconds: the ranks of a job that was just killed (a crash,
        a pre-empted SLURM job requeued at once) can hold the lock for a moment longer."""
        import fcntl
        import time

        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / ".fedsilo.lock", "a+b")  # noqa: SIM115 - held for the job
        give_up = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except OSError:
                if time.monotonic() < give_up:
                    time.sleep(0.1)
                    continue
            handle.close()
            raise CheckpointError(f"{self.root} is in use by another fedsilo job (its "
                                  f".fedsilo.lock is held); wait for it to end, or choose "
                                  f"another --out") from None

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files a crash left mid-write (``.NAME.*.tmp`` from
        :func:`atomic_file`); returns what was removed."""
        removed = []
        for tmp in [*self.root.glob(".*.tmp"), *self.checkpoints.glob("round-*/.*.tmp")]:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        return removed

    def holds_run(self) -> bool:
        return self.metrics.exists() or self.checkpoints.exists() or self.model.exists()

    def complete_rounds(self) -> list[int]:
        """Rounds with a complete checkpoint, ascending."""
        if not self.checkpoints.is_dir():
            return []
        rounds = []
        for entry in self.checkpoints.iterdir():
            match = _ROUND_DIR.match(entry.name)
            if match and (entry / COORDINATOR_FILE).is_file():
                rounds.append(int(match.group(1)))
        return sorted(rounds)

    def prune(self, *, keep: int, current: int) -> None:
        """Delete round directories older than the last ``keep`` complete ones, and any
        incomplete directory older than ``current`` (left by a crash)."""
        complete = self.complete_rounds()
        keep_rounds = set(complete[-keep:])
        if not self.checkpoints.is_dir():
            return
        for entry in self.checkpoints.iterdir():
            match = _ROUND_DIR.match(entry.name)
            if match and int(match.group(1)) < current and int(match.group(1)) not in keep_rounds:
                shutil.rmtree(entry, ignore_errors=True)

    # -- metrics ----------------------------------------------------------------------

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(finite_json(row)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line torn by a crash: everything after it is gone too
        return rows

    def truncate_metrics(self, *, last_round: int) -> None:
        """Keep rows up to ``last_round`` (rows of rounds a crash left without checkpoint go)."""
        rows = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        atomic_write_text(self.metrics, "".join(json.dumps(finite_json(r)) + "\n" for r in rows))


def dump_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(finite_json(obj), indent=2, sort_keys=False) + "\n")


def finite_json(obj: Any) -> Any:
    """``obj`` with NaN/Inf floats replaced by None (JSON has no NaN; e.g. AUC of one class)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj
