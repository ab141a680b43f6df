"""MedMNIST v2 ``.npz`` files (Yang et al., "MedMNIST v2", Scientific Data 10, 41, 2023).

Any 2-D MedMNIST set works: keys ``{train,val,test}_{images,labels}`` with images
(N, H, W) for grayscale or (N, H, W, 3) for RGB, and labels (N, 1).  Multi-label sets
(ChestMNIST, labels (N, 14)) are refused: fedsilo trains single-label classifiers.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.errors import DataError
from fedsilo.prep.source import SOURCE_SPLITS, SourceData
from fedsilo.shards import file_digest, sha256_file


def load_medmnist(npz_path: str | os.PathLike[str]) -> SourceData:
    """Load a MedMNIST 2-D ``.npz`` as uint8 NCHW images and int64 labels."""
    path = Path(npz_path)
    if not path.is_file():
        raise DataError(f"MedMNIST file not found: {path}")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if not is_zip:  # np.load would try it as a .npy or a pickle, and say so
        raise DataError(f"{path}: not a readable MedMNIST file: not a valid .npz file (a "
                        f".npz is a zip archive of .npy arrays; this file is not a zip)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = [k for k in ("train_images", "train_labels") if k not in keys]
            if missing:
                raise DataError(f"{path}: missing keys {missing} (has {sorted(keys)})")
            raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            for split in SOURCE_SPLITS:
                pair = (f"{split}_images", f"{split}_labels")
                present = [k for k in pair if k in keys]
                if len(present) == 1:
                    absent = [k for k in pair if k not in keys]
                    raise DataError(f"{path}: has {present[0]!r} but missing keys {absent}")
                if present:
                    raw[split] = (npz[pair[0]], npz[pair[1]])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # ValueError: object arrays refused by allow_pickle=False, or a mangled member
        reason = ("a member holds Python objects (a pickle), which fedsilo never loads"
                  if "allow_pickle" in str(exc) else " ".join(str(exc).split())[:300])
        raise DataError(f"{path}: not a readable MedMNIST .npz file: {reason}") from None

    splits = {
        split: (_to_nchw(images, path, split), _to_labels(labels, len(images), path, split))
        for split, (images, labels) in raw.items()
    }
    if len(splits["train"][1]) == 0:
        raise DataError(f"{path}: the train split is empty")
    num_classes = 1 + max(int(labels.max()) for _, labels in splits.values() if labels.size)
    return SourceData(
        name=path.stem,
        num_classes=num_classes,
        splits=splits,
        provenance={
            "kind": "medmnist",
            "name": path.stem,
            "path": str(path.resolve()),
            "sha256": sha256_file(path),
        },
    )


def _to_nchw(images: np.ndarray, path: Path, split: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {split}_images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        return images[:, None, :, :]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise DataError(
        f"{path}: {split}_images has shape {images.shape}; expected (N, H, W) or (N, H, W, 3)"
    )


def _to_labels(labels: np.ndarray, num_images: int, path: Path, split: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{path}: {split}_labels has shape {labels.shape}: multi-label data "
            f"({labels.shape[1]} labels per image) is not supported"
        )
    if labels.ndim == 2:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: {split}_labels must be integers of shape (N,) or (N, 1), "
            f"got {labels.dtype} {labels.shape}"
        )
    if len(labels) != num_images:
        raise DataError(f"{path}: {num_images} {split} images but {len(labels)} labels")
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: {split}_labels has negative label {int(labels.min())}")
    return labels.astype(np.int64)


def _check_is_the_set(source: SourceData, info: dict[str, Any], *, flag: str, size: int,
                      path: Path) -> None:
    """A file whose md5 is not the release's may still be the set (re-saved); one whose
    channels, image side, split sizes or classes differ from the set's is another set's
    file under this name, and is refused."""
    images, labels = source.splits["train"]
    counts = {split: len(data[1]) for split, data in source.splits.items()}
    expected = {k: int(v) for k, v in info.get("n_samples", {}).items()}
    differs = [f"{what} {got}, the set has {want}" for what, got, want in (
        ("channels", images.shape[1], int(info["n_channels"])),
        ("image side", images.shape[2], size),
        ("samples per split", counts, expected),
    ) if got != want]
    if labels.size and int(labels.max()) >= len(info["label"]):
        differs.append(f"label {int(labels.max())}, the set has {len(info['label'])} classes")
    if differs:
        raise DataError(f"{path} is not MedMNIST {flag} at {size} px (its md5 differs from "
                        f"the release's, and so does its content: {'; '.join(differs)}); "
                        f"give the set's own file, or --source for a file of your own")


#: the image sides MedMNIST+ publishes (28 is the original ``NAME.npz``)
MEDMNIST_SIZES = (28, 64, 128, 224)


def medmnist_file(flag: str, size: int) -> str:
    """The file name the ``medmnist`` package gives set ``flag`` at ``size`` px."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def load_medmnist_by_name(name: str, *, size: int = 28, root: str | os.PathLike[str],
                          download: bool = False) -> SourceData:
    """MedMNIST set ``name`` (``pneumoniamnist``...) at ``size`` px from ``root``, where the
    ``medmnist`` package keeps it (``pneumoniamnist_64.npz``); ``download`` fetches it with
    the package's own downloader (zenodo.org).  The package (and torch, which it imports) is
    loaded only here."""
    import medmnist

    flag = name.lower()
    info = medmnist.INFO.get(flag)
    if info is None or flag.endswith("3d"):
        known = ", ".join(k for k in medmnist.INFO if not k.endswith("3d"))
        raise DataError(f"unknown 2-D MedMNIST set {name!r}; known: {known}")
    cls = getattr(medmnist, info["python_class"])
    if size not in cls.available_sizes:
        raise DataError(f"MedMNIST {flag} comes at {', '.join(map(str, cls.available_sizes))} "
                        f"px, not {size}")
    root = Path(root).expanduser()
    path = root / medmnist_file(flag, size)
    url = info["url" if size == 28 else f"url_{size}"]
    if download and not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        try:
            cls(split="train", size=size, root=str(root), download=True)
        except Exception as exc:  # the package wraps every download failure in RuntimeError
            raise DataError(
                f"cannot download MedMNIST {flag} at {size} px ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0]}); without internet, download {url} "
                f"elsewhere and place it at {path}") from None
    if not path.is_file():
        raise DataError(f"MedMNIST {flag} at {size} px not found: {path} is missing; add "
                        f"--download to fetch it (needs internet: zenodo.org), or place the "
                        f"file from {url} there")
    source = load_medmnist(path)
    md5 = info.get("MD5" if size == 28 else f"MD5_{size}")
    if md5 is None or file_digest(path, "md5") != md5:
        _check_is_the_set(source, info, flag=flag, size=size, path=path)
    provenance = {**source.provenance, "name": flag, "size": size, "url": url,
                  "license": info.get("license"),
                  "classes": [info["label"][k] for k in sorted(info["label"], key=int)],
                  "md5_verified": md5 is not None and file_digest(path, "md5") == md5}
    return SourceData(name=f"{flag}_{size}", num_classes=max(source.num_classes,
                                                             len(info["label"])),
                      splits=source.splits, provenance=provenance)

