"""Per-participant cost of pairwise masking (issue #13), as the number of sites P grows.

For one site (the middle one), times ``quantize`` (float32 -> fixed point uint64) and
``add_masks`` with its neighbours in the dense mask graph (P-1 peers) and in the sparse
SecAgg+ graph (``masks.sparse_degree(P)`` requested; the peers actually used are what
``mask_graph`` gives).  Pure functions, no MPI; pair keys from fresh X25519 keys.  Also
times the pair-key derivation (X25519 + HKDF, once per launch, not per round).

    .venv/bin/python benchmarks/bench_masks.py --json benchmarks/results/masks-cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedsilo.crypto import masks

SIZES = {"small_cnn": 420_739, "resnet18": 11_172_292}


def bench(numel: int, sites: list[int], repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    update = (rng.standard_normal(numel) * 1e-3).astype(np.float32)
    ring = np.empty(numel, dtype=np.uint64)
    masks.quantize(update, frac_bits=masks.FRAC_BITS, out=ring)  # warm-up (page faults)
    rows = []
    for p in sites:
        own = {s: X25519PrivateKey.generate() for s in range(p)}
        site = p // 2
        for graph_name, degree in (("dense", None), ("sparse", masks.sparse_degree(p))):
            graph = masks.mask_graph(range(p), degree=degree, seed=b"bench-graph-seed")
            t = time.perf_counter()
            keys = masks.derive_pair_keys(own[site], site=site, neighbours=graph[site],
                                          public_keys={s: k.public_key() for s, k in own.items()})
            key_s = time.perf_counter() - t
            q_times, m_times = [], []
            for r in range(repeats):
                t = time.perf_counter()
                masks.quantize(update, frac_bits=masks.FRAC_BITS, out=ring)
                t2 = time.perf_counter()
                masks.add_masks(ring, site=site, pair_keys=keys, round_index=r + 1,
                                nonce=b"8bytes!!")
                t3 = time.perf_counter()
                q_times.append(t2 - t)
                m_times.append(t3 - t2)
            q, m = statistics.median(q_times), statistics.median(m_times)
            rows.append({"numel": numel, "P": p, "graph": graph_name,
                         "degree_requested": degree, "peers": len(graph[site]),
                         "quantize_s": q, "add_masks_s": m, "total_s": q + m,
                         "mask_s_per_peer": m / max(1, len(graph[site])),
                         "mask_values_per_s": numel * len(graph[site]) / m,
                         "pair_keys_s": key_s, "repeats": repeats,
                         "quantize_s_all": q_times, "add_masks_s_all": m_times})
            print(f"{numel:>10} P={p:<3} {graph_name:<6} peers={len(graph[site]):<3} "
                  f"quantize {q:.4f} s  add_masks {m:.4f} s  total {q + m:.4f} s  "
                  f"keys {key_s * 1e3:.2f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="2,4,8,16")
    parser.add_argument("--repeats-small", type=int, default=7)
    parser.add_argument("--repeats-large", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    sites = [int(s) for s in args.sites.split(",")]
    out = {"frac_bits": masks.FRAC_BITS, "chunk_values": masks.CHUNK_VALUES,
           "note": "one site, single thread, medians over repeats",
           "rows": bench(SIZES["small_cnn"], sites, args.repeats_small)
           + bench(SIZES["resnet18"], sites, args.repeats_large)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
