"""How a round's cost grows with the number of sites: 8 to 64 sites, plain, DP, CKKS, masks.

    .venv/bin/python benchmarks/scaling_sites.py --sites 8 16 32 64 --ranks 4 \
        --modes plain dp ckks masks --out runs/scaling-sites

Every job runs 1 coordinator + ``--ranks`` participant ranks; with more sites than ranks,
each rank trains several sites in turn (``S / ranks`` each), as a hospital network with a
few nodes and many departments would.  Synthetic 1×28×28 images, 2 classes, 40 training
images per site, the ``small_cnn`` (420,610 parameters), local work capped at 2 steps of
batch 16 so that the figure is the cost of federating many sites, not training; test
evaluation only at the end; 3 rounds, medians over rounds 2-3.

Per (sites, mode) it prints and records:

- **round s**: the median round;
- **coordinator MB**: rank 0's peak resident memory (``ru_maxrss`` of the process), and the
  largest participant rank's;
- **MB moved**: bytes of one round as the coordinator records them (broadcast + reduce;
  with CKKS the ciphertexts);
- the phases that grow: aggregate (the transport), coordination (plans, reports, outcome),
  and for masks and CKKS their own figures.

The rank processes run under a small wrapper (``_rss_wrapper``) that records each rank's
peak RSS at exit; nothing in fedsilo is changed for the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WRAPPER = """
import atexit, os, resource, sys
out = os.environ["FEDSILO_RSS_DIR"]
rank = os.environ.get("OMPI_COMM_WORLD_RANK", "0")
def record():
    with open(os.path.join(out, f"rss-{rank}.txt"), "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
atexit.register(record)
from fedsilo.cli import main
sys.exit(main(sys.argv[1:]))
"""

MODES = {
    "plain": [],
    "dp": ["--set", "dp.enabled=true", "--set", "dp.noise_multiplier=1.0",
           "--set", "dp.target_epsilon=null"],
    "ckks": ["--set", "he.enabled=true"],
    "masks": ["--set", "aggregation.secure=masks"],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--ranks", type=int, default=4, help="participant ranks")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/scaling-sites")
    return parser


def fedsilo(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "fedsilo", *argv], check=True,
                   stdout=subprocess.DEVNULL)


def run(sites: int, mode: str, args: argparse.Namespace) -> dict:
    base = args.out / f"s{sites}"
    shards = base / "shards"
    if not (shards / "manifest.json").is_file():
        fedsilo("prep", "synthetic", "--samples", str(sites * 60), "--classes", "2",
                "--sites", str(sites), "--partition", "iid", "--seed", "0", "--out", str(shards))
    extra = list(MODES[mode])
    if mode == "ckks":
        keys = args.out / "ckks-keys"
        if not keys.exists():
            fedsilo("keys", "--out", str(keys))
        extra += ["--set", f"he.keys={keys}"]
    if mode == "masks":
        keys = base / "identities"
        if not keys.exists():
            fedsilo("keys", "--identity", "--sites", str(sites), "--out", str(keys))
        extra += ["--set", f"aggregation.keys={keys}"]
    run_dir = base / f"run-{mode}"
    rss = base / f"rss-{mode}"
    for path in (run_dir, rss):
        subprocess.run(["rm", "-rf", str(path)], check=True)
    rss.mkdir(parents=True)
    ranks = 1 + min(args.ranks, sites)
    command = [str(Path(sys.executable).parent / "mpirun"), "-n", str(ranks), "--oversubscribe",
               "--bind-to", "none"]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
    command += [sys.executable, "-c", WRAPPER, "train", "--set", f"data.dir={shards}",
                "--set", "model.name=small_cnn", "--set", f"rounds={args.rounds}",
                "--set", "train.max_steps=2", "--set", "train.batch_size=16",
                "--set", "eval.every=1000", "--set", "runtime.threads=1",
                "--set", "runtime.progress=off", *extra, "--out", str(run_dir)]
    env = dict(os.environ, FEDSILO_RSS_DIR=str(rss), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL,
                          stderr=(base / f"{mode}.log").open("w"))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"sites": sites, "mode": mode, "error": f"exit {done.returncode}, see "
                f"{base / f'{mode}.log'}"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()][1:]
    seconds = [row["seconds"] for row in rows]
    med = {key: statistics.median(s.get(key, 0.0) for s in seconds)
           for key in ("round", "aggregate", "coordination", "broadcast", "local_compute_max")}
    moved = statistics.median(sum(row["bytes"].values()) for row in rows)
    rss_kb = {int(p.stem.split("-")[1]): int(p.read_text()) for p in rss.glob("rss-*.txt")}
    return {"sites": sites, "mode": mode, "ranks": ranks, "job_s": wall,
            **{f"{k}_s": v for k, v in med.items()},
            "mb_moved": moved / 1e6,
            "coordinator_mb": rss_kb.get(0, 0) / 1024,
            "participant_mb": max((v for k, v in rss_kb.items() if k), default=0) / 1024}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    header = (f"{'sites':>5} {'mode':>6} {'round s':>8} {'aggr ms':>8} {'coord ms':>9} "
              f"{'MB moved':>9} {'coord MB':>9} {'part MB':>8}")
    print(header, flush=True)
    for sites in args.sites:
        for mode in args.modes:
            r = run(sites, mode, args)
            results.append(r)
            if "error" in r:
                print(f"{sites:>5} {mode:>6} {r['error']}", flush=True)
                continue
            print(f"{sites:>5} {mode:>6} {r['round_s']:8.3f} {r['aggregate_s'] * 1e3:8.1f} "
                  f"{r['coordination_s'] * 1e3:9.1f} {r['mb_moved']:9.1f} "
                  f"{r['coordinator_mb']:9.0f} {r['participant_mb']:8.0f}", flush=True)
    (args.out / "scaling_sites.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
