"""The plots of ``fedsilo report`` (matplotlib, Agg, through ``Figure`` objects: no pyplot,
no global backend state).  Curves of several runs are overlaid, one colour per run; plots
that cannot be overlaid (ε per site, time per phase) get one panel per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from fedsilo.runrecords import Run

#: the coordinator's phases of a round, in order; together (with "other") they make up
#: ``seconds.round``.  ``local_*_max`` are parts of ``local`` and are not stacked.
PHASES = ("coordination", "broadcast", "local", "aggregate", "server_step", "evaluate",
          "checkpoint")
_METRICS = (("acc", "accuracy"), ("auc", "ROC AUC"), ("loss", "loss"))
_DPI = 100
_MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*")


def draw_plots(runs: Sequence[Run], out: Path) -> dict[str, Path]:
    """Write the PNGs into ``out``; returns them by name (test, gap, validation, epsilon,
    time), leaving out plots no run has data for (gap: a federated run and a centralized
    baseline)."""
    written: dict[str, Path] = {}
    for name, draw in (("test", _test), ("gap", _gap), ("validation", _validation),
                       ("epsilon", _epsilon), ("time", _time)):
        figure = draw(runs)
        if figure is not None:
            path = out / f"{name}.png"
            figure.savefig(path, dpi=_DPI)
            written[name] = path
    return written


def _figure(num_panels: int, *, width: float = 4.0, height: float = 3.2) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    columns = min(num_panels, 3)
    rows = -(-num_panels // columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for extra in axes[num_panels:]:
        extra.set_visible(False)
    return figure, axes[:num_panels]


def _colour(index: int) -> str:
    return f"C{index % 10}"


def _series(rows: Sequence[dict[str, Any]], get: Any) -> tuple[list[int], list[float]]:
    """(rounds, values) of the rows where ``get(row)`` is a number."""
    rounds, values = [], []
    for row in rows:
        value = get(row)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rounds.append(row["round"])
            values.append(float(value))
    return rounds, values


def _curves(runs: Sequence[Run], get_of: Any, title: str) -> Any:
    figure, axes = _figure(len(_METRICS))
    drawn = False
    for axis, (key, label) in zip(axes, _METRICS):
        for index, run in enumerate(runs):
            rounds, values = _series(run.rows, get_of(key))
            if rounds:
                # a centralized baseline is the reference line: dashed, and named so
                axis.plot(rounds, values, marker="o" if len(rounds) <= 30 else None,
                          markersize=3, color=_colour(index),
                          linestyle="--" if run.centralized else "-",
                          label=f"{run.name} (centralized)" if run.centralized else run.name)
                drawn = True
        axis.set_title(label)
        axis.set_xlabel("round")
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    if not drawn:
        return None
    axes[0].legend(fontsize="small")
    figure.suptitle(title)
    return figure


def _test(runs: Sequence[Run]) -> Any:
    return _curves(runs, lambda key: lambda row: row.get(key), "test set")


def _gap(runs: Sequence[Run]) -> Any:
    """Centralized − federated test accuracy and AUC per round, one line per federated
    run (``runrecords.baseline_gaps``), with zero marked: above it, federating costs."""
    from fedsilo.runrecords import baseline_gaps

    gaps = [gap for gap in baseline_gaps(runs) if gap.rounds]
    if not gaps:
        return None
    figure, axes = _figure(2)
    for axis, (key, label) in zip(axes, (("acc", "accuracy"), ("auc", "ROC AUC"))):
        for index, gap in enumerate(gaps):
            pairs = [(r, v) for r, v in zip(gap.rounds, getattr(gap, key)) if v is not None]
            if pairs:
                axis.plot([r for r, _ in pairs], [v for _, v in pairs],
                          marker="o" if len(pairs) <= 30 else None, markersize=3,
                          color=_colour(index), label=gap.run)
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_title(f"{label}: centralized − federated")
        axis.set_xlabel("round")
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize="small")
    figure.suptitle(f"gap to the centralized baseline {gaps[0].baseline}")
    return figure


def _validation(runs: Sequence[Run]) -> Any:
    return _curves(runs, lambda key: lambda row: (row.get("val") or {}).get(key),
                   "federated validation (the model each round started from)")


def _epsilon(runs: Sequence[Run]) -> Any:
    private = [run for run in runs
               if any(r.get("epsilon") or r.get("user_epsilon") is not None for r in run.rows)]
    if not private:
        return None
    figure, axes = _figure(len(private), width=5.0, height=3.6)
    for axis, run in zip(axes, private):
        sites = sorted({s for r in run.rows for s in r.get("epsilon") or {}}, key=int)
        for index, site in enumerate(sites):
            rounds, values = _series(run.rows, lambda r, s=site: (r.get("epsilon") or {}).get(s))
            # sites of the same size spend the same ε: a marker each keeps them apart
            axis.plot(rounds, values, color=_colour(index), label=f"site {site}",
                      marker=_MARKERS[index % len(_MARKERS)] if len(rounds) <= 30 else None,
                      markersize=7 - index % 4, fillstyle="none")
            budget = run.budget(site)
            if isinstance(budget, (int, float)):
                axis.axhline(budget, color=_colour(index), linestyle="--", linewidth=1)
        rounds, values = _series(run.rows, lambda r: r.get("user_epsilon"))
        if rounds:
            axis.plot(rounds, values, color="black", label="user level")
        axis.set_title(f"{run.name}: ε spent (dashed: budget)")
        axis.set_xlabel("round")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_ylabel("ε")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    return figure


def time_stacks(rows: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Seconds of each round by phase, as stacked in ``time.png``; they add up to
    ``seconds.round``.

    With ``runtime.overlap_eval`` a round's record (evaluation, checkpoint) runs while the
    participants train the next round, so it lies inside the next round's wall time: it is
    counted there, out of what would otherwise be "other".

    >>> rows = [{"seconds": {"local": 1.0, "evaluate": 0.2, "round": 1.0},
    ...          "overlapped": ["evaluate"]},
    ...         {"seconds": {"local": 0.7, "evaluate": 0.2, "round": 1.0},
    ...          "overlapped": ["evaluate"]}]
    >>> stacks = time_stacks(rows)
    >>> stacks["local"], stacks["previous round's record (overlapped)"]
    ([1.0, 0.7], [0.0, 0.2])
    >>> [round(v, 6) for v in stacks["other"]], stacks["evaluate"]
    ([0.0, 0.1], [0.0, 0.0])
    """
    stacks = {phase: [float(r["seconds"].get(phase) or 0.0) if phase not in
                      r.get("overlapped", ()) else 0.0 for r in rows] for phase in PHASES}
    other = [max(0.0, float(r["seconds"].get("round") or 0.0) - sum(
        stacks[p][i] for p in PHASES)) for i, r in enumerate(rows)]
    previous = [0.0] * len(rows)
    for i in range(1, len(rows)):
        record = sum(float(rows[i - 1]["seconds"].get(p) or 0.0)
                     for p in rows[i - 1].get("overlapped", ()))
        previous[i] = min(record, other[i])
        other[i] -= previous[i]
    stacks["other"] = other
    if any(r.get("overlapped") for r in rows):
        stacks["previous round's record (overlapped)"] = previous
    return stacks


def _time(runs: Sequence[Run]) -> Any:
    timed = [run for run in runs if any(r.get("seconds") for r in run.rows)]
    if not timed:
        return None
    figure, axes = _figure(len(timed), width=5.0, height=3.6)
    for axis, run in zip(axes, timed):
        rows = [r for r in run.rows if r.get("seconds")]
        rounds = [r["round"] for r in rows]
        bottom = [0.0] * len(rows)
        stacks = time_stacks(rows)
        for index, (phase, values) in enumerate(stacks.items()):
            if not any(values):
                continue
            hidden = phase.endswith("(overlapped)")
            axis.bar(rounds, values, bottom=bottom, color=_colour(index), label=phase,
                     width=0.8, hatch="//" if hidden else None, alpha=0.6 if hidden else 1.0)
            bottom = [b + v for b, v in zip(bottom, values)]
        axis.set_title(f"{run.name}: seconds per round")
        axis.set_xlabel("round")
        axis.set_ylabel("seconds")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure
