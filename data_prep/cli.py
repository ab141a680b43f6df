"""``fedsilo prep``: make a shard set from a source dataset, verify one, or describe one.

The ``fedsilo`` command calls :func:`add_parser`; each subcommand sets ``func`` to a
callable taking the parsed arguments and returning the exit status.  FedsiloErrors are
left to propagate: ``fedsilo``'s main turns them into one error line and exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedsilo.errors import ConfigError, ShardError
from fedsilo.prep import record_cli, stats
from fedsilo.prep.args import FORMATTER, add_common, name_list, positive_int, resolve_only
from fedsilo.prep.medmnist import MEDMNIST_SIZES, load_medmnist, load_medmnist_by_name
from fedsilo.prep.pipeline import prepare_shards
from fedsilo.prep.source import SourceData
from fedsilo.prep.synthetic import make_synthetic
from fedsilo.prep.tvdatasets import DATASETS
from fedsilo.shards import MANIFEST_FILE, Manifest, load_manifest, verify_shard_set

#: exit status of ``prep verify`` when the shard set has problems
EXIT_PROBLEMS = 2


def add_parser(subparsers: Any) -> None:
    """Add ``prep`` (sources ``medmnist``, ``torchvision``, ``synthetic``, ``folder``, ``csv``,
    ``dicom``; ``verify`` and ``stats``)."""
    prep = subparsers.add_parser(
        "prep",
        help="convert a dataset into per-site HDF5 shards, or verify a shard set",
        description="Convert a dataset into a shard set (site-000.h5 ..., test.h5, "
        "manifest.json), verify an existing one, or show how its classes spread over sites.",
        formatter_class=FORMATTER,
    )
    sources = prep.add_subparsers(dest="prep_command", required=True, metavar="SOURCE")

    medmnist = sources.add_parser(
        "medmnist",
        help="a MedMNIST v2 2-D set: an .npz file, or by name (e.g. pneumoniamnist)",
        description="Shard a MedMNIST v2 set, given as an .npz (--source) or by name (--name, "
        "read from --root where the medmnist package keeps it, fetched with --download): its "
        "train split is partitioned over the sites, its val split follows each site's label "
        "mix, its test split becomes test.h5.",
        formatter_class=FORMATTER,
    )
    which = medmnist.add_mutually_exclusive_group(required=True)
    which.add_argument("--source", "--npz", dest="source", type=Path, metavar="PATH",
                       help="path of the MedMNIST .npz file")
    which.add_argument("--name", help="a MedMNIST set by name (pneumoniamnist, pathmnist...)")
    medmnist.add_argument("--size", type=int, default=28, choices=MEDMNIST_SIZES,
                          help="with --name: image side in px (MedMNIST+ sizes)")
    medmnist.add_argument("--root", type=Path, default=Path("~/.medmnist"),
                          help="with --name: directory of the .npz files (NAME_SIZE.npz)")
    medmnist.add_argument("--download", action="store_true",
                          help="with --name: download the file when missing (needs internet)")
    add_common(medmnist)
    medmnist.set_defaults(func=_run_medmnist)

    tv = sources.add_parser(
        "torchvision",
        help="MNIST, FashionMNIST, CIFAR10, CIFAR100 or SVHN through torchvision",
        description="Shard a classic vision set read by torchvision's dataset classes from "
        "--root (fetched with --download): its train split is partitioned over the sites "
        "(each keeps a validation hold-out), its test split becomes test.h5.",
        formatter_class=FORMATTER,
    )
    tv.add_argument("--dataset", required=True, choices=DATASETS, help="the set (required)")
    tv.add_argument("--root", type=Path, required=True, default=argparse.SUPPRESS,
                    help="directory of the set in torchvision's layout (required)")
    tv.add_argument("--download", action="store_true",
                    help="download the set into --root when missing (needs internet)")
    add_common(tv)
    tv.set_defaults(func=_run_torchvision)

    synthetic = sources.add_parser(
        "synthetic",
        help="a generated dataset with class-dependent structure",
        description="Shard a synthetic image-classification set generated on the fly; "
        "test and validation splits are stratified hold-outs of the generated samples.",
        formatter_class=FORMATTER,
    )
    synthetic.add_argument("--samples", type=positive_int, default=2000,
                           help="images to generate in all (train + val + test)")
    synthetic.add_argument("--classes", type=positive_int, default=2, help="number of classes")
    synthetic.add_argument("--channels", type=positive_int, default=1,
                           help="image channels (1 grayscale, 3 RGB)")
    synthetic.add_argument("--size", type=positive_int, nargs=2, default=[28, 28],
                           metavar=("H", "W"), help="image height and width")
    add_common(synthetic)
    synthetic.set_defaults(func=_run_synthetic)

    record_cli.add_parsers(sources, report=_report)
    _add_segmentation(sources)

    verify = sources.add_parser(
        "verify",
        help="check a shard set against its manifest",
        description="Check every file of a shard set (presence, sha256, format, shapes, "
        "label ranges, counts) against manifest.json; exit status 2 if anything is wrong.",
        formatter_class=FORMATTER,
    )
    verify.add_argument("dir", type=Path, help="directory holding manifest.json and the shards")
    verify.set_defaults(func=_run_verify)

    stats.add_parser(sources)


def _add_segmentation(sources: Any) -> None:
    seg = sources.add_parser(
        "segmentation",
        help="image/mask pairs (folders matched by name, or a CSV of pairs)",
        description="Shard image/mask pairs for segmentation (docs/segmentation.md): "
        "images and uint8 label maps, kept together by group (--group-pattern: one patient "
        "never straddles sites or the test set).",
        formatter_class=FORMATTER,
    )
    which = seg.add_mutually_exclusive_group(required=True)
    which.add_argument("--images", type=Path,
                       help="folder of images: PNG/JPEG/TIFF/BMP, or DICOM (.dcm) (with --masks)")
    which.add_argument("--pairs", type=Path,
                       help="CSV with columns image, mask[, group][, site]")
    seg.add_argument("--masks", type=Path,
                     help="folder of masks, matched to --images by name; the --images folder "
                          "itself for DICOM images with their masks beside them")
    seg.add_argument("--test-images", type=Path, help="folder of test images (else a hold-out)")
    seg.add_argument("--test-masks", type=Path, help="folder of the test images' masks")
    seg.add_argument("--test-pairs", type=Path, help="CSV of test pairs (else a hold-out)")
    seg.add_argument("--group-pattern", default=None, metavar="REGEX",
                     help="regular expression finding an image's group (patient) in its name "
                     "stem, e.g. 'Image_(\\d+)'; default: each image is its own group")
    seg.add_argument("--classes", type=positive_int, default=2,
                     help="label-map classes, background 0 included")
    seg.add_argument("--class-names", default=None, help="comma-separated class names")
    seg.add_argument("--channels", type=int, choices=(1, 3), default=None,
                     help="convert images to 1 or 3 channels (default: as decoded)")
    seg.add_argument("--skip-bad", action="store_true",
                     help="leave out bad pairs and list them in the manifest instead of failing")
    add_common(seg, natural=True)
    seg.set_defaults(func=_run_segmentation)


def _run_segmentation(args: argparse.Namespace) -> int:
    from fedsilo.prep import segmentation as seg

    if args.only is not None:
        raise ConfigError("--only is not offered for segmentation sets yet")
    bad: list[Any] = []
    if args.images is not None:
        if args.masks is None:
            raise ConfigError("--images needs --masks")
        pairs, bad = seg.pair_folders(args.images, args.masks, group_pattern=args.group_pattern)
    else:
        pairs = seg.pair_csv(args.pairs, group_pattern=args.group_pattern)
    test_pairs = None
    if args.test_images is not None:
        if args.test_masks is None:
            raise ConfigError("--test-images needs --test-masks")
        test_pairs, test_bad = seg.pair_folders(args.test_images, args.test_masks,
                                                group_pattern=args.group_pattern)
        bad += test_bad
    elif args.test_pairs is not None:
        test_pairs = seg.pair_csv(args.test_pairs, group_pattern=args.group_pattern)
    names = None if args.class_names is None else name_list(args.class_names)
    manifest = seg.prepare_segmentation(
        pairs, out=args.out, sites=args.sites, partition=args.partition, seed=args.seed,
        num_classes=args.classes, class_names=names, channels=args.channels,
        test_pairs=test_pairs, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, skip_bad=args.skip_bad, overwrite=args.overwrite,
        pre_bad=bad, source={"images": str(args.images or args.pairs)})
    return _report(manifest, args)


def _run_medmnist(args: argparse.Namespace) -> int:
    if args.source is not None:
        if args.download or args.size != 28:
            raise ConfigError("--size and --download go with --name, not --source "
                              "(a given .npz is read as it is)")
        return _prepare(load_medmnist(args.source), args)
    source = load_medmnist_by_name(args.name, size=args.size, root=args.root,
                                   download=args.download)
    _note_unverified(source)
    return _prepare(source, args)


def _run_torchvision(args: argparse.Namespace) -> int:
    from fedsilo.prep.tvdatasets import load_torchvision  # imports torch and torchvision

    source = load_torchvision(args.dataset, root=args.root, download=args.download)
    _note_unverified(source)
    return _prepare(source, args)


def _note_unverified(source: SourceData) -> None:
    if source.provenance.get("md5_verified") is False:
        print(f"note: the files of {source.name} do not match the release's md5; the "
              f"manifest records source.md5_verified: false")


def _run_synthetic(args: argparse.Namespace) -> int:
    source = make_synthetic(
        num_samples=args.samples,
        num_classes=args.classes,
        image_shape=(args.channels, args.size[0], args.size[1]),
        seed=args.seed,
    )
    return _prepare(source, args)


def _prepare(source: SourceData, args: argparse.Namespace) -> int:
    return _report(_prepare_source(source, args), args)


def _prepare_source(source: SourceData, args: argparse.Namespace) -> Manifest | None:
    return prepare_shards(
        source,
        out_dir=args.out,
        participants=args.sites,
        partition=args.partition,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        overwrite=args.overwrite,
        only=resolve_only(args.only),
    )


def _report(manifest: Manifest | None, args: argparse.Namespace) -> int:
    """Print what a preparation wrote; the exit status."""
    if manifest is None:
        print(f"wrote {resolve_only(args.only)} to {args.out}; the set is not complete yet")
        return 0
    print(f"wrote {manifest.num_sites} site shards, test.h5 and manifest.json to {args.out}")
    print(format_class_table(manifest))
    if manifest.skipped is not None:
        print(f"skipped {len(manifest.skipped)} bad input(s)"
              + (f"; listed under 'skipped' in {Path(args.out) / MANIFEST_FILE}"
                 if manifest.skipped else ""))
    return 0


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
    names = manifest.class_names or tuple(f"class {c}" for c in range(manifest.num_classes))
    header = ["file", "split", "samples", *names]
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

