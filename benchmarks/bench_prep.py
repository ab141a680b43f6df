"""Throughput and peak memory of ``fedsilo prep folder`` on generated PNG folders.

::

    python benchmarks/bench_prep.py --work /tmp/bench-prep --json benchmarks/results/prep.json

1. **Throughput**: images per second of the whole command (process start to exit) on a
   folder of 28x28 grayscale PNGs and one of 224x224 RGB PNGs, with ``--workers 1``
   and ``--workers 2``, measured side by side; the median of ``--repeats`` runs.
2. **Memory**: peak resident memory of ``prep folder`` on 224x224 RGB folders of 1x, 2x,
   4x and 8x ``--memory-images`` images, run under an address-space limit
   (``RLIMIT_AS``, ``--limit-mib``) smaller than the largest decoded dataset: the run
   succeeds only if the pixels are never all in memory, and the peak must stay flat
   as the dataset grows eightfold.  Reported: the largest single process (the
   kernel's ``ru_maxrss`` from ``wait4``) and the sampled sum over the process tree
   (main process and decoding workers).

Each run also records CPU seconds: of the whole process tree (``wait4``) and of the main
process alone (sampled from ``/proc``).  The main process writes the shards while the
workers decode, so its CPU time is the serial floor of the wall time; on a shared,
loaded machine the CPU times are steadier than the wall times.

Images are smooth random gradients with Gaussian noise (sigma 8), written with PNG
compression level 1 to keep generation quick (decoding cost hardly depends on it).
The smaller memory folders are hard links into the largest, so they cost no disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

_PAGE = os.sysconf("SC_PAGE_SIZE")


def make_folder(root: Path, *, num_images: int, size: int, channels: int, classes: int,
                seed: int) -> Path:
    """``root/class-K/NNNNNN.png``; reused if already complete."""
    marker = root / ".complete"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(num_images):
        folder = root / f"class-{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(-120, 120, 3)
        base = 128 + a * yy + b * xx + c * (yy - 0.5) * (xx - 0.5)
        shape = (size, size, channels) if channels == 3 else (size, size)
        noise = rng.normal(0, 8, shape).astype(np.float32)
        pixels = (base[..., None] if channels == 3 else base) + noise
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(folder / f"{i:06d}.png", compress_level=1)
    marker.touch()
    return root


def linked_subset(full: Path, root: Path, num_images: int) -> Path:
    """The first ``num_images`` images of ``full`` (by index), as hard links."""
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for path in sorted(full.rglob("*.png")):
        if int(path.stem) < num_images:
            target = root / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    (root / ".complete").touch()
    return root


def run_prep(folder: Path, out: Path, *, workers: int,
             limit_mib: int | None = None) -> dict[str, Any]:
    """Run ``fedsilo prep folder`` once; wall seconds, peak RSS of the largest process and of the
    tree."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "fedsilo", "prep", "folder", "--source", str(folder),
               "--sites", "4", "--partition", "iid", "--out", str(out), "--workers", str(workers)]

    def limit() -> None:
        if limit_mib is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_mib << 20, limit_mib << 20))

    begin = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=limit)
    tree_peak, main_cpu = 0, 0.0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        tree_peak = max(tree_peak, _tree_rss(process.pid))
        main_cpu = max(main_cpu, _cpu_seconds(process.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - begin
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {stderr[-2000:]}")
    return {"seconds": wall, "max_rss_mib": usage.ru_maxrss / 1024,
            "tree_rss_mib": tree_peak / (1 << 20),
            "cpu_s": usage.ru_utime + usage.ru_stime, "main_cpu_s": main_cpu}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants, now."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def throughput(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    sets = [
        ("28x28 gray", make_folder(work / "small", num_images=args.small_images, size=28,
                                   channels=1, classes=10, seed=1), args.small_images, 28 * 28),
        ("224x224 RGB", linked_subset(work / "mem-8", work / "large", args.large_images),
         args.large_images, 224 * 224 * 3),
    ]
    rows = []
    for label, folder, count, image_bytes in sets:
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            for workers in (1, 2):
                runs[workers].append(run_prep(folder, work / "out", workers=workers))
        for workers, results in runs.items():
            seconds = [r["seconds"] for r in results]
            median = statistics.median(seconds)
            cpu = statistics.median(r["cpu_s"] for r in results)
            main_cpu = statistics.median(r["main_cpu_s"] for r in results)
            rows.append({"images": label, "count": count, "workers": workers, "median_s": median,
                         "runs_s": seconds, "images_per_s": count / median,
                         "decoded_mib_per_s": count * image_bytes / median / (1 << 20),
                         "cpu_s": cpu, "main_cpu_s": main_cpu})
            print(f"{label:12s} {count:6d} images  workers {workers}: {median:7.2f} s  "
                  f"{count / median:8.0f} images/s  CPU {cpu:6.2f} s (main {main_cpu:6.2f} s)  "
                  f"(runs {', '.join(f'{s:.2f}' for s in seconds)})")
    return rows


def memory(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    n = args.memory_images
    full = make_folder(work / "mem-8", num_images=8 * n, size=224, channels=3, classes=4, seed=2)
    rows = []
    for factor, workers in ((1, 1), (2, 1), (4, 1), (8, 1), (8, 2)):
        folder = full if factor == 8 else linked_subset(full, work / f"mem-{factor}", factor * n)
        decoded = factor * n * 224 * 224 * 3 / (1 << 20)
        result = run_prep(folder, work / "out", workers=workers, limit_mib=args.limit_mib)
        rows.append({"images": factor * n, "decoded_mib": decoded, "workers": workers,
                     "limit_mib": args.limit_mib, **result})
        print(f"224x224 RGB {factor * n:6d} images ({decoded:6.0f} MiB decoded), "
              f"workers {workers}, "
              f"RLIMIT_AS {args.limit_mib} MiB: peak RSS {result['max_rss_mib']:.0f} MiB (largest "
              f"process), {result['tree_rss_mib']:.0f} MiB (tree), {result['seconds']:.1f} s")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedsilo-bench-prep"),
                        help="where the generated folders and shard sets go (kept for reruns)")
    parser.add_argument("--small-images", type=int, default=20000, help="28x28 images")
    parser.add_argument("--large-images", type=int, default=1000,
                        help="224x224 images (throughput)")
    parser.add_argument("--memory-images", type=int, default=500,
                        help="224x224 images of the 1x memory set (then 2x, 4x and 8x)")
    parser.add_argument("--limit-mib", type=int, default=512, help="RLIMIT_AS of the memory runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    memory_rows = memory(args, args.work)  # first: it generates the 224x224 images
    results = {"throughput": throughput(args, args.work), "memory": memory_rows,
               "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
               "total_s": time.perf_counter() - begin}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
