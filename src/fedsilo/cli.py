"""The ``fedsilo`` command: ``train``, ``demo``, ``budget``, ``keys`` and ``prep``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fedsilo import __version__
from fedsilo.errors import ConfigError, FedsiloError

Formatter = argparse.ArgumentDefaultsHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsilo", formatter_class=Formatter,
        description="Federated learning of vision models across data silos, over MPI. "
                    "Rank 0 coordinates; ranks 1..P each train on their own HDF5 shard.")
    parser.add_argument("--version", action="version", version=f"fedsilo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train", formatter_class=Formatter, help="train a federation (run under mpirun/srun)",
        description="Run federated training. Launch with 'mpirun -n P+1 fedsilo train ...' "
                    "(or srun), P = number of shards in the shard set; with fewer ranks, "
                    "each participant rank trains several sites in turn.")
    train.add_argument("--config", metavar="CFG.yaml", default=None,
                       help="configuration file (YAML); defaults apply to missing keys")
    train.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append",
                       default=[], help="override a config key, e.g. --set train.lr=0.05 "
                                        "(repeatable; VALUE is parsed as YAML)")
    train.add_argument("--out", metavar="RUN_DIR", default=None,
                       help="run directory to create (config, metrics, checkpoints, model)")
    train.add_argument("--resume", metavar="RUN_DIR", default=None,
                       help="continue the run in RUN_DIR from its last complete checkpoint")
    train.add_argument("--auto-resume", action="store_true", default=False,
                       help="if --out already holds a run, resume it (for requeued batch jobs)")
    train.add_argument("--verbose", action="store_true", default=False,
                       help="debug logging on every rank")
    train.set_defaults(func=_train)

    demo = sub.add_parser(
        "demo", formatter_class=Formatter, help="run a small federation end to end",
        description="Generate a synthetic image dataset, shard it over the participants, and "
                    "train on P+1 MPI ranks launched by this command.")
    demo.add_argument("--participants", type=int, default=3, help="number of participants P")
    demo.add_argument("--rounds", type=int, default=5, help="federated rounds")
    demo.add_argument("--model", default="small_cnn", help="model name")
    demo.add_argument("--samples", type=int, default=3000, help="synthetic training images")
    demo.add_argument("--partition", default="dirichlet:1.0", help="how samples are split")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--out", metavar="DIR", default=None,
                      help="where shards and the run go (default: a new temporary directory)")
    demo.add_argument("--mpirun", metavar="PATH", default=None,
                      help="MPI launcher (default: the one beside this Python, else on PATH)")
    demo.set_defaults(func=_demo)

    budget = sub.add_parser(
        "budget", formatter_class=Formatter, help="plan a participant's privacy budget offline",
        description="Noise multiplier for a target epsilon, or epsilon for a noise multiplier, "
                    "of one participant's DP-SGD over a whole federated job (Poisson sampling "
                    "at rate B/N, ceil(N/B) steps per local epoch). Give exactly one of "
                    "--target-epsilon and --noise-multiplier.")
    budget.add_argument("--samples", type=int, required=True, metavar="N",
                        help="training samples of the participant (required)")
    budget.add_argument("--batch-size", type=int, default=64, metavar="B",
                        help="expected batch size (train.batch_size)")
    budget.add_argument("--epochs", type=int, default=1, metavar="E",
                        help="local epochs per round (train.epochs)")
    budget.add_argument("--max-steps", type=int, default=None,
                        help="cap on local steps per round (train.max_steps)")
    budget.add_argument("--rounds", type=int, default=10, metavar="R", help="federated rounds")
    budget.add_argument("--delta", type=float, default=1e-5, metavar="D", help="target delta")
    budget.add_argument("--target-epsilon", type=float, default=None, metavar="X",
                        help="epsilon to spend over the job: prints the noise multiplier")
    budget.add_argument("--noise-multiplier", type=float, default=None, metavar="S",
                        help="noise multiplier sigma: prints the epsilon it spends")
    budget.add_argument("--accountant", choices=["rdp", "prv", "gdp"], default="rdp",
                        help="privacy accountant")
    budget.add_argument("--json", action="store_true", default=False,
                        help="print the plan as JSON")
    budget.set_defaults(func=_budget)

    keys = sub.add_parser(
        "keys", formatter_class=Formatter,
        help="create keys for secure aggregation (site identities, or a CKKS key set)",
        description="With --identity: one X25519 identity key per site, DIR/site-NNN.key "
                    "(mode 0600: give each site its own) and DIR/public.json (everyone's public "
                    "keys: give it to every participant); train with --set "
                    "aggregation.secure=masks --set aggregation.keys=DIR.  Without: a CKKS key "
                    "set, DIR/participant.key (secret key, mode 0600: give it to every "
                    "participant), DIR/coordinator.ctx (no secret key: the coordinator's) and "
                    "DIR/params.json; train with --set aggregation.secure=ckks "
                    "--set he.keys=DIR.")
    keys.add_argument("--identity", action="store_true",
                      help="issue per-site identity keys for masked secure aggregation")
    keys.add_argument("--sites", type=int, default=None,
                      help="--identity: number of sites (the shard set's, site-000 ...)")
    keys.add_argument("--out", metavar="DIR", required=True, help="directory to write the keys to")
    keys.add_argument("--poly-modulus-degree", type=int, default=8192,
                      help="ring degree N (N/2 values per ciphertext)")
    keys.add_argument("--data-bits", type=int, default=56,
                      help="bits of the one data prime (128-bit security bounds apply)")
    keys.add_argument("--scale-bits", type=int, default=46, help="log2 of the CKKS scale")
    keys.add_argument("--participants", type=int, default=16,
                      help="most participants the keys must aggregate precisely")
    keys.set_defaults(func=_keys)

    from data_prep.cli import add_parser as add_prep_parser

    add_prep_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FedsiloError as exc:
        print(f"fedsilo: error: {exc}", file=sys.stderr)
        return exc.exit_code


def _train(args: argparse.Namespace) -> int:
    from fedsilo.comm import World, run_guarded
    from fedsilo.federation import run_job
    from fedsilo.log import setup_logging

    world = World()
    setup_logging(world.rank, world.size, verbose=args.verbose)
    return run_guarded(lambda: run_job(world, config_path=args.config, overrides=args.overrides,
                                       out_dir=args.out, resume_dir=args.resume,
                                       auto_resume=args.auto_resume))


def _budget(args: argparse.Namespace) -> int:
    import json

    from fedsilo.privacy.budget import format_budget, plan_budget

    plan = plan_budget(num_samples=args.samples, batch_size=args.batch_size, epochs=args.epochs,
                       rounds=args.rounds, delta=args.delta, target_epsilon=args.target_epsilon,
                       noise_multiplier=args.noise_multiplier, max_steps=args.max_steps,
                       accountant=args.accountant)
    print(json.dumps(plan, indent=2) if args.json else format_budget(plan))
    return 0


def _keys(args: argparse.Namespace) -> int:
    if args.identity:
        from fedsilo.crypto.identity import generate_identities

        if args.sites is None:
            raise ConfigError("fedsilo keys --identity needs --sites P (the shard set's sites)")
        paths = generate_identities(args.out, num_sites=args.sites)
        print(f"wrote {len(paths) - 1} site identity keys (mode 0600: give site-NNN.key to "
              f"site NNN only) and {paths[-1]} (public keys: give it to every participant) "
              f"in {args.out}")
        return 0
    from fedsilo.crypto.ckks import generate_keys
    from fedsilo.crypto.params import CKKSParams

    params = CKKSParams(poly_modulus_degree=args.poly_modulus_degree, data_bits=args.data_bits,
                        scale_bits=args.scale_bits)
    paths = generate_keys(args.out, params, num_participants=args.participants)
    print(f"wrote {paths['participant']} (secret key, mode 0600: participants only), "
          f"{paths['coordinator']} (no secret key: the coordinator) and {paths['params']}; "
          f"parameters {params.to_dict()}, up to {params.max_participants()} participants, "
          f"|values| < {params.max_abs:g}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fedsilo.demo import run_demo

    return run_demo(participants=args.participants, rounds=args.rounds, model=args.model,
                    samples=args.samples, partition=args.partition, seed=args.seed,
                    out=args.out, mpirun=args.mpirun)
