"""Command-line pieces shared by the ``fedsilo prep`` sources: common options, value types."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fedsilo.errors import ConfigError

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def add_common(parser: argparse.ArgumentParser, *, natural: bool = False) -> None:
    """Options every source takes: sites, partition, seed, output, hold-outs, array task.

    ``natural``: the source has labels-file columns, so ``natural:COLUMN`` is offered and
    ``--sites`` may be left out for it.  ``--participants`` is the old spelling of
    ``--sites``, kept as an alias.
    """
    if natural:
        parser.add_argument("--sites", "--participants", dest="sites", type=positive_int,
                            default=None, metavar="P",
                            help="number of sites to split the samples over, one shard each; "
                            "required unless the partition is natural:COLUMN (one site per "
                            "value of the column)")
    else:
        parser.add_argument("--sites", "--participants", dest="sites", type=positive_int,
                            required=True, default=argparse.SUPPRESS, metavar="P",
                            help="number of sites to split the samples over, one shard each "
                            "(required)")
    parser.add_argument("--partition", default="iid",
                        help="how samples are split over sites: iid, dirichlet:ALPHA "
                        "(label skew), quantity:ALPHA (size skew) or classes:K"
                        + (", or natural:COLUMN (one site per value of a labels-file column)"
                           if natural else ""))
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the partition and the hold-outs")
    parser.add_argument("--out", type=Path, required=True, default=argparse.SUPPRESS,
                        help="output directory for the shard set, created if missing (required)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of each site's samples held out for validation, "
                        "used only when the source has no validation split")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="fraction of the samples held out as test.h5, used only "
                        "when the source has no test split")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a shard set already in --out")
    parser.add_argument("--only", metavar="site:K|test|array", default=None,
                        help="write one file of the set, for parallel preparation (e.g. a "
                        "SLURM array): site:K, test, or 'array' to take it from "
                        "SLURM_ARRAY_TASK_ID (0..P-1 = sites, P = test). The task that "
                        "completes the set writes manifest.json")


def add_source(parser: argparse.ArgumentParser, old: str, *, what: str) -> None:
    """``--source PATH``, the one spelling of every source's input; ``old`` (``--npz``,
    ``--root``, ``--images``) is kept as an alias."""
    parser.add_argument("--source", old, dest="source", type=Path, required=True,
                        default=argparse.SUPPRESS, metavar="PATH", help=f"{what} (required)")


def resolve_only(only: str | None) -> str | None:
    """``--only`` as the pipeline takes it: ``array`` becomes ``task:$SLURM_ARRAY_TASK_ID``."""
    if only != "array":
        return only
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None or not task.isdigit():
        raise ConfigError("--only array needs SLURM_ARRAY_TASK_ID (run it as a SLURM array task)")
    return f"task:{int(task)}"


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def name_list(text: str) -> list[str]:
    """``a,b,c`` -> ``["a", "b", "c"]``."""
    return [part.strip() for part in text.split(",")]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
