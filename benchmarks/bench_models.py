"""Step time of a real-size torchvision model (issue #15): one site's training step, non-DP
and DP-SGD, for ``tv:`` models built exactly as a run builds them (``models.build_for``).

Variants (each a fresh model, timed interleaved so load on a shared machine hits all alike):
  bn            the model as torchvision builds it (BatchNorm), plain SGD step: a non-DP run
  gn            the same after the DP fix (GroupNorm, residuals out of place), plain SGD
  dp-mixed      DP fix + fedsilo's mixed ghost clipping, noise, SGD (dp.grad_sample_mode=mixed)
  dp-hooks      DP fix + Opacus's per-sample gradients (hooks), clip, noise, SGD
  dp-mixed-l4   dp-mixed with model.train_layers=1 (last block and head train, rest frozen)

The per-step closures are ``bench_dp_step.make_step``'s.  A site of a federation runs this
step on its own cores; the round time of P sites is one site's local time plus the
aggregation (see the other sections of RESULTS.md), so one site is what is measured.

    python benchmarks/bench_models.py --model tv:resnet50 --size 224 --batch 8 --steps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dp_step import make_step  # noqa: E402

from fedsilo.config import load_config  # noqa: E402
from fedsilo.models import build_for  # noqa: E402

VARIANTS = {
    "bn": ("nonprivate", ["model.dp_fix=off"]),
    "gn": ("nonprivate", ["model.dp_fix=on"]),
    "dp-mixed": ("mixed", ["model.dp_fix=on"]),
    "dp-hooks": ("hooks", ["model.dp_fix=on"]),
    "dp-mixed-l4": ("mixed", ["model.dp_fix=on", "model.train_layers=1"]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tv:resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    y = torch.randint(0, args.classes, (args.batch,))
    steps, params = {}, {}
    for name in args.variants:
        method, sets = VARIANTS[name]
        config = load_config(None, overrides=[f"model.name={args.model}", *sets])
        torch.manual_seed(0)
        model = build_for(config, in_channels=args.channels, num_classes=args.classes,
                          image_size=(args.size, args.size))
        params[name] = (sum(p.numel() for p in model.parameters() if p.requires_grad),
                        sum(p.numel() for p in model.parameters()))
        steps[name] = make_step(method, model.train(), batch=args.batch, name=args.model)
        steps[name](x, y)  # warm-up
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            begin = time.perf_counter()
            for _ in range(args.steps):
                step(x, y)
            times[name].append((time.perf_counter() - begin) / args.steps)
    base = statistics.median(times.get("bn", times[next(iter(times))]))
    result = {
        "model": args.model, "image": [args.channels, args.size, args.size],
        "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "variants": {n: {"step_s": round(statistics.median(t), 3),
                         "images_per_s": round(args.batch / statistics.median(t), 2),
                         "vs_bn": round(statistics.median(t) / base, 2),
                         "trainable_params": params[n][0], "params": params[n][1]}
                     for n, t in times.items()},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
