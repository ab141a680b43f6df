"""Compare a plaintext and an encrypted run (metrics.jsonl): accuracy and per-phase seconds.

    python benchmarks/compare_he.py RUN_PLAIN RUN_HE

Medians skip round 1 (warm-up) when there are more than two rounds.
"""

import json
import statistics
import sys


def rows(path):
    return [json.loads(line) for line in open(f"{path}/metrics.jsonl")]


def main(plain_dir, he_dir):
    a, b = rows(plain_dir), rows(he_dir)
    print(f"final test acc: plain {a[-1]['acc']:.4f}  encrypted {b[-1]['acc']:.4f}  "
          f"difference {100 * (b[-1]['acc'] - a[-1]['acc']):+.2f} points")
    print("acc per round, plain:    ", [round(r["acc"], 4) for r in a])
    print("acc per round, encrypted:", [round(r["acc"], 4) for r in b])
    skip = 1 if len(a) > 2 else 0
    med = lambda rs, f: statistics.median(f(r) for r in rs[skip:])  # noqa: E731
    print(f"{'phase (median s)':22s} {'plain':>9s} {'encrypted':>10s}")
    for key in ["round", "local", "local_train_max", "aggregate", "broadcast", "evaluate"]:
        print(f"{key:22s} {med(a, lambda r: r['seconds'][key]):9.3f} "
              f"{med(b, lambda r: r['seconds'][key]):10.3f}")
    for key in ["encrypt_s", "reduce_s", "decrypt_s", "ciphertext_bytes_per_param"]:
        print(f"he.{key:19s} {'':9s} {med(b, lambda r: r['he'][key]):10.3f}")
    ratio = med(b, lambda r: r["seconds"]["round"]) / med(a, lambda r: r["seconds"]["round"])
    print(f"round time encrypted / plain: {ratio:.2f}")
    print("bytes of the last round: plain", a[-1]["bytes"], " encrypted", b[-1]["bytes"],
          " ciphertext per site", b[-1]["he"]["ciphertext_bytes"],
          " coordinator receives", b[-1]["he"]["coordinator_receives_bytes"])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
