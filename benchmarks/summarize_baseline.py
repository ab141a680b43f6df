"""The tables of benchmarks/RESULTS.md, "Federated against the centralized baseline (issue
#26)", from what ``benchmarks/run_baseline.sh`` left in RUNS: the federated run and its
baseline (final, best, mean of the last 5 rounds' test metrics), and each site's global and
personal validation metrics (from the personal models' cards).

    .venv/bin/python benchmarks/summarize_baseline.py RUNS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def runs_table(root: Path) -> str:
    lines = ["| run | rounds | final acc | final AUC | best acc (round) | mean acc, last 5 | "
             "mean AUC, last 5 |", "|---|---|---|---|---|---|---|"]
    finals = {}
    for name in ("fed", "base"):
        rows = [r for r in _rows(root / name) if "acc" in r]
        test = json.loads((root / name / "summary.json").read_text())["test"]
        best = max(rows, key=lambda r: r["acc"])
        last = rows[-5:]
        finals[name] = (test["acc"], test["auc"], mean(r["acc"] for r in last),
                        mean(r["auc"] for r in last))
        lines.append(f"| {'federated' if name == 'fed' else 'centralized baseline'} | "
                     f"{rows[-1]['round']} | {test['acc']:.4f} | {test['auc']:.4f} | "
                     f"{best['acc']:.4f} ({best['round']}) | {finals[name][2]:.4f} | "
                     f"{finals[name][3]:.4f} |")
    f, b = finals["fed"], finals["base"]
    lines.append(f"| **gap** (centralized − federated) | | {b[0] - f[0]:+.4f} | "
                 f"{b[1] - f[1]:+.4f} | | {b[2] - f[2]:+.4f} | {b[3] - f[3]:+.4f} |")
    return "\n".join(lines)


def personal_table(root: Path) -> str:
    def card(name: str) -> dict:
        data = json.loads((root / "personal" / name).with_suffix(".json").read_text())
        return data["personalized"]

    lines = ["| site | train / val images | global (federated) acc / AUC | personal head, 1 ep "
             "| personal all, 1 ep | personal head, 5 ep | centralized model |",
             "|---|---|---|---|---|---|---|"]
    for site in range(3):
        head = card(f"fed-site{site}-head-e1.pt")
        val = head["validation"]

        def pair(metrics: dict) -> str:
            return f"{metrics['acc']:.4f} / {metrics['auc']:.4f}"

        cells = [pair(val["global"]), pair(val["personal"]),
                 pair(card(f"fed-site{site}-all-e1.pt")["validation"]["personal"]),
                 pair(card(f"fed-site{site}-head-e5.pt")["validation"]["personal"]),
                 pair(card(f"base-site{site}-head-e1.pt")["validation"]["global"])]
        counts = json.loads((root / "shards" / "manifest.json").read_text())["sites"][site]
        lines.append(f"| {site} | {counts['num_samples']['train']} / "
                     f"{counts['num_samples']['val']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "runs/baseline")
    print(runs_table(root))
    print()
    print(personal_table(root))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
