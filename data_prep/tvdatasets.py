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
    if name in ("MNIST", "FashionMNIST"):
        for path in files:  # torchvision's reader only asserts, with no message
            check_idx(path)
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


#: IDX type codes (the third byte of the magic number) and their item sizes in bytes
_IDX_TYPES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}


def check_idx(path: Path) -> None:
    """A DataError unless ``path`` is a whole IDX file (MNIST's format: two zero bytes, a
    type code, the number of dimensions, each dimension as a big-endian uint32, then the
    items) whose size matches its header.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     _ = f.write(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9])); f.flush()
    ...     check_idx(Path(f.name))
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
            if len(head) == 4 and head[0] == head[1] == 0 and head[2] in _IDX_TYPES \
                    and 1 <= head[3] <= 4:
                dims = handle.read(4 * head[3])
            else:
                dims = b""
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if not dims or len(dims) != 4 * head[3]:
        raise DataError(f"{path} is not an IDX file (MNIST's format): its header "
                        f"{head.hex() or 'is empty'} is not 00 00 TYPE NDIM; replace it with "
                        f"the release's file (or use --download)")
    shape = [int.from_bytes(dims[i:i + 4], "big") for i in range(0, len(dims), 4)]
    expected = 4 + len(dims) + int(np.prod(shape, dtype=np.float64)) * _IDX_TYPES[head[2]]
    if size != expected:
        raise DataError(f"{path}: an IDX file of shape {shape} has {expected} bytes, this one "
                        f"{size} (truncated or not an IDX file); replace it with the "
                        f"release's file (or use --download)")


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

