"""The figures of a federated segmentation run (issue 28), from its run directory and the
log of ``benchmarks/run_segmentation.sh``: test Dice, IoU, pixel AUC and HD95 at every
evaluation, the median and total seconds per round, and each rank's peak RSS (the
``peak_rss_kib`` lines ``/usr/bin/time`` writes, ``rank R`` where the script names it).

    python benchmarks/summarize_segmentation.py runs/chase-fed runs/chase-fed.log
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def summarize(run: Path, log: Path | None) -> dict[str, object]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    seconds = [row["seconds"]["round"] for row in rows if "round" in row.get("seconds", {})]
    tests = [{"round": row["round"], **{k: round(float(row[k]), 4)
                                         for k in ("dice", "iou", "auc", "hd95", "acc")}}
             for row in rows if "dice" in row]
    result: dict[str, object] = {
        "run": str(run), "rounds": len(rows), "tests": tests,
        "final": tests[-1] if tests else None,
        "round_s_median": round(statistics.median(seconds), 2) if seconds else None,
        "round_s_total": round(sum(seconds), 1),
    }
    if log is not None and log.is_file():
        peaks = {}
        for number, line in enumerate(log.read_text(errors="replace").splitlines()):
            found = re.search(r"(?:rank (\d+) )?peak_rss_kib (\d+)", line)
            if found:
                key = f"rank {found.group(1)}" if found.group(1) else f"process {number}"
                peaks[key] = round(int(found.group(2)) / 1024)
        result["peak_rss_mib"] = dict(sorted(peaks.items()))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("log", type=Path, nargs="?")
    args = parser.parse_args(argv)
    print(json.dumps(summarize(args.run, args.log), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
