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

File modes (docs/decisions.md, "file modes"): private state (checkpoints, a site's state,
``departed/``) is 0600 whatever the umask; the released files (config, metrics, summary,
models and their cards, markers, report) follow the umask, like any file a tool writes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
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
log = logging.getLogger("fedsilo")


#: directories whose files are private state whatever their names
PRIVATE_DIRS = (CHECKPOINTS, "departed")


def is_private(path: Path) -> bool:
    """Whether ``path`` is private state, written 0600 whatever the umask: a checkpoint
    (``*.pt`` other than the released ``model.pt``/``best.pt``), or anything under
    ``checkpoints/`` or ``departed/``.

    >>> is_private(Path("run/checkpoints/round-0001/site-000.pt")), is_private(Path("run/model.pt"))
    (True, False)
    >>> is_private(Path("site-dir/round-0003/site-001.pt")), is_private(Path("run/summary.json"))
    (True, False)
    """
    if path.suffix == ".pt" and path.name not in ("model.pt", "best.pt"):
        return True
    return any(part in PRIVATE_DIRS for part in path.parent.parts)


def _make_parents(path: Path, *, private: bool) -> None:
    """Create ``path``'s missing directories; for a private file, those of the private
    part (its own directory, ``checkpoints/``, ``departed/`` and below) are 0700."""
    missing = []
    directory = path.parent
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for directory in reversed(missing):
        inside = directory == path.parent or any(p in PRIVATE_DIRS for p in directory.parts)
        directory.mkdir(mode=0o700 if private and inside else 0o777, exist_ok=True)


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path, *, retry: str = "resume the run", private: bool | None = None,
                exclusive: bool = False) -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary file in the same directory, fsynced and renamed
    into place on success; on an exception the temporary file goes and ``path`` is intact.
    A full disk is a CheckpointError saying to free space and ``retry``.

    ``private`` (default: :func:`is_private`): mode 0600 and, for directories this call
    creates, 0700; otherwise the mode follows the umask (0666 & ~umask).  ``exclusive``:
    the file is linked into place only if nothing is there yet (FileExistsError otherwise),
    so that a first verdict is never overwritten by a later one."""
    private = is_private(path) if private is None else private
    _make_parents(path, private=private)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600 if private else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic, and fails where a file already is
            Path(tmp).unlink()
        else:
            os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"no space left on the device (or quota) while writing "
                                  f"{path}; free space there and {retry}") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, *, retry: str = "resume the run",
                      private: bool | None = None, exclusive: bool = False) -> None:
    with atomic_file(path, retry=retry, private=private, exclusive=exclusive) as handle:
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


def atomic_torch_save(path: Path, obj: Any, *, private: bool | None = None) -> None:
    """``torch.save`` through :func:`atomic_file`; a full disk is named as such (ENOSPC
    from the file, not torch's zip-writer error, where the cause is lost)."""
    import torch  # the run directory's other files need no torch

    with atomic_file(path, private=private) as handle:
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
        # torch's first line says what (its weights-only refusal goes on for a page)
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()),
                     type(exc).__name__)
        raise CheckpointError(f"checkpoint {path} cannot be read: {first}") from None


class RunDir:
    """A run directory.  Its **released** part (:meth:`released_files`: models, cards,
    metrics, summary, report, TensorBoard, config) carries no secret; its **private**
    parts are the coordinator's checkpoints and each site's state (secret, accountant),
    under ``checkpoints/`` or, with ``site_dir``, in a directory of each site's own."""

    def __init__(self, root: str | Path, *, site_dir: str | None = None) -> None:
        self.root = Path(root)
        #: checkpoint.site_dir: each site's private state directory ({site}: its index)
        self.site_dir = site_dir

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
    #: written by the party that saw the job fail (an agreed error, a rank's exception)
    failed = property(lambda self: self.root / "failed.json")
    #: the markers of earlier endings, kept once a resume continued the run
    endings = property(lambda self: self.root / "endings")
    MARKERS = ("stopped.json", "hung.json", "failed.json")

    def keep_markers(self) -> list[Path]:
        """Move the previous job's ending markers to ``endings/NNN-NAME`` (a resume goes
        on, so they no longer describe the run, but they stay as its record: never deleted,
        never over an earlier one); the paths they now have."""
        kept: list[Path] = []
        for name in self.MARKERS:
            source = self.root / name
            if not source.is_file():
                continue
            self.endings.mkdir(exist_ok=True)
            number = 1 + len(list(self.endings.iterdir()))
            while True:
                target = self.endings / f"{number:03d}-{name}"
                try:
                    os.link(source, target)  # exclusive: an earlier record stays
                except FileExistsError:
                    number += 1
                    continue
                break
            source.unlink()
            kept.append(target)
        return kept

    def round_dir(self, round_index: int) -> Path:
        return self.checkpoints / f"round-{round_index:04d}"

    def coordinator_checkpoint(self, round_index: int) -> Path:
        return self.round_dir(round_index) / COORDINATOR_FILE

    def participant_checkpoint(self, round_index: int, site: int) -> Path:
        if self.site_dir is not None:
            return self.site_state(site) / f"round-{round_index:04d}" / f"site-{site:03d}.pt"
        return self.round_dir(round_index) / f"site-{site:03d}.pt"

    def newest_site_round(self, site: int) -> int | None:
        """The newest round of which ``site`` saved its state (None: none)."""
        base = self.site_state(site) if self.site_dir is not None else self.checkpoints
        if not base.is_dir():
            return None
        rounds = [int(m.group(1)) for e in base.iterdir() if (m := _ROUND_DIR.match(e.name))
                  and (e / f"site-{site:03d}.pt").is_file()]
        return max(rounds, default=None)

    def site_state(self, site: int) -> Path:
        """A site's own private directory (``checkpoint.site_dir``)."""
        assert self.site_dir is not None
        return Path(self.site_dir.replace("{site}", f"{site:03d}")).expanduser()

    def prune_site(self, site: int, *, keep: int) -> None:
        """With ``site_dir``: keep the site's ``keep + 1`` newest rounds (one more than the
        coordinator keeps: the site saves a round before the coordinator completes it)."""
        if self.site_dir is None or not self.site_state(site).is_dir():
            return
        rounds = sorted(int(m.group(1)) for e in self.site_state(site).iterdir()
                        if (m := _ROUND_DIR.match(e.name)))
        for old in rounds[:-(keep + 1)]:
            shutil.rmtree(self.site_state(site) / f"round-{old:04d}", ignore_errors=True)

    #: what a run directory releases: files a reader of the run (a party in the threat
    #: table) may hold; everything else in it is private
    RELEASED = ("config.yaml", "metrics.jsonl", "summary.json", "model.pt", "model.json",
                "best.pt", "best.json", "stopped.json", "hung.json", "failed.json", "endings",
                "report", "tensorboard")

    def released_files(self) -> list[Path]:
        """The files of the released part, in order: nothing under ``checkpoints/`` or
        ``departed/`` (private state, secrets), no lock or temporary file."""
        out: list[Path] = []
        for name in self.RELEASED:
            path = self.root / name
            if path.is_file():
                out.append(path)
            elif path.is_dir():
                out += sorted(p for p in path.rglob("*") if p.is_file())
        return out

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

    def set_aside(self, round_index: int) -> Path:
        """Rename round ``round_index``'s directory to ``round-NNNN.unreadable`` (then
        ``.unreadable.2``, ...): out of the complete rounds and of pruning, kept for a look."""
        source = self.round_dir(round_index)
        target = source.with_name(f"{source.name}.unreadable")
        number = 1
        while target.exists():
            number += 1
            target = source.with_name(f"{source.name}.unreadable.{number}")
        source.rename(target)
        return target

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

    def scan_metrics(self) -> tuple[list[dict[str, Any]], list[tuple[int, bytes]]]:
        """The rows of ``metrics.jsonl`` and its bad lines as ``(line number, bytes)``.

        A bad line (torn by a crash, edited, not UTF-8 or not JSON, not an object, or its
        ``round`` not a positive integer) is skipped, never the rows after it."""
        try:
            data = self.metrics.read_bytes()
        except FileNotFoundError:
            return [], []
        rows: list[dict[str, Any]] = []
        bad: list[tuple[int, bytes]] = []
        for number, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            row = _metrics_row(line)
            if row is None:
                bad.append((number, line))
            else:
                rows.append(row)
        return rows, bad

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl``; bad lines are skipped with a warning naming them."""
        rows, bad = self.scan_metrics()
        if bad:
            log.warning("%s: line(s) %s are not metrics rows (torn by a crash, or edited); "
                        "they are skipped", self.metrics, _numbers(bad))
        return rows

    def truncate_metrics(self, *, last_round: int) -> None:
        """Keep every row up to ``last_round``, bad lines or not; rows of later rounds (a
        crash left them without checkpoint) go to ``metrics.jsonl.dropped`` and bad lines to
        ``metrics.jsonl.corrupt`` (both appended, so nothing a resume removes is lost)."""
        rows, bad = self.scan_metrics()
        keep = [r for r in rows if r["round"] <= last_round]
        later = [r for r in rows if r["round"] > last_round]
        if bad:
            _append(self.root / f"{self.metrics.name}.corrupt",
                    b"".join(f"line {n}: ".encode() + line + b"\n" for n, line in bad))
            log.warning("%s: line(s) %s are not metrics rows (torn by a crash, or edited); "
                        "moved to %s.corrupt, the other rows are kept", self.metrics,
                        _numbers(bad), self.metrics.name)
        if later:
            _append(self.root / f"{self.metrics.name}.dropped",
                    "".join(json.dumps(finite_json(r)) + "\n" for r in later).encode())
            log.info("%s: rows of rounds %s have no checkpoint to resume from; moved to "
                     "%s.dropped", self.metrics, ", ".join(str(r["round"]) for r in later),
                     self.metrics.name)
        atomic_write_text(self.metrics, "".join(json.dumps(finite_json(r)) + "\n" for r in keep))


def _metrics_row(line: bytes) -> dict[str, Any] | None:
    """``line`` as a metrics row, or None when it is not one."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deep
        return None
    if not isinstance(row, dict):
        return None
    index = row.get("round")
    if isinstance(index, bool) or not isinstance(index, int) or index < 1:
        return None
    return row


def _numbers(bad: list[tuple[int, bytes]], limit: int = 20) -> str:
    shown = ", ".join(str(n) for n, _ in bad[:limit])
    return shown + (f" and {len(bad) - limit} more" if len(bad) > limit else "")


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def dump_json(path: Path, obj: Any, *, exclusive: bool = False) -> bool:
    """Write ``obj`` to ``path`` atomically; with ``exclusive``, only if no file is there
    yet.  Returns whether it was written."""
    text = json.dumps(finite_json(obj), indent=2, sort_keys=False) + "\n"
    try:
        atomic_write_text(path, text, exclusive=exclusive)
    except FileExistsError:
        if not exclusive:
            raise
        return False
    return True


def finite_json(obj: Any) -> Any:
    """``obj`` with NaN/Inf floats replaced by None (JSON has no NaN; e.g. AUC of one class)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj
