"""Summarize benchmarks/run_secure_checks.sh: per mode, the median round time and the
median coordination and aggregation phases over every round but the first, and each secure
mode's ratio to the plain runs of the same pairs (interleaved, so drift cancels)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

MODES = ("plain", "masks", "masks-old", "ckks", "ckks-old")


def later_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return [r for r in rows if r.get("round", 0) > 1 and "seconds" in r]


def main(out: str) -> dict:
    out_dir = Path(out)
    result: dict = {}
    for mode in MODES:
        runs = sorted(p for p in out_dir.glob(f"{mode}-[0-9]*") if (p / "metrics.jsonl").is_file())
        rows = [r for run in runs for r in later_rows(run)]
        if not rows:
            continue
        result[mode] = {
            "runs": len(runs), "rounds": len(rows),
            "round_s": statistics.median(r["seconds"]["round"] for r in rows),
            "coordination_s": statistics.median(r["seconds"].get("coordination", 0.0)
                                                for r in rows),
            "aggregate_s": statistics.median(r["seconds"].get("aggregate", 0.0) for r in rows),
            "per_run_round_s": [statistics.median(r["seconds"]["round"] for r in later_rows(p))
                                for p in runs]}
    plain = result.get("plain")
    for mode, figures in result.items():
        if plain and mode != "plain":
            figures["ratio_to_plain"] = figures["round_s"] / plain["round_s"]
            figures["pair_ratios"] = [m / p for m, p in zip(figures["per_run_round_s"],
                                                            plain["per_run_round_s"])]
    print(json.dumps(result, indent=2))
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1])
