"""DP-SGD on a GPU: ms/step and peak memory, non-private against DP, in one command.

For each model (dp_cnn and ResNet-18 at 28 px, ResNet-50 at 224 px by default) the variants
below run interleaved in one process (one timed block of ``--steps`` steps per variant per
repeat), and the report gives each variant's median ms/step, its median ratio to the
non-private fp32 step of the same repeat, and its peak GPU memory
(``torch.cuda.max_memory_allocated`` over a separate run of the variant).

Variants (``--variants``):
  np-fp32      forward, backward, SGD step
  np-bf16      the same under bf16 autocast
  np-bf16-cl   ... and channels_last
  dp-fp32      fedsilo's DP step (``ParticipantPrivacy._step``: mixed ghost clipping, noise
               from the site secret drawn ahead on a worker thread into pinned buffers and
               copied asynchronously, privacy/lookahead.py)
  dp-inplace   the DP step with the noise drawn in place (on the critical path)
  dp-bf16      the DP step under bf16 autocast (norms and clipped sums in fp32)
  dp-bf16-cl   ... and channels_last

Every DP step computes on exactly ``--batch`` samples (no Poisson draw: its cost is
negligible and its size varies); its noise is that of (round 1, step k).

    python benchmarks/bench_dp_gpu.py --out benchmarks/results/dp-gpu.json      # on a GPU
    python benchmarks/bench_dp_gpu.py --smoke                                   # CPU, tiny

``--smoke`` runs every model and variant on the CPU with tiny sizes (a test that the script
works, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from fedsilo.config import SiteDP, TrainConfig, load_config
from fedsilo.models import build_for
from fedsilo.privacy.engine import ParticipantPrivacy
from fedsilo.privacy.lookahead import Ahead, fill_noise

VARIANTS = ["np-fp32", "np-bf16", "np-bf16-cl", "dp-fp32", "dp-inplace", "dp-bf16",
            "dp-bf16-cl"]
#: (model name, image size, channels, batch) measured by default
CASES = [("dp_cnn", 28, 1, 64), ("resnet18", 28, 1, 64), ("tv:resnet50", 224, 3, 32)]
#: the same on the CPU with --smoke
SMOKE = [("dp_cnn", 28, 1, 2), ("resnet18", 16, 1, 2), ("tv:resnet50", 32, 3, 2)]


def build(name: str, *, size: int, channels: int, device: torch.device) -> nn.Module:
    config = load_config(None, overrides=[f"model.name={name}", "dp.enabled=true",
                                          "dp.noise_multiplier=1.0"])
    torch.manual_seed(0)
    return build_for(config, in_channels=channels, num_classes=10,
                     image_size=(size, size)).to(device)


def make_step(variant: str, name: str, *, size: int, channels: int, batch: int,
              device: torch.device, closers: list[Callable[[], None]]
              ) -> tuple[Callable[[], None], nn.Module]:
    """A closure running one step of ``variant`` on its own copy of the model."""
    model = build(name, size=size, channels=channels, device=device)
    channels_last = variant.endswith("-cl")
    precision = "bf16" if "bf16" in variant else "fp32"
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) \
        if precision == "bf16" else None
    if variant.startswith("np"):
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            if autocast is None:
                loss = F.cross_entropy(model(x), y)
            else:
                with autocast():
                    loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        return step, model
    ahead = variant != "dp-inplace"
    engine = ParticipantPrivacy(
        model, site=0, settings=SiteDP(target_epsilon=None, noise_multiplier=1.0, delta=1e-5,
                                       max_grad_norm=1.0),
        mechanism="rdp", num_samples=20 * batch,
        train=TrainConfig(batch_size=batch, precision=precision), rounds=1, model_name=name,
        sample=x[:2], mode="mixed", lookahead=2 if ahead else 0)
    secret = bytes(range(32))
    std = engine.noise_multiplier * engine.settings.max_grad_norm
    if ahead:
        pool, stop = engine._buffers(), threading.Event()
        draws = Ahead(lambda k: fill_noise(pool.acquire(stop), secret, round_index=1, step=k,
                                           std=std),
                      1 << 30, depth=1, describe=str, stop=stop, discard=pool.release)
        closers.append(draws.close)

        def dp_step() -> None:
            engine._step(x, y, optimizer, draws.take(), 0, 0.0)
        return dp_step, model
    counter = [0]

    def dp_step_in_place() -> None:
        counter[0] += 1
        engine._step(x, y, optimizer, engine._noise_in_place(secret, 1, counter[0]), 0, 0.0)
    return dp_step_in_place, model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(step: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def run_case(name: str, size: int, channels: int, batch: int, *, variants: list[str],
             steps: int, repeats: int, warmup: int, device: torch.device) -> dict[str, Any]:
    closers: list[Callable[[], None]] = []
    try:
        steppers = {}
        for variant in variants:
            steppers[variant], _ = make_step(variant, name, size=size, channels=channels,
                                             batch=batch, device=device, closers=closers)
        peaks = {}
        for variant, step in steppers.items():
            for _ in range(warmup):
                step()
            peaks[variant] = peak_mb(step, device)
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(repeats):
            for variant, step in steppers.items():
                sync(device)
                begin = time.perf_counter()
                for _ in range(steps):
                    step()
                sync(device)
                times[variant].append((time.perf_counter() - begin) / steps)
    finally:
        for close in closers:
            close()
    base = times[variants[0]]
    return {v: {"step_ms_median": 1000 * statistics.median(t),
                "ratio_median": statistics.median(a / b for a, b in zip(t, base)),
                "peak_mb": peaks[v], "step_ms": [1000 * s for s in t]}
            for v, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None,
                        help="NAME:SIZE:CHANNELS:BATCH, e.g. resnet18:28:1:64 (default: "
                             + " ".join(f"{n}:{s}:{c}:{b}" for n, s, c, b in CASES) + ")")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS,
                        help="np-fp32 is always run first (the ratios' denominator)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU, one step: checks that the script runs")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.smoke:
        device = torch.device(args.device or "cpu")
        cases = SMOKE
        args.steps, args.repeats, args.warmup = 1, 1, 0
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cases = CASES
    if args.models:
        cases = [(n, int(s), int(c), int(b)) for n, s, c, b in
                 (m.rsplit(":", 3) for m in args.models)]
    variants = ["np-fp32"] + [v for v in VARIANTS if v in args.variants and v != "np-fp32"]
    results: dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "smoke": args.smoke,
        "machine": platform.processor() or platform.machine(), "steps": args.steps,
        "repeats": args.repeats, "argv": sys.argv[1:] if argv is None else list(argv),
        "models": {}}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
        torch.backends.cudnn.benchmark = True
    for name, size, channels, batch in cases:
        key = f"{name}@{size}px/b{batch}"
        try:
            row = run_case(name, size, channels, batch, variants=variants, steps=args.steps,
                           repeats=args.repeats, warmup=args.warmup, device=device)
        except torch.cuda.OutOfMemoryError as exc:  # recorded, the other models still run
            results["models"][key] = {"error": f"out of memory: {exc}"}
            print(f"{key:28s} out of memory", flush=True)
            torch.cuda.empty_cache()
            continue
        results["models"][key] = row
        for variant, r in row.items():
            peak = "" if r["peak_mb"] is None else f"  peak {r['peak_mb']:8.0f} MB"
            print(f"{key:28s} {variant:11s} {r['step_ms_median']:9.1f} ms/step  "
                  f"x{r['ratio_median']:.2f}{peak}", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
