"""``fedsilo prep``: MedMNIST and synthetic sources through the CLI to verified shard sets."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedsilo.errors import ConfigError, DataError
from fedsilo.prep.cli import add_parser
from fedsilo.prep.medmnist import load_medmnist
from fedsilo.prep.partition import class_histogram
from fedsilo.prep.pipeline import prepare_shards
from fedsilo.prep.source import SourceData
from fedsilo.prep.synthetic import make_synthetic
from fedsilo.shards import load_manifest, read_shard, sha256_file, verify_shard_set

PNEUMONIA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "pneumoniamnist.npz"


def run_cli(*argv: str) -> tuple[int, str]:
    """Parse with a local harness shaped like fedsilo's main; return (status, stdout)."""
    parser = argparse.ArgumentParser(prog="fedsilo")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(list(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = args.func(args)
    return status, out.getvalue()


def prep_pneumonia(out: Path, *extra: str) -> tuple[int, str]:
    return run_cli("prep", "medmnist", "--source", str(PNEUMONIA), "--sites", "3",
                   "--partition", "dirichlet:0.5", "--seed", "0", "--out", str(out), *extra)


@pytest.fixture(scope="module")
def pneumonia_set(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("pneumonia") / "shards"
    status, text = prep_pneumonia(out)
    assert status == 0
    return out, text


def _rows(images: np.ndarray) -> np.ndarray:
    """Images as sortable byte rows, to compare sets of samples irrespective of order."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    return np.sort(flat.view(np.dtype((np.void, flat.shape[1]))).ravel())


# --- PneumoniaMNIST end to end ------------------------------------------------------------


def test_pneumonia_shard_set_files_hashes_and_counts(pneumonia_set):
    out, _ = pneumonia_set
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "site-000.h5", "site-001.h5", "site-002.h5", "test.h5"]
    manifest = load_manifest(out)
    assert (manifest.num_sites == 3 and manifest.num_classes == 2
            and manifest.image_shape == (1, 28, 28))
    assert manifest.partition == "dirichlet:0.5" and manifest.seed == 0
    assert (manifest.source["kind"] == "medmnist"
            and manifest.source["sha256"] == sha256_file(PNEUMONIA))
    for entry in (*manifest.sites, manifest.test):
        assert sha256_file(out / entry.file) == entry.sha256
    assert sum(e.num_samples["train"] for e in manifest.sites) == 4708
    assert sum(e.num_samples["val"] for e in manifest.sites) == 524
    assert manifest.test.num_samples == {"test": 624}
    assert manifest.test.class_counts["test"] == (234, 390)
    total_train = np.sum([e.class_counts["train"] for e in manifest.sites], axis=0)
    assert total_train.tolist() == [1214, 3494]


def test_pneumonia_shards_hold_exactly_the_source_samples(pneumonia_set):
    out, _ = pneumonia_set
    with np.load(PNEUMONIA) as npz:
        train, val, test = npz["train_images"], npz["val_images"], npz["test_images"]
        test_labels = npz["test_labels"][:, 0]
    shards = [read_shard(out / f"site-{k:03d}.h5") for k in range(3)]
    site_train = np.concatenate([s.splits["train"].images for s in shards])
    site_val = np.concatenate([s.splits["val"].images for s in shards])
    assert np.array_equal(_rows(site_train), _rows(train[:, None]))  # each sample exactly once
    assert np.array_equal(_rows(site_val), _rows(val[:, None]))
    held = read_shard(out / "test.h5").splits["test"]
    assert np.array_equal(held.images[:, 0], test) and np.array_equal(held.labels, test_labels)
    assert [s.site for s in shards] == [0, 1, 2]
    manifest = load_manifest(out)
    np.testing.assert_allclose(manifest.normalization_mean, [(train / 255.0).mean()], rtol=1e-12)
    np.testing.assert_allclose(manifest.normalization_std, [(train / 255.0).std()], rtol=1e-9)


def test_pneumonia_sites_are_label_skewed_and_val_follows_train_mix(pneumonia_set):
    out, _ = pneumonia_set
    manifest = load_manifest(out)
    train = np.array([e.class_counts["train"] for e in manifest.sites], dtype=float)
    val = np.array([e.class_counts["val"] for e in manifest.sites], dtype=float)
    mixes = train[:, 0] / train.sum(axis=1)
    assert mixes.max() - mixes.min() > 0.3  # dirichlet:0.5 over 2 classes: clearly skewed
    expected = train / train.sum(axis=0) * val.sum(axis=0)  # assign_like's per-class shares
    assert np.all(np.abs(val - expected) < 1.0)


def test_prep_prints_the_class_histogram_table(pneumonia_set):
    out, text = pneumonia_set
    manifest = load_manifest(out)
    lines = text.splitlines()
    for entry in manifest.sites:
        for split in ("train", "val"):
            row = next(line for line in lines
                       if line.startswith(entry.file) and f" {split} " in line)
            assert row.split()[2:] == [str(entry.num_samples[split]),
                                       *map(str, entry.class_counts[split])]
    assert any(line.split() == ["test.h5", "test", "624", "234", "390"] for line in lines)
    assert "class 0" in text and "class 1" in text


def test_same_command_gives_identical_manifest_and_files(pneumonia_set, tmp_path):
    out, _ = pneumonia_set
    status, _ = prep_pneumonia(tmp_path / "again")
    assert status == 0
    first = json.loads((out / "manifest.json").read_text())
    second = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert first == second
    assert ((out / "manifest.json").read_bytes()
            == (tmp_path / "again" / "manifest.json").read_bytes())
    status, _ = run_cli("prep", "medmnist", "--source", str(PNEUMONIA), "--sites", "3",
                        "--partition", "dirichlet:0.5", "--seed", "1",
                        "--out", str(tmp_path / "seed1"))
    other = json.loads((tmp_path / "seed1" / "manifest.json").read_text())
    assert other["sites"] != first["sites"]  # the seed matters


def test_verify_passes_then_reports_a_flipped_byte(pneumonia_set, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(pneumonia_set[0], out)
    status, text = run_cli("prep", "verify", str(out))
    assert status == 0 and "OK" in text and "site-002.h5" in text
    site = out / "site-001.h5"
    data = bytearray(site.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 16):
        data[offset] ^= 0xFF
    site.write_bytes(bytes(data))
    status, text = run_cli("prep", "verify", str(out))
    assert status == 2
    problems = [line for line in text.splitlines() if line.startswith("  - ")]
    assert problems and all("site-001.h5" in p for p in problems)
    assert any("sha256 mismatch" in p for p in problems)


def test_refuses_to_overwrite_and_overwrites_on_request(tmp_path):
    out = tmp_path / "set"
    assert prep_pneumonia(out)[0] == 0
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    with pytest.raises(DataError, match="already holds a shard set .*--overwrite"):
        prep_pneumonia(out)
    with pytest.raises(DataError, match="already holds"):
        prep_pneumonia(out, "--sites", "2")
    with pytest.raises(ConfigError, match="unknown partitioner"):
        prep_pneumonia(out, "--partition", "bogus", "--overwrite")
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before  # refusals touch nothing
    status, _ = run_cli("prep", "medmnist", "--source", str(PNEUMONIA), "--sites", "2",
                        "--seed", "0", "--out", str(out), "--overwrite")
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "site-000.h5", "site-001.h5", "test.h5"]
    assert load_manifest(out).partition == "iid" and verify_shard_set(out) == []


def test_load_medmnist_pneumonia():
    source = load_medmnist(PNEUMONIA)
    assert source.num_classes == 2 and source.name == "pneumoniamnist"
    assert {k: v[0].shape for k, v in source.splits.items()} == {
        "train": (4708, 1, 28, 28), "val": (524, 1, 28, 28), "test": (624, 1, 28, 28)}
    assert all(v[0].dtype == np.uint8 and v[1].dtype == np.int64 for v in source.splits.values())


# --- other MedMNIST layouts -------------------------------------------------------------


def _write_rgb_npz(path: Path, *, num_classes: int = 5, size: int = 12) -> dict[str, np.ndarray]:
    src = make_synthetic(num_samples=400, num_classes=num_classes, image_shape=(3, size, size),
                         seed=3, val_samples=60, test_samples=80)
    arrays = {}
    for split, (images, labels) in src.splits.items():
        arrays[f"{split}_images"] = images.transpose(0, 2, 3, 1)  # MedMNIST stores NHWC
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return arrays


def test_rgb_five_class_npz_goes_through_the_same_path(tmp_path):
    arrays = _write_rgb_npz(tmp_path / "rgb.npz")
    status, text = run_cli("prep", "medmnist", "--source", str(tmp_path / "rgb.npz"),
                           "--sites", "4", "--partition", "dirichlet:1.0", "--seed", "0",
                           "--out", str(tmp_path / "out"))
    assert status == 0 and "class 4" in text
    manifest = load_manifest(tmp_path / "out")
    assert manifest.image_shape == (3, 12, 12) and manifest.num_classes == 5
    assert len(manifest.normalization_mean) == 3
    assert manifest.total_samples("train") == 400 and manifest.total_samples("val") == 60
    held = read_shard(tmp_path / "out" / "test.h5").splits["test"]
    assert np.array_equal(held.images, arrays["test_images"].transpose(0, 3, 1, 2))
    assert np.array_equal(held.labels, arrays["test_labels"][:, 0])
    assert verify_shard_set(tmp_path / "out") == []


def test_multi_label_npz_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "chest.npz", train_images=rng.integers(0, 255, (20, 8, 8), dtype=np.uint8),
             train_labels=rng.integers(0, 2, (20, 14)))
    with pytest.raises(DataError, match="multi-label data .*14 labels per image.* not supported"):
        run_cli("prep", "medmnist", "--source", str(tmp_path / "chest.npz"), "--sites", "2",
                "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_keys_are_named(tmp_path):
    np.savez(tmp_path / "a.npz", train_images=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"missing keys \['train_labels'\]"):
        load_medmnist(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", train_images=np.zeros((4, 8, 8), np.uint8),
             train_labels=np.zeros((4, 1), np.uint8), val_images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"missing keys \['val_labels'\]"):
        load_medmnist(tmp_path / "b.npz")
    with pytest.raises(DataError, match="not found"):
        load_medmnist(tmp_path / "absent.npz")
    (tmp_path / "c.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="not a readable MedMNIST"):
        load_medmnist(tmp_path / "c.npz")


# --- synthetic source -------------------------------------------------------------------


def test_synthetic_cli_holds_out_test_and_val(tmp_path):
    status, text = run_cli("prep", "synthetic", "--samples", "600", "--classes", "3",
                           "--channels", "3", "--size", "16", "16", "--sites", "2", "--seed", "1",
                           "--out", str(tmp_path / "syn"))
    assert status == 0 and "site-001.h5" in text
    manifest = load_manifest(tmp_path / "syn")
    assert manifest.image_shape == (3, 16, 16) and manifest.num_classes == 3
    assert manifest.test.num_samples["test"] == 120  # --test-fraction 0.2
    for entry in manifest.sites:
        n = entry.num_samples["train"] + entry.num_samples["val"]
        assert abs(entry.num_samples["val"] - 0.1 * n) <= 1  # --val-fraction 0.1
    assert manifest.total_samples("train") + manifest.total_samples("val") == 480
    assert manifest.source["kind"] == "synthetic" and manifest.source["seed"] == 1
    assert verify_shard_set(tmp_path / "syn") == []


def test_synthetic_is_deterministic_and_streams_are_independent():
    a = make_synthetic(num_samples=200, num_classes=3, seed=5)
    b = make_synthetic(num_samples=200, num_classes=3, seed=5, test_samples=50)
    c = make_synthetic(num_samples=200, num_classes=3, seed=6)
    assert np.array_equal(a.splits["train"][0], b.splits["train"][0])
    assert np.array_equal(a.splits["train"][1], b.splits["train"][1])
    assert not np.array_equal(a.splits["train"][0], c.splits["train"][0])
    assert set(a.splits) == {"train"} and b.splits["test"][0].shape == (50, 1, 28, 28)


@pytest.mark.parametrize(
    ("num_classes", "shape", "floor"), [(2, (1, 28, 28), 0.75), (5, (3, 16, 16), 0.45)]
)
def test_synthetic_classes_are_learnable_but_not_trivial(num_classes, shape, floor):
    src = make_synthetic(num_samples=3000, num_classes=num_classes, image_shape=shape,
                         seed=0, test_samples=1000)
    (x, y), (xt, yt) = src.splits["train"], src.splits["test"]
    x = x.reshape(len(x), -1) / 255.0
    xt = xt.reshape(len(xt), -1) / 255.0
    centroids = np.stack([x[y == c].mean(axis=0) for c in range(num_classes)])
    pred = np.argmin(((xt[:, None, :] - centroids[None]) ** 2).sum(axis=-1), axis=1)
    accuracy = (pred == yt).mean()
    # nearest class mean, about the weakest learner: far above chance (0.5 and 0.2),
    # yet the blended images keep even the best model near 0.9
    assert floor < accuracy < 0.95, accuracy
    assert np.all(class_histogram(y, num_classes) > 0.6 * len(y) / num_classes)
    assert 60 < x.mean() * 255 < 200  # mid-grey images, neither saturated nor black


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(DataError, match="at least 2 classes"):
        make_synthetic(num_samples=10, num_classes=1)
    with pytest.raises(DataError, match="image_shape"):
        make_synthetic(num_samples=10, image_shape=(28, 28))


# --- pipeline and CLI details -------------------------------------------------------------


def test_source_data_validates():
    images = np.zeros((3, 1, 4, 4), np.uint8)
    with pytest.raises(DataError, match="no 'train' split"):
        SourceData(name="x", num_classes=2, splits={"val": (images, np.zeros(3, np.int64))})
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        SourceData(name="x", num_classes=2, splits={"train": (images, np.array([0, 1, 2]))})


def test_pipeline_rejects_bad_settings(tmp_path):
    src = make_synthetic(num_samples=50, seed=0)
    with pytest.raises(ConfigError, match="participants must be a positive integer"):
        prepare_shards(src, out_dir=tmp_path / "a", participants=0, partition="iid", seed=0)
    with pytest.raises(ConfigError, match="val_fraction must be in"):
        prepare_shards(src, out_dir=tmp_path / "a", participants=2, partition="iid", seed=0,
                       val_fraction=1.5)
    with pytest.raises(ConfigError,
                       match="number of sites must be between 1 and the number of samples"):
        prepare_shards(src, out_dir=tmp_path / "a", participants=60, partition="iid", seed=0)
    with pytest.raises(ConfigError, match="unknown partitioner 'zipf'; known: classes, dirichlet"):
        run_cli("prep", "synthetic", "--samples", "50", "--sites", "2", "--partition", "zipf:1",
                "--out", str(tmp_path / "b"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        prepare_shards(src, out_dir=tmp_path / "file", participants=2, partition="iid", seed=0)


@pytest.mark.parametrize("source, old", [("medmnist", "--npz"), ("folder", "--root"),
                                         ("csv", "--images"), ("dicom", "--root")])
def test_old_spellings_are_aliases_of_sites_and_source(source, old):
    from fedsilo.cli import build_parser

    parser = build_parser()
    extra = ["--labels", "l.csv"] if source == "csv" else []
    new = parser.parse_args(["prep", source, "--source", "d", "--sites", "2", "--out", "o", *extra])
    was = parser.parse_args(["prep", source, old, "d", "--participants", "2", "--out", "o", *extra])
    assert vars(new) == vars(was)
    assert (new.source, new.sites) == (Path("d"), 2)
    for command, flag in (("demo", "--participants"), ("keys", "--participants")):
        argv = [command, flag, "5"] + (["--out", "k"] if command == "keys" else [])
        assert parser.parse_args(argv).sites == 5


def test_help_lists_every_option_with_its_default(capsys):
    for command in ("medmnist", "synthetic", "verify"):
        with pytest.raises(SystemExit) as exit_info:
            run_cli("prep", command, "--help")
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        if command != "verify":
            for option in ("--sites", "--partition", "--seed", "--out", "--val-fraction",
                           "--test-fraction", "--overwrite"):
                assert option in text
            assert "(default: iid)" in text and "(default: 0.1)" in text and "(default: 0)" in text
        if command == "synthetic":
            assert "(default: 2000)" in text and "(default: [28, 28])" in text
