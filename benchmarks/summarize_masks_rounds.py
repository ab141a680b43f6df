"""Summarize interleaved plain/masks runs (benchmarks/run_masks_rounds.sh): medians of the
per-round phase times (round 1 skipped), per-pair ratios, and bytes per parameter."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


def main(out: str) -> dict:
    out_dir = Path(out)
    runs = {mode: sorted(out_dir.glob(f"{mode}-*/metrics.jsonl")) for mode in ("plain", "masks")}
    result: dict = {"runs": {m: [str(p.parent) for p in r] for m, r in runs.items()}}
    per_mode: dict = {}
    pair_ratios = []
    for mode, files in runs.items():
        rounds, aggs, run_medians = [], [], []
        numel = None
        reduce_bytes = []
        for f in files:
            rs = [r for r in rows(f.parent) if "seconds" in r]
            later = [r for r in rs if r["round"] > 1]
            rounds += [r["seconds"]["round"] for r in later]
            aggs += [r["seconds"]["aggregate"] for r in later]
            run_medians.append(statistics.median(r["seconds"]["round"] for r in later))
            reduce_bytes += [r["bytes"]["reduce"] for r in rs]
            # the broadcast counts the float32 global model once per participant (3 here)
            numel = rs[0]["bytes"]["broadcast"] / 4 / 3
        per_mode[mode] = {"round_s_median": statistics.median(rounds),
                          "aggregate_s_median": statistics.median(aggs),
                          "round_s_per_run": run_medians, "rounds_counted": len(rounds),
                          "reduce_bytes": statistics.median(reduce_bytes), "numel": numel,
                          "reduce_bytes_per_param_per_participant":
                              statistics.median(reduce_bytes) / numel / 3}
    for p, m in zip(per_mode["plain"]["round_s_per_run"], per_mode["masks"]["round_s_per_run"]):
        pair_ratios.append(m / p)
    result.update(per_mode)
    result["ratio_round_median"] = (per_mode["masks"]["round_s_median"]
                                    / per_mode["plain"]["round_s_median"])
    result["ratio_round_per_pair"] = pair_ratios
    result["ratio_round_median_of_pairs"] = statistics.median(pair_ratios)
    result["aggregate_s_increase"] = (per_mode["masks"]["aggregate_s_median"]
                                      - per_mode["plain"]["aggregate_s_median"])
    masks_rows = [r for f in runs["masks"] for r in rows(f.parent) if r.get("masks")]
    result["masks_subobject_example"] = masks_rows[-1]["masks"] if masks_rows else None
    text = json.dumps(result, indent=2)
    print(text)
    (out_dir / "summary.json").write_text(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1])
