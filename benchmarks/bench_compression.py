"""Would compressing what travels pay on a slow link?  (issue #29, point 4)

    .venv/bin/python benchmarks/bench_compression.py RUN_DIR [RUN_DIR ...] [--repeats 5]

Reads the last two checkpoints of each run directory (``checkpoints/round-NNNN/coordinator.pt``,
through fedsilo's validating reader) and measures, for the global weights (what the
coordinator broadcasts) and for one round's delta (the shape of a plain update):

- the compressed size as a fraction of the float32 bytes, lossless: zlib and, where the
  ``zstandard`` package is importable, zstd; each on the raw bytes and after a byte
  shuffle (the 4 bytes of every float32 grouped, as Blosc does);
- the seconds to compress and decompress (median of ``--repeats``, one thread);
- the link rate below which it pays, for a point-to-point transfer: compression saves
  ``bytes * (1 - ratio) / rate`` of wire time and costs ``compress + decompress`` seconds,
  so it pays below ``rate* = bytes * (1 - ratio) / (compress + decompress)``;
- the bitwise difference (XOR of the float32 words of two rounds' weights): unlike the
  arithmetic delta, it restores the new weights bit for bit;
- the lossy half-precision alternatives for comparison: bf16 and fp16 (exactly 0.5), with
  the largest relative error they make on the delta.

It also prints the size ratio of a masked update (uniform 64-bit words, what a masked
participant sends) to show that secure transfers do not compress.  One JSON line per
measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

try:
    import zstandard
except ImportError:  # optional: the benchmark says so and measures zlib only
    zstandard = None


def last_two(run: Path) -> tuple[np.ndarray, np.ndarray, str]:
    from fedsilo.checkpointfile import read_coordinator_state

    rounds = sorted(p for p in (run / "checkpoints").glob("round-*") if p.is_dir())
    if len(rounds) < 2:
        sys.exit(f"{run}: needs two checkpoints (checkpoints/round-NNNN), found {len(rounds)}")
    states = [read_coordinator_state(r / "coordinator.pt") for r in rounds[-2:]]
    weights = [s["weights"].numpy().astype(np.float32) for s in states]
    return weights[0], weights[1], f"{rounds[-2].name}->{rounds[-1].name}"


def shuffle(x: np.ndarray) -> bytes:
    return x.view(np.uint8).reshape(-1, 4).T.copy().tobytes()


def timed(fn: Callable[[], bytes], repeats: int) -> tuple[bytes, float]:
    times, out = [], b""
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def codecs() -> dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    found = {"zlib-1": (lambda d: zlib.compress(d, 1), zlib.decompress),
             "zlib-6": (lambda d: zlib.compress(d, 6), zlib.decompress)}
    if zstandard is not None:
        for level in (1, 3):
            c = zstandard.ZstdCompressor(level=level, threads=0)
            d = zstandard.ZstdDecompressor()
            found[f"zstd-{level}"] = (c.compress, d.decompress)
    return found


def measure(run: Path, repeats: int) -> None:
    before, after, rounds = last_two(run)
    xor = (after.view(np.uint32) ^ before.view(np.uint32)).view(np.float32)
    for what, x in (("weights", after), ("delta", (after - before).astype(np.float32)),
                    ("xor", xor)):
        raw = x.tobytes()
        for layout, data in (("raw", raw), ("byteshuffle", shuffle(x))):
            for name, (comp, decomp) in codecs().items():
                packed, c_s = timed(lambda: comp(data), repeats)
                _, d_s = timed(lambda: decomp(packed), repeats)
                ratio = len(packed) / len(raw)
                saved = len(raw) * (1.0 - ratio)
                pays_below = saved * 8 / (c_s + d_s) if c_s + d_s > 0 else float("inf")
                print(json.dumps({"run": str(run), "rounds": rounds, "what": what,
                                  "values": int(x.size), "bytes": len(raw), "codec": name,
                                  "layout": layout, "ratio": round(ratio, 4),
                                  "compress_ms": round(c_s * 1e3, 2),
                                  "decompress_ms": round(d_s * 1e3, 2),
                                  "pays_below_mbit_s": round(pays_below / 1e6, 1)}))
        if what == "delta":
            import torch

            t = torch.from_numpy(x)
            scale = float(np.abs(x).max()) or 1.0
            for dtype in (torch.bfloat16, torch.float16):
                back = t.to(dtype).to(torch.float32).numpy()
                print(json.dumps({"run": str(run), "what": what, "codec": str(dtype),
                                  "layout": "lossy", "ratio": 0.5,
                                  "max_abs_error_over_max": float(np.abs(back - x).max()) / scale}))
    masked = np.random.default_rng().integers(0, 2**64 - 1, size=after.size, dtype=np.uint64)
    for name, (comp, _) in codecs().items():
        print(json.dumps({"run": str(run), "what": "masked update (uniform uint64)",
                          "codec": name, "ratio": round(len(comp(masked.tobytes()))
                                                        / masked.nbytes, 4)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if zstandard is None:
        print(json.dumps({"note": "zstandard is not installed: zlib only"}))
    for run in args.runs:
        measure(run, args.repeats)


if __name__ == "__main__":
    main()
