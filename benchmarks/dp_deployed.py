"""The deployed model of DP runs (issue #26): test accuracy and AUC of ``best.pt`` at its
stored decision threshold (and of ``model.pt``), each run's largest site ε, as table rows.

    PYTHONPATH=src .venv/bin/python benchmarks/dp_deployed.py --test SHARDS/test.h5 RUN...

Reads the test shard with ``fedsilo predict``'s reader and evaluates exactly as ``fedsilo
predict`` decides (p(positive) > threshold).  It never touches the runs' files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fedsilo.metrics import auc as auc_of
from fedsilo.modelfile import load_model
from fedsilo.predict import decide, probabilities, read_batches


def evaluate(weights: Path, test: Path) -> dict[str, float | None]:
    model, card, _ = load_model(weights)
    batch = next(iter(read_batches([test], card)))
    probs = probabilities(model, batch.images, card)
    labels = np.asarray(batch.labels)
    return {"acc": float((decide(probs, card.threshold) == labels).mean()),
            "acc_05": float((decide(probs) == labels).mean()),
            "auc": float(auc_of(labels, probs)), "threshold": card.threshold,
            "round": card.round}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", required=True, type=Path, help="the shard set's test.h5")
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | max site ε | best.pt round | threshold | acc (threshold) | acc (0.5) | AUC "
          "| model.pt acc (threshold) | model.pt AUC |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        summary = json.loads((run / "summary.json").read_text())
        eps = max((p["epsilon"] for p in summary.get("privacy", {}).values()), default=None)
        final = evaluate(run / "model.pt", args.test)
        best = evaluate(run / "best.pt", args.test) if (run / "best.pt").exists() else None
        cells = ["-"] * 5 if best is None else [
            str(best["round"]), f"{best['threshold']}", f"{best['acc']:.4f}",
            f"{best['acc_05']:.4f}", f"{best['auc']:.4f}"]
        print(f"| {run.name} | {'-' if eps is None else f'{eps:.3f}'} | {' | '.join(cells)} "
              f"| {final['acc']:.4f} | {final['auc']:.4f} |")


if __name__ == "__main__":
    main()
