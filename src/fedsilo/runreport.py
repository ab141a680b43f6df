"""``fedsilo report``: PNG plots and one self-contained HTML page of one or more runs,
read by :mod:`fedsilo.runrecords` (never unpickling a checkpoint, importing neither torch
nor MPI)."""

from __future__ import annotations

import base64
import datetime
import html
import math
from pathlib import Path
from typing import Any, Sequence

from fedsilo import __version__
from fedsilo.errors import ReportError
from fedsilo.runrecords import (  # noqa: F401 - Run, load_run: the readers, re-exported
    REPORT_FILE,
    Gap,
    Run,
    baseline_gaps,
    default_out,
    is_number,
    load_run,
    load_runs,
)


def write_report(paths: Sequence[str | Path], *, out: str | Path | None = None) -> Path:
    """Write the plots and ``report.html`` of the runs at ``paths`` into ``out``; returns the
    HTML page's path."""
    from fedsilo.runplots import draw_plots

    runs = load_runs(paths)
    directory = Path(out) if out is not None else default_out(paths)
    page = directory / REPORT_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        plots = draw_plots(runs, directory)
        page.write_text(render_html(runs, plots))
    except OSError as exc:
        raise ReportError(f"cannot write the report to {directory}: {exc.strerror or exc}; "
                          f"choose another --out") from None
    return page


# -- the page ----------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
td.status, td.run { text-align: left; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #a35a00; }
.status-finished { color: #1a7f37; } .status-running { color: #0550ae; }
.status-interrupted, .status-hung, .status-stopped { color: #a35a00; }
"""

_PLOT_TITLES = {"test": "Test metrics per round (the global model on test.h5)",
                "gap": "Gap to the centralized baseline (centralized − federated, per round)",
                "validation": "Federated validation (each site's own split, sample-weighted)",
                "epsilon": "Privacy spent: ε per site against its budget",
                "time": "Where each round's time went (the coordinator's phases)"}


def render_html(runs: Sequence[Run], plots: dict[str, Path]) -> str:
    """The report page: a table of the runs, notes, privacy, the plots (embedded as data
    URIs) and each run's configuration."""
    names = ", ".join(run.name for run in runs)
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>fedsilo report: {_e(names)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>fedsilo report: {_e(names)}</h1>",
             f"<p>Written {_e(now)} by fedsilo {_e(__version__)} from "
             f"{', '.join(f'<code>{_e(str(r.root))}</code>' for r in runs)}.</p>",
             _runs_table(runs), _segmentation_table(runs), _gap_table(runs), _notes(runs),
             _privacy_table(runs)]
    for key, title in _PLOT_TITLES.items():
        if key in plots:
            data = base64.b64encode(plots[key].read_bytes()).decode("ascii")
            parts.append(f"<h2>{_e(title)}</h2>\n<img id=\"plot-{key}\" alt=\"{_e(title)}\" "
                         f"src=\"data:image/png;base64,{data}\">")
    parts.append(_overlays(runs))
    parts.append(_configuration(runs))
    parts.append("</body></html>\n")
    return "\n".join(p for p in parts if p)


def _runs_table(runs: Sequence[Run]) -> str:
    head = ("run", "status", "rounds", "test acc", "test AUC", "test loss", "best acc (round)",
            "val acc", "val AUC", "max ε spent", "time", "bytes moved")
    lines = ["<h2>Runs</h2>", "<table id=\"runs\"><tr>"
             + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for run in runs:
        test, val = run.final_test(), run.final_val()
        best, best_round = run.best()
        eps = run.epsilon()
        planned = run.planned_rounds
        rounds = f"{run.last_round}/{planned}" if planned else str(run.last_round)
        spent = max(eps.values(), default=None) if eps else run.rows[-1].get("user_epsilon")
        cells = [
            f"<td class=\"run\">{_e(run.name)}"
            f"{' (centralized baseline)' if run.centralized else ''}</td>",
            f"<td class=\"status status-{run.status}\">{run.status}</td>",
            f"<td class=\"rounds\">{rounds}</td>",
            _value_cell("final-acc", test.get("acc")),
            _value_cell("final-auc", test.get("auc")),
            _value_cell("final-loss", test.get("loss")),
            _value_cell("best-acc", best, suffix=f" ({best_round})" if best_round else ""),
            _value_cell("final-val-acc", val.get("acc")),
            _value_cell("final-val-auc", val.get("auc")),
            _value_cell("max-epsilon", spent, digits=3),
            f"<td class=\"time\">{_duration(run.total('seconds', 'round'))}</td>",
            f"<td class=\"bytes\">{_bytes(run.total('bytes'))}</td>"]
        lines.append(f"<tr data-run=\"{_e(run.name)}\">" + "".join(cells) + "</tr>")
    for gap in baseline_gaps(runs):
        # the same columns as the runs: the difference sits under test acc and AUC
        cells = [f"<td class=\"run\">gap to the centralized baseline ({_e(gap.run)} vs "
                 f"{_e(gap.baseline)})</td>", "<td></td><td></td>",
                 _value_cell("gap-acc", gap.final_acc), _value_cell("gap-auc", gap.final_auc)]
        lines.append(f"<tr class=\"gap\" data-run=\"{_e(gap.run)}\">" + "".join(cells)
                     + "<td></td>" * (len(head) - 5) + "</tr>")
    lines.append("</table>")
    lines.append("<p>Final metrics are summary.json's for a finished run, else the last "
                 "evaluated round's. Time is the sum of the rounds' wall-clock seconds."
                 + (" A centralized baseline (<code>fedsilo baseline</code>) is the same "
                    "recipe on the pooled data; its gap row is centralized − federated "
                    "(positive: what federating costs)." if any(r.centralized for r in runs)
                    else "") + "</p>")
    return "\n".join(lines)


def _segmentation_table(runs: Sequence[Run]) -> str:
    """Segmentation runs' final test Dice, IoU (foreground means and per class) and HD95."""
    rows = []
    for run in runs:
        test = run.final_test()
        if "dice" not in test:
            continue
        per_class = test.get("dice_per_class")
        classes = ", ".join(_number(v, 4) if is_number(v) else "n/a" for v in per_class) \
            if isinstance(per_class, list) else ""
        rows.append(f"<tr data-run=\"{_e(run.name)}\"><td class=\"run\">{_e(run.name)}</td>"
                    + _value_cell("final-dice", test.get("dice"))
                    + _value_cell("final-iou", test.get("iou"))
                    + _value_cell("final-hd95", test.get("hd95"), digits=1)
                    + f"<td>{_e(classes)}</td></tr>")
    if not rows:
        return ""
    head = ("run", "test Dice", "test IoU", "test HD95 (px)", "Dice per class")
    return ("<h2>Segmentation</h2>\n<table id=\"segmentation\"><tr>"
            + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")


def _gap_table(runs: Sequence[Run]) -> str:
    """Per round, each federated run's gap to the centralized baseline."""
    gaps = [gap for gap in baseline_gaps(runs) if gap.rounds]
    if not gaps:
        return ""
    lines = ["<h2>Gap to the centralized baseline</h2>",
             f"<p>Test accuracy and AUC of the centralized baseline <b>{_e(gaps[0].baseline)}"
             f"</b> minus the federated run's, in each round both evaluated (a baseline "
             f"round is one pass of the recipe over the pooled data).</p>"]
    for gap in gaps:
        lines.append(f"<details><summary>{_e(gap.run)}: per round</summary>"
                     f"<table class=\"gap-rounds\" data-run=\"{_e(gap.run)}\"><tr>"
                     f"<th>round</th><th>acc gap</th><th>AUC gap</th></tr>")
        for index, acc, auc in zip(gap.rounds, gap.acc, gap.auc):
            lines.append(f"<tr data-round=\"{index}\"><td>{index}</td>"
                         f"{_value_cell('gap-acc', acc)}{_value_cell('gap-auc', auc)}</tr>")
        lines.append("</table></details>")
    return "\n".join(lines)


def _notes(runs: Sequence[Run]) -> str:
    items = [f"<li class=\"note\"><b>{_e(run.name)}</b>: {_e(note)}</li>"
             for run in runs for note in run.notes]
    return "<ul id=\"notes\">\n" + "\n".join(items) + "\n</ul>" if items else ""


def _privacy_table(runs: Sequence[Run]) -> str:
    """Per site, the ε spent (as published in metrics.jsonl) against its budget; user-level
    ε when the run accounts it."""
    lines = []
    for run in runs:
        eps = run.epsilon()
        last = run.rows[-1]
        user = last.get("user_epsilon")
        if not eps and user is None:
            continue
        stopped = (run.summary or {}).get("stopped") or last.get("stopped") or {}
        delta = last.get("delta") or {}
        lines.append(f"<h3>{_e(run.name)}</h3><table class=\"privacy\" data-run=\"{_e(run.name)}\">"
                     "<tr><th>site</th><th>ε spent</th><th>budget ε</th><th>δ</th>"
                     "<th>stopped in round</th></tr>")
        for site, value in sorted(eps.items(), key=lambda kv: int(kv[0])):
            lines.append(f"<tr data-site=\"{_e(site)}\"><td>site {_e(site)}</td>"
                         f"{_value_cell('epsilon', value, digits=3)}"
                         f"{_value_cell('budget', run.budget(site), digits=3)}"
                         f"<td>{_e(_number(delta.get(site), 3, 'g'))}</td>"
                         f"<td>{_e(str(stopped.get(site, '')))}</td></tr>")
        if user is not None:
            lines.append(f"<tr><td>user level (largest over sites)</td>"
                         f"{_value_cell('user-epsilon', user, digits=3)}<td></td>"
                         f"<td>{_e(_number(last.get('user_delta'), 3, 'g'))}</td><td></td></tr>")
        lines.append("</table>")
    return "<h2>Privacy spent</h2>\n" + "\n".join(lines) if lines else ""


#: overlay images a report embeds per run, and the largest file it embeds
MAX_OVERLAYS, MAX_OVERLAY_BYTES = 4, 8 << 20


def _overlays(runs: Sequence[Run]) -> str:
    """A segmentation run's test images beside their true and predicted masks: the PNGs in
    ``RUN_DIR/overlays/`` (written by ``fedsilo demo --task segmentation``, or by a user who
    chooses to publish test images; docs/segmentation.md), embedded as they are."""
    parts = []
    for run in runs:
        folder = run.root / "overlays"
        files = sorted(p for p in folder.glob("*.png") if p.is_file()
                       and p.stat().st_size <= MAX_OVERLAY_BYTES)[:MAX_OVERLAYS] \
            if folder.is_dir() else []
        for path in files:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(f"<p>{_e(run.name)}: {_e(path.name)}</p>\n<img class=\"overlay\" "
                         f"alt=\"{_e(path.name)}\" src=\"data:image/png;base64,{data}\">")
    if not parts:
        return ""
    return "<h2>Test images: photograph | true mask | predicted mask</h2>\n" + "\n".join(parts)


def _configuration(runs: Sequence[Run]) -> str:
    lines = ["<h2>Configuration</h2>"]
    if len(runs) > 1:
        flat = [_flatten(run.config) for run in runs]
        keys = sorted({k for f in flat for k in f if len({repr(g.get(k)) for g in flat}) > 1}
                      - {"data.dir"})
        if keys:
            lines.append("<table id=\"config-diff\"><tr><th>key</th>"
                         + "".join(f"<th>{_e(r.name)}</th>" for r in runs) + "</tr>")
            for key in keys:
                lines.append(f"<tr><td>{_e(key)}</td>"
                             + "".join(f"<td>{_e(str(f.get(key, '')))}</td>" for f in flat)
                             + "</tr>")
            lines.append("</table>")
    for run in runs:
        lines.append(f"<details{' open' if len(runs) == 1 else ''}><summary>{_e(run.name)}: "
                     f"config.yaml</summary><pre>{_e(run.config_text)}</pre></details>")
    return "\n".join(lines)


def _flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _value_cell(kind: str, value: Any, *, digits: int = 4, suffix: str = "") -> str:
    """A table cell showing ``value`` rounded, with the exact value in ``data-value``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"<td class=\"{kind}\">–</td>"
    return (f"<td class=\"{kind}\" data-value=\"{value!r}\">"
            f"{_e(_number(value, digits))}{_e(suffix)}</td>")


def _number(value: Any, digits: int, style: str = "f") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    return f"{value:.{digits}{style}}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
