"""What TensorBoard logging costs the coordinator per round, against the round itself.

    python benchmarks/bench_tensorboard.py benchmarks/results/pneu-small_cnn [RUN_DIR ...]

For each run directory, every ``metrics.jsonl`` row is written to a fresh event file the
way the coordinator writes it (``fedsilo.boardlog.BoardLog.write``: one ``add_scalar`` per
figure of the row, then a flush to disk), ``--repeats`` times.  The cost of a round is the
median over rows and repeats; it is set against the median of the rows' recorded
``seconds.round``.  The one-off cost (importing ``torch.utils.tensorboard`` and opening the
writer, once per process) is measured in a fresh interpreter and reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ONE_OFF = """
import tempfile, time
begin = time.perf_counter()
from fedsilo.boardlog import BoardLog
board = BoardLog(tempfile.mkdtemp())
print(time.perf_counter() - begin)
board.close()
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--repeats", type=int, default=7, help="passes over the rows")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the figures here")
    return parser


def measure(run: Path, *, repeats: int) -> dict:
    from fedsilo.boardlog import BoardLog, scalars

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    per_row: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(repeats):
            board = BoardLog(Path(scratch) / str(repeat))
            for row in rows:
                begin = time.perf_counter()
                board.write(row)
                per_row.append(time.perf_counter() - begin)
            board.close()
    round_s = statistics.median(r["seconds"]["round"] for r in rows)
    cost = statistics.median(per_row)
    return {"run": str(run), "rounds": len(rows), "repeats": repeats,
            "scalars_per_round": statistics.median(len(scalars(r)) for r in rows),
            "write_s_median": cost, "write_s_max": max(per_row),
            "round_s_median": round_s, "share_of_round": cost / round_s}


def one_off() -> float:
    """Seconds to import torch.utils.tensorboard and open a writer, in a fresh process
    (torch itself is imported by the coordinator anyway: it is imported first)."""
    code = "import torch\n" + _ONE_OFF
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=300)
    return float(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    figures = {"runs": [measure(run, repeats=args.repeats) for run in args.runs],
               "one_off_s": statistics.median(one_off() for _ in range(3))}
    for run in figures["runs"]:
        print(f"{run['run']}: {run['scalars_per_round']:.0f} scalars per round, write + flush "
              f"{run['write_s_median'] * 1e3:.3f} ms (max {run['write_s_max'] * 1e3:.3f} ms) "
              f"against a {run['round_s_median']:.3f} s round: "
              f"{run['share_of_round'] * 100:.4f} % of the round")
    print(f"once per process: import torch.utils.tensorboard + open the writer "
          f"{figures['one_off_s']:.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
