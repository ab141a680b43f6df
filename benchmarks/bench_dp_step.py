"""Cost of privacy: DP-SGD step time / non-private step time, measured side by side.

For each model, the methods run interleaved in one process (one timed block of ``--steps``
steps per method per repeat, so load on a shared machine hits them alike), and the report
gives the median over ``--repeats`` of each method's time divided by the non-private time
of the same repeat.  A DP step here is the whole step: per-sample clipping, the clipped
sum, Gaussian noise and the optimizer step.

Methods:
  nonprivate  forward, backward, SGD step
  hooks       Opacus GradSampleModule (explicit per-sample gradients), clip, sum, noise
  ghost       Opacus fast gradient clipping (ghost norms for Linear; per-sample gradient
              norms through hooks for the rest), DPOptimizerFastGradientClipping
  mixed       fedsilo mixed ghost clipping (ghost or explicit norm per layer, Bu et al.
              2022; src/fedsilo/privacy/ghost.py), reweighted second backward, noise

Peak memory: each method is run again alone (3 steps) in a child process; reported is the
peak growth of its resident set over the steps, sampled from /proc every 0.5 ms (CPU), or
``torch.cuda.max_memory_allocated`` (GPU).

    python benchmarks/bench_dp_step.py --models small_cnn resnet18 --out results/dp-step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from fedsilo.models import build_model
from fedsilo.privacy.ghost import GhostClipper

METHODS = ["nonprivate", "hooks", "ghost", "mixed"]


def make_step(method: str, model: nn.Module, *, batch: int, clip: float = 1.0,
              sigma: float = 1.0):
    """A closure running one training step of ``method`` on (x, y)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def add_noise():
        for p in params:
            p.grad.add_(torch.normal(0.0, sigma * clip, size=p.shape, device=p.device))
            p.grad.div_(batch)

    if method == "nonprivate":
        def step(x, y):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return step
    if method == "hooks":
        from opacus import GradSampleModule

        module = GradSampleModule(model, loss_reduction="sum")

        def step(x, y):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(module(x), y, reduction="sum").backward()
            per_sample = [p.grad_sample for p in params]
            norms = torch.stack([g.reshape(len(x), -1).norm(2, dim=1) for g in per_sample], 1)
            factor = (clip / (norms.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
            for p, g in zip(params, per_sample):
                p.grad = torch.einsum("i,i...->...", factor, g)
                p.grad_sample = None
            add_noise()
            optimizer.step()
        return step
    if method == "ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        module = GradSampleModuleFastGradientClipping(model, max_grad_norm=clip,
                                                      use_ghost_clipping=True,
                                                      loss_reduction="sum")
        dp_optimizer = DPOptimizerFastGradientClipping(
            optimizer, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=batch,
            loss_reduction="sum")
        criterion = DPLossFastGradientClipping(module, dp_optimizer,
                                               nn.CrossEntropyLoss(reduction="sum"), "sum")

        def step(x, y):
            dp_optimizer.zero_grad(set_to_none=True)
            criterion(module(x), y).backward()
            dp_optimizer.step()
        return step
    if method == "mixed":
        clipper = GhostClipper(model)

        def step(x, y):
            optimizer.zero_grad(set_to_none=True)
            clipper.clipped_sum(x, y, max_grad_norm=clip)
            add_noise()
            optimizer.step()
        return step
    raise ValueError(method)


def build(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, in_channels=1, num_classes=2, image_size=(28, 28),
                       norm_groups=32).to(device)


def run_timing(name: str, *, batch: int, steps: int, repeats: int, warmup: int,
               device: torch.device) -> dict:
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    steppers = {m: make_step(m, build(name, device), batch=batch) for m in METHODS}
    for step in steppers.values():
        for _ in range(warmup):
            step(x, y)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(repeats):
        for method, step in steppers.items():
            _sync(device)
            begin = time.perf_counter()
            for _ in range(steps):
                step(x, y)
            _sync(device)
            times[method].append((time.perf_counter() - begin) / steps)
    base = times["nonprivate"]
    return {m: {"step_ms_median": 1000 * statistics.median(t),
                "ratio_median": statistics.median(a / b for a, b in zip(t, base))}
            for m, t in times.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(name: str, method: str, *, batch: int, device: torch.device) -> float:
    """MB of peak memory of ``method`` alone (child process)."""
    out = subprocess.run([sys.executable, __file__, "--child", name, method, str(batch),
                          str(device)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _child_peak(name: str, method: str, batch: int, device: str) -> float:
    warnings.simplefilter("ignore")
    device = torch.device(device)
    model = build(name, device)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    step = make_step(method, model, batch=batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step(x, y)
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is useless here (importing torch peaks higher than a step): sample the
    # resident set from /proc while the steps run, relative to just before them
    import threading

    def rss_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize() / 2**20

    base, peak, done = rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for _ in range(3):
        step(x, y)
    done.set()
    sampler.join()
    return max(peak[0], rss_mb()) - base


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", default=False)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {"batch": args.batch, "steps": args.steps, "repeats": args.repeats,
               "threads": args.threads, "device": str(device), "torch": torch.__version__,
               "machine": platform.processor() or platform.machine(), "models": {}}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    for name in args.models:
        timing = run_timing(name, batch=args.batch, steps=args.steps, repeats=args.repeats,
                            warmup=args.warmup, device=device)
        if not args.no_memory:
            for method in METHODS:
                timing[method]["peak_mb"] = peak_memory(name, method, batch=args.batch,
                                                        device=device)
        results["models"][name] = timing
        for method, row in timing.items():
            print(f"{name:10s} {method:11s} {row['step_ms_median']:8.1f} ms/step  "
                  f"x{row['ratio_median']:.2f}" +
                  (f"  peak {row['peak_mb']:.0f} MB" if "peak_mb" in row else ""), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        torch.set_num_threads(1)
        print(_child_peak(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
        sys.exit(0)
    sys.exit(main())
