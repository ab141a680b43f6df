"""Costs of encrypted aggregation (CKKS): bytes, encryption speed, correctness, the
aggregation step plaintext vs encrypted, and the coordinator's peak memory.

Single process (no MPI)::

    python benchmarks/bench_he.py codec --json codec.json

  bytes per parameter of a fresh ciphertext (uplink) and of a sum (what the tree forwards),
  encryption throughput per core (1 thread, and all of the process's cores), and the
  relative error of the encrypted sum against the float64 exact sum for 2..16 participants.

Under MPI (rank 0 coordinator, ranks 1..P participants)::

    mpirun -n P+1 python benchmarks/bench_he.py aggregate --model resnet18 --json out.json

  the round's aggregation step for a model-sized update, both ways in the same run:
  plaintext ``World.reduce_sum`` against encrypt + tree + decrypt + relay (per phase), and
  the coordinator's peak RSS (it never holds a ciphertext, so it must not grow with P).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NUMEL = {"small_cnn": 420_739, "resnet18": 11_172_292}


def codec_bench(args: argparse.Namespace) -> dict:
    from fedsilo.crypto import CODECS
    from fedsilo.crypto.ckks import PARTICIPANT_FILE, generate_keys, load_keys
    from fedsilo.crypto.params import CKKSParams
    from fedsilo.runtime import available_cores

    keys_dir = Path(tempfile.mkdtemp()) / "keys"
    generate_keys(keys_dir, CKKSParams(), num_participants=16)
    rng = np.random.default_rng(0)
    out: dict = {"params": CKKSParams().to_dict(), "cores": available_cores()}
    n = args.numel
    x = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    for threads in sorted({1, available_cores()}):
        codec = CODECS.get("ckks")(keys=load_keys(keys_dir / PARTICIPANT_FILE,
                                                  expect="participant", num_threads=threads))
        codec.encrypt(x[:8192])  # warm-up
        times = []
        for _ in range(args.repeats):
            begin = time.perf_counter()
            ct = codec.encrypt(x)
            times.append(time.perf_counter() - begin)
        enc = min(times)
        begin = time.perf_counter()
        data = codec.to_bytes(ct)
        ser = time.perf_counter() - begin
        out[f"threads_{threads}"] = {"encrypt_s": enc, "serialize_s": ser,
                                     "params_per_s": n / enc,
                                     "params_per_s_per_core": n / enc / threads,
                                     "params_per_s_incl_serialize": n / (enc + ser)}
    total = codec.from_bytes(data)
    codec.add_into(total, codec.from_bytes(data))
    begin = time.perf_counter()
    codec.decrypt_into(total, np.empty(n, dtype=np.float64))
    out["decrypt_params_per_s"] = n / (time.perf_counter() - begin)
    out["uplink_bytes_per_param"] = len(data) / n
    out["sum_bytes_per_param"] = len(codec.to_bytes(total)) / n
    out["plaintext_bytes_per_param"] = 4
    # correctness: sums of P encrypted pre-weighted updates vs the exact float64 sum
    size = 200_000
    errors = {}
    for p in (2, 4, 8, 16):
        updates = [(rng.standard_normal(size) * 1e-2 / p).astype(np.float32) for _ in range(p)]
        total = codec.from_bytes(codec.to_bytes(codec.encrypt(updates[0])))
        for u in updates[1:]:
            codec.add_into(total, codec.from_bytes(codec.to_bytes(codec.encrypt(u))))
        dec = codec.decrypt_into(total, np.empty(size, dtype=np.float64))
        exact = np.sum(np.asarray(updates, dtype=np.float64), axis=0)
        errors[p] = {"relative_l2": float(np.linalg.norm(dec - exact) / np.linalg.norm(exact)),
                     "max_abs": float(np.abs(dec - exact).max()),
                     "bound": CKKSParams().error_bound(p)}
    out["correctness"] = errors
    return out


def aggregate_bench(args: argparse.Namespace) -> dict | None:
    from fedsilo.comm import AGGREGATOR, World
    from fedsilo.crypto import CODECS
    from fedsilo.crypto.ckks import COORDINATOR_FILE, PARTICIPANT_FILE, generate_keys, load_keys
    from fedsilo.crypto.params import CKKSParams
    from fedsilo.runtime import available_cores

    world = World()
    threads = max(1, available_cores() // world.size)
    if world.is_coordinator:
        keys_dir = Path(tempfile.mkdtemp()) / "keys"
        generate_keys(keys_dir, CKKSParams(), num_participants=16)
        world.bcast_obj(str(keys_dir))
        keys = load_keys(keys_dir / COORDINATOR_FILE, expect="coordinator")
        codec = None
    else:
        keys_dir = Path(world.bcast_obj(None))
        keys = load_keys(keys_dir / PARTICIPANT_FILE, expect="participant", num_threads=threads)
        codec = CODECS.get("ckks")(keys=keys)
    n = NUMEL.get(args.model, args.numel)
    buffer = np.zeros(n, dtype=np.float32)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = []
    for repeat in range(args.repeats):
        if not world.is_coordinator:
            buffer[:] = np.random.default_rng(repeat * 100 + world.rank).standard_normal(n) * 1e-3
        else:
            buffer.fill(0)
        world.quiet_barrier()
        begin = time.perf_counter()
        world.reduce_sum(buffer)
        plain = time.perf_counter() - begin
        world.quiet_barrier()
        phases = {}
        begin = time.perf_counter()
        payload = None
        if codec is not None:
            payload = codec.to_bytes(codec.encrypt(buffer))
        phases["encrypt"] = time.perf_counter() - begin
        world.quiet_barrier()  # the round has a barrier between local work and the sum
        t = time.perf_counter()
        total = world.reduce_participants(payload, codec=codec)
        phases["reduce"] = time.perf_counter() - t
        t = time.perf_counter()
        if total is not None:
            codec.decrypt_into(total, buffer)
            del total
        phases["decrypt"] = time.perf_counter() - t
        t = time.perf_counter()
        world.relay_to_coordinator(buffer, None)
        phases["relay"] = time.perf_counter() - t
        encrypted = time.perf_counter() - begin
        all_phases = world.allgather_obj(phases)
        sizes = world.allgather_obj(len(payload) if payload else 0)
        rows.append({"plain_s": plain, "encrypted_s": encrypted,
                     "encrypt_s_max": max(p["encrypt"] for p in all_phases),
                     "reduce_s_aggregator": all_phases[AGGREGATOR]["reduce"],
                     "decrypt_s": all_phases[AGGREGATOR]["decrypt"],
                     "relay_s": all_phases[0]["relay"],
                     "uplink_bytes_per_param": max(sizes) / n})
        del payload
    rss = world.allgather_obj(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    if not world.is_coordinator:
        return None
    median = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
    return {"model": args.model, "numel": n, "participants": world.num_participants,
            "threads_per_rank": threads, "repeats": args.repeats, "median": median,
            "ratio_encrypted_to_plain_aggregation": median["encrypted_s"] / median["plain_s"],
            "coordinator_peak_rss_mb": rss[0] / 1024,
            "coordinator_rss_before_rounds_mb": rss_start / 1024,
            "participant_peak_rss_mb": [r / 1024 for r in rss[1:]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["codec", "aggregate"])
    parser.add_argument("--model", default="small_cnn", help="small_cnn, resnet18 or custom")
    parser.add_argument("--numel", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = codec_bench(args) if args.mode == "codec" else aggregate_bench(args)
    if result is not None:
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
