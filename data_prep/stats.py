"""``fedsilo prep stats DIR``: how samples and classes spread over the sites of a shard set.

Prints, per site, its sample counts, its class counts (train + val), its label skew --
the total-variation distance between its class mix and the mix of all sites together
(0: the same mix, 1: disjoint classes) -- and its own pixel statistics; then draws the
class distribution per site as a PNG bar chart (counts, and fractions), the picture
people look at first to judge how non-IID a federation is.  Only the manifest and the
shards' attributes are read, never pixels.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.prep.args import FORMATTER
from fedsilo.shards import Manifest, load_manifest, read_split_attrs

PLOT_FILE = "class-distribution.png"


@dataclass(frozen=True)
class SiteStats:
    """One site of a shard set, as ``prep stats`` reports it."""

    file: str
    name: str
    train: int
    val: int
    class_counts: tuple[int, ...]  # train + val
    label_skew: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


def add_parser(sources: Any) -> None:
    """Add ``stats`` to the ``prep`` sub-parsers."""
    parser = sources.add_parser(
        "stats", help="per-site sample and class counts, and a bar chart of them",
        description="Print each site's sample and class counts, label skew and pixel "
        "statistics, and write a PNG bar chart of the class distribution per site.",
        formatter_class=FORMATTER,
    )
    parser.add_argument("dir", type=Path, help="directory holding manifest.json and the shards")
    parser.add_argument("--plot", type=Path, default=None,
                        help=f"where to write the chart (default: DIR/{PLOT_FILE})")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    parser.set_defaults(func=_run)


def site_stats(manifest: Manifest, directory: str | Path) -> list[SiteStats]:
    """Counts, label skew and pixel statistics of every site (shard attributes only)."""
    counts = np.array([_train_val(entry.class_counts) for entry in manifest.sites], dtype=np.int64)
    overall = counts.sum(axis=0) / max(1, counts.sum())
    names = site_names(manifest)
    result = []
    for k, entry in enumerate(manifest.sites):
        mix = counts[k] / max(1, counts[k].sum())
        train = read_split_attrs(Path(directory) / entry.file).get("train", {})
        result.append(SiteStats(
            file=entry.file, name=names[k], train=entry.num_samples.get("train", 0),
            val=entry.num_samples.get("val", 0), class_counts=tuple(int(v) for v in counts[k]),
            label_skew=float(0.5 * np.abs(mix - overall).sum()),
            mean=tuple(float(v) for v in np.ravel(train.get("mean", []))),
            std=tuple(float(v) for v in np.ravel(train.get("std", []))),
        ))
    return result


def site_names(manifest: Manifest) -> list[str]:
    """The column values of a natural partition, else ``site 0``, ``site 1``, ..."""
    natural = manifest.source.get("natural") or {}
    names = natural.get("sites") if isinstance(natural, dict) else None
    if isinstance(names, list) and len(names) == manifest.num_sites:
        return [str(n) for n in names]
    return [f"site {k}" for k in range(manifest.num_sites)]


def format_stats(manifest: Manifest, sites: list[SiteStats]) -> str:
    """The ``prep stats`` table."""
    classes = list(manifest.class_names or (f"class {c}" for c in range(manifest.num_classes)))
    header = ["file", "site", "train", "val", *classes, "skew", "mean", "std"]
    rows = [[s.file, s.name, str(s.train), str(s.val), *map(str, s.class_counts),
             f"{s.label_skew:.3f}", _join(s.mean), _join(s.std)] for s in sites]
    total = np.sum([s.class_counts for s in sites], axis=0)
    rows.append(["all sites", "", str(sum(s.train for s in sites)), str(sum(s.val for s in sites)),
                 *map(str, total), "", "", ""])
    test = manifest.test.class_counts.get("test", ())
    rows.append([manifest.test.file, "(test)", "", "", *map(str, test), "", "", ""])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    skews = [s.label_skew for s in sites]
    lines = [
        f"{manifest.num_sites} sites, {manifest.num_classes} classes, image "
        f"{'x'.join(map(str, manifest.image_shape))}, partition {manifest.partition}, seed "
        f"{manifest.seed}; label skew (total variation from the pooled class mix) mean "
        f"{np.mean(skews):.3f}, max {np.max(skews):.3f}"
    ]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(w) for cell, w in zip(row[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def plot_class_distribution(manifest: Manifest, sites: list[SiteStats], path: str | Path) -> Path:
    """Write the per-site class distribution (counts and fractions) as a PNG bar chart."""
    # the object-oriented API: no pyplot, no global figure state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    classes = list(manifest.class_names or (f"class {c}" for c in range(manifest.num_classes)))
    counts = np.array([s.class_counts for s in sites], dtype=np.float64)
    labels = [s.name for s in sites] + ["all sites"]
    fractions = np.vstack([counts, counts.sum(axis=0, keepdims=True)])
    fractions /= np.maximum(fractions.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(max(8.0, 1.2 * len(labels) + 4), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    colours = _colours(len(classes))
    x = np.arange(len(sites))
    bottom = np.zeros(len(sites))
    for c, name in enumerate(classes):
        left.bar(x, counts[:, c], bottom=bottom, color=colours[c], label=name)
        bottom += counts[:, c]
    left.set_xticks(x, [s.name for s in sites], rotation=30 if len(sites) > 6 else 0)
    left.set_ylabel("training + validation samples")
    left.set_title("samples per site")
    bottom = np.zeros(len(labels))
    x = np.arange(len(labels))
    for c, name in enumerate(classes):
        right.bar(x, fractions[:, c], bottom=bottom, color=colours[c])
        bottom += fractions[:, c]
    right.set_xticks(x, labels, rotation=30 if len(labels) > 6 else 0)
    right.set_ylim(0, 1)
    right.set_ylabel("fraction of the site's samples")
    right.set_title("class mix per site")
    if len(classes) <= 20:
        figure.legend(loc="outside right center", title="class")
    figure.suptitle(f"{manifest.num_sites} sites, partition {manifest.partition}")
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


def _run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.dir)
    sites = site_stats(manifest, args.dir)
    print(format_stats(manifest, sites))
    if not args.no_plot:
        path = plot_class_distribution(manifest, sites, args.plot or Path(args.dir) / PLOT_FILE)
        print(f"wrote {path}")
    return 0


def _train_val(class_counts: dict[str, tuple[int, ...]]) -> list[int]:
    splits = [np.asarray(class_counts[s]) for s in ("train", "val") if s in class_counts]
    return np.sum(splits, axis=0).tolist()


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](i / max(1, n - 1)) for i in range(n)]


def _join(values: tuple[float, ...]) -> str:
    return "/".join(f"{v:.3f}" for v in values)
