"""Round time and bytes across simulated nodes (network namespaces, Open MPI over TCP) on
links limited with ``tc ... tbf``, per secure mode and model, and the time from a cut wire to
hung.json (issue #29).

    sudo .venv/bin/python benchmarks/bench_multinode.py --shards DIR \
        [--rates 10gbit 1gbit 100mbit] [--modes none masks ckks] [--models small_cnn resnet18] \
        [--nodes 2 4] [--rounds 4] [--no-cut]

Needs root (tests/multinode/netbed.py makes the namespaces).  DIR must hold as many sites as
the largest node count has participant ranks (one rank per node beyond the coordinator's).
Prints one JSON line per measurement: the median ``round`` seconds the coordinator recorded
(rounds 2..R) and the bytes one round moved (``bytes`` of the metrics row), per rate, node
count, model and secure mode; then the seconds from the cut to hung.json against
hang_timeout_s.  A job that fails prints its status and the tail of its stderr.
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


def layout(nodes: int) -> list[int]:
    """Ranks per node: the coordinator and one participant on node 0, one participant on
    each other node (what a cluster job with one rank per node and the coordinator beside
    the first participant looks like)."""
    return [2] + [1] * (nodes - 1)


def train(bed: NetBed, shards: Path, out: Path, *extra: str,
          ranks: list[int] | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "fedsilo", "train", "--set", f"data.dir={shards}",
            "--set", "train.max_steps=2", "--set", "runtime.progress=off",
            "--set", "runtime.device=cpu", "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out.parent.mkdir(parents=True, exist_ok=True)
    err = open(out.parent / f"{out.name}.stderr", "w")
    return subprocess.Popen(bed.mpirun(ranks or [2, 2], argv, mpirun=MPIRUN,
                                       keepalive=(20, 5, 3)),
                            env=env, stdout=subprocess.DEVNULL, stderr=err)


def burst_for(rate: str) -> str:
    """A token bucket at least rate/HZ deep (the tbf rule; HZ = 100 at most here): a
    shallower one throttles far below the nominal rate."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if rate.endswith(unit):
            bits = float(rate[: -len(unit)]) * scale
            return f"{max(4, int(bits / 100 / 8 / 1024))}kb"  # tc: kb = kilobytes
    raise SystemExit(f"bench_multinode.py: rate {rate!r} is not N kbit|mbit|gbit")


def keys_for(mode: str, work: Path, sites: int) -> list[str]:
    """The settings (and key files) a secure mode needs."""
    if mode == "none":
        return []
    out = work / f"keys-{mode}-{sites}"
    if not out.exists():
        argv = ["keys", "--out", str(out)] if mode == "ckks" else \
            ["keys", "--identity", "--sites", str(sites), "--out", str(out)]
        subprocess.run([sys.executable, "-m", "fedsilo", *argv], check=True,
                       capture_output=True)
    if mode == "ckks":
        return ["--set", "aggregation.secure=ckks", "--set", f"he.keys={out}"]
    return ["--set", "aggregation.secure=masks", "--set", f"aggregation.keys={out}"]


def round_bytes(run: Path) -> int:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return sum(rows[-1].get("bytes", {}).values())


def round_seconds(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(row["seconds"]["round"] for row in rows[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--rates", nargs="+", default=["10gbit", "1gbit", "100mbit"])
    parser.add_argument("--modes", nargs="+", default=["none", "masks", "ckks"])
    parser.add_argument("--models", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--nodes", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--hang-timeout", type=float, default=5.0)
    parser.add_argument("--no-cut", action="store_true", help="skip the cut-wire timing")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        raise SystemExit(f"bench_multinode.py: {reason}")
    sites = json.loads((args.shards / "manifest.json").read_text())["num_sites"] \
        if (args.shards / "manifest.json").exists() else None
    work = Path(tempfile.mkdtemp(prefix="bench-multinode-"))
    for nodes in args.nodes:
        for model in args.models:
            for rate in args.rates:
                for secure in args.modes:
                    with NetBed(nodes) as bed:
                        bed.limit(rate, burst=burst_for(rate))
                        out = work / f"{nodes}n-{model}-{rate}-{secure}"
                        extra = keys_for(secure, work, sites or nodes)
                        process = train(bed, args.shards, out, "--set", f"rounds={args.rounds}",
                                        "--set", f"model.name={model}", *extra,
                                        ranks=layout(nodes))
                        status = process.wait(timeout=900)
                        record = {"nodes": nodes, "model": model, "rate": rate,
                                  "secure": secure, "status": status}
                        if status == 0:
                            record.update(round_s_median=round(round_seconds(out), 3),
                                          round_bytes=round_bytes(out))
                        else:
                            stderr = out.parent / f"{out.name}.stderr"
                            record["stderr_tail"] = stderr.read_text()[-600:]
                        print(json.dumps(record), flush=True)
    if args.no_cut:
        return 0
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
