"""CHASE_DB1 vessel segmentation, centralized, with fedsilo's segmentation pieces (issue 28).

Trains ``basic_unet`` on the 20 training images (children 01-10) of a shard set made by
``fedsilo prep segmentation`` (any number of sites: their train splits are pooled), for a
wall-clock budget or a number of steps, and evaluates on test.h5 (children 11-14) with
sliding windows: Dice, IoU, pixel AUC, HD95.  Prints one JSON object; the command and result
go in benchmarks/RESULTS.md.  The federated counterpart is ``fedsilo train`` on the same
shard set (the command is in RESULTS.md).

    python benchmarks/bench_segmentation.py --shards shards/chase --minutes 10
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from fedsilo.config import SegmentationConfig
    from fedsilo.models import build_model
    from fedsilo.segmentation.task import SegmentationTask, SegSplit, evaluate_segmentation
    from fedsilo.shards import SplitReader, load_manifest

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    manifest = load_manifest(args.shards)
    mean, std = manifest.normalization_mean, manifest.normalization_std
    config = SegmentationConfig(patch_size=args.patch)
    task = SegmentationTask(config)
    device = torch.device("cpu")
    sources = [(SplitReader(manifest.path_of(e, args.shards), "train", cache_bytes=0), mean, std)
               for e in manifest.sites]
    parts = task.load(sources, data=None, device=device, who="benchmark")  # type: ignore[arg-type]
    train = SegSplit(torch.cat([p.images for p in parts]), torch.cat([p.masks for p in parts]),
                     torch.cat([p.labels for p in parts]), parts[0].mean, parts[0].std,
                     args.patch)
    test = task.load([(SplitReader(manifest.path_of(manifest.test, args.shards), "test",
                                   cache_bytes=0), mean, std)], data=None, device=device,
                     who="benchmark")[0]  # type: ignore[arg-type]
    channels = manifest.image_shape[0]
    model = build_model("basic_unet", in_channels=channels, num_classes=manifest.num_classes,
                        image_size=(args.patch, args.patch))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    transform = task.train_transform(None, torch.Generator().manual_seed(args.seed + 1))
    start, steps, losses = time.perf_counter(), 0, []
    model.train()
    while steps < args.steps and time.perf_counter() - start < args.minutes * 60:
        index = torch.randint(0, len(train), (args.batch,), generator=generator)
        for images, masks in train.batches([index], transform=transform):
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model(images), masks)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        steps += 1
    train_s = time.perf_counter() - start
    begin = time.perf_counter()
    result = evaluate_segmentation(model, test, config=config, batch_size=16)
    print(json.dumps({
        "steps": steps, "train_s": round(train_s, 1), "s_per_step": round(train_s / steps, 3),
        "eval_s": round(time.perf_counter() - begin, 1),
        "final_train_loss": round(float(np.mean(losses[-20:])), 4),
        "test_dice": result["dice"], "test_iou": result["iou"], "test_auc": result["auc"],
        "test_hd95": result["hd95"], "test_acc": result["acc"],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
