"""Rank 0's view of a run: a tqdm bar on a TTY (round n/N, ETA, the last metrics), one log
line per round otherwise (SLURM logs, pipes).

While the bar is up, fedsilo's log records go through ``tqdm.write``, so a warning prints
above the bar instead of through it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any

log = logging.getLogger("fedsilo")


class RoundProgress:
    """``mode``: ``auto`` (a bar on a TTY, else log lines), ``on`` (a bar), ``off`` (log
    lines)."""

    def __init__(self, *, total: int, done: int = 0, mode: str = "auto") -> None:
        self.total = total
        self.bar: Any = None
        self._timed = False
        self._redirect = contextlib.ExitStack()
        if mode == "on" or (mode == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # initial=done: a resumed run's ETA counts only the rounds run in this process
            self.bar = tqdm(total=total, initial=done, desc="round", unit="round",
                            file=sys.stderr, dynamic_ncols=True, leave=True,
                            bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| "
                                       "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")
            self._redirect.enter_context(logging_redirect_tqdm(loggers=[log]))

    def update(self, round_index: int, row: dict[str, Any]) -> None:
        seconds = row["seconds"]["round"]
        if self.bar is not None:
            if not self._timed:  # the clock starts with the first round, not at start-up
                self.bar.start_t = self.bar.last_print_t = time.time() - seconds
                self._timed = True
            self.bar.set_postfix_str(_postfix(row), refresh=False)
            self.bar.update(round_index - self.bar.n)
            return
        parts = [f"round {round_index}/{self.total}"]
        if "acc" in row:
            parts.append(f"test acc {row['acc']:.4f} auc {_fmt(row.get('auc'))} "
                         f"loss {row['loss']:.4f}"
                         + (f" dice {_fmt(row.get('dice'))}" if "dice" in row else ""))
        if row.get("val"):
            parts.append(f"val acc {row['val']['acc']:.4f}")
        parts.append(f"{seconds:.1f}s")
        log.info("%s", " | ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._redirect.close()


def _postfix(row: dict[str, Any]) -> str:
    """The bar's tail: the round's test metrics, federated validation and the largest ε."""
    parts = []
    if "acc" in row:
        parts.append(f"acc {row['acc']:.4f} auc {_fmt(row.get('auc'))} loss {row['loss']:.4f}")
    if row.get("val"):
        parts.append(f"val acc {row['val']['acc']:.4f}")
    if row.get("epsilon"):
        parts.append(f"ε {max(row['epsilon'].values()):.2f}")
    parts.append(f"{row['seconds']['round']:.1f} s")
    return " | ".join(parts)


def _fmt(value: Any) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"
