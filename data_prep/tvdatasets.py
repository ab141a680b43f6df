"""The classic vision sets by name, read through torchvision's dataset classes:
``fedsilo prep torchvision --dataset MNIST|FashionMNIST|CIFAR10|CIFAR100|SVHN --root DIR``.

The train split is partitioned over the sites (each keeps a validation hold-out), the test
split becomes ``test.h5``.  ``--download`` fetches the files with torchvision's own
downloader; without it the files must already be under ``--root`` in torchvision's layout
(``MNIST/raw/*-ubyte``, ``cifar-10-batches-py/``, ``train_32x32.mat``...).

torchvision checks each file's md5 against the published release before reading it; here a
file that is present but does not match is still read (so a mirror's re-packed copy, or a
test's tiny file, works) and the manifest's ``source.md5_verified`` says so.  CIFAR's batches
are Python pickles, which torchvision's reader unpickles: only read CIFAR files you
downloaded from the release (or with ``--download``).

torch and torchvision are imported when a set is loaded, never by ``fedsilo prep`` itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.errors import DataError
from fedsilo.prep.source import SourceData
from fedsilo.shards import file_digest

#: the sets offered, and the files each needs under --root (relative paths, md5 by file)
DATASETS = ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100", "SVHN")


def expected_files(name: str, root: Path) -> dict[Path, str]:
    """The files torchvision reads for set ``name`` under ``root``, with their release md5.
    MNIST-style sets are listed unpacked (torchvision unpacks the ``.gz`` it downloads)."""
    from torchvision import datasets

    cls = getattr(datasets, name)
    if name in ("MNIST", "FashionMNIST"):
        raw = root / name / "raw"
        files = {}
        for url, md5 in cls.resources:
            files[raw / os.path.splitext(os.path.basename(url))[0]] = ""  # md5 is the .gz's
        return files
    if name in ("CIFAR10", "CIFAR100"):
        base = root / cls.base_folder
        return {**{base / f: md5 for f, md5 in cls.train_list + cls.test_list},
                base / cls.meta["filename"]: cls.meta["md5"]}
    return {root / entry[1]: entry[2] for split, entry in cls.split_list.items()
            if split in ("train", "test")}


def load_torchvision(name: str, *, root: str | os.PathLike[str],
                     download: bool = False) -> SourceData:
    """Set ``name`` (one of :data:`DATASETS`) under ``root`` as uint8 NCHW train and test
    splits; a DataError naming the missing files (and suggesting ``--download``), or the
    download that failed."""
    if name not in DATASETS:
        lower = {d.lower(): d for d in DATASETS}
        if name.lower() not in lower:
            raise DataError(f"unknown torchvision dataset {name!r}; known: {', '.join(DATASETS)}")
        name = lower[name.lower()]
    root = Path(root).expanduser()
    if download:
        _download(name, root)
    files = expected_files(name, root)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise DataError(
            f"{name} under {root} is missing or incomplete: {len(missing)} of {len(files)} "
            f"file(s) not found ({', '.join(missing)}); add --download to fetch them with "
            f"torchvision (needs internet), or place the release's files there")
    splits, classes = {}, None
    for split in ("train", "test"):
        try:
            images, labels, classes = _read(name, root, split)
        except DataError:
            raise
        except Exception as exc:  # torchvision's readers: pickle, scipy, struct errors
            raise DataError(f"{name} under {root}: cannot read the {split} split "
                            f"({type(exc).__name__}: {exc})") from None
        splits[split] = (images, labels)
    num_classes = len(classes) if classes else 1 + max(int(s[1].max()) for s in splits.values())
    verified = all(not md5 or file_digest(p, "md5") == md5 for p, md5 in files.items())
    return SourceData(name=name.lower(), num_classes=num_classes, splits=splits, provenance={
        "kind": "torchvision", "name": name, "root": str(root.resolve()),
        "classes": list(classes) if classes else None, "md5_verified": verified,
    })


def _download(name: str, root: Path) -> None:
    from urllib.error import URLError

    from torchvision import datasets

    root.mkdir(parents=True, exist_ok=True)
    cls = getattr(datasets, name)
    try:
        for split in ("train", "test"):
            cls(str(root), download=True, **_split_kwargs(name, split))
    except (URLError, OSError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot download {name} into {root} ({type(exc).__name__}: {reason}); without "
            f"internet, download the release elsewhere and place its files under {root} "
            f"(torchvision's layout, e.g. "
            f"{', '.join(str(p) for p in list(expected_files(name, root))[:2])})") from None


def _split_kwargs(name: str, split: str) -> dict[str, Any]:
    return {"split": split} if name == "SVHN" else {"train": split == "train"}


def _read(name: str, root: Path, split: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """torchvision's dataset object for ``split``, its arrays as uint8 NCHW and int64."""
    from torchvision import datasets

    cls = getattr(datasets, name)
    if name in ("CIFAR10", "CIFAR100"):
        # the md5 check of a file that is present is reported (md5_verified), not enforced:
        # torchvision's check_integrity(path, None) only asks that the file exist
        cls = type(name, (cls,), {"train_list": [[f, None] for f, _ in cls.train_list],
                                  "test_list": [[f, None] for f, _ in cls.test_list],
                                  "meta": {**cls.meta, "md5": None}})
    elif name == "SVHN":
        cls = type(name, (cls,), {"split_list": {k: [url, f, None] for k, (url, f, _)
                                                 in cls.split_list.items()}})
    dataset = cls(str(root), download=False, **_split_kwargs(name, split))
    if name in ("MNIST", "FashionMNIST"):
        images = dataset.data.numpy()[:, None]
        labels = dataset.targets.numpy()
    elif name == "SVHN":
        images, labels = dataset.data, dataset.labels
    else:
        images = np.asarray(dataset.data).transpose(0, 3, 1, 2)
        labels = np.asarray(dataset.targets)
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{name} {split}: expected uint8 images, got {images.dtype} "
                        f"{images.shape}")
    return images, np.asarray(labels, dtype=np.int64), getattr(dataset, "classes", None)

