"""A smaller MedMNIST .npz: a random fraction of its train and val splits, the whole test
split (issue #26: sites of a few hundred images, as a consortium of small hospitals has).

    python benchmarks/medmnist_subset.py --source ../shared/data/pneumoniamnist.npz \
        --fraction 0.128 --seed 0 --out /tmp/pneu-small.npz

It writes only OUT (refusing to replace an existing file).  Shard the result with
``fedsilo prep medmnist --source OUT ...``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, type=Path)
    parser.add_argument("--fraction", required=True, type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    if not 0 < args.fraction <= 1:
        parser.error("--fraction must be in (0, 1]")
    if args.out.exists():
        parser.error(f"{args.out} exists; choose another --out")
    rng = np.random.default_rng(args.seed)
    with np.load(args.source, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    for split in ("train", "val"):
        count = len(arrays[f"{split}_labels"])
        keep = np.sort(rng.choice(count, size=max(1, round(count * args.fraction)),
                                  replace=False))
        for kind in ("images", "labels"):
            arrays[f"{split}_{kind}"] = arrays[f"{split}_{kind}"][keep]
    np.savez_compressed(args.out, **arrays)
    print(", ".join(f"{k}: {len(v)}" for k, v in arrays.items() if k.endswith("_labels")))


if __name__ == "__main__":
    main()
