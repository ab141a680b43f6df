"""The ``fedsilo`` command: ``train``, ``baseline``, ``personalize``, ``report``, ``demo``,
``predict``, ``export``, ``budget``, ``keys``, ``audit``, ``release`` and ``prep``."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from fedsilo import __version__
from fedsilo.errors import ConfigError, FedsiloError

Formatter = argparse.ArgumentDefaultsHelpFormatter
#: sites a CKKS key set keeps precise unless ``fedsilo keys --sites`` says otherwise
_CKKS_SITES = 16
#: the demo's rounds: well under a minute on 2 cores (docs/model.md has the measurement)
DEMO_ROUNDS = 8
#: the segmentation demo's rounds (a few minutes on 2 cores; benchmarks/RESULTS.md)
SEG_DEMO_ROUNDS = 3


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
    train.add_argument("--sites-changed", action="store_true", default=False,
                       help="with --resume: the shard set gained or lost sites on purpose "
                            "(sites are matched by their data; a new site starts fresh, a "
                            "departed one's state is archived); see docs/training.md")
    train.add_argument("--verbose", action="store_true", default=False,
                       help="debug logging on every rank")
    train.add_argument("--tensorboard", action="store_true", default=False,
                       help="write TensorBoard event files to RUN_DIR/tensorboard/ "
                            "(= --set runtime.tensorboard=true)")
    train.set_defaults(func=_train)

    report = sub.add_parser(
        "report", formatter_class=Formatter, help="plots and an HTML page of one or more runs",
        description="Read run directories (finished, crashed or still running; no MPI, no "
                    "torch) and write PNG plots (test metrics, federated validation, privacy "
                    "spent per site, where each round's time went) and a self-contained "
                    "report.html with the configuration and the final and best metrics. "
                    "Several runs are drawn side by side.")
    report.add_argument("runs", metavar="RUN_DIR", nargs="+", help="run directories")
    report.add_argument("--out", metavar="DIR", default=None,
                        help="where the PNGs and report.html go (default: RUN_DIR/report for "
                             "one run, ./fedsilo-report for several)")
    report.set_defaults(func=_report)

    baseline = sub.add_parser(
        "baseline", formatter_class=Formatter,
        help="the centralized baseline: the same recipe on the pooled data (no MPI)",
        description="Train the model of a training config on the union of every site's "
                    "training split, in one process, as if one site held every image: the "
                    "same model, optimizer, lr schedule, batch size, augmentation and DP "
                    "settings (DP-SGD on the pooled set as one site), one round = one pass "
                    "of the recipe, tested on test.h5 as the federation is. The run "
                    "directory is read by 'fedsilo report FEDERATED_RUN BASELINE_RUN', which "
                    "shows the gap. A simulation for whoever may pool the data: it reads "
                    "every shard (docs/baseline.md).")
    baseline.add_argument("--config", metavar="CFG.yaml", default=None,
                          help="the federated run's configuration file (YAML)")
    baseline.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append",
                          default=[], help="override a config key (repeatable), as for train")
    baseline.add_argument("--out", metavar="RUN_DIR", required=True,
                          help="run directory to create (config, metrics, model, summary)")
    baseline.add_argument("--verbose", action="store_true", default=False,
                          help="debug logging")
    baseline.set_defaults(func=_baseline)

    personalize = sub.add_parser(
        "personalize", formatter_class=Formatter,
        help="a site's personal model: the global model fine-tuned on its own data",
        description="Run by one site alone: fine-tune RUN_DIR/model.pt on site K's own "
                    "training split (reading only site K's shard), report the global and "
                    "the personal model's accuracy and AUC on site K's validation split, "
                    "and write the personal model with its card (mode 0600; an existing "
                    "file is never overwritten). The personal model stays with the site "
                    "(docs/baseline.md).")
    personalize.add_argument("run", metavar="RUN_DIR", help="a finished run directory")
    personalize.add_argument("--site", type=int, required=True, metavar="K",
                             help="the site (site-00K.h5 of the run's shard set)")
    personalize.add_argument("--layers", choices=["head", "all"], default="head",
                             help="fine-tune the classifier only, or every layer")
    personalize.add_argument("--epochs", type=int, default=1, metavar="E",
                             help="epochs over the site's training split")
    personalize.add_argument("--lr", type=float, default=None,
                             help="learning rate (default: the run's last round's)")
    personalize.add_argument("--data", metavar="DIR", default=None,
                             help="where the site's shard and manifest.json are (default: "
                                  "the run's data.dir)")
    personalize.add_argument("--out", metavar="FILE.pt", required=True,
                             help="the personal model to write (a new file)")
    personalize.set_defaults(func=_personalize)

    release = sub.add_parser(
        "release", formatter_class=Formatter,
        help="copy a run directory's released part (no secret) to share it",
        description="Copy what a run directory releases (config.yaml, metrics.jsonl, "
                    "summary.json, model.pt/best.pt with their cards, stopped/hung markers, "
                    "report/ and tensorboard/) into a new directory; never checkpoints/ or "
                    "departed/, which hold the coordinator's and the sites' private state "
                    "and secrets (docs/privacy.md, 'Released and private').")
    release.add_argument("run", metavar="RUN_DIR", help="the run directory")
    release.add_argument("--out", metavar="DIR", required=True,
                         help="a new (or empty) directory for the copy")
    release.set_defaults(func=_release)

    demo = sub.add_parser(
        "demo", formatter_class=Formatter, help="run a small federation end to end",
        description="Three hospitals train a pneumonia classifier on real chest X-rays "
                    "(PneumoniaMNIST, MedMNIST v2, CC BY 4.0, shipped with fedsilo): the "
                    "images are split over P sites with label skew, sharded, and trained on "
                    "P+1 MPI ranks launched by this command; it prints the final and the best "
                    "(federated validation) model's test metrics and the run report.")
    demo.add_argument("--sites", "--participants", dest="sites", type=int, default=3, metavar="P",
                      help="number of sites (hospitals), one participant rank each "
                           "(P+1 MPI ranks in all)")
    demo.add_argument("--task", choices=("classification", "segmentation"),
                      default="classification",
                      help="segmentation: retinal vessels in CHASE_DB1 fundus photographs "
                           "(CC BY 4.0, shipped), split by child, U-Net, test Dice and "
                           "overlay images")
    demo.add_argument("--rounds", type=int, default=None,
                      help=f"federated rounds (default: {DEMO_ROUNDS}; segmentation "
                           f"{SEG_DEMO_ROUNDS})")
    demo.add_argument("--model", default=None,
                      help="model name (default: dp_cnn, 26k parameters)")
    demo.add_argument("--samples", type=int, default=None,
                      help="use a random subset of this many training images (default: all "
                           "4708)")
    demo.add_argument("--partition", default="dirichlet:0.5",
                      help="how the training images are split over the sites")
    demo.add_argument("--dp", action="store_true", default=False,
                      help="DP-SGD on every site with a budget of epsilon = 8 (delta = 1e-5)")
    demo.add_argument("--secure", action="store_true", default=False,
                      help="secure aggregation with pairwise masks (site keys made here)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--out", metavar="DIR", default=None,
                      help="where shards and the run go (default: a new temporary directory)")
    demo.add_argument("--mpirun", metavar="PATH", default=None,
                      help="MPI launcher (default: the one beside this Python, else on PATH)")
    demo.set_defaults(func=_demo)

    predict = sub.add_parser(
        "predict", formatter_class=Formatter,
        help="class probabilities of images by a trained model",
        description="Run a trained model (RUN_DIR/model.pt or best.pt, with its model card "
                    "model.json/best.json) on image files (PNG, JPEG, BMP, TIFF), DICOM files, "
                    "folders of them (a DICOM series) or HDF5 shards, with the run's image size, "
                    "channels and normalization; writes a CSV of per-class probabilities and the "
                    "predicted class (and the decision at the stored threshold, if any). A "
                    "segmentation model writes a PNG mask per image into the folder --out.")
    predict.add_argument("--model", required=True, metavar="MODEL",
                         help="RUN_DIR/model.pt, RUN_DIR/best.pt, or a run directory")
    predict.add_argument("inputs", nargs="+", metavar="IMAGES",
                         help="image files, DICOM files, folders or HDF5 shards")
    predict.add_argument("--out", metavar="CSV", default=None,
                         help="CSV file to write (default: standard output); for a "
                         "segmentation model, the folder of masks (required)")
    predict.add_argument("--probabilities", action="store_true",
                         help="segmentation: also write each image's probability map(s)")
    predict.set_defaults(func=_predict)

    export = sub.add_parser(
        "export", formatter_class=Formatter, help="a trained model as TorchScript or ONNX",
        description="Write a trained model as TorchScript or ONNX (input: normalized images "
                    "N x C x H x W, output: logits; the model card travels inside), load the "
                    "file back and check its outputs against PyTorch's on a batch: the largest "
                    "absolute difference must be at most 1e-5, or the export fails.")
    export.add_argument("--model", required=True, metavar="MODEL",
                        help="RUN_DIR/model.pt, RUN_DIR/best.pt, or a run directory")
    export.add_argument("--format", required=True, choices=["torchscript", "onnx"],
                        help="export format")
    export.add_argument("--out", required=True, metavar="FILE", help="file to write")
    export.set_defaults(func=_export)

    budget = sub.add_parser(
        "budget", formatter_class=Formatter, help="plan a participant's privacy budget offline",
        description="Noise multiplier for a target epsilon, or epsilon for a noise multiplier, "
                    "of one participant's DP-SGD over a whole federated job (Poisson sampling "
                    "at rate B/N, ceil(N/B) steps per local epoch). With --config, the numbers "
                    "come from a training config (train.*, rounds, dp.*) and N from the "
                    "manifest of its data.dir; any flag given overrides the config's value. "
                    "Without --config, give --samples and exactly one of --target-epsilon "
                    "and --noise-multiplier.")
    # flags left out are absent (SUPPRESS), so a config can fill them in
    unset = argparse.SUPPRESS
    budget.add_argument("--config", metavar="CFG.yaml", default=None,
                        help="training config to read train.batch_size, train.epochs, "
                             "train.max_steps, rounds, dp.target_epsilon or "
                             "dp.noise_multiplier, dp.delta and dp.accountant from")
    budget.add_argument("--site", type=int, default=unset, metavar="K",
                        help="with --config: plan for site K (its training samples in the "
                             "manifest, its dp.sites.K overrides); default: the site with the "
                             "fewest training samples")
    budget.add_argument("--samples", type=int, default=unset, metavar="N",
                        help="training samples of the participant (default: from the manifest "
                             "of --config's data.dir; required without one)")
    budget.add_argument("--batch-size", type=int, default=unset, metavar="B",
                        help="expected batch size (default: the config's train.batch_size, "
                             "else 64)")
    budget.add_argument("--epochs", type=int, default=unset, metavar="E",
                        help="local epochs per round (default: the config's train.epochs, else 1)")
    budget.add_argument("--max-steps", type=int, default=unset,
                        help="cap on local steps per round (default: the config's train.max_steps, "
                             "else none)")
    budget.add_argument("--rounds", type=int, default=unset, metavar="R",
                        help="federated rounds (default: the config's rounds, else 10)")
    budget.add_argument("--delta", type=float, default=unset, metavar="D",
                        help="target delta (default: the config's dp.delta, else 1e-05)")
    budget.add_argument("--target-epsilon", type=float, default=unset, metavar="X",
                        help="epsilon to spend over the job: prints the noise multiplier")
    budget.add_argument("--noise-multiplier", type=float, default=unset, metavar="S",
                        help="noise multiplier sigma: prints the epsilon it spends")
    budget.add_argument("--accountant", choices=["rdp", "prv", "gdp"], default=unset,
                        help="privacy accountant (default: the config's dp.accountant, else rdp)")
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
                    "participant), DIR/coordinator.ctx (no secret key: the coordinator's), "
                    "DIR/params.json, and one identity key per site (DIR/site-NNN.key, mode "
                    "0600: give each site its own; DIR/public.json: every participant), with "
                    "which each site masks what it encrypts; train with --set "
                    "aggregation.secure=ckks --set he.keys=DIR.")
    keys.add_argument("--identity", action="store_true",
                      help="issue per-site identity keys for masked secure aggregation")
    keys.add_argument("--sites", "--participants", dest="sites", type=int,
                      default=argparse.SUPPRESS, metavar="P",
                      help="number of sites: with --identity, the shard set's sites, one key each "
                           "(required); without it, the most sites whose sum the CKKS keys must "
                           f"keep precise (default {_CKKS_SITES})")
    keys.add_argument("--out", metavar="DIR", required=True, help="directory to write the keys to")
    keys.add_argument("--poly-modulus-degree", type=int, default=8192,
                      help="ring degree N (N values per ciphertext: two per slot)")
    keys.add_argument("--data-bits", type=int, default=56,
                      help="bits of the one data prime (128-bit security bounds apply)")
    keys.add_argument("--scale-bits", type=int, default=46, help="log2 of the CKKS scale")
    keys.set_defaults(func=_keys)

    from fedsilo.audit_cli import add_parser as add_audit_parser
    from fedsilo.prep.cli import add_parser as add_prep_parser

    add_audit_parser(sub)
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
    overrides = [*args.overrides, *(["runtime.tensorboard=true"] if args.tensorboard else [])]
    return run_guarded(lambda: run_job(world, config_path=args.config, overrides=overrides,
                                       out_dir=args.out, resume_dir=args.resume,
                                       auto_resume=args.auto_resume,
                                       sites_changed=args.sites_changed))


def _report(args: argparse.Namespace) -> int:
    from fedsilo.runreport import write_report

    html = write_report(args.runs, out=args.out)
    print(html)
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from fedsilo.baseline import run_baseline
    from fedsilo.log import setup_logging

    setup_logging(0, 1, verbose=args.verbose)
    root = run_baseline(config_path=args.config, overrides=args.overrides, out_dir=args.out)
    print(root)
    return 0


def _personalize(args: argparse.Namespace) -> int:
    from fedsilo.log import setup_logging
    from fedsilo.personalize import format_result, personalize

    setup_logging(0, 1)
    result = personalize(args.run, site=args.site, out=args.out, layers=args.layers,
                         epochs=args.epochs, lr=args.lr, data_dir=args.data)
    print(format_result(result))
    return 0


def _release(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from fedsilo.rundir import RunDir

    run, out = RunDir(args.run), Path(args.out)
    if not run.config.is_file():
        raise ConfigError(f"{run.root} holds no config.yaml: not a fedsilo run directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty directory; the release "
                          f"goes into a new one (nothing there is overwritten)")
    if out.resolve().is_relative_to(run.root.resolve()):
        raise ConfigError(f"--out {out} lies inside the run directory {run.root}")
    files = run.released_files()
    try:
        for path in files:
            target = out / path.relative_to(run.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    except OSError as exc:
        raise ConfigError(f"cannot copy the release into {out}: {exc.strerror or exc}") from None
    print(f"copied {len(files)} released file(s) of {run.root} to {out} (no checkpoints, no "
          f"site state, no secret)")
    return 0


def _budget(args: argparse.Namespace) -> int:
    import json

    from fedsilo.privacy.budget import format_budget, plan_budget

    inputs, site = _budget_inputs(args)
    plan = plan_budget(**inputs)
    plan = {**plan, "num_samples": inputs["num_samples"], "site": site}
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        if site is not None and "samples" not in vars(args):
            print(f"site {site}: {inputs['num_samples']} training samples "
                  f"(manifest of {args.config}'s data.dir)")
        print(format_budget(plan))
    return 0


def _budget_inputs(args: argparse.Namespace) -> tuple[dict[str, Any], int | None]:
    """plan_budget's arguments: the flags given, else ``--config``'s values, else the
    defaults; and the site they are for (None: none in particular)."""
    from fedsilo.config import load_config

    given = vars(args)
    config = load_config(args.config)  # None: the defaults, as fedsilo train has them
    site, num_samples = given.get("site"), given.get("samples")
    if args.config is None:
        if site is not None:
            raise ConfigError("--site K picks a site of a training config's shard set: "
                              "give --config CFG.yaml")
        if num_samples is None:
            raise ConfigError("give --samples N (the participant's training samples), or "
                              "--config CFG.yaml whose data.dir holds a shard set")
    elif num_samples is None:
        site, num_samples = _site_samples(config.data.dir, site, config_path=args.config)
    dp = config.dp if site is None else config.dp.for_site(site)  # job-wide, or the site's
    sigma_or_eps: dict[str, Any] = {k: given[k] for k in ("target_epsilon", "noise_multiplier")
                                    if k in given}
    if not sigma_or_eps and args.config is not None:
        # as training does: an explicit sigma wins, the target is then only the budget
        if dp.noise_multiplier is not None:
            sigma_or_eps = {"noise_multiplier": dp.noise_multiplier}
        elif dp.target_epsilon is not None:
            sigma_or_eps = {"target_epsilon": dp.target_epsilon}
        else:
            raise ConfigError(f"{args.config} sets neither dp.target_epsilon nor "
                              f"dp.noise_multiplier; give --target-epsilon or --noise-multiplier")
    train = config.train
    inputs = {
        "num_samples": num_samples,
        "batch_size": given.get("batch_size", train.batch_size),
        "epochs": given.get("epochs", train.epochs),
        "max_steps": given.get("max_steps", train.max_steps),
        "rounds": given.get("rounds", config.rounds),
        "delta": given.get("delta", dp.delta),
        "accountant": given.get("accountant", config.dp.accountant),
        **sigma_or_eps,
    }
    if config.dp.validation.enabled:  # dp.validation's releases are in the site's ε too
        inputs["validation_sigma"] = config.dp.validation.noise_multiplier
        inputs["validation_releases"] = config.dp.validation.releases(int(inputs["rounds"]))
    return inputs, site


def _site_samples(data_dir: str, site: int | None, *, config_path: str) -> tuple[int, int]:
    """(site, its training samples) from the manifest of ``data_dir``; without ``site``,
    the site with the fewest."""
    from pathlib import Path

    from fedsilo.shards import MANIFEST_FILE, load_manifest

    directory = Path(data_dir).expanduser().resolve()
    if not (directory / MANIFEST_FILE).is_file():
        raise ConfigError(f"--samples not given, and {config_path}'s data.dir {directory} holds "
                          f"no shard set ({MANIFEST_FILE}) to count them in: give --samples N, "
                          f"or prepare the shards first (fedsilo prep)")
    manifest = load_manifest(directory)
    counts = [int(entry.num_samples.get("train", 0)) for entry in manifest.sites]
    if site is None:
        site = counts.index(min(counts))
    elif not 0 <= site < len(counts):
        raise ConfigError(f"--site {site}: the shard set {directory} has sites "
                          f"0..{len(counts) - 1}")
    return site, counts[site]


def _keys(args: argparse.Namespace) -> int:
    if args.identity:
        from fedsilo.crypto.identity import generate_identities

        if getattr(args, "sites", None) is None:
            raise ConfigError("fedsilo keys --identity needs --sites P (the shard set's sites)")
        written = generate_identities(args.out, num_sites=args.sites)
        print(f"wrote {len(written) - 1} site identity keys (mode 0600: give site-NNN.key to "
              f"site NNN only) and {written[-1]} (public keys: give it to every participant) "
              f"in {args.out}")
        return 0
    from fedsilo.crypto.ckks import generate_keys
    from fedsilo.crypto.params import CKKSParams

    params = CKKSParams(poly_modulus_degree=args.poly_modulus_degree, data_bits=args.data_bits,
                        scale_bits=args.scale_bits)
    sites = getattr(args, "sites", _CKKS_SITES)
    paths = generate_keys(args.out, params, num_participants=sites)
    # what is encrypted is masked first (crypto/ring.py): the sites' identity keys too
    from fedsilo.crypto.identity import generate_identities

    identities = generate_identities(args.out, num_sites=max(sites, 2))
    print(f"wrote {paths['participant']} (secret key, mode 0600: participants only), "
          f"{paths['coordinator']} (no secret key: the coordinator) and {paths['params']}; "
          f"parameters {params.to_dict()}, up to {params.max_participants()} sites; and "
          f"{len(identities) - 1} site identity keys site-NNN.key (mode 0600: give each to "
          f"its site only) with {identities[-1]} (every participant)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.task == "segmentation":
        from fedsilo.segdemo import run_segmentation_demo

        if args.dp:
            raise ConfigError("--dp is not offered for segmentation yet (docs/segmentation.md)")
        return run_segmentation_demo(participants=args.sites,
                                     rounds=args.rounds or SEG_DEMO_ROUNDS, seed=args.seed,
                                     out=args.out, mpirun=args.mpirun, secure=args.secure)
    from fedsilo.demo import run_demo

    return run_demo(participants=args.sites, rounds=args.rounds or DEMO_ROUNDS, model=args.model,
                    samples=args.samples, partition=args.partition, seed=args.seed,
                    out=args.out, mpirun=args.mpirun, dp=args.dp, secure=args.secure)


def _predict(args: argparse.Namespace) -> int:
    from fedsilo.predict import predict

    predict(args.model, args.inputs, out=args.out, probability_maps=args.probabilities)
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedsilo.export import export_model

    export_model(args.model, fmt=args.format, out=args.out)
    return 0
