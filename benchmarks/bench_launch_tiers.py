"""One small ``fedsilo train`` job launched by a real ``mpirun`` and on in-process ranks
(``tests/localjobs.py``), alternately, side by side: the seconds each takes, end to end.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_launch_tiers.py --repeats 3

Prints each launch's seconds, the medians, and their ratio.  The job is what the e2e tests
run: 3 synthetic sites on 4 ranks, ``small_cnn``, ``--set rounds=R``, one thread a rank.
The in-process launcher's first job also starts its job server (the imports, once per test
session); that start is printed apart and left out of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=4)
    args = parser.parse_args()

    from helpers import mpirun  # noqa: E402 - tests/ on the path above
    from localjobs import _start, local_mpirun

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        subprocess.run([sys.executable, "-m", "fedsilo", "prep", "synthetic", "--samples",
                        "1500", "--classes", "3", "--sites", str(args.ranks - 1), "--seed",
                        "0", "--out", str(shards)], check=True, capture_output=True)
        begin = time.monotonic()
        _start()
        job = local_mpirun(2, ["--help"], timeout=600)  # waits for the server's imports
        print(f"job server start: {time.monotonic() - begin:.1f} s (once per session; "
              f"status {job.returncode})")
        times: dict[str, list[float]] = {"mpirun": [], "in-process": []}
        for repeat in range(args.repeats):
            for name, launch in (("mpirun", mpirun), ("in-process", local_mpirun)):
                out = Path(tmp) / f"{name}-{repeat}"
                job = launch(args.ranks, ["train", "--set", f"data.dir={shards}",
                                          "--set", f"rounds={args.rounds}",
                                          "--set", "runtime.threads=1",
                                          "--set", "runtime.progress=off", "--out", str(out)],
                             timeout=600)
                if job.returncode != 0:
                    raise SystemExit(job.output[-3000:])
                times[name].append(job.seconds)
                print(f"{name:>10} {repeat}: {job.seconds:6.1f} s", flush=True)
        real, local = (statistics.median(times[k]) for k in ("mpirun", "in-process"))
        print(f"median: mpirun {real:.1f} s, in-process {local:.1f} s, "
              f"ratio {real / local:.2f}x ({args.ranks} ranks, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
