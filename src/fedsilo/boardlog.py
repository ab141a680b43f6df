"""TensorBoard event files of a run, written by the coordinator as the run goes
(``runtime.tensorboard: true`` or ``fedsilo train --tensorboard``).

Each round's scalars are taken from its ``metrics.jsonl`` row and from nothing else, so the
event files release nothing the metrics file does not already hold (docs/privacy.md: under
DP, no per-site loss, validation or timing is in the row, so none is in the events either).
The step is the round.  This module imports no torch; :class:`BoardLog` imports
``torch.utils.tensorboard`` when it is created, so a run without TensorBoard never loads it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

#: where the event files go, inside the run directory
BOARD_DIR = "tensorboard"


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one metrics row, by tag; values that are missing or not
    finite (``null`` in metrics.jsonl, e.g. the AUC of a one-class test set) are left out.

    >>> scalars({"round": 3, "acc": 0.75, "auc": None, "epsilon": {"0": 1.2},
    ...          "seconds": {"round": 1.5}, "bytes": {"broadcast": 8, "reduce": 8}})
    ... # doctest: +NORMALIZE_WHITESPACE
    {'test/acc': 0.75, 'epsilon/site_0': 1.2, 'seconds/round': 1.5,
     'bytes/broadcast': 8.0, 'bytes/reduce': 8.0, 'bytes/total': 16.0}
    """
    out: dict[str, float] = {}

    def put(tag: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            out[tag] = float(value)

    for key in ("acc", "auc", "loss", "dice", "iou", "hd95"):  # the last three: segmentation
        put(f"test/{key}", row.get(key))
    for key, value in (row.get("val") or {}).items():
        if key != "num_samples":  # a count, not a metric
            put(f"val/{key}", value)
    for site, value in (row.get("epsilon") or {}).items():
        put(f"epsilon/site_{site}", value)
    put("user_epsilon/released", row.get("user_epsilon"))
    put("user_epsilon/coordinator", row.get("user_epsilon_coordinator"))
    for site, value in (row.get("user_epsilon_per_site") or {}).items():
        put(f"user_epsilon/site_{site}", value)
    for phase, value in (row.get("seconds") or {}).items():
        put(f"seconds/{phase}", value)
    moved = row.get("bytes") or {}
    for kind, value in moved.items():
        put(f"bytes/{kind}", value)
    if moved:
        put("bytes/total", sum(v for v in moved.values() if isinstance(v, (int, float))))
    return out


class BoardLog:
    """A ``SummaryWriter`` on ``RUN_DIR/tensorboard``, one point per tag and round.

    ``rows`` are the rows ``metrics.jsonl`` already holds when the run (re)starts, those of
    rounds up to the checkpoint it resumes from.  If event files are there already, the
    writer starts with ``purge_step`` at the resumed round R: TensorBoard hides every point
    of round R and later written before (rounds a crash left without a checkpoint, and round
    R, whose row a resume may have restored from the checkpoint), and round R is written
    again.  If there are none (TensorBoard switched on at a resume), every row is written.
    Each round is flushed at once, so a crash loses no round and a running run is visible.
    """

    def __init__(self, run_root: Path, *, rows: Sequence[dict[str, Any]] = ()) -> None:
        from torch.utils.tensorboard import SummaryWriter

        directory = Path(run_root) / BOARD_DIR
        resumed = max((int(r["round"]) for r in rows), default=0)
        earlier = directory.is_dir() and any(directory.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(directory),
                                    purge_step=max(resumed, 1) if earlier else None)
        for row in rows:
            if not earlier or int(row["round"]) == resumed:
                self.write(row)

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
