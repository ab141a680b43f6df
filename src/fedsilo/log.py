"""Logging with a ``[rank r/N]`` prefix; rank 0 logs at INFO, the others at WARNING."""

from __future__ import annotations

import logging
import sys


def setup_logging(rank: int, size: int, *, verbose: bool = False) -> logging.Logger:
    logger = logging.getLogger("fedsilo")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}/{size}] %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger
