"""fedsilo and Flower's simulation runtime on the same task, interleaved run by run.

    .venv/bin/python benchmarks/flower_side_by_side.py --repeats 3 \
        [--flower-python /path/to/venv-with-flwr/bin/python]

The task is issue #16's: PneumoniaMNIST, 3 Dirichlet-0.5 sites (``fedsilo prep medmnist
--source ../shared/data/pneumoniamnist.npz --sites 3 --partition dirichlet:0.5 --seed 0``),
the 420,610-parameter ``small_cnn``, 1 local epoch, batch 64, SGD 0.05/0.9, 10 rounds, the
global model evaluated on the test split after every round and on every site's validation
split. Flower's side is ``flower_task.py`` (run only when an interpreter with ``flwr`` is
given or this one has it; Flower pulls in Ray, so it lives in its own venv here).

For every run it measures, and prints the medians over the repeats of:

- **job**: wall time of the whole command (``mpirun ... fedsilo train`` or
  ``python flower_task.py``), as a user waits for it;
- **overhead per round**: the median over rounds of (round − the work done in it), the work
  being the slowest site's training + validation and the central test evaluation;
- **start-up (+ teardown)**: job minus the work of every round minus rounds × the median
  overhead, i.e. everything the user waits for that is neither work nor a steady-state
  round's overhead.  A first round slower than the rest (Flower starts its Ray actors
  lazily, in round 1) is start-up by this definition, for both frameworks.

Runs alternate (fedsilo, Flower, fedsilo, ...) so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedsilo.launch import mpirun_command, rank_environment  # noqa: E402

TRAIN = ["--set", "model.name=small_cnn", "--set", "train.epochs=1",
         "--set", "train.batch_size=64", "--set", "train.lr=0.05", "--set", "train.momentum=0.9",
         "--set", "train.weight_decay=0", "--set", "eval.every=1"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--shards", type=Path, default=ROOT / "runs/flower-vs/shards")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/flower-vs")
    parser.add_argument("--flower-python", default=None,
                        help="an interpreter with flwr[simulation] installed (and fedsilo "
                             "importable); default: this one, if it has flwr")
    return parser


def prepare(shards: Path) -> None:
    if (shards / "manifest.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "fedsilo", "prep", "medmnist", "--source",
                    str(ROOT.parent / "shared/data/pneumoniamnist.npz"), "--sites", "3",
                    "--partition", "dirichlet:0.5", "--seed", "0", "--out", str(shards)],
                   check=True, stdout=subprocess.DEVNULL)


def run_fedsilo(shards: Path, rounds: int, out: Path) -> dict:
    config = str(ROOT / "jobs/configs/pneumoniamnist.yaml")
    command = mpirun_command(4, ["train", "--config", config,
                                 "--set", f"data.dir={shards}", "--set", f"rounds={rounds}",
                                 *TRAIN, "--out", str(out)])
    start = time.perf_counter()
    subprocess.run(command, env=rank_environment(4), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    rounds_s = [row["seconds"]["round"] for row in rows]
    # an evaluation overlapped with the next round's training (runtime.overlap_eval) is not
    # on the round's critical path: the round's work is then its local work alone
    work = [row["seconds"].get("local_compute_max", 0.0)
            + (0.0 if "evaluate" in row.get("overlapped", ()) else
               row["seconds"].get("evaluate", 0.0)) for row in rows]
    summary = json.loads((out / "summary.json").read_text())
    return {"job": wall, "rounds": rounds_s, "work": work,
            "final_test_acc": summary["test"]["acc"]}


def run_flower(python: str, shards: Path, rounds: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    timings = out / "timings.json"
    start = time.perf_counter()
    subprocess.run([python, str(ROOT / "benchmarks/flower_task.py"), "--shards", str(shards),
                    "--rounds", str(rounds), "--out", str(timings)], check=True,
                   stdout=subprocess.DEVNULL, stderr=(out / "flower.log").open("w"))
    wall = time.perf_counter() - start
    data = json.loads(timings.read_text())
    return {"job": wall, "rounds": data["round_s"], "work": data["work_s"],
            "final_test_acc": data["final_test_acc"]}


def figures(run: dict) -> dict:
    overhead = [r - w for r, w in zip(run["rounds"], run["work"])]
    median = statistics.median(overhead)
    startup = run["job"] - sum(run["work"]) - len(overhead) * median
    return {"job": run["job"], "startup": startup, "overhead": median,
            "acc": run["final_test_acc"]}


def flower_python(choice: str | None) -> str | None:
    if choice:
        return choice
    return sys.executable if importlib.util.find_spec("flwr") else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prepare(args.shards)
    flower = flower_python(args.flower_python)
    if flower is None:
        print("flwr is not installed here (pass --flower-python): timing fedsilo only")
    results: dict[str, list[dict]] = {"fedsilo": [], "flower": []}
    for repeat in range(args.repeats):
        results["fedsilo"].append(figures(run_fedsilo(args.shards, args.rounds,
                                                      args.out / f"fedsilo-{repeat}")))
        print("fedsilo", repeat, results["fedsilo"][-1], flush=True)
        if flower:
            results["flower"].append(figures(run_flower(flower, args.shards, args.rounds,
                                                        args.out / f"flower-{repeat}")))
            print("flower ", repeat, results["flower"][-1], flush=True)
    print(f"\nmedians over {args.repeats} interleaved runs, {args.rounds} rounds each:")
    print(f"{'':10} {'job s':>8} {'start-up s':>11} {'overhead/round s':>17} {'final acc':>10}")
    medians = {}
    for name, runs in results.items():
        if not runs:
            continue
        medians[name] = {key: statistics.median(r[key] for r in runs)
                         for key in ("job", "startup", "overhead", "acc")}
        m = medians[name]
        print(f"{name:10} {m['job']:8.1f} {m['startup']:11.1f} {m['overhead']:17.4f} "
              f"{m['acc']:10.4f}")
    if len(medians) == 2:
        a, b = medians["fedsilo"], medians["flower"]
        print(f"{'ratio':10} {a['job'] / b['job']:8.2f} {a['startup'] / b['startup']:11.2f} "
              f"{a['overhead'] / b['overhead']:17.3f}   (fedsilo / Flower)")
    (args.out / "side_by_side.json").write_text(json.dumps({"runs": results,
                                                            "medians": medians}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
