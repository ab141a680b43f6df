"""Round time across two simulated nodes (network namespaces, Open MPI over TCP) on links
limited with ``tc ... tbf``, and the time from a cut wire to hung.json (issue #29).

    sudo .venv/bin/python benchmarks/bench_multinode.py --shards DIR [--rates 1gbit 100mbit]

Needs root (tests/multinode/netbed.py makes the namespaces).  Prints one JSON line per
measurement: the median ``round`` seconds the coordinator recorded (rounds 2..R), per rate
and secure mode, then the seconds from the cut to hung.json against hang_timeout_s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "multinode"))

from netbed import NetBed, unavailable  # noqa: E402

MPIRUN = str(Path(sys.executable).parent / "mpirun")


def train(bed: NetBed, shards: Path, out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "fedsilo", "train", "--set", f"data.dir={shards}",
            "--set", "train.max_steps=2", "--set", "runtime.progress=off",
            "--set", "runtime.device=cpu", "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(bed.mpirun([2, 2], argv, mpirun=MPIRUN, keepalive=(20, 5, 3)),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def round_seconds(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(row["seconds"]["round"] for row in rows[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--rates", nargs="+", default=["1gbit", "100mbit"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--hang-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        raise SystemExit(f"bench_multinode.py: {reason}")
    work = Path(tempfile.mkdtemp(prefix="bench-multinode-"))
    for rate in args.rates:
        for secure in ("none", "masks"):
            with NetBed(2) as bed:
                bed.limit(rate)
                out = work / f"{rate}-{secure}"
                process = train(bed, args.shards, out, "--set", f"rounds={args.rounds}",
                                "--set", f"aggregation.secure={secure}")
                process.wait(timeout=600)
                print(json.dumps({"rate": rate, "secure": secure, "status": process.returncode,
                                  "round_s_median": round_seconds(out)}), flush=True)
    with NetBed(2) as bed:
        out = work / "cut"
        process = train(bed, args.shards, out, "--set", "rounds=50",
                        "--set", f"runtime.hang_timeout_s={args.hang_timeout}")
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.05)
        bed.cut(1)
        cut = time.monotonic()
        while not (out / "hung.json").exists() and time.monotonic() - cut < 120:
            time.sleep(0.05)
        to_marker = time.monotonic() - cut
        while bed.processes(0, containing="fedsilo train") and time.monotonic() - cut < 120:
            time.sleep(0.05)
        to_end = time.monotonic() - cut
        try:
            process.wait(timeout=60)
            launcher = time.monotonic() - cut
        except subprocess.TimeoutExpired:
            process.kill()
            launcher = None
        print(json.dumps({"hang_timeout_s": args.hang_timeout, "cut_to_hung_json_s": to_marker,
                          "cut_to_reachable_ranks_ended_s": to_end,
                          "cut_to_launcher_exit_s": launcher}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
