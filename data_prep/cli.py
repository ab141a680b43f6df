"""``fedsilo prep``: make a shard set from a source dataset, or verify one.

The ``fedsilo`` command calls :func:`add_parser`; each subcommand sets ``func`` to a
callable taking the parsed arguments and returning the exit status.  FedsiloErrors are
left to propagate: ``fedsilo``'s main turns them into one error line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from data_prep.medmnist import load_medmnist
from data_prep.pipeline import prepare_shards
from data_prep.source import SourceData
from data_prep.synthetic import make_synthetic
from fedsilo.errors import ConfigError, ShardError
from fedsilo.shards import Manifest, load_manifest, verify_shard_set

_FORMATTER = argparse.ArgumentDefaultsHelpFormatter

#: exit status of ``prep verify`` when the shard set has problems
EXIT_PROBLEMS = 2


def add_parser(subparsers: Any) -> None:
    """Add the ``prep`` subcommand (with ``medmnist``, ``synthetic``, ``verify``)."""
    prep = subparsers.add_parser(
        "prep",
        help="convert a dataset into per-site HDF5 shards, or verify a shard set",
        description="Convert a dataset into a shard set (site-000.h5 ..., test.h5, "
        "manifest.json), or verify an existing one.",
        formatter_class=_FORMATTER,
    )
    sources = prep.add_subparsers(dest="prep_command", required=True, metavar="SOURCE")

    medmnist = sources.add_parser(
        "medmnist",
        help="a MedMNIST v2 2-D .npz file (e.g. pneumoniamnist.npz)",
        description="Shard a MedMNIST v2 .npz: its train split is partitioned over the "
        "sites, its val split follows each site's label mix, its test split becomes test.h5.",
        formatter_class=_FORMATTER,
    )
    medmnist.add_argument(
        "--npz", type=Path, required=True, default=argparse.SUPPRESS,
        help="path of the MedMNIST .npz file (required)",
    )  # fmt: skip
    _add_common(medmnist)
    medmnist.set_defaults(func=_run_medmnist)

    synthetic = sources.add_parser(
        "synthetic",
        help="a generated dataset with class-dependent structure",
        description="Shard a synthetic image-classification set generated on the fly; "
        "test and validation splits are stratified hold-outs of the generated samples.",
        formatter_class=_FORMATTER,
    )
    synthetic.add_argument("--samples", type=_positive_int, default=2000,
                           help="images to generate in all (train + val + test)")
    synthetic.add_argument("--classes", type=_positive_int, default=2, help="number of classes")
    synthetic.add_argument("--channels", type=_positive_int, default=1,
                           help="image channels (1 grayscale, 3 RGB)")
    synthetic.add_argument("--size", type=_positive_int, nargs=2, default=[28, 28],
                           metavar=("H", "W"), help="image height and width")
    _add_common(synthetic)
    synthetic.set_defaults(func=_run_synthetic)

    verify = sources.add_parser(
        "verify",
        help="check a shard set against its manifest",
        description="Check every file of a shard set (presence, sha256, format, shapes, "
        "label ranges, counts) against manifest.json; exit status 2 if anything is wrong.",
        formatter_class=_FORMATTER,
    )
    verify.add_argument("dir", type=Path, help="directory holding manifest.json and the shards")
    verify.set_defaults(func=_run_verify)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--participants", type=_positive_int, required=True,
                        default=argparse.SUPPRESS,
                        help="number of sites, one shard each (required)")
    parser.add_argument("--partition", default="iid",
                        help="how samples are split over sites: iid, dirichlet:ALPHA "
                        "(label skew), quantity:ALPHA (size skew) or classes:K")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="seed of the partition and the hold-outs")
    parser.add_argument("--out", type=Path, required=True, default=argparse.SUPPRESS,
                        help="output directory for the shard set, created if missing (required)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of each site's samples held out for validation, "
                        "used only when the source has no validation split")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="fraction of the samples held out as test.h5, used only "
                        "when the source has no test split")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a shard set already in --out")
    parser.add_argument("--only", metavar="site:K|test|array", default=None,
                        help="write one file of the set, for parallel preparation (e.g. a "
                        "SLURM array): site:K, test, or 'array' to take it from "
                        "SLURM_ARRAY_TASK_ID (0..P-1 = sites, P = test). The task that "
                        "completes the set writes manifest.json")


def _run_medmnist(args: argparse.Namespace) -> int:
    return _prepare(load_medmnist(args.npz), args)


def _run_synthetic(args: argparse.Namespace) -> int:
    source = make_synthetic(
        num_samples=args.samples,
        num_classes=args.classes,
        image_shape=(args.channels, args.size[0], args.size[1]),
        seed=args.seed,
    )
    return _prepare(source, args)


def _prepare(source: SourceData, args: argparse.Namespace) -> int:
    manifest = prepare_shards(
        source,
        out_dir=args.out,
        participants=args.participants,
        partition=args.partition,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        overwrite=args.overwrite,
        only=_only(args),
    )
    if manifest is None:
        print(f"wrote {_only(args)} to {args.out}; the set is not complete yet")
        return 0
    print(f"wrote {manifest.num_sites} site shards, test.h5 and manifest.json to {args.out}")
    print(format_class_table(manifest))
    return 0


def _only(args: argparse.Namespace) -> str | None:
    if args.only != "array":
        return args.only
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None or not task.isdigit():
        raise ConfigError("--only array needs SLURM_ARRAY_TASK_ID (run it as a SLURM array task)")
    return "test" if int(task) == args.participants else f"site:{task}"


def _run_verify(args: argparse.Namespace) -> int:
    try:
        print(format_class_table(load_manifest(args.dir)))
    except ShardError:
        pass  # verify_shard_set reports the same problem below
    problems = verify_shard_set(args.dir)
    if problems:
        print(f"{len(problems)} problem(s) in {args.dir}:")
        for problem in problems:
            print(f"  - {problem}")
        return EXIT_PROBLEMS
    print(f"OK: {args.dir} matches its manifest")
    return 0


def format_class_table(manifest: Manifest) -> str:
    """Per-file, per-split sample counts and class histograms, as a text table."""
    header = ["file", "split", "samples", *(f"class {c}" for c in range(manifest.num_classes))]
    rows = []
    for entry in (*manifest.sites, manifest.test):
        for split, n in entry.num_samples.items():
            rows.append([entry.file, split, str(n), *map(str, entry.class_counts[split])])
    for split in ("train", "val"):
        totals = [0] * manifest.num_classes
        for entry in manifest.sites:
            for c, v in enumerate(entry.class_counts.get(split, ())):
                totals[c] += v
        rows.append(["all sites", split, str(sum(totals)), *map(str, totals)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        f"{manifest.num_sites} sites, {manifest.num_classes} classes, image "
        f"{'x'.join(map(str, manifest.image_shape))}, partition {manifest.partition}, "
        f"seed {manifest.seed}"
    ]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(w) for cell, w in zip(row[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
