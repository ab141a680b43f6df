"""Where a fedsilo round's time goes, from the ``metrics.jsonl`` of finished runs.

    python benchmarks/overhead.py runs/pneu-resnet18 runs/pneu-small_cnn

For every run it prints the median over rounds of each phase the coordinator records in
``seconds`` (a phase missing from a round counts as 0 s there, e.g. ``evaluate`` when
``eval.every > 1``, or when the row says it was ``overlapped`` with the next round), then
two shares of the round:

- *not training or evaluating*: ``(round - local_compute_max - evaluate) / round``, where
  ``local_compute_max`` is the slowest participant's training + validation (runs recorded
  before that key existed use ``local_train_max + local_val_max``, the two maxima taken
  separately, which can overstate the work)
  (what federating costs on top of the work itself: transport, waiting for the slowest
  participant beyond its own training, weighting and checking updates, the server step);
- *pure communication*: ``(broadcast + aggregate + coordination) / round``.

Each share is given as the median of the per-round shares and as the share of the summed
times over all rounds.  ``round`` is taken as recorded.  It includes the coordinator's
checkpoint; in runs recorded before that was so (no ``local_compute_max``), the shares are
repeated with ``round + checkpoint`` as the denominator.

Plain standard library: no MPI, no numpy, no torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Sequence

PHASES = ("broadcast", "local", "local_train_max", "local_val_max", "local_compute_max",
          "aggregate", "server_step", "evaluate", "checkpoint", "coordination", "round")
LABELS = {"local": "local (wait)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories holding metrics.jsonl")
    parser.add_argument("--skip-rounds", type=int, default=0, metavar="K",
                        help="leave out the first K rounds (warm-up)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the numbers here")
    return parser


def read_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"overhead.py: {path} not found (is {run} a fedsilo run directory?)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    if not rows:
        raise SystemExit(f"overhead.py: {path} holds no rounds")
    return rows


def analyse(rows: Sequence[dict]) -> dict:
    """Phase medians and overhead shares of a run's rounds."""
    seconds = [{name: float(row["seconds"].get(name, 0.0)) for name in PHASES} for row in rows]
    for s, row in zip(seconds, rows):
        s["new_format"] = "local_compute_max" in row["seconds"]
        if "evaluate" in row.get("overlapped", ()):  # ran during the next round's training
            s["evaluate"] = 0.0
    medians = {name: statistics.median(s[name] for s in seconds) for name in PHASES}
    totals = {name: sum(s[name] for s in seconds) for name in PHASES}

    def work(s: dict) -> float:
        if s["new_format"]:
            return s["local_compute_max"] + s["evaluate"]
        return s["local_train_max"] + s["local_val_max"] + s["evaluate"]

    def comm(s: dict) -> float:
        return s["broadcast"] + s["aggregate"] + s["coordination"]

    shares = {}
    for label, denominator in (("round", lambda s: s["round"]),
                               ("round+checkpoint",
                                lambda s: s["round"] + (0.0 if s["new_format"]
                                                        else s["checkpoint"]))):
        shares[label] = {
            "not_training_median": statistics.median(
                (denominator(s) - work(s)) / denominator(s) for s in seconds),
            "not_training_total": (sum(denominator(s) for s in seconds)
                                   - sum(work(s) for s in seconds))
                                  / sum(denominator(s) for s in seconds),
            "communication_median": statistics.median(comm(s) / denominator(s) for s in seconds),
            "communication_total": sum(comm(s) for s in seconds)
                                   / sum(denominator(s) for s in seconds),
        }
    last = rows[-1]
    return {
        "rounds": [rows[0]["round"], last["round"]],
        "num_rounds": len(rows),
        "median_s": medians,
        "total_s": totals,
        "shares": shares,
        "final": {k: last[k] for k in ("acc", "auc", "loss") if k in last},
        "best_acc": max((row["acc"] for row in rows if "acc" in row), default=None),
    }


def _model(run: Path) -> str:
    try:
        return json.loads((run / "summary.json").read_text(encoding="utf-8"))["model"]
    except (OSError, KeyError, ValueError):
        return "?"


def print_report(runs: Sequence[Path], results: Sequence[dict]) -> None:
    width = max(14, *(len(r.name) + 2 for r in runs))
    print(f"{'median seconds':<20}" + "".join(f"{r.name:>{width}}" for r in runs))
    print(f"{'model':<20}" + "".join(f"{_model(r):>{width}}" for r in runs))
    print(f"{'rounds':<20}" + "".join(
        f"{'%d-%d (%d)' % (*res['rounds'], res['num_rounds']):>{width}}" for res in results))
    print("-" * (20 + width * len(runs)))
    for name in PHASES:
        print(f"{LABELS.get(name, name):<20}"
              + "".join(f"{res['median_s'][name]:>{width}.4f}" for res in results))
    print("-" * (20 + width * len(runs)))
    rows = [("not train/eval, median", "round", "not_training_median"),
            ("not train/eval, total", "round", "not_training_total"),
            ("communication, median", "round", "communication_median"),
            ("communication, total", "round", "communication_total"),
            ("not train/eval +ckpt", "round+checkpoint", "not_training_total"),
            ("communication +ckpt", "round+checkpoint", "communication_total")]
    for label, base, key in rows:
        print(f"{label:<20}" + "".join(f"{100 * res['shares'][base][key]:>{width - 1}.2f}%"
                                       for res in results))
    print("-" * (20 + width * len(runs)))
    for key in ("acc", "auc"):
        print(f"{'final test ' + key:<20}" + "".join(
            f"{res['final'].get(key, float('nan')):>{width}.4f}" for res in results))
    print(f"{'best test acc':<20}" + "".join(
        f"{res['best_acc'] if res['best_acc'] is not None else float('nan'):>{width}.4f}"
        for res in results))
    print("shares: 'median' = median of per-round shares, 'total' = over the summed times; "
          "'+ckpt' divides by round + checkpoint (round excludes the checkpoint write)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = []
    for run in args.runs:
        rows = read_rows(run)[args.skip_rounds:]
        if not rows:
            raise SystemExit(f"overhead.py: {run} has no rounds after --skip-rounds "
                             f"{args.skip_rounds}")
        results.append(analyse(rows))
    print_report(args.runs, results)
    if args.json:
        Path(args.json).write_text(json.dumps({str(r): res for r, res in zip(args.runs, results)},
                                              indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
