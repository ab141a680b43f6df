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
              2022; src/fedsilo/privacy/ghost.py), reweighted second backward, noise from
              torch.normal (the DP step before issue #11)
  secret      the engine's own step (ParticipantPrivacy._step, mode "mixed"): the Poisson
              mask and the Gaussian noise drawn from a site secret (privacy/secret.py:
              ChaCha20, Box-Muller in float64) in place, on the critical path, the
              sampled rows gathered from 20*batch samples (the step after issue #11)
  before      the engine's step as it was before #27, for a side-by-side before/after: the
              GhostClipper of an earlier ghost.py (``--before-ghost FILE``, e.g. from
              ``git show 8b5b998:src/fedsilo/privacy/ghost.py``) and the noise drawn in
              place, parameter by parameter, on the critical path
  ahead       the same step with the mask and the noise drawn ahead on worker threads
              (privacy/lookahead.py, as ParticipantPrivacy.train_round does since #27):
              step s+1's noise is drawn while step s computes

The secret step draws a Poisson batch, whose size varies; so that it computes on exactly
``--batch`` samples like the other methods, it runs only at (round, step) counters whose
mask holds exactly ``--batch`` samples, found beforehand under a fixed secret.  The mask
is still drawn inside every timed step.

``--noise-sizes`` also times the noise generators alone, side by side: values per second of
``SecretStream.fill_gaussian`` into a float32 buffer against ``torch.normal``, and the
ChaCha20 keystream alone (the 256 bits each secret value consumes).

Peak memory: each method is run again alone (3 steps) in a child process; reported is the
peak growth of its resident set over the steps, sampled from /proc every 0.5 ms (CPU), or
``torch.cuda.max_memory_allocated`` (GPU).

    python benchmarks/bench_dp_step.py --models small_cnn resnet18 --out results/dp-step.json
    python benchmarks/bench_dp_step.py --models resnet18 --methods nonprivate mixed secret
    python benchmarks/bench_dp_step.py --models --noise-sizes 1000000 11000000
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedsilo.config import SiteDP, TrainConfig
from fedsilo.models import build_model
from fedsilo.privacy.engine import ParticipantPrivacy
from fedsilo.privacy.ghost import GhostClipper
from fedsilo.privacy.lookahead import Ahead, fill_noise
from fedsilo.privacy.secret import Purpose, SecretStream
from fedsilo.training import TensorSplit

METHODS = ["nonprivate", "hooks", "ghost", "mixed", "before", "secret", "ahead"]
#: --before-ghost: the earlier ghost.py the "before" method clips with
BEFORE_GHOST: list[str] = []
#: the secret step samples from this many times --batch samples (q = 1/POOL)
POOL = 20


def make_step(method: str, model: nn.Module, *, batch: int, name: str, clip: float = 1.0,
              sigma: float = 1.0):
    """A closure running one training step of ``method`` on (x, y); the ``secret`` step
    ignores (x, y) and draws its batch from its own pool of random images."""
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
    if method == "before":
        return _before_step(model, optimizer, batch=batch, clip=clip, sigma=sigma)
    if method in ("secret", "ahead"):
        return _secret_step(model, optimizer, batch=batch, name=name, clip=clip, sigma=sigma,
                            ahead=method == "ahead")
    raise ValueError(method)


#: the look-aheads the "ahead" steps started (closed at exit)
_OPEN: list = []


def _secret_step(model: nn.Module, optimizer: torch.optim.Optimizer, *, batch: int, name: str,
                 clip: float, sigma: float, ahead: bool = False):
    device = next(model.parameters()).device
    num_samples = POOL * batch
    data = TensorSplit(torch.randn(num_samples, 1, 28, 28, device=device),
                       torch.randint(0, 2, (num_samples,), device=device))
    engine = ParticipantPrivacy(
        model, site=0, settings=SiteDP(target_epsilon=None, noise_multiplier=sigma,
                                       delta=1e-5, max_grad_norm=clip),
        mechanism="rdp", num_samples=num_samples, train=TrainConfig(batch_size=batch),
        rounds=1, model_name=name, sample=data.images[:2], mode="mixed",
        lookahead=2 if ahead else 0)
    assert engine.sample_rate * num_samples == batch and engine.noise_multiplier == sigma
    secret = bytes(range(32))  # fixed, so the counters below are the same in every run
    counters = _full_batch_counters(secret, num_samples=num_samples, rate=engine.sample_rate,
                                    batch=batch, count=32)
    position = [0]
    std = sigma * clip
    if ahead:
        pool = engine._buffers()
        stop = threading.Event()

        def produce(k: int):
            round_index, index = counters[k % len(counters)]
            return (engine._poisson(secret, round_index, index),
                    fill_noise(pool.acquire(stop), secret, round_index=round_index,
                               step=index, std=std))

        draws = Ahead(produce, 1 << 30, depth=1, describe=str, stop=stop,
                      discard=lambda item: pool.release(item[1]))
        _OPEN.append(draws)

        def step_ahead(x, y):
            rows, noise = draws.take()
            images, labels = next(data.batches([rows]))
            engine._step(images, labels, optimizer, noise, 0, 0.0)
        return step_ahead

    def step(x, y):
        round_index, index = counters[position[0] % len(counters)]
        position[0] += 1
        # the Poisson draw, the noise and the batch in place, then the step
        rows = engine._poisson(secret, round_index, index)
        noise = engine._noise_in_place(secret, round_index, index)
        images, labels = next(data.batches([rows]))
        engine._step(images, labels, optimizer, noise, 0, 0.0)
    return step


def _before_step(model: nn.Module, optimizer: torch.optim.Optimizer, *, batch: int,
                 clip: float, sigma: float):
    """The DP step before #27: the earlier GhostClipper, the mask and then the noise drawn in
    place (one stream, parameter by parameter), added, divided, the optimizer step."""
    import importlib.util

    if not BEFORE_GHOST:
        raise SystemExit("method 'before' needs --before-ghost FILE")
    spec = importlib.util.spec_from_file_location("ghost_before", BEFORE_GHOST[0])
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    clipper = old.GhostClipper(model)
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    num_samples = POOL * batch
    data = TensorSplit(torch.randn(num_samples, 1, 28, 28, device=device),
                       torch.randint(0, 2, (num_samples,), device=device))
    secret = bytes(range(32))
    counters = _full_batch_counters(secret, num_samples=num_samples, rate=1 / POOL,
                                    batch=batch, count=32)
    buffer = np.empty(max(p.numel() for p in params), dtype=np.float32)
    position = [0]

    def step(x, y):
        round_index, index = counters[position[0] % len(counters)]
        position[0] += 1
        mask = SecretStream(secret, purpose=Purpose.POISSON, round_index=round_index,
                            step=index).bernoulli(num_samples, 1 / POOL)
        images, labels = next(data.batches([np.flatnonzero(mask)]))
        optimizer.zero_grad(set_to_none=True)
        clipper.clipped_sum(images, labels, max_grad_norm=clip)
        noise = SecretStream(secret, purpose=Purpose.NOISE, round_index=round_index, step=index)
        for p in params:
            values = buffer[:p.numel()]
            noise.fill_gaussian(values, std=sigma * clip)
            p.grad.add_(torch.from_numpy(values).view_as(p).to(device))
            p.grad.div_(batch)
        optimizer.step()
    return step


def _full_batch_counters(secret: bytes, *, num_samples: int, rate: float, batch: int,
                         count: int) -> list[tuple[int, int]]:
    """The first ``count`` (round, step) counters whose Poisson mask draws ``batch`` samples."""
    found = []
    for round_index in range(10_000):
        for index in range(100):
            mask = SecretStream(secret, purpose=Purpose.POISSON, round_index=round_index,
                                step=index).bernoulli(num_samples, rate)
            if int(mask.sum()) == batch:
                found.append((round_index, index))
                if len(found) == count:
                    return found
    raise RuntimeError("no Poisson mask of the expected batch size")


def build(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, in_channels=1, num_classes=2, image_size=(28, 28),
                       norm_groups=32).to(device)


def run_timing(name: str, *, methods: list[str], batch: int, steps: int, repeats: int,
               warmup: int, device: torch.device) -> dict:
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    steppers = {m: make_step(m, build(name, device), batch=batch, name=name) for m in methods}
    for step in steppers.values():
        for _ in range(warmup):
            step(x, y)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):
        for method, step in steppers.items():
            _sync(device)
            begin = time.perf_counter()
            for _ in range(steps):
                step(x, y)
            _sync(device)
            times[method].append((time.perf_counter() - begin) / steps)
    base = times["nonprivate"]
    result = {m: {"step_ms_median": 1000 * statistics.median(t),
                  "ratio_median": statistics.median(a / b for a, b in zip(t, base)),
                  "step_ms": [1000 * v for v in t]}
              for m, t in times.items()}
    for method in ("secret", "ahead"):
        if method in times and "before" in times:
            result[method]["vs_before_median"] = statistics.median(
                a / b for a, b in zip(times[method], times["before"]))
    if "secret" in times and "ahead" in times:
        result["ahead"]["vs_secret_median"] = statistics.median(
            a / b for a, b in zip(times["ahead"], times["secret"]))
    if "secret" in times and "mixed" in times:
        # the cost of the change: after (secret) / before (mixed), repeat by repeat
        result["secret"]["vs_mixed_median"] = statistics.median(
            a / b for a, b in zip(times["secret"], times["mixed"]))
    return result


def noise_throughput(sizes: list[int], *, repeats: int, std: float = 1.0) -> dict:
    """Values per second of the secret Gaussian (``fill_gaussian`` into float32) and of
    ``torch.normal`` (float32, a new tensor as the step before issue #11 did), interleaved."""
    secret = bytes(range(32))
    out = {}
    for size in sizes:
        buffer = np.empty(size, dtype=np.float32)
        times: dict[str, list[float]] = {"secret": [], "keystream": [], "torch": [],
                                         "fill_noise": []}
        flat = torch.empty(size)
        for repeat in range(repeats + 1):  # the first round is a warm-up
            begin = time.perf_counter()
            SecretStream(secret, purpose=Purpose.NOISE, round_index=0,
                         step=repeat).fill_gaussian(buffer, std=std)
            middle = time.perf_counter()
            torch.normal(0.0, std, size=(size,))
            end = time.perf_counter()
            # the ChaCha20 part alone: the 4 x 64 bits each secret value consumes
            stream = SecretStream(secret, purpose=Purpose.NOISE, round_index=1, step=repeat)
            for chunk in range(0, size, 1 << 20):
                stream.uint64(4 * min(1 << 20, size - chunk))
            last = time.perf_counter()
            fill_noise(flat, secret, round_index=2, step=repeat, std=std)
            after = time.perf_counter()
            if repeat:
                times["fill_noise"].append(after - last)
                times["secret"].append(middle - begin)
                times["torch"].append(end - middle)
                times["keystream"].append(last - end)
        out[str(size)] = {
            "secret_ms_median": 1000 * statistics.median(times["secret"]),
            "keystream_ms_median": 1000 * statistics.median(times["keystream"]),
            "torch_ms_median": 1000 * statistics.median(times["torch"]),
            "fill_noise_ms_median": 1000 * statistics.median(times["fill_noise"]),
            "secret_values_per_s": size / statistics.median(times["secret"]),
            "torch_values_per_s": size / statistics.median(times["torch"]),
            "secret_over_torch_median": statistics.median(
                a / b for a, b in zip(times["secret"], times["torch"]))}
    return out


def round_timing(name: str, *, steps: int, batch: int, repeats: int, device: torch.device
                 ) -> dict:
    """Seconds of one whole local round of ``steps`` steps, interleaved: non-private
    (``train_local``) against DP-SGD (``ParticipantPrivacy.train_round``, Poisson batches of
    mean ``batch`` from 20·batch samples) with the noise drawn in place and drawn ahead."""
    from fedsilo.training import make_optimizer, train_local

    num_samples = POOL * batch
    data = TensorSplit(torch.randn(num_samples, 1, 28, 28, device=device),
                       torch.randint(0, 2, (num_samples,), device=device))
    config = TrainConfig(batch_size=batch, max_steps=steps, epochs=steps)
    models = {m: build(name, device) for m in ("nonprivate", "dp-inplace", "dp-ahead")}
    engines = {m: ParticipantPrivacy(
        models[m], site=0, settings=SiteDP(None, 1.0, 1e-5, 1.0), mechanism="rdp",
        num_samples=num_samples, train=config, rounds=repeats + 1, model_name=name,
        sample=data.images[:2], mode="mixed", lookahead=2 if m == "dp-ahead" else 0)
        for m in ("dp-inplace", "dp-ahead")}
    secret = bytes(range(32))
    times: dict[str, list[float]] = {m: [] for m in models}
    for repeat in range(repeats + 1):  # the first is a warm-up
        for method, model in models.items():
            optimizer = make_optimizer(model, config)
            begin = time.perf_counter()
            if method == "nonprivate":
                train_local(model, data, config=config, optimizer=optimizer,
                            generator=torch.Generator().manual_seed(repeat))
            else:
                engines[method].train_round(data, optimizer=optimizer, secret=secret,
                                            round_index=repeat + 1)
            _sync(device)
            if repeat:
                times[method].append(time.perf_counter() - begin)
    base = times["nonprivate"]
    return {m: {"round_s_median": statistics.median(t),
                "ratio_median": statistics.median(a / b for a, b in zip(t, base))}
            for m, t in times.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(name: str, method: str, *, batch: int, device: torch.device) -> float:
    """MB of peak memory of ``method`` alone (child process)."""
    out = subprocess.run([sys.executable, __file__, "--child", name, method, str(batch),
                          str(device), *BEFORE_GHOST], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _child_peak(name: str, method: str, batch: int, device: str) -> float:
    warnings.simplefilter("ignore")
    device = torch.device(device)
    model = build(name, device)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    step = make_step(method, model, batch=batch, name=name)
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
    parser.add_argument("--models", nargs="*", default=["small_cnn", "resnet18"],
                        help="dp_cnn, small_cnn, resnet18, ... (none: only --noise-sizes)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS,
                        help="nonprivate is always run (the ratios' denominator)")
    parser.add_argument("--noise-sizes", nargs="*", type=lambda v: int(float(v)), default=[],
                        help="also time the noise generators alone for these numbers of values")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", default=False)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--round-steps", type=int, default=0,
                        help="also time whole local rounds of this many steps (0: not)")
    parser.add_argument("--before-ghost", default=None,
                        help="an earlier privacy/ghost.py, for the method 'before'")
    args = parser.parse_args(argv)
    if args.before_ghost:
        BEFORE_GHOST[:] = [args.before_ghost]
    methods = ["nonprivate"] + [m for m in METHODS if m in args.methods and m != "nonprivate"]
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {"batch": args.batch, "steps": args.steps, "repeats": args.repeats,
               "threads": args.threads, "device": str(device), "torch": torch.__version__,
               "machine": platform.processor() or platform.machine(), "methods": methods,
               "argv": sys.argv[1:] if argv is None else list(argv), "models": {}}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    for name in args.models:
        timing = run_timing(name, methods=methods, batch=args.batch, steps=args.steps,
                            repeats=args.repeats, warmup=args.warmup, device=device)
        if not args.no_memory:
            for method in methods:
                timing[method]["peak_mb"] = peak_memory(name, method, batch=args.batch,
                                                        device=device)
        results["models"][name] = timing
        for method, row in timing.items():
            print(f"{name:10s} {method:11s} {row['step_ms_median']:8.1f} ms/step  "
                  f"x{row['ratio_median']:.2f}" +
                  (f"  peak {row['peak_mb']:.0f} MB" if "peak_mb" in row else "") +
                  (f"  x{row['vs_mixed_median']:.3f} of mixed" if "vs_mixed_median" in row
                   else "") +
                  (f"  x{row['vs_secret_median']:.3f} of secret" if "vs_secret_median" in row
                   else "") +
                  (f"  x{row['vs_before_median']:.3f} of before" if "vs_before_median" in row
                   else ""), flush=True)
        if args.round_steps:
            rounds = round_timing(name, steps=args.round_steps, batch=args.batch,
                                  repeats=args.repeats, device=device)
            results.setdefault("rounds", {})[name] = rounds
            for method, row in rounds.items():
                print(f"{name:10s} round of {args.round_steps} steps {method:11s} "
                      f"{row['round_s_median']:8.2f} s  x{row['ratio_median']:.2f}", flush=True)
    if args.noise_sizes:
        results["noise"] = noise_throughput(args.noise_sizes, repeats=args.repeats)
        for size, row in results["noise"].items():
            print(f"noise {int(size):>10,d} values: secret {row['secret_ms_median']:8.1f} ms "
                  f"({row['secret_values_per_s'] / 1e6:6.1f} M/s)  torch.normal "
                  f"{row['torch_ms_median']:7.1f} ms ({row['torch_values_per_s'] / 1e6:6.1f} M/s)"
                  f"  secret/torch x{row['secret_over_torch_median']:.1f}  (of the secret time, "
                  f"ChaCha20 alone {row['keystream_ms_median']:.1f} ms)  the engine's fill_noise "
                  f"{row['fill_noise_ms_median']:.1f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    for draws in _OPEN:
        draws.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        torch.set_num_threads(1)
        BEFORE_GHOST[:] = sys.argv[6:7]
        print(_child_peak(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
        sys.exit(0)
    sys.exit(main())
