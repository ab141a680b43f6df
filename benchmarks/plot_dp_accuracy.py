"""Table (markdown) and plot (PNG, matplotlib, a dependency of fedsilo) of test
accuracy/AUC against the per-site ε of DP runs (see run_dp_accuracy.sh)."""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path


def summarize(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    privacy = summary.get("privacy")
    eps = max(p["epsilon"] for p in privacy.values()) if privacy else math.inf
    target = next(iter(privacy.values()))["target_epsilon"] if privacy else math.inf
    sigmas = " / ".join(f"{privacy[k]['noise_multiplier']:.2f}" for k in sorted(privacy, key=int)) \
        if privacy else "–"
    return {"run": str(run), "target": target, "epsilon": eps, "acc": summary["test"]["acc"],
            "auc": summary["test"]["auc"], "rounds": summary["rounds_completed"],
            "seed": _seed(run), "sigmas": sigmas}


def _seed(run: Path) -> int | None:
    """The job's seed, from the config.yaml the run wrote (None if it is not there)."""
    config = run / "config.yaml"
    found = re.search(r"^seed:\s*(\d+)", config.read_text(), re.M) if config.exists() else None
    return int(found.group(1)) if found else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--png", default=None, help="write the plot here")
    args = parser.parse_args(argv)
    rows = sorted((summarize(r) for r in args.runs),
                  key=lambda r: (r["target"], -1 if r["seed"] is None else r["seed"]))
    print("| target ε | seed | max site ε (δ=1e-5) | σ per site | rounds | test acc | test AUC |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']:g} | {r['seed']} | {r['epsilon']:.3f} | {r['sigmas']} | "
              f"{r['rounds']} | {r['acc']:.4f} | {r['auc']:.4f} |")
    for target in sorted({r["target"] for r in rows}):
        same = [r for r in rows if r["target"] == target]
        if len(same) > 1:
            print(f"| {target:g} | median of {len(same)} | | | | "
                  f"{statistics.median(r['acc'] for r in same):.4f} | "
                  f"{statistics.median(r['auc'] for r in same):.4f} |")
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        finite = [r for r in rows if math.isfinite(r["target"])]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["target"] for r in finite], [r["acc"] for r in finite], "o-", label="acc")
        ax.plot([r["target"] for r in finite], [r["auc"] for r in finite], "s-", label="AUC")
        for r in rows:
            if not math.isfinite(r["target"]):
                ax.axhline(r["acc"], ls="--", color="C0", lw=0.8, label="acc, no DP")
                ax.axhline(r["auc"], ls="--", color="C1", lw=0.8, label="AUC, no DP")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("per-site ε (δ = 1e-5)")
        ax.set_ylabel("test metric")
        ax.set_title("PneumoniaMNIST, dp_cnn, 3 sites dirichlet:0.5")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
