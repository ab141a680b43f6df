"""``fedsilo audit`` at several reported ε: the empirical lower bound and its run time.

For each target ε (σ planned by fedsilo for the job, as ``fedsilo train`` does) and each
repeat, one canary run of one site's DP-SGD (``privacy/canaries.py``, the engine of
``fedsilo train``) and the one-run bound of Steinke, Nasr & Jagielski (2023).  Each repeat
has a fresh site secret (the DP noise) and canary seed ``repeat``; all run in one process,
so torch is imported once (``seconds`` is one audit's own time, as ``fedsilo audit`` prints
it, without the ~2 s of interpreter start-up and imports).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_audit.py \\
        --config jobs/configs/pneumoniamnist.yaml --set data.dir=/tmp/audit-dp-shards \\
        --set model.name=dp_cnn --set train.lr=0.05 --set train.lr_decay=0.95 \\
        --site 1 --epsilons 1 2 4 8 --repeats 3 --out results/audit.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from fedsilo.config import load_config
from fedsilo.privacy.canaries import run_canary_audit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--site", type=int, default=0)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=None,
                        help="DP-SGD steps (default: the config's whole job)")
    parser.add_argument("--debug-noise-scale", type=float, default=1.0,
                        help="a broken run, to show what the audit finds then")
    parser.add_argument("--out", default=None, help="JSON file of every run (new file)")
    args = parser.parse_args(argv)
    if args.out is not None and Path(args.out).exists():
        print(f"{args.out} exists: give a new path", file=sys.stderr)
        return 2
    runs = []
    for epsilon in args.epsilons:
        config = load_config(args.config, overrides=[
            *args.overrides, "dp.enabled=true", f"dp.target_epsilon={epsilon}"])
        for repeat in range(args.repeats):
            result = run_canary_audit(config, site=args.site, num_canaries=args.canaries,
                                      steps=args.steps, seed=repeat,
                                      noise_scale=args.debug_noise_scale)
            runs.append(result)
            print(f"target ε {epsilon:g} repeat {repeat}: reported {result['reported_epsilon']:.3f}"
                  f", ε_lb {result['epsilon_lb']:.3f} ({result['num_correct']}/"
                  f"{result['num_guesses']}), σ {result['noise_multiplier']:.3f} (measured "
                  f"{result['measured_noise_multiplier']:.3f}), {result['steps']} steps, "
                  f"{result['seconds']:.1f} s", flush=True)
    if args.out is not None:
        with open(args.out, "x", encoding="utf-8") as handle:
            json.dump({"argv": sys.argv[1:], "runs": runs}, handle, indent=2)
    print()
    print("| reported ε | σ | steps | empirical ε_lb (95 %) | guesses | correct | seconds |")
    print("|---|---|---|---|---|---|---|")
    for epsilon in args.epsilons:
        rows = [r for r in runs if r["target_epsilon"] == epsilon]
        lbs = [r["epsilon_lb"] for r in rows]
        secs = [r["seconds"] for r in rows]
        median = statistics.median(lbs)
        spread = f" ({min(lbs):.2f}–{max(lbs):.2f})" if len(rows) > 1 else ""
        best = min(rows, key=lambda r: abs(r["epsilon_lb"] - median))
        print(f"| {rows[0]['reported_epsilon']:.3f} | {rows[0]['noise_multiplier']:.3f} | "
              f"{rows[0]['steps']} | {median:.2f}{spread} | {best['num_guesses']} | "
              f"{best['num_correct']} | {statistics.median(secs):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
