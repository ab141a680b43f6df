"""Cost of fedsilo's weight transport against bare mpi4py collectives, side by side.

Run under MPI (rank 0 plays the coordinator, every other rank a participant)::

    .venv/bin/mpirun --allow-run-as-root --oversubscribe --bind-to none -n 4 \\
        .venv/bin/python benchmarks/bench_reduce.py --model resnet18 --json out.json

For one flat float32 vector of N values it times, interleaved in the same run (the order
rotates every repeat, each measurement is preceded by a barrier):

- ``reduce_bare``      ``comm.Reduce(sendbuf, recvbuf, op=SUM, root=0)`` on a plain
                       ``COMM_WORLD.Dup()``, preallocated numpy buffers;
- ``reduce_bare_inplace`` the same with ``MPI.IN_PLACE`` at the root (what fedsilo does),
                       to tell an in-place effect from a fedsilo effect;
- ``reduce_world``     fedsilo's plain transport (``transport.PlainReduce``: the identity codec,
                       then ``World.reduce_sum``; the coordinator contributes a zeroed buffer);
- ``aggregation``      the round loop's whole aggregation step: participants weight their
                       update (``np.subtract`` + ``*=``) and check it (``count_nonfinite``),
                       ``reduce_sum``, then at rank 0 the FedAvg ``server_step(..., out=...)``
                       and the finiteness check of the new weights (``coordinator.py``);
- ``bcast_bare`` / ``bcast_world``  ``comm.Bcast`` against ``World.bcast_weights``.

Times are wall-clock seconds from the end of the barrier to the end of the call.  The
table gives the median at rank 0 (what the round loop records as ``seconds.aggregate`` /
``seconds.broadcast``) and the median over repeats of the slowest rank.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Callable, Sequence

import numpy as np
from mpi4py import MPI

#: ResNet-18 (GroupNorm, 1×28×28 input, 2 classes): fedsilo's PneumoniaMNIST model
RESNET18_NUMEL = 11_168_706

OPS = ("reduce_bare", "reduce_bare_inplace", "reduce_world", "aggregation",
       "bcast_bare", "bcast_world")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--numel", type=int, default=None,
                      help=f"float32 values per vector (default {RESNET18_NUMEL:,}, ResNet-18)")
    size.add_argument("--model", choices=("small_cnn", "resnet18"), default=None,
                      help="take N from fedsilo's model of that name (1x28x28 images, 2 classes)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats of every operation")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repeats first")
    parser.add_argument("--ops", default=",".join(OPS),
                        help="comma-separated subset of the operations to time")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the numbers here")
    return parser


def model_numel(name: str) -> int:
    from fedsilo.models import build_model
    from fedsilo.weights import WeightLayout

    model = build_model(name, in_channels=1, num_classes=2, image_size=(28, 28))
    return WeightLayout.of(model).numel


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedsilo.aggregate import count_nonfinite
    from fedsilo.comm import World
    from fedsilo.messages import Contribution, RoundOutcome
    from fedsilo.strategies import build_strategy
    from fedsilo.transport import TRANSPORTS

    bare = MPI.COMM_WORLD.Dup()
    world = World()
    rank, size = bare.Get_rank(), bare.Get_size()
    if size < 2:
        print("bench_reduce.py needs at least 2 MPI ranks", file=sys.stderr)
        return 2
    numel = args.numel or (model_numel(args.model) if args.model and rank == 0 else None) \
        or RESNET18_NUMEL
    numel = bare.bcast(numel, root=0)
    label = args.model or ("resnet18" if numel == RESNET18_NUMEL else "custom")

    # Every rank's contribution is reproducible from its rank, so rank 0 can check the sum.
    def contribution(r: int) -> np.ndarray:
        if r == 0:
            return np.zeros(numel, dtype=np.float32)
        return np.random.default_rng(r).standard_normal(numel, dtype=np.float32) * np.float32(1e-2)

    send = contribution(rank)
    recv = np.zeros(numel, dtype=np.float32)
    world_buf = np.zeros(numel, dtype=np.float32)
    inplace_buf = np.zeros(numel, dtype=np.float32)
    bcast_buf = np.full(numel, float(rank), dtype=np.float32)
    # the aggregation step's buffers, as in participant.py and coordinator.py
    global_w = np.random.default_rng(1000).standard_normal(numel, dtype=np.float32)
    local_w = global_w + send  # this participant's trained weights
    reduce_buffer = np.zeros(numel, dtype=np.float32)
    weight = np.float32(1.0 / (size - 1))
    strategy = build_strategy("fedavg", {})
    parts: dict[str, list[float]] = {"participant_prep": [], "server_step": []}

    def reduce_bare() -> None:
        bare.Reduce([send, MPI.FLOAT], [recv, MPI.FLOAT] if rank == 0 else None,
                    op=MPI.SUM, root=0)

    def reduce_bare_inplace() -> None:
        if rank == 0:
            bare.Reduce(MPI.IN_PLACE, [inplace_buf, MPI.FLOAT], op=MPI.SUM, root=0)
        else:
            bare.Reduce([send, MPI.FLOAT], None, op=MPI.SUM, root=0)

    # fedsilo's path: the plain transport (identity codec, then World.reduce_sum)
    transport = TRANSPORTS.get("plain")()
    everyone = tuple(range(1, size))
    outcome = RoundOutcome(round=1, ranks=everyone, contributors=everyone, in_sum=everyone,
                           rows_per_rank={}, refused=False)
    world_contribution = Contribution(total=world_buf if rank == 0 else send)
    round_contribution = Contribution(total=reduce_buffer)

    def reduce_world() -> None:
        transport.aggregate(world, world_contribution, outcome)

    def aggregation() -> None:
        begin = time.perf_counter()
        if rank == 0:
            reduce_buffer.fill(0)  # Coordinator.local_round
        else:  # Participant.local_round, after flatten
            np.subtract(local_w, global_w, out=reduce_buffer)
            np.multiply(reduce_buffer, weight, out=reduce_buffer)  # participant.py: `*= weight`
            if count_nonfinite(reduce_buffer):
                raise AssertionError("non-finite update")
        prepared = time.perf_counter()
        transport.aggregate(world, round_contribution, outcome)
        reduced = time.perf_counter()
        if rank == 0:  # Coordinator.finish_round
            strategy.server_step(global_w, reduce_buffer, out=global_w)
            if count_nonfinite(global_w):
                raise AssertionError("non-finite weights")
            parts["server_step"].append(time.perf_counter() - reduced)
        else:
            parts["participant_prep"].append(prepared - begin)

    def bcast_bare() -> None:
        bare.Bcast([bcast_buf, MPI.FLOAT], root=0)

    def bcast_world() -> None:
        world.bcast_weights(bcast_buf)

    ops: dict[str, Callable[[], None]] = {
        "reduce_bare": reduce_bare, "reduce_bare_inplace": reduce_bare_inplace,
        "reduce_world": reduce_world, "aggregation": aggregation,
        "bcast_bare": bcast_bare, "bcast_world": bcast_world,
    }
    selected = tuple(name for name in OPS if name in args.ops.split(","))
    unknown = set(args.ops.split(",")) - set(OPS)
    if unknown:
        raise SystemExit(f"unknown --ops {sorted(unknown)}; known: {', '.join(OPS)}")
    times = {name: [] for name in selected}

    for i in range(args.warmup + args.repeats):
        if i == args.warmup:
            for values in parts.values():
                values.clear()  # keep the timed repeats only
        shift = i % len(selected)
        order = selected[shift:] + selected[:shift]  # rotate: no op always goes first
        for name in order:
            if name in ("reduce_world", "reduce_bare_inplace") and rank == 0:
                # the coordinator contributes zeros; zeroed outside the timing, as the
                # round loop does it (Coordinator.local_round)
                (world_buf if name == "reduce_world" else inplace_buf).fill(0)
            bare.Barrier()
            begin = time.perf_counter()
            ops[name]()
            elapsed = time.perf_counter() - begin
            if i >= args.warmup:
                times[name].append(elapsed)
        if i == 0:
            checked = {"reduce_bare": recv, "reduce_bare_inplace": inplace_buf,
                       "reduce_world": world_buf}
            _check_sums(rank, size, contribution,
                        *(buf for name, buf in checked.items() if name in selected))

    gathered = bare.gather(times, root=0)
    gathered_parts = bare.gather(parts, root=0)
    if rank == 0:
        result = _summarize(gathered, gathered_parts, numel=numel, size=size, label=label,
                            repeats=args.repeats, warmup=args.warmup)
        _print_table(result)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
    world.comm.Free()
    bare.Free()
    return 0


def _check_sums(rank: int, size: int, contribution: Callable[[int], np.ndarray],
                *results: np.ndarray) -> None:
    """After the first pass, rank 0 checks that each reduction produced the real sum."""
    if rank != 0 or not results:
        return
    expected = np.zeros_like(results[0])
    for r in range(1, size):
        expected += contribution(r)
    for i, result in enumerate(results):
        if not np.allclose(result, expected, rtol=1e-5, atol=1e-6):
            raise AssertionError(f"reduction #{i} did not produce the sum of the contributions")


def _median_ms(values: Sequence[float]) -> float:
    return float(np.median(values) * 1e3)


def _summarize(gathered: list[dict[str, list[float]]], parts: list[dict[str, list[float]]], *,
               numel: int, size: int, label: str, repeats: int, warmup: int) -> dict:
    nbytes = numel * 4
    ops = {}
    for name in gathered[0]:
        per_rank = np.array([g[name] for g in gathered])  # ranks × repeats
        rank0 = per_rank[0]
        slowest = per_rank.max(axis=0)
        ops[name] = {
            "rank0_median_ms": _median_ms(rank0),
            "rank0_min_ms": float(rank0.min() * 1e3),
            "max_over_ranks_median_ms": _median_ms(slowest),
            "rank0_MBps": nbytes / np.median(rank0) / 1e6,
            "rank0_ms": [round(t * 1e3, 3) for t in rank0],
        }
    prep = [t for p in parts[1:] for t in p["participant_prep"]]
    ratios = {
        "reduce_world/reduce_bare": _ratio(ops, "reduce_world", "reduce_bare"),
        "reduce_bare_inplace/reduce_bare": _ratio(ops, "reduce_bare_inplace", "reduce_bare"),
        "aggregation/reduce_bare": _ratio(ops, "aggregation", "reduce_bare"),
        "bcast_world/bcast_bare": _ratio(ops, "bcast_world", "bcast_bare"),
    }
    return {
        "benchmark": "bench_reduce",
        "date": datetime.date.today().isoformat(),
        "model": label,
        "numel": numel,
        "megabytes": nbytes / 1e6,
        "ranks": size,
        "repeats": repeats,
        "warmup": warmup,
        "host": platform.node(),
        "cores": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count()),
        "mpi": MPI.Get_library_version().splitlines()[0].split(",")[0],
        "mpi4py": __import__("mpi4py").__version__,
        "numpy": np.__version__,
        "ops": ops,
        "aggregation_parts_median_ms": {
            "participant_prep (subtract, scale, nonfinite check)":
                _median_ms(prep) if prep else None,
            "server_step (fedavg add + nonfinite check, rank 0)":
                _median_ms(parts[0]["server_step"]) if parts[0]["server_step"] else None,
        },
        "ratios_rank0_median": ratios,
    }


def _ratio(ops: dict, top: str, bottom: str) -> float | None:
    if top not in ops or bottom not in ops:
        return None
    return ops[top]["rank0_median_ms"] / ops[bottom]["rank0_median_ms"]


def _print_table(result: dict) -> None:
    print(f"bench_reduce: {result['model']}, N = {result['numel']:,} float32 "
          f"({result['megabytes']:.1f} MB), {result['ranks']} ranks, {result['cores']} cores, "
          f"{result['repeats']} repeats after {result['warmup']} warm-up; {result['mpi']}, "
          f"mpi4py {result['mpi4py']}, numpy {result['numpy']}")
    header = f"{'operation':<22}{'rank 0 median ms':>18}{'max-rank median ms':>20}" \
             f"{'rank 0 min ms':>15}{'MB/s (rank 0)':>15}"
    print(header)
    print("-" * len(header))
    for name, op in result["ops"].items():
        print(f"{name:<22}{op['rank0_median_ms']:>18.2f}{op['max_over_ranks_median_ms']:>20.2f}"
              f"{op['rank0_min_ms']:>15.2f}{op['rank0_MBps']:>15.0f}")
    print("aggregation parts (median ms): " + ", ".join(
        f"{k} {v:.2f}" for k, v in result["aggregation_parts_median_ms"].items() if v is not None))
    print("ratios of rank-0 medians: " + ", ".join(
        f"{k} = {v:.3f}" for k, v in result["ratios_rank0_median"].items() if v is not None))
    sys.stdout.flush()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # one failing rank must not leave the others in a collective
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
