"""``fedsilo prep torchvision --dataset NAME`` and ``fedsilo prep medmnist --name NAME``:
tiny files written here in each set's own on-disk format, read by torchvision's dataset
classes and the medmnist package; nothing is downloaded."""

from __future__ import annotations

import argparse
import contextlib
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from fedsilo.errors import ConfigError, DataError
from fedsilo.prep.cli import add_parser
from fedsilo.shards import load_manifest, read_shard, verify_shard_set

RNG = np.random.default_rng(0)


def run_cli(*argv: str | Path) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="fedsilo")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = args.func(args)
    return status, out.getvalue()


def write_mnist(root: Path, name: str = "MNIST", *, train: int = 40, test: int = 10) -> None:
    """The four idx-ubyte files of MNIST/FashionMNIST under ROOT/NAME/raw (unpacked)."""
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", test)):
        images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, n) + labels.tobytes())


def write_cifar10(root: Path, *, per_batch: int = 8) -> np.ndarray:
    """CIFAR-10's python batches (pickled dicts, as the release ships them); returns the
    first training image (HWC)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = RNG.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        first = images[0].transpose(1, 2, 0) if first is None else first
        batch = {"data": images.reshape(per_batch, -1), "labels": list(range(per_batch))}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps(
        {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                         "horse", "ship", "truck"]}))
    return first


def write_svhn(root: Path, *, n: int = 30) -> None:
    root.mkdir(parents=True)
    for split in ("train", "test"):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1)  # SVHN labels the digit 0 as 10
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})


#: PneumoniaMNIST's split sizes: --name refuses a file whose content is another set's
RELEASE_SPLITS = (("train", 4708), ("val", 524), ("test", 624))


def write_medmnist(root: Path, size: int,
                   splits: tuple[tuple[str, int], ...] = (("train", 40), ("val", 8),
                                                          ("test", 10))) -> None:
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in splits:
        arrays[f"{split}_images"] = RNG.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    np.savez(root / (f"pneumoniamnist_{size}.npz" if size != 28 else "pneumoniamnist.npz"),
             **arrays)


def test_mnist_by_name(tmp_path):
    write_mnist(tmp_path / "data")
    status, out = run_cli("prep", "torchvision", "--dataset", "MNIST", "--root", tmp_path / "data",
                          "--sites", "2", "--out", tmp_path / "shards")
    assert status == 0, out
    manifest = load_manifest(tmp_path / "shards")
    assert manifest.image_shape == (1, 28, 28) and manifest.num_classes == 10
    assert sum(s.num_samples["train"] + s.num_samples["val"] for s in manifest.sites) == 40
    assert manifest.test.num_samples["test"] == 10
    assert manifest.source["kind"] == "torchvision" and manifest.source["classes"][0] == "0 - zero"
    assert verify_shard_set(tmp_path / "shards") == []


def test_cifar10_by_name_keeps_pixels_and_channels(tmp_path):
    first = write_cifar10(tmp_path / "data")
    status, out = run_cli("prep", "torchvision", "--dataset", "CIFAR10", "--root",
                          tmp_path / "data", "--sites", "2", "--out", tmp_path / "shards")
    assert status == 0, out
    assert "do not match the release's md5" in out  # tiny files, not the release
    manifest = load_manifest(tmp_path / "shards")
    assert manifest.image_shape == (3, 32, 32) and manifest.num_classes == 10
    assert manifest.source["md5_verified"] is False
    images = np.concatenate([split.images for s in manifest.sites for split in
                             read_shard(tmp_path / "shards" / s.file).splits.values()])
    assert any(np.array_equal(image.transpose(1, 2, 0), first) for image in images)


def test_svhn_by_name_maps_label_10_to_0(tmp_path):
    write_svhn(tmp_path / "data")
    status, out = run_cli("prep", "torchvision", "--dataset", "SVHN", "--root", tmp_path / "data",
                          "--sites", "1", "--out", tmp_path / "shards")
    assert status == 0, out
    manifest = load_manifest(tmp_path / "shards")
    assert manifest.num_classes == 10 and tuple(manifest.test.class_counts["test"]) == (3,) * 10


def test_a_missing_or_incomplete_set_names_the_files_and_suggests_download(tmp_path):
    with pytest.raises(DataError, match=r"FashionMNIST under .* 4 of 4 file\(s\) not found "
                       r".*train-images-idx3-ubyte.*add --download"):
        run_cli("prep", "torchvision", "--dataset", "FashionMNIST", "--root", tmp_path,
                "--sites", "1", "--out", tmp_path / "shards")
    write_cifar10(tmp_path / "c")
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"1 of 7 file\(s\) not found \(.*data_batch_3\)"):
        run_cli("prep", "torchvision", "--dataset", "CIFAR10", "--root", tmp_path / "c",
                "--sites", "1", "--out", tmp_path / "shards")


def test_download_without_network_is_a_clear_error(tmp_path):
    import socket

    try:
        socket.create_connection(("ossci-datasets.s3.amazonaws.com", 443), timeout=3).close()
        pytest.skip("this machine reaches the MNIST mirror")
    except OSError:
        pass
    with pytest.raises(DataError, match=r"cannot download MNIST into .*without internet"):
        run_cli("prep", "torchvision", "--dataset", "MNIST", "--root", tmp_path, "--download",
                "--sites", "1", "--out", tmp_path / "shards")


def test_medmnist_by_name_and_size(tmp_path):
    write_medmnist(tmp_path / "mm", 64, RELEASE_SPLITS)  # random pixels: the md5 differs
    status, out = run_cli("prep", "medmnist", "--name", "pneumoniamnist", "--size", "64",
                          "--root", tmp_path / "mm", "--sites", "2", "--out", tmp_path / "shards")
    assert status == 0, out
    manifest = load_manifest(tmp_path / "shards")
    assert manifest.image_shape == (1, 64, 64) and manifest.num_classes == 2
    assert manifest.source["classes"] == ["normal", "pneumonia"]
    assert manifest.source["size"] == 64 and manifest.source["md5_verified"] is False
    assert manifest.test.num_samples["test"] == 624


def test_medmnist_by_name_errors(tmp_path):
    write_medmnist(tmp_path / "mm", 28)
    with pytest.raises(DataError, match=r"pneumoniamnist_128.npz is missing; add --download"):
        run_cli("prep", "medmnist", "--name", "pneumoniamnist", "--size", "128", "--root",
                tmp_path / "mm", "--sites", "1", "--out", tmp_path / "s")
    with pytest.raises(DataError, match="unknown 2-D MedMNIST set 'pneumonia'; known: pathmnist"):
        run_cli("prep", "medmnist", "--name", "pneumonia", "--root", tmp_path / "mm",
                "--sites", "1", "--out", tmp_path / "s")
    with pytest.raises(ConfigError, match="go with --name"):
        run_cli("prep", "medmnist", "--source", tmp_path / "mm" / "pneumoniamnist.npz",
                "--size", "64", "--sites", "1", "--out", tmp_path / "s")
