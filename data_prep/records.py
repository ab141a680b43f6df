"""Listing a dataset before decoding it: one record (path, label, extra columns) per image.

Partitioning and splitting need only labels, sites and patients, which are cheap; the
pixels are decoded later, chunk by chunk (:mod:`fedsilo.prep.stream`).  Two layouts are
read here:

* **class folders** -- ``ROOT/<class>/**/<image>``, one sub-folder per class, class
  names sorted (or as ``classes`` lists them);
* **a labels file** -- a CSV (or ``.tsv``) with a path column (relative to a root
  folder, or absolute), a label column and optionally more columns (the site of
  ``natural:COLUMN``, a patient id).  Rows keep the file's order.  Labels are class
  names (sorted), or non-negative integers used as class indices as they are.

Problems found while listing (a missing image, an unknown label, a duplicate path, an
empty class folder) are :class:`BadInput` items: by default the first one stops the
preparation with a :class:`DataError` naming the path; with ``skip_bad`` they are left
out and recorded.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from fedsilo.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: DICOM files often have no extension at all
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima", "")

_INTEGER = re.compile(r"^\d+$")


@dataclass(frozen=True)
class BadInput:
    """An input that cannot be used, and why."""

    path: str
    reason: str

    def message(self) -> str:
        return f"{self.path}: {self.reason}"

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class RecordSet:
    """The listed images: ``paths[i]`` has label ``labels[i]`` and ``columns[name][i]``."""

    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: inputs left out while listing (only with ``skip_bad``)
    problems: tuple[BadInput, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """sha256 of the listing (paths, labels, columns): it identifies the plan's input."""
        digest = hashlib.sha256()
        digest.update("\0".join(self.class_names).encode())
        for i, path in enumerate(self.paths):
            cols = "\t".join(self.columns[name][i] for name in sorted(self.columns))
            digest.update(f"\n{path}\t{int(self.labels[i])}\t{cols}".encode())
        return digest.hexdigest()


def list_class_folders(
    root: str | os.PathLike[str],
    *,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    classes: Sequence[str] | None = None,
    skip_bad: bool = False,
) -> RecordSet:
    """Records of ``root/<class>/**/<file>`` for files whose extension is in ``extensions``.

    Hidden files and folders are ignored.  An empty class folder, or (when ``classes``
    is given) a folder that is not one of them, is a bad input; a listed class without
    a folder is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    folders = {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if not folders:
        raise DataError(f"{root} has no class sub-folders (expected one folder per class)")
    problems: list[BadInput] = []
    if classes is not None:
        names = _check_class_list(classes)
        absent = [c for c in names if c not in folders]
        if absent:
            raise DataError(f"{root / absent[0]}: class folder not found "
                            f"(--classes lists {absent[0]!r})")
        problems += [BadInput(str(folders[name]),
                              f"unknown class folder: not one of --classes {list(names)}")
                     for name in sorted(set(folders) - set(names))]
    else:
        names = tuple(sorted(folders))
    wanted = {e.lower() for e in extensions}
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        folder = folders[name]
        files = sorted(
            (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in wanted
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
            key=lambda p: p.relative_to(folder).as_posix(),
        )
        if not files:
            shown = ", ".join(e or "(none)" for e in extensions)
            problems.append(BadInput(str(folder), f"class folder {name!r} has no images ({shown})"))
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    return _finish(paths, labels, names, {}, problems, skip_bad=skip_bad, where=str(root))


def read_label_file(
    labels_file: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str],
    path_column: str = "path",
    label_column: str = "label",
    columns: Iterable[str] = (),
    classes: Sequence[str] | None = None,
    skip_bad: bool = False,
) -> RecordSet:
    """Records of a CSV labels file; paths are relative to ``root`` (or absolute).

    ``columns`` are further columns to keep (e.g. a site or patient id column).  Rows
    with an empty path or label, a path that is not a file, a path already listed, or
    a label outside ``classes`` are bad inputs.
    """
    labels_file, root = Path(labels_file), Path(root)
    if not labels_file.is_file():
        raise DataError(f"labels file not found: {labels_file}")
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    extra = list(dict.fromkeys(columns))
    delimiter = "\t" if labels_file.suffix.lower() == ".tsv" else ","
    try:
        with open(labels_file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames
            if not header:
                raise DataError(f"{labels_file}: the labels file is empty (no header row)")
            for option, name in (("--path-column", path_column), ("--label-column", label_column),
                                 *(("a column option", c) for c in extra)):
                if name not in header:
                    raise ConfigError(f"{labels_file}: no column {name!r} ({option}); its columns "
                                      f"are {header}")
            rows = [(i, row) for i, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{labels_file}: cannot read the labels file: {exc}") from exc

    problems: list[BadInput] = []
    seen: dict[str, int] = {}
    kept: list[tuple[str, str, list[str], int]] = []
    for i, row in rows:
        where = f"{labels_file}, row {i}"
        path_text = (row.get(path_column) or "").strip()
        if not path_text:
            problems.append(BadInput(where, "empty path"))
            continue
        path = os.path.normpath(os.path.join(root, path_text))
        if path in seen:
            problems.append(BadInput(path, f"duplicate path: row {i} repeats row {seen[path]} "
                                           f"of {labels_file}"))
            continue
        seen[path] = i
        label = (row.get(label_column) or "").strip()
        if not label:
            problems.append(BadInput(path, f"empty label ({where})"))
        elif not os.path.isfile(path):
            problems.append(BadInput(path, f"image not found ({where})"))
        else:
            kept.append((path, label, [(row.get(c) or "").strip() for c in extra], i))

    if classes is not None:
        names = _check_class_list(classes)
    elif kept and all(_INTEGER.match(label) for _, label, _, _ in kept):
        names = tuple(str(c) for c in range(1 + max(int(label) for _, label, _, _ in kept)))
    else:
        names = tuple(sorted({label for _, label, _, _ in kept}))
    index = {name: c for c, name in enumerate(names)}
    integer = classes is None and names == tuple(str(c) for c in range(len(names)))
    paths, labels, values = [], [], []
    for path, label, cols, i in kept:
        key = str(int(label)) if integer and _INTEGER.match(label) else label
        if key not in index:
            problems.append(BadInput(path, f"unknown label {label!r} ({labels_file}, row {i}); "
                                           f"known: {list(names)}"))
            continue
        paths.append(path)
        labels.append(index[key])
        values.append(cols)
    table = {name: tuple(v[j] for v in values) for j, name in enumerate(extra)}
    return _finish(paths, labels, names, table, problems, skip_bad=skip_bad, where=str(labels_file))


def raise_bad(problems: Sequence[BadInput], *, where: str) -> None:
    """Raise a DataError naming the first problem (and how many more there are)."""
    if not problems:
        return
    more = (f" (and {len(problems) - 1} more problem(s) in {where})" if len(problems) > 1 else "")
    raise DataError(f"{problems[0].message()}{more}; --skip-bad leaves bad inputs out and "
                    f"lists them in the manifest")


def _finish(paths: list[str], labels: list[int], names: tuple[str, ...],
            columns: dict[str, tuple[str, ...]], problems: list[BadInput], *, skip_bad: bool,
            where: str) -> RecordSet:
    if not skip_bad:
        raise_bad(problems, where=where)
    if not paths:
        raise DataError(f"{where}: no usable images found")
    return RecordSet(paths=tuple(paths), labels=np.asarray(labels, dtype=np.int64),
                     class_names=names, columns=columns, problems=tuple(problems))


def _check_class_list(classes: Sequence[str]) -> tuple[str, ...]:
    names = tuple(str(c).strip() for c in classes)
    if not names or any(not n for n in names):
        raise ConfigError(f"--classes must list non-empty class names, got {list(classes)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--classes lists a class twice: {list(names)}")
    return names
