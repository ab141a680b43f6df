"""Rank 0's view of a run: a progress bar on a TTY, one log line per round otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("fedsilo")


class RoundProgress:
    def __init__(self, *, total: int, done: int = 0, mode: str = "auto") -> None:
        self.total = total
        self.bar = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        self._drawn = False
        if self.bar and done:
            self._draw(done, "")

    def update(self, round_index: int, row: dict[str, Any]) -> None:
        seconds = row["seconds"]["round"]
        parts = [f"round {round_index}/{self.total}"]
        if "acc" in row:
            parts.append(f"test acc {row['acc']:.4f} auc {_fmt(row.get('auc'))} "
                         f"loss {row['loss']:.4f}")
        if row.get("val"):
            parts.append(f"val acc {row['val']['acc']:.4f}")
        parts.append(f"{seconds:.1f}s")
        if self.bar:
            self._draw(round_index, " | ".join(parts[1:]))
        else:
            log.info("%s", " | ".join(parts))

    def _draw(self, done: int, text: str) -> None:
        width = 24
        filled = int(width * done / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                         f"{text}\033[K")
        sys.stderr.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _fmt(value: Any) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"
