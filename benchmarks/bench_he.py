"""Costs of encrypted aggregation (CKKS): bytes, encryption speed, correctness, the
aggregation step plaintext vs encrypted, and the coordinator's peak memory.

Single process (no MPI)::

    python benchmarks/bench_he.py codec --json codec.json

  bytes per parameter of a fresh ciphertext (uplink) and of a sum (what the coordinator forwards),
  encryption throughput per core (1 thread, and all of the process's cores), and the
  relative error of the encrypted sum against the float64 exact sum for 2..16 participants.

Under MPI (rank 0 coordinator, ranks 1..P participants)::

    mpirun -n P+1 python benchmarks/bench_he.py aggregate --model resnet18 --json out.json

  the round's aggregation step for a model-sized update, both ways in the same run:
  plaintext ``World.reduce_sum`` against encrypt + add at the coordinator + send the
  encrypted total to participant 1 + decrypt + relay (per phase), and the coordinator's
  RSS growth during the aggregation (VmHWM reset before it; it holds at most two
  ciphertexts at once, so it must not grow with P).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
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
    cores = available_cores()
    # one process, fedsilo's worker processes (he.workers), and the codec before #16's
    # rewrite (TenSEAL CKKSVector), interleaved repeat by repeat; medians
    variants = {"threads_1": (1, 1)}
    variants.update({f"workers_{w}": (1, w) for w in sorted({2, cores}) if w > 1})
    codecs = {name: CODECS.get("ckks")(keys=load_keys(keys_dir / PARTICIPANT_FILE,
                                                      expect="participant", num_threads=t),
                                       workers=w) for name, (t, w) in variants.items()}
    import tenseal as ts

    @contextlib.contextmanager
    def quiet_stdout():  # TenSEAL prints a warning on fd 1 for multi-ciphertext vectors
        sys.stdout.flush()
        saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)

    def tenseal_vector(codec) -> list:
        """The codec before #16's rewrite: TenSEAL ``CKKSVector``s, one real value per slot
        (pieces of 64 ciphertexts of N/2 values), serialized by TenSEAL (unseeded)."""
        step = 64 * codec.per_ciphertext // 2
        with quiet_stdout():
            return [ts.ckks_vector(codec.context, x[a:a + step]) for a in range(0, n, step)]

    encrypters = {name: codec.encrypt for name, codec in codecs.items()}
    encrypters["tenseal_vector_1"] = lambda _x: tenseal_vector(codecs["threads_1"])
    owner = {**{name: name for name in codecs}, "tenseal_vector_1": "threads_1"}
    variants["tenseal_vector_1"] = (1, 1)
    for name, encrypt in encrypters.items():
        encrypt(x)  # warm-up (and the worker processes started)
    times: dict[str, list[float]] = {name: [] for name in encrypters}
    encrypt_only: dict[str, list[float]] = {name: [] for name in encrypters}
    sizes: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, encrypt in encrypters.items():
            begin = time.perf_counter()
            ct = encrypt(x)
            middle = time.perf_counter()
            if name == "tenseal_vector_1":
                data = b"".join(v.serialize() for v in ct)
            else:
                data = codecs[owner[name]].to_bytes(ct)
            sizes[name] = len(data)
            times[name].append(time.perf_counter() - begin)
            encrypt_only[name].append(middle - begin)
    for name in encrypters:
        t, w = variants[name]
        enc = statistics.median(times[name])
        only = statistics.median(encrypt_only[name])
        out[name] = {"threads": t, "workers": w, "encrypt_and_serialize_s": enc,
                     "params_per_s": n / enc, "params_per_s_per_core": n / enc / max(t, w),
                     "encrypt_only_params_per_s_per_core": n / only / max(t, w),
                     "uplink_bytes_per_param": sizes[name] / n,
                     "speedup_vs_1": statistics.median(times["threads_1"]) / enc}
        # (workers serialize in the worker: their "encrypt only" includes serialization)
        print(f"{name:12} {n / enc / 1e6:6.2f} M params/s "
              f"({n / enc / max(t, w) / 1e6:.2f} M/s per core; encryption alone "
              f"{n / only / max(t, w) / 1e6:.2f} M/s per core; "
              f"{out[name]['speedup_vs_1']:.2f}x one process)", flush=True)
    codec = codecs["threads_1"]
    data = codec.to_bytes(codec.encrypt(x))
    for other in codecs.values():
        if other is not codec:
            other.close()
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


def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def aggregate_bench(args: argparse.Namespace) -> dict | None:
    """The protocol of ``transport.CKKSThroughCoordinator`` (issue #13): participants send
    their ciphertexts to the key-less coordinator, which adds them as they arrive, sends the
    encrypted total to participant 1 (AGGREGATOR) to decrypt, and gets the float sum back."""
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
        # only the public context, as in coordinator.py: it can add ciphertexts, not decrypt them
        keys = load_keys(keys_dir / COORDINATOR_FILE, expect="coordinator")
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
        if not world.is_coordinator:
            payload = codec.to_bytes(codec.encrypt(buffer))
        phases["encrypt"] = time.perf_counter() - begin
        world.quiet_barrier()  # the round has a barrier between local work and the sum
        # coordinator memory during the aggregation: RSS before, peak (VmHWM reset) during
        rss_before_kb = _status_kb("VmRSS")
        kinds_before = {k: _status_kb(k) for k in ("RssAnon", "RssShmem", "RssFile")}
        hwm_reset = _reset_peak_rss()
        t = time.perf_counter()
        total = world.add_at_coordinator(payload, codec=codec)
        phases["add"] = time.perf_counter() - t
        t = time.perf_counter()
        if world.is_coordinator:
            data = codec.to_bytes(total)
            del total
            phases["total_bytes"] = len(data)
            world.send_to_aggregator(data)
            del data
        else:
            data = world.receive_total()
            payload = None
            if data is not None:  # the aggregator: the only participant that decrypts
                codec.decrypt_into(codec.from_bytes(data), buffer)
                del data
        phases["send_decrypt"] = time.perf_counter() - t
        t = time.perf_counter()
        world.relay_to_coordinator(buffer, None)
        phases["relay"] = time.perf_counter() - t
        encrypted = time.perf_counter() - begin
        peak_kb = _status_kb("VmHWM") if hwm_reset else None
        phases["rss_peak_mb"] = None if peak_kb is None else peak_kb / 1024
        phases["rss_growth_mb"] = None if peak_kb is None else (peak_kb - rss_before_kb) / 1024
        phases["rss_before_mb"] = rss_before_kb / 1024
        # after the step: heap (RssAnon) vs MPI's shared-memory segments (RssShmem)
        phases["rss_kind_growth_mb"] = {k: (_status_kb(k) - v) / 1024
                                        for k, v in kinds_before.items()}
        all_phases = world.allgather_obj(phases)
        world.allgather_obj(len(payload) if payload else 0)
        coord = all_phases[0]
        rows.append({"plain_s": plain, "encrypted_s": encrypted,
                     "encrypt_s_max": max(p["encrypt"] for p in all_phases[1:]),
                     "add_at_coordinator_s": coord["add"],
                     "to_aggregator_and_decrypt_s": all_phases[AGGREGATOR]["send_decrypt"],
                     "relay_s": coord["relay"],
                     "total_ciphertext_bytes_per_param": coord["total_bytes"] / n,
                     "coordinator_rss_before_mb": coord["rss_before_mb"],
                     "coordinator_rss_growth_mb": coord["rss_growth_mb"],
                     "coordinator_rss_peak_during_aggregation_mb": coord["rss_peak_mb"],
                     "coordinator_rss_kind_growth_after_mb": coord["rss_kind_growth_mb"],
                     "aggregator_rss_growth_mb": all_phases[AGGREGATOR]["rss_growth_mb"]})
    rss = world.allgather_obj(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    if not world.is_coordinator:
        return None
    median = {k: float(np.median([r[k] for r in rows])) for k in rows[0]
              if all(isinstance(r[k], (int, float)) for r in rows)}
    return {"model": args.model, "numel": n, "participants": world.num_participants,
            "protocol": "add_at_coordinator (issue #13)",
            "threads_per_rank": threads, "repeats": args.repeats, "median": median,
            "rows": rows,
            "ratio_encrypted_to_plain_aggregation": median["encrypted_s"] / median["plain_s"],
            "coordinator_peak_rss_mb": rss[0] / 1024,
            "coordinator_rss_before_rounds_mb": rss_start / 1024,
            # freed heap stays mapped between repeats, so later repeats grow little: the
            # figure is the highest peak during any aggregation minus the RSS just before
            # the first one (model buffers, keys and imports already in place)
            "coordinator_rss_before_first_aggregation_mb": rows[0]["coordinator_rss_before_mb"],
            "coordinator_rss_growth_during_aggregation_mb":
                max((r["coordinator_rss_peak_during_aggregation_mb"] or 0) for r in rows)
                - rows[0]["coordinator_rss_before_mb"],
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
