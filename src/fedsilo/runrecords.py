"""The records of run directories, read for ``fedsilo report`` (:mod:`fedsilo.runreport`)
and its plots (:mod:`fedsilo.runplots`): each run's configuration, metrics rows, summary and
status, and the gap of federated runs to a centralized baseline.

It reads only what a run directory holds as text (``config.yaml`` with ``yaml.safe_load``,
``metrics.jsonl`` and ``summary.json`` as JSON); it never unpickles a checkpoint and imports
neither torch nor MPI, so it runs on a login node or a laptop beside a copied run.  A run
may be finished (``summary.json``), stopped, hung, crashed (its last line cut mid-write:
the complete lines are read and the page says so) or still running.
"""

from __future__ import annotations

import fcntl
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from fedsilo.errors import ReportError

REPORT_FILE = "report.html"
#: the default --out of several runs (one run: RUN_DIR/report)
SEVERAL_RUNS_OUT = "fedsilo-report"


@dataclass
class Run:
    """What a run directory says about its run, read without unpickling anything."""

    root: Path
    name: str
    config: dict[str, Any]
    config_text: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None
    #: finished | running | stopped | hung | interrupted
    status: str
    notes: list[str] = field(default_factory=list)

    @property
    def planned_rounds(self) -> int | None:
        rounds = self.config.get("rounds")
        return rounds if isinstance(rounds, int) else None

    @property
    def last_round(self) -> int:
        return int(self.rows[-1]["round"])

    def final_test(self) -> dict[str, Any]:
        """The final test metrics: summary.json's when the run finished, else the last row
        that has them."""
        if self.summary and isinstance(self.summary.get("test"), dict):
            return self.summary["test"]
        tested = [r for r in self.rows if "acc" in r]
        keys = ("acc", "auc", "loss", "dice", "iou", "hd95", "dice_per_class")
        return {k: tested[-1][k] for k in keys if k in tested[-1]} if tested else {}

    def best(self) -> tuple[float | None, int | None]:
        """The best test accuracy over the rounds, and its round."""
        tested = [r for r in self.rows if isinstance(r.get("acc"), (int, float))]
        if not tested:
            return None, None
        top = max(tested, key=lambda r: r["acc"])
        return top["acc"], top["round"]

    def final_val(self) -> dict[str, Any]:
        if self.summary and isinstance(self.summary.get("val"), dict):
            return self.summary["val"]
        with_val = [r for r in self.rows if r.get("val")]
        return with_val[-1]["val"] if with_val else {}

    def epsilon(self) -> dict[str, float]:
        """Each site's ε spent, as of the last row that reports it."""
        rows = [r for r in self.rows if r.get("epsilon")]
        if not rows:
            return {}
        # a value that is not a number (a hand-edited or foreign row) is no ε spent
        return {k: v for k, v in dict(rows[-1]["epsilon"]).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def budget(self, site: str) -> float | None:
        """Site ``site``'s ε budget: summary.json's, else config.yaml's (its dp.sites
        override first)."""
        privacy = (self.summary or {}).get("privacy") or {}
        if isinstance(privacy.get(site), dict) and "target_epsilon" in privacy[site]:
            return privacy[site]["target_epsilon"]
        dp = self.config.get("dp") or {}
        sites = dp.get("sites") or {}
        override = sites.get(site, sites.get(int(site) if site.isdigit() else site)) or {}
        if isinstance(override, dict) and "target_epsilon" in override:
            return override["target_epsilon"]
        return dp.get("target_epsilon")

    @property
    def centralized(self) -> bool:
        """Whether this is a centralized baseline (``fedsilo baseline``: every row and the
        summary say so), not a federation."""
        return bool((self.summary or {}).get("centralized") is True
                    or any(r.get("centralized") is True for r in self.rows))

    def total(self, section: str, key: str | None = None) -> float:
        """The sum over the rounds of ``row[section][key]`` (of every value without key)."""
        total = 0.0
        for row in self.rows:
            values = row.get(section) or {}
            for name, value in values.items():
                if (key is None or name == key) and isinstance(value, (int, float)):
                    total += value
        return total


def load_run(path: str | Path, *, name: str | None = None) -> Run:
    """Read the run directory ``path``; a :class:`ReportError` names what is wrong with it."""
    root = Path(path)
    if not root.exists():
        raise ReportError(f"{root}: no such directory")
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory: give a run directory (fedsilo train "
                          f"--out RUN_DIR)")
    metrics, config_file = root / "metrics.jsonl", root / "config.yaml"
    if not metrics.is_file():
        if config_file.is_file():
            raise ReportError(f"{root} holds no metrics.jsonl yet: the run has completed no "
                              f"round, there is nothing to report")
        raise ReportError(f"{root} is not a fedsilo run directory (it holds neither "
                          f"metrics.jsonl nor config.yaml)")
    notes: list[str] = []
    rows = _read_rows(metrics, notes)
    config, config_text = _read_config(config_file, notes)
    summary = _read_json(root / "summary.json", notes)
    status = _status(root, rows, summary, notes)
    return Run(root=root, name=name or root.resolve().name, config=config,
               config_text=config_text, rows=rows, summary=summary, status=status,
               notes=notes)


def _read_rows(metrics: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``.  A line that is not a row (cut by a crash, edited) is
    left out with a note, never the rows after it; a row whose figures have types the report
    cannot show is a ReportError naming the line and the key."""
    text = metrics.read_bytes().decode("utf-8", errors="replace")
    if not text.strip():
        raise ReportError(f"{metrics} is empty: the run has completed no round yet")
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, an int too long, nested too deep
            row = None
        index = row.get("round") if isinstance(row, dict) else None
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= MAX_ROUND:
            bad.append(number)
            continue
        assert isinstance(row, dict)
        _check_row(row, where=f"{metrics} line {number}")
        rows.append(row)
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    if bad and bad[-1] == last:
        notes.append(f"the last line of metrics.jsonl (line {last}) was cut mid-line (a crash "
                     f"while writing it, or a row being written now); it is left out")
        bad.pop()
    if bad:
        shown = ", ".join(map(str, bad[:20])) + (f" and {len(bad) - 20} more"
                                                  if len(bad) > 20 else "")
        notes.append(f"line(s) {shown} of metrics.jsonl are not metrics rows (edited, or "
                     f"torn by a crash); they are left out, the other rows are reported")
    if not rows:
        raise ReportError(f"{metrics} holds no complete row: the run has completed no round "
                          f"yet ({notes[-1] if notes else 'nothing to read'})")
    return rows


#: the largest round index a row may carry (a plot axis holds it as a float)
MAX_ROUND = 2**31 - 1
#: what the report reads of a row: figures (a number or null) ...
_FIGURES = ("acc", "auc", "loss", "user_epsilon", "user_delta")
#: ... objects of figures by name ...
_FIGURE_MAPS = ("val", "seconds", "bytes")
#: ... and objects of figures by site (a decimal site index)
_SITE_MAPS = ("epsilon", "delta", "stopped")
#: config.yaml: the most bytes, levels of nesting and values (aliases counted each time
#: they are used) the report reads
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_NODES = 100_000


def _check_row(row: dict[str, Any], *, where: str) -> None:
    """ReportError unless every key the report reads of ``row`` has the type it needs."""
    for key in _FIGURES:
        if not _is_figure(row.get(key)):
            raise ReportError(f"{where}: {key!r} must be a number or null; got "
                              f"{_show(row[key])}")
    for key in (*_FIGURE_MAPS, *_SITE_MAPS):
        _check_map(row.get(key), key=key, sites=key in _SITE_MAPS, where=where)
    overlapped = row.get("overlapped", [])
    if not isinstance(overlapped, list) or not all(isinstance(v, str) for v in overlapped):
        raise ReportError(f"{where}: 'overlapped' must be a list of phase names; got "
                          f"{_show(overlapped)}")


def _check_map(value: Any, *, key: str, sites: bool, where: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        what = "site index" if sites else "name"
        raise ReportError(f"{where}: {key!r} must be an object ({what}: number); got "
                          f"{_show(value)}")
    for name, item in value.items():
        if sites and not (name.isascii() and name.isdigit() and len(name) <= 9):
            raise ReportError(f"{where}: {key!r} has the site key {_show(name)}; site keys are "
                              f"decimal site indexes such as \"0\"")
        if not _is_figure(item):
            raise ReportError(f"{where}: {key}.{name} must be a number or null; got "
                              f"{_show(item)}")


def _is_figure(value: Any) -> bool:
    """A number the page and the plots can show (a float: an int beyond float is not), or
    None."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _show(value: Any) -> str:
    """``value`` in an error message, short."""
    text = repr(value) if isinstance(value, str) else json.dumps(value) \
        if isinstance(value, (int, float, bool)) or value is None else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _read_config(path: Path, notes: list[str]) -> tuple[dict[str, Any], str]:
    if not path.is_file():
        notes.append("no config.yaml: the configuration is unknown")
        return {}, ""
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ReportError(f"{path} is {path.stat().st_size} bytes, more than a fedsilo "
                          f"configuration ever is (at most {MAX_CONFIG_BYTES}); not read")
    text = path.read_text(errors="replace")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ReportError(f"{path} is not valid YAML ({where}{problem})") from None
    except RecursionError:
        raise ReportError(f"{path} is nested deeper than a fedsilo configuration ever is "
                          f"(at most {MAX_CONFIG_DEPTH} levels); not read") from None
    if not isinstance(config, dict):
        raise ReportError(f"{path} is not a fedsilo configuration (a YAML mapping)")
    _check_config(config, path=path)
    return config, text


def _check_config(config: dict[str, Any], *, path: Path) -> None:
    """ReportError unless ``config`` is small enough to walk and its keys the report reads
    have their types (``rounds``, ``dp``, ``dp.sites``, ``dp.target_epsilon``)."""
    stack: list[tuple[Any, int]] = [(config, 1)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if depth > MAX_CONFIG_DEPTH or seen > MAX_CONFIG_NODES:
            what = (f"nested deeper than {MAX_CONFIG_DEPTH} levels" if depth > MAX_CONFIG_DEPTH
                    else f"more than {MAX_CONFIG_NODES} values (aliases counted each time)")
            raise ReportError(f"{path} is {what}, more than a fedsilo configuration ever "
                              f"is; not read")
        children = node.values() if isinstance(node, dict) else \
            node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    dp = config.get("dp")
    if dp is not None and not isinstance(dp, dict):
        raise ReportError(f"{path}: 'dp' must be a mapping; got {_show(dp)}")
    sites = (dp or {}).get("sites")
    if sites is not None and not isinstance(sites, dict):
        raise ReportError(f"{path}: 'dp.sites' must be a mapping of site indexes; got "
                          f"{_show(sites)}")


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (ValueError, RecursionError):  # not JSON (or UTF-8), nested too deep
        notes.append(f"{path.name} cannot be read as JSON; it is left out")
        return None
    if not isinstance(value, dict):
        return None
    for key in ("privacy", "stopped", "test", "val"):
        if value.get(key) is not None and not isinstance(value[key], dict):
            raise ReportError(f"{path}: {key!r} must be an object; got {_show(value[key])}")
    for site, entry in (value.get("privacy") or {}).items():
        if not isinstance(entry, dict):
            raise ReportError(f"{path}: privacy.{site} must be an object; got {_show(entry)}")
    return value


def _status(root: Path, rows: list[dict[str, Any]], summary: dict[str, Any] | None,
            notes: list[str]) -> str:
    if _locked(root / ".fedsilo.lock"):
        notes.append(f"the run is still going (a job holds its lock): this is round "
                     f"{rows[-1]['round']}")
        return "running"
    if summary is not None and summary.get("rounds_completed") == rows[-1]["round"]:
        return "finished"
    failed = root / "failed.json"
    if failed.is_file():
        notes.append(_failure_note(failed, root))
        return "failed"
    for marker, status in (("stopped.json", "stopped"), ("hung.json", "hung")):
        if (root / marker).is_file():
            notes.append(f"{marker}: the run ended early; 'fedsilo train --resume {root}' "
                         f"continues it")
            return status
    notes.append(f"the run ended after round {rows[-1]['round']} without summary.json (a crash "
                 f"or a kill); 'fedsilo train --resume {root}' continues it")
    return "interrupted"


#: the most of a marker the report reads (a marker is a few hundred bytes)
MAX_MARKER_BYTES = 1 << 20


def _failure_note(path: Path, root: Path) -> str:
    """What ``failed.json`` says, in one line; any field of the wrong type is left out."""
    try:
        with path.open("rb") as handle:
            value = json.loads(handle.read(MAX_MARKER_BYTES + 1)[:MAX_MARKER_BYTES])
    except (OSError, ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        return f"{path.name}: the job failed (the file cannot be read as a marker)"
    ranks, errors = value.get("ranks"), value.get("errors")
    who = (f" on rank(s) {', '.join(str(r) for r in ranks[:8])}"
           if isinstance(ranks, list) and all(isinstance(r, int) for r in ranks) and ranks
           else "")
    what = (f" ({', '.join(sorted(set(errors)))[:200]})"
            if isinstance(errors, list) and errors and all(isinstance(e, str) for e in errors)
            else "")
    message = value.get("message")
    text = f": {message[:500]}" if isinstance(message, str) else ""
    last = value.get("last_checkpoint_round")
    after = (f"; 'fedsilo train --resume {root}' continues from round {last}"
             if isinstance(last, int) and not isinstance(last, bool) and last > 0
             else "; no complete checkpoint to resume from")
    return " ".join(f"{path.name}: the job failed{who}{what}{text}{after}".split())


def _locked(lock: Path) -> bool:
    """Whether a fedsilo job holds the run directory's lock (RunDir.lock) now."""
    if not lock.is_file():
        return False
    with lock.open("rb") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False


@dataclass(frozen=True)
class Gap:
    """How far a federated run is from the centralized baseline: per round both tested,
    ``baseline − federated`` in test accuracy and AUC (positive: federating costs that
    much), and the same of their final models."""

    run: str
    baseline: str
    rounds: list[int]
    acc: list[float]
    auc: list[float | None]
    final_acc: float | None
    final_auc: float | None


def baseline_gaps(runs: Sequence[Run]) -> list[Gap]:
    """The gap of every federated run to the first centralized baseline among ``runs``
    (none without one, or without a federated run)."""
    baseline = next((run for run in runs if run.centralized), None)
    if baseline is None:
        return []
    reference = {r["round"]: r for r in baseline.rows if is_number(r.get("acc"))}
    base_final = baseline.final_test()
    gaps = []
    for run in runs:
        if run.centralized:
            continue
        rounds, acc, auc = [], [], []
        for row in run.rows:
            other = reference.get(row["round"])
            if other is None or not is_number(row.get("acc")):
                continue
            rounds.append(row["round"])
            acc.append(other["acc"] - row["acc"])
            auc.append(other["auc"] - row["auc"]
                       if is_number(other.get("auc")) and is_number(row.get("auc")) else None)
        final = run.final_test()
        gaps.append(Gap(run=run.name, baseline=baseline.name, rounds=rounds, acc=acc, auc=auc,
                        final_acc=_difference(base_final.get("acc"), final.get("acc")),
                        final_auc=_difference(base_final.get("auc"), final.get("auc"))))
    return gaps


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _difference(a: Any, b: Any) -> float | None:
    return float(a) - float(b) if is_number(a) and is_number(b) else None


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Read every run; runs with the same directory name are named by their parent too."""
    roots = [Path(p) for p in paths]
    names = [r.resolve().name for r in roots]
    return [load_run(root, name=f"{root.resolve().parent.name}/{name}"
                     if names.count(name) > 1 else name) for root, name in zip(roots, names)]


def default_out(paths: Sequence[str | Path]) -> Path:
    return Path(paths[0]) / "report" if len(paths) == 1 else Path(SEVERAL_RUNS_OUT)


