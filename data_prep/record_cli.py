"""``fedsilo prep folder|csv|dicom``: listed datasets (image files on disk) into shard sets."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from fedsilo.errors import ConfigError
from fedsilo.prep.args import (
    FORMATTER,
    add_common,
    add_source,
    finite_float,
    name_list,
    positive_int,
    resolve_only,
)
from fedsilo.prep.pipeline import prepare_record_shards
from fedsilo.prep.plan import TEST_SPLITS, natural_column
from fedsilo.prep.records import (
    DICOM_EXTENSIONS,
    IMAGE_EXTENSIONS,
    RecordSet,
    list_class_folders,
    read_label_file,
)
from fedsilo.prep.stream import RecordSource
from fedsilo.shards import Manifest, sha256_file


def add_parsers(sources: Any, *,
                report: Callable[[Manifest | None, argparse.Namespace], int]) -> None:
    """Add ``folder``, ``csv`` and ``dicom`` to the ``prep`` sub-parsers."""
    folder = sources.add_parser(
        "folder", help="a folder of images, one sub-folder per class (PNG/JPEG/BMP/TIFF)",
        description="Shard a folder of images with one sub-folder per class (class names "
        "sorted); images are found recursively. Test and validation splits are stratified "
        "hold-outs.", formatter_class=FORMATTER,
    )
    add_source(folder, "--root", what="folder holding one sub-folder per class")
    _add_classes(folder)
    _add_image_options(folder, natural=False)
    folder.set_defaults(func=lambda args: report(_run_folder(args), args))

    table = sources.add_parser(
        "csv", help="images listed in a CSV labels file (path, label, optional site/patient)",
        description="Shard the images a CSV (or .tsv) labels file lists: one row per image, "
        "with a path column (relative to --source, or absolute) and a label column; further "
        "columns can name the site (--partition natural:COLUMN) and the patient "
        "(--patient-column).", formatter_class=FORMATTER,
    )
    add_source(table, "--images", what="folder the paths in the labels file are relative to")
    table.add_argument("--labels", type=Path, required=True, default=argparse.SUPPRESS,
                       help="the CSV labels file (required)")
    _add_columns(table)
    _add_classes(table)
    _add_image_options(table, natural=True)
    table.set_defaults(func=lambda args: report(_run_csv(args), args))

    dicom = sources.add_parser(
        "dicom", help="DICOM images, with a CSV labels file or one sub-folder per class",
        description="Shard DICOM images (one image per file). Grayscale goes through the "
        "rescale slope/intercept and the window (--window, else the header's, else the "
        "image's range); MONOCHROME1 is inverted. Labels come from --labels (paths relative "
        "to --source) or, without it, from one sub-folder per class.", formatter_class=FORMATTER,
    )
    add_source(dicom, "--root", what="folder of the DICOM files")
    dicom.add_argument("--labels", type=Path, default=None,
                       help="CSV labels file; without it, one sub-folder of --source per class")
    dicom.add_argument("--window", type=finite_float, nargs=2, metavar=("C", "W"), default=None,
                       help="window center and width for every image (after rescale), "
                       "instead of each header's WindowCenter/WindowWidth")
    _add_columns(dicom)
    _add_classes(dicom)
    _add_image_options(dicom, natural=True)
    dicom.set_defaults(func=lambda args: report(_run_dicom(args), args))


def _add_columns(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path-column", default="path", help="labels-file column of image paths")
    parser.add_argument("--label-column", default="label", help="labels-file column of labels")
    parser.add_argument("--patient-column", default=None,
                        help="labels-file column of patient ids: a patient's images stay in one "
                        "split (train, val or test) and on one site")


def _add_classes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=name_list, default=None, metavar="NAME,NAME,...",
                        help="the class names, in label order; any other label (or class "
                        "folder) is a bad input. Default: the sorted names found, or the "
                        "integers 0..max when every label is an integer")


def _add_image_options(parser: argparse.ArgumentParser, *, natural: bool) -> None:
    parser.add_argument("--size", type=positive_int, nargs=2, metavar=("H", "W"), default=None,
                        help="resize every image to H x W (antialiased bilinear); without it "
                        "every image must have the size of the first")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="convert every image to 1 (grayscale) or 3 (RGB) channels; "
                        "without it every image must have the channels of the first")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="processes decoding images (and threads compressing shard chunks) in "
                        "parallel; the files do not depend on it")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out unreadable images, missing files, unknown labels... "
                        "and list them in manifest.json, instead of stopping at the first")
    parser.add_argument("--test-split", choices=TEST_SPLITS, default="global",
                        help="hold test.h5 out of all samples (global), or out of each "
                        "site's own samples (per-site)")
    add_common(parser, natural=natural)


def _run_folder(args: argparse.Namespace) -> Manifest | None:
    from fedsilo.prep.images import ImageDecoder

    if natural_column(args.partition) is not None:
        raise ConfigError(f"--partition {args.partition} takes its sites from a labels-file "
                          f"column; a class-folder layout has none: use 'fedsilo prep csv'")
    records = list_class_folders(args.source, extensions=IMAGE_EXTENSIONS, classes=args.classes,
                                 skip_bad=args.skip_bad)
    decoder = ImageDecoder(channels=args.channels, size=_size(args))
    provenance = {"kind": "folder", "root": str(args.source.resolve())}
    return _prepare(RecordSource(args.source.resolve().name, "folder", records, decoder,
                                 provenance), args)


def _run_csv(args: argparse.Namespace) -> Manifest | None:
    from fedsilo.prep.images import ImageDecoder

    records = _read_labels(args, root=args.source)
    decoder = ImageDecoder(channels=args.channels, size=_size(args))
    provenance = {"kind": "csv", "root": str(args.source.resolve()), **_labels_provenance(args)}
    return _prepare(RecordSource(args.labels.stem, "csv", records, decoder, provenance), args)


def _run_dicom(args: argparse.Namespace) -> Manifest | None:
    from fedsilo.prep.dicom import DicomDecoder

    if args.labels is None:
        if args.patient_column is not None or natural_column(args.partition) is not None:
            raise ConfigError("--patient-column and --partition natural:COLUMN need a labels "
                              "file (--labels)")
        records = list_class_folders(args.source, extensions=DICOM_EXTENSIONS, classes=args.classes,
                                     skip_bad=args.skip_bad)
        labels: dict[str, Any] = {}
    else:
        records = _read_labels(args, root=args.source)
        labels = _labels_provenance(args)
    if args.window is not None and args.window[1] <= 0:
        raise ConfigError(f"--window width must be positive, got {args.window[1]}")
    decoder = DicomDecoder(channels=args.channels, size=_size(args),
                           window=None if args.window is None else tuple(args.window))
    provenance = {"kind": "dicom", "root": str(args.source.resolve()), **labels}
    return _prepare(RecordSource(args.source.resolve().name, "dicom", records, decoder,
                                 provenance), args)


def _read_labels(args: argparse.Namespace, *, root: Path) -> RecordSet:
    columns = [c for c in (natural_column(args.partition), args.patient_column) if c is not None]
    return read_label_file(args.labels, root=root, path_column=args.path_column,
                           label_column=args.label_column, columns=columns, classes=args.classes,
                           skip_bad=args.skip_bad)


def _labels_provenance(args: argparse.Namespace) -> dict[str, Any]:
    return {"labels": str(args.labels.resolve()), "labels_sha256": sha256_file(args.labels),
            "path_column": args.path_column, "label_column": args.label_column}


def _prepare(source: RecordSource, args: argparse.Namespace) -> Manifest | None:
    return prepare_record_shards(
        source, out_dir=args.out, participants=args.sites, partition=args.partition,
        seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        test_split=args.test_split, patient_column=getattr(args, "patient_column", None),
        workers=args.workers, skip_bad=args.skip_bad, overwrite=args.overwrite,
        only=resolve_only(args.only),
    )


def _size(args: argparse.Namespace) -> tuple[int, int] | None:
    return None if args.size is None else (int(args.size[0]), int(args.size[1]))

