"""Summarize heterogeneity-study runs: final test accuracy/AUC, best accuracy, and the first
round whose test accuracy reached a threshold (default 0.85).

    python benchmarks/summarize_heterogeneity.py RUN_DIR [RUN_DIR ...] [--threshold 0.85]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summarize(run: Path, threshold: float) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    reached = next((r["round"] for r in rows if r.get("acc", 0) >= threshold), None)
    summary = json.loads((run / "summary.json").read_text())
    return {"run": run.name, "final_acc": summary["test"]["acc"],
            "final_auc": summary["test"]["auc"],
            "best_acc": max(r["acc"] for r in rows if "acc" in r), "rounds_to": reached,
            "rounds": rows[-1]["round"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--threshold", type=float, default=0.85)
    args = parser.parse_args()
    print(f"| run | final acc | final AUC | best acc | rounds to {args.threshold} acc |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        s = summarize(run, args.threshold)
        reached = s["rounds_to"] if s["rounds_to"] else f"not in {s['rounds']}"
        print(f"| {s['run']} | {s['final_acc']:.4f} | {s['final_auc']:.4f} | "
              f"{s['best_acc']:.4f} | {reached} |")


if __name__ == "__main__":
    main()
