"""What reading a configuration costs a rank: ``import fedsilo.config`` and ``load_config``
of a DP, ``tv:``-model, FedProx configuration, each in a fresh interpreter (as every rank
starts), for one or more source trees side by side (issue #25: the pydantic schema).

    python benchmarks/bench_config.py --src /work/main/src --src src --repeats 9

prints, per source tree, the median seconds of the import and of the load (the runs of the
trees alternate, so both see the same load on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, time
start = time.perf_counter()
import fedsilo.config
imported = time.perf_counter()
fedsilo.config.load_config(None, overrides=["dp.enabled=true", "model.name=tv:resnet50",
                                            "strategy.name=fedprox", "strategy.mu=1e-3"])
print(json.dumps([imported - start, time.perf_counter() - imported]))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", action="append", required=True, help="a source tree (src/)")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    times: dict[str, list[list[float]]] = {src: [] for src in args.src}
    for _ in range(args.repeats):
        for src in args.src:
            env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
            out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True,
                                 capture_output=True, text=True).stdout
            times[src].append(json.loads(out.splitlines()[-1]))
    for src, runs in times.items():
        print(f"{src}: import {statistics.median(r[0] for r in runs):.3f} s, "
              f"load {statistics.median(r[1] for r in runs):.3f} s "
              f"(medians of {len(runs)} fresh interpreters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
