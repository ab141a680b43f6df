"""Streaming a split from its shard against holding it in memory: peak memory and speed.

::

    python benchmarks/bench_streaming.py --source ../shared/data/pneumoniamnist.npz \\
        --work /tmp/bench-streaming --json benchmarks/results/streaming.json

Each measurement is one fresh child process that does what a participant does with its
train split: open it (``loading.load_splits``: held in memory, or streamed), build
``small_cnn`` and run ``training.train_local`` with batches of 64 (SGD), on the CPU with
``--threads`` torch threads.  It reports its own peak resident memory (``ru_maxrss``) and
the samples per second of training (loading excluded).

1. **Memory**: shards of PneumoniaMNIST's 4708 training images, upsampled to 56x56
   (nearest) and replicated 1x, 4x and 16x (14, 56 and 225 MiB of pixels), trained for
   ``--memory-steps`` steps in memory and streamed with ``data.memory_limit_mb =
   --limit-mb``.  Streamed, the peak must stay flat as the shard grows sixteenfold.
2. **Speed**: the 28x28 training images as they are (3.7 MiB, which the chunk cache
   holds), ``--epochs`` epochs in memory and streamed (``data.in_memory=false``), runs
   interleaved (memory, streamed, memory, ...), the median of ``--repeats`` each.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def make_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    from fedsilo.shards import ShardWriter

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with ShardWriter(path, kind="site", image_shape=images.shape[1:], num_classes=2,
                     threads=2) as writer:
        writer.append("train", images, labels)
        writer.append("val", images[:64], labels[:64])
    return path


def child(args: argparse.Namespace) -> None:
    import torch

    from fedsilo.config import DataConfig, TrainConfig
    from fedsilo.loading import StreamedSplit, load_splits
    from fedsilo.models import build_model
    from fedsilo.shards import SplitReader
    from fedsilo.training import make_optimizer, train_local

    torch.set_num_threads(args.threads)
    reader = SplitReader(args.shard, "train", cache_bytes=0)
    begin = time.perf_counter()
    [split] = load_splits([(reader, reader.mean, reader.std)],
                          data=DataConfig(in_memory=args.in_memory,
                                          memory_limit_mb=args.limit_mb),
                          device=torch.device("cpu"), who="bench")
    load_s = time.perf_counter() - begin
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, num_classes=2,
                        image_size=reader.image_shape[1:])
    config = TrainConfig(batch_size=64, epochs=args.epochs, max_steps=args.steps)
    cpu = time.process_time()
    stats = train_local(model, split, config=config, optimizer=make_optimizer(model, config),
                        generator=torch.Generator().manual_seed(0))
    print(json.dumps({
        "in_memory": args.in_memory, "peak_rss_mib":
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "samples_per_s": stats.samples / stats.seconds, "load_s": load_s,
        "samples_per_cpu_s": stats.samples / (time.process_time() - cpu),
        "steps": stats.steps, "chunks_read": split.reader.chunks_read
        if isinstance(split, StreamedSplit) else None}))


def run_child(shard: Path, *, in_memory: str, limit_mb: int, steps: int | None, epochs: int,
              threads: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", "--shard", str(shard), "--in-memory",
               in_memory, "--limit-mb", str(limit_mb), "--epochs", str(epochs),
               "--threads", str(threads)] + (["--steps", str(steps)] if steps else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=Path("../shared/data/pneumoniamnist.npz"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-streaming"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--limit-mb", type=int, default=32)
    parser.add_argument("--memory-steps", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--factors", type=int, nargs="*", default=[1, 4, 16],
                        help="shard sizes of the memory part (none: skip it)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    with np.load(args.source) as npz:
        images = npz["train_images"][:, None]  # N x 1 x 28 x 28
        labels = npz["train_labels"].reshape(-1).astype(np.int64)
    results: dict[str, Any] = {"memory": [], "speed": {}, "settings": vars(args) | {
        "source": str(args.source), "work": str(args.work), "json": str(args.json)}}

    big = images.repeat(2, axis=2).repeat(2, axis=3)  # 56 x 56
    for factor in args.factors:
        shard = make_shard(args.work / f"x{factor}.h5", np.concatenate([big] * factor),
                           np.concatenate([labels] * factor))
        row: dict[str, Any] = {"factor": factor, "images": len(labels) * factor,
                               "pixels_mib": big.nbytes * factor / 2**20}
        for mode in ("true", "false"):
            row[mode] = run_child(shard, in_memory=mode, limit_mb=args.limit_mb,
                                  steps=args.memory_steps, epochs=1, threads=args.threads)
        results["memory"].append(row)
        print(f"x{factor}: {row['pixels_mib']:.0f} MiB of pixels; peak RSS in memory "
              f"{row['true']['peak_rss_mib']:.0f} MiB, streamed "
              f"{row['false']['peak_rss_mib']:.0f} MiB", flush=True)

    shard = make_shard(args.work / "x1-28px.h5", images, labels)
    runs: dict[str, dict[str, list[float]]] = {
        mode: {"samples_per_s": [], "samples_per_cpu_s": []} for mode in ("true", "false")}
    for _ in range(args.repeats):
        for mode in ("true", "false"):
            result = run_child(shard, in_memory=mode, limit_mb=1024, steps=None,
                               epochs=args.epochs, threads=args.threads)
            for key, values in runs[mode].items():
                values.append(result[key])
    results["speed"] = {"in_memory": runs["true"], "streamed": runs["false"]}
    for key in ("samples_per_s", "samples_per_cpu_s"):
        memory = statistics.median(runs["true"][key])
        streamed = statistics.median(runs["false"][key])
        results["speed"][f"median_{key}"] = {"in_memory": memory, "streamed": streamed,
                                             "ratio": streamed / memory}
        print(f"28 px, {key}: {memory:.0f} in memory, {streamed:.0f} streamed (ratio "
              f"{streamed / memory:.3f}; medians of {args.repeats})", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
