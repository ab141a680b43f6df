"""Shard format: round trip, streaming, atomicity, check_shard failures, manifest, verify."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedsilo.errors import DataError, ShardError
from fedsilo.shards import (
    FORMAT_VERSION,
    Manifest,
    ShardWriter,
    build_manifest,
    check_shard,
    load_manifest,
    read_shard,
    sha256_file,
    verify_shard_set,
    write_manifest,
    write_shard,
)

SHAPE = (1, 28, 28)


def _data(n: int, *, seed: int = 0, shape=SHAPE, num_classes: int = 3):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).astype(np.int64)
    return images, labels


def _site(path: Path, *, n_train: int = 300, n_val: int = 40, seed: int = 0, **kwargs):
    return write_shard(
        path,
        kind="site",
        splits={"train": _data(n_train, seed=seed), "val": _data(n_val, seed=seed + 100)},
        num_classes=3,
        attrs=kwargs.get("attrs", {"site": 0}),
    )


# --- writing and reading ---------------------------------------------------------------


def test_round_trip_is_pixel_exact_with_numpy_stats(tmp_path):
    shape = (3, 10, 12)
    train = _data(700, shape=shape, seed=1)
    val = _data(50, shape=shape, seed=2)
    info = write_shard(
        tmp_path / "s.h5", kind="site", splits={"train": train, "val": val}, num_classes=3,
        attrs={"site": 4, "note": "hello", "dims": [1, 2]},
    )
    shard = read_shard(tmp_path / "s.h5")
    assert shard.kind == "site" and shard.num_classes == 3 and shard.image_shape == shape
    assert shard.attrs == {"site": 4, "note": "hello", "dims": [1, 2]} and shard.site == 4
    for name, (images, labels) in (("train", train), ("val", val)):
        split = shard.splits[name]
        assert split.images.dtype == np.uint8 and np.array_equal(split.images, images)
        assert split.labels.dtype == np.int64 and np.array_equal(split.labels, labels)
        scaled = images / 255.0
        np.testing.assert_allclose(split.mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-12)
        np.testing.assert_allclose(split.std, scaled.std(axis=(0, 2, 3)), rtol=1e-10)
        assert split.class_counts.tolist() == np.bincount(labels, minlength=3).tolist()
        assert info.num_samples[name] == len(labels)
        assert info.class_counts[name] == tuple(np.bincount(labels, minlength=3))
        np.testing.assert_allclose(info.stats[name].mean, scaled.mean(axis=(0, 2, 3)))
    assert info.sha256 == sha256_file(tmp_path / "s.h5")
    assert read_shard(tmp_path / "s.h5", splits=["val"]).splits.keys() == {"val"}


def test_file_layout_matches_the_format(tmp_path):
    images, labels = _data(600)
    write_shard(tmp_path / "t.h5", kind="test", splits={"test": (images, labels)}, num_classes=3)
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert f.attrs["fedsilo_format"] == FORMAT_VERSION == 1
        assert f.attrs["kind"] == "test" and f.attrs["num_classes"] == 3
        assert f.attrs["image_shape"].tolist() == [1, 28, 28]
        ds = f["test/images"]
        assert ds.dtype == np.uint8 and ds.chunks == (256, 1, 28, 28)
        assert ds.compression == "gzip" and ds.compression_opts == 4 and ds.shuffle
        assert ds.maxshape[0] is None
        assert f["test/labels"].dtype == np.int64
        g = f["test"].attrs
        assert g["num_samples"] == 600
        assert g["class_counts"].dtype == np.int64 and g["class_counts"].sum() == 600
        assert g["pixel_count"].tolist() == [600 * 28 * 28]
        np.testing.assert_allclose(g["pixel_sum"], [(images / 255.0).sum()])
        np.testing.assert_allclose(g["pixel_sumsq"], [np.square(images / 255.0).sum()])


def test_streaming_appends_equal_one_shot_write(tmp_path):
    images, labels = _data(1000, seed=5)
    one = write_shard(tmp_path / "one.h5", kind="test", splits={"test": (images, labels)},
                      num_classes=3)
    with ShardWriter(tmp_path / "many.h5", kind="test", image_shape=SHAPE, num_classes=3) as w:
        for start, stop in [(0, 1), (1, 300), (300, 300), (300, 777), (777, 1000)]:
            w.append("test", images[start:stop], labels[start:stop])
    many = w.info
    loaded = read_shard(tmp_path / "many.h5").splits["test"]
    assert np.array_equal(loaded.images, images) and np.array_equal(loaded.labels, labels)
    assert many.num_samples == one.num_samples and many.class_counts == one.class_counts
    assert many.stats == one.stats  # integer-exact sums: chunking does not change them


def test_same_data_gives_byte_identical_files(tmp_path):
    import time

    a = _site(tmp_path / "a.h5")
    time.sleep(1.1)  # HDF5 object timestamps have one-second resolution: cross a second
    b = _site(tmp_path / "b.h5")
    assert a.sha256 == b.sha256  # no timestamps in the file: manifests are reproducible


def test_site_shard_always_has_train_and_val(tmp_path):
    with ShardWriter(tmp_path / "s.h5", kind="site", image_shape=SHAPE, num_classes=3) as w:
        w.append("train", *_data(5))
    shard = read_shard(tmp_path / "s.h5")
    assert set(shard.splits) == {"train", "val"}
    assert len(shard.splits["val"].labels) == 0 and w.info.num_samples == {"train": 5, "val": 0}


def test_exception_inside_writer_leaves_no_file(tmp_path):
    target = tmp_path / "s.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(target, kind="site", image_shape=SHAPE, num_classes=3) as w:
            w.append("train", *_data(10))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its temporary file


def test_failed_rewrite_leaves_existing_file_intact(tmp_path):
    target = tmp_path / "s.h5"
    before = _site(target).sha256
    with pytest.raises(DataError):
        with ShardWriter(target, kind="site", image_shape=SHAPE, num_classes=3) as w:
            w.append("train", *_data(10, seed=9))
            w.append("train", np.zeros((2, 1, 28, 28), np.float32), np.array([0, 1]))
    assert sha256_file(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]
    check_shard(target, kind="site", expected_sha256=before)


def test_file_appears_only_on_close(tmp_path):
    target = tmp_path / "s.h5"
    w = ShardWriter(target, kind="test", image_shape=SHAPE, num_classes=3)
    w.append("test", *_data(3))
    assert not target.exists()
    info = w.close()
    assert target.exists() and info.sha256 == sha256_file(target)
    with pytest.raises(ShardError, match="already closed"):
        w.append("test", *_data(3))


@pytest.mark.parametrize(
    ("split", "images", "labels", "message"),
    [
        ("train", np.zeros((2, 1, 28, 28), np.float32), np.array([0, 1]),
         "images must be uint8, got float32"),
        ("train", np.zeros((2, 1, 28, 27), np.uint8), np.array([0, 1]),
         r"must have shape \(N, 1, 28, 28\), got \(2, 1, 28, 27\)"),
        ("train", np.zeros((2, 1, 28, 28), np.uint8), np.array([0, 3]),
         r"label 3 is outside \[0, 3\)"),
        ("train", np.zeros((2, 1, 28, 28), np.uint8), np.array([0, -1]),
         r"label -1 is outside \[0, 3\)"),
        ("train", np.zeros((2, 1, 28, 28), np.uint8), np.array([0.0, 1.0]), "1-D integer"),
        ("train", np.zeros((2, 1, 28, 28), np.uint8), np.array([0, 1, 2]), "2 images but 3 labels"),
        ("test", np.zeros((2, 1, 28, 28), np.uint8), np.array([0, 1]),
         r"holds splits \['train', 'val'\], not 'test'"),
    ],
)
def test_writer_validates_input(tmp_path, split, images, labels, message):
    with pytest.raises(DataError, match=message) as info:
        with ShardWriter(tmp_path / "s.h5", kind="site", image_shape=SHAPE, num_classes=3) as w:
            w.append(split, images, labels)
    assert "s.h5" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_construction(tmp_path):
    with pytest.raises(DataError, match="kind must be one of"):
        ShardWriter(tmp_path / "s.h5", kind="train", image_shape=SHAPE, num_classes=2)
    with pytest.raises(DataError, match="may not override"):
        ShardWriter(tmp_path / "s.h5", kind="site", image_shape=SHAPE, num_classes=2,
                    attrs={"kind": "x"})
    with pytest.raises(ShardError, match="cannot create shard file"):
        ShardWriter(tmp_path / "nodir" / "s.h5", kind="site", image_shape=SHAPE, num_classes=2)


# --- check_shard -------------------------------------------------------------------------


def _raw(path: Path, splits: dict, *, num_classes: int = 3, kind: str = "site", shape=SHAPE,
         fmt: int = 1) -> Path:
    """A shard written with h5py directly, so tests can build what the writer refuses."""
    with h5py.File(path, "w") as f:
        f.attrs.update({"fedsilo_format": fmt, "kind": kind, "num_classes": num_classes,
                        "image_shape": np.array(shape)})
        for name, (images, labels) in splits.items():
            g = f.create_group(name)
            g.create_dataset("images", data=images, chunks=(64, *images.shape[1:]),
                             maxshape=(None, *images.shape[1:]))
            g.create_dataset("labels", data=labels)
            valid = (labels[(labels >= 0) & (labels < num_classes)] if labels.ndim == 1
                     else labels[:0])
            g.attrs.update({
                "num_samples": len(labels),
                "class_counts": np.bincount(valid, minlength=num_classes),
                "pixel_count": [1], "pixel_sum": [0.0], "pixel_sumsq": [0.0],
                "mean": [0.0], "std": [0.0],
            })
    return path


def _good(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    return _data(n)


def _check_fails(path: Path, cause: str, **kwargs) -> None:
    kwargs.setdefault("kind", "site")
    with pytest.raises(ShardError) as info:
        check_shard(path, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    assert cause in message, message


def test_check_accepts_a_good_shard(tmp_path):
    written = _site(tmp_path / "s.h5")
    info = check_shard(tmp_path / "s.h5", kind="site", expected_sha256=written.sha256,
                       image_shape=SHAPE, num_classes=3)
    assert info.num_samples == written.num_samples and info.class_counts == written.class_counts
    assert info.stats == written.stats and info.sha256 == written.sha256


def test_check_missing_file(tmp_path):
    _check_fails(tmp_path / "absent.h5", "not found")


def test_check_random_bytes(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    _check_fails(path, "not a readable HDF5 file")


def test_check_truncated_file(tmp_path):
    path = tmp_path / "cut.h5"
    _site(path, n_train=2000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _check_fails(path, "truncated or corrupt")


def test_check_sha_mismatch_names_both_hashes(tmp_path):
    info = _site(tmp_path / "s.h5")
    wrong = "0" * 64
    _check_fails(tmp_path / "s.h5", "sha256 mismatch", expected_sha256=wrong)
    with pytest.raises(ShardError) as exc:
        check_shard(tmp_path / "s.h5", kind="site", expected_sha256=wrong)
    assert info.sha256[:12] in str(exc.value) and wrong[:12] in str(exc.value)


def test_check_wrong_format_version(tmp_path):
    _check_fails(_raw(tmp_path / "v.h5", {"train": _good(), "val": _good()}, fmt=2),
                 "unsupported fedsilo_format 2")


def test_check_not_a_fedsilo_file(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    _check_fails(path, "not a fedsilo shard")


def test_check_wrong_kind(tmp_path):
    _check_fails(_raw(tmp_path / "k.h5", {"test": _good()}, kind="test"),
                 "is a 'test' shard, expected a 'site'")


def test_check_missing_split_group(tmp_path):
    _check_fails(_raw(tmp_path / "m.h5", {"train": _good()}), "missing split group 'val'")


def test_check_missing_dataset(tmp_path):
    path = _site(tmp_path / "d.h5").path
    with h5py.File(path, "r+") as f:
        del f["val/labels"]
    _check_fails(path, "missing dataset 'labels'")


def test_check_length_mismatch(tmp_path):
    images, labels = _good(10)
    _check_fails(_raw(tmp_path / "l.h5", {"train": (images, labels[:7]), "val": _good()}),
                 "10 images but 7 labels")


def test_check_image_dtype(tmp_path):
    images, labels = _good()
    _check_fails(_raw(tmp_path / "i.h5",
                      {"train": (images.astype(np.int16), labels), "val": _good()}),
                 "dtype int16, expected uint8 or float")


def _empty_float_split() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 1, 4, 4), np.float32), np.zeros(0, np.int64)


def test_check_nan_and_inf_pixels_in_a_late_block(tmp_path):
    images = np.random.default_rng(0).random((3000, 1, 4, 4)).astype(np.float32)
    labels = np.zeros(3000, dtype=np.int64)
    images[2999, 0, 3, 3] = np.nan  # past the first scanned block
    path = _raw(tmp_path / "nan.h5", {"train": (images, labels), "val": _empty_float_split()},
                shape=(1, 4, 4))
    _check_fails(path, "non-finite pixel values")
    images[2999, 0, 3, 3] = np.inf
    path = _raw(tmp_path / "inf.h5", {"train": (images, labels), "val": _empty_float_split()},
                shape=(1, 4, 4))
    _check_fails(path, "non-finite pixel values")


def test_check_accepts_finite_float_images(tmp_path):
    images = np.random.default_rng(0).random((20, 1, 4, 4)).astype(np.float32)
    path = _raw(tmp_path / "f.h5",
                {"train": (images, np.zeros(20, np.int64)), "val": _empty_float_split()},
                shape=(1, 4, 4))
    assert check_shard(path, kind="site").num_samples == {"train": 20, "val": 0}


def test_check_image_shape_differs(tmp_path):
    _site(tmp_path / "s.h5")
    _check_fails(tmp_path / "s.h5", "image shape is 1x28x28 but 3x28x28 was expected",
                 image_shape=(3, 28, 28))


def test_check_class_count_differs(tmp_path):
    _site(tmp_path / "s.h5")
    _check_fails(tmp_path / "s.h5", "num_classes is 3 in the file but 2 was expected",
                 num_classes=2)


def test_check_labels_out_of_range(tmp_path):
    images, labels = _good(500)
    labels[450] = 7
    _check_fails(_raw(tmp_path / "r.h5", {"train": (images, labels), "val": _good()}),
                 "labels out of range [0, 3): found 7")


def test_check_empty_train_split(tmp_path):
    empty = (np.zeros((0, *SHAPE), np.uint8), np.zeros(0, np.int64))
    _check_fails(_raw(tmp_path / "e.h5", {"train": empty, "val": _good()}),
                 "training split is empty")


def test_check_class_counts_attribute_must_match_labels(tmp_path):
    path = _site(tmp_path / "s.h5").path
    with h5py.File(path, "r+") as f:
        f["train"].attrs["class_counts"] = np.array([0, 0, 300])
    _check_fails(path, "class_counts attribute [0, 0, 300] disagrees")


# --- manifest and verify -------------------------------------------------------------


def _shard_set(directory: Path, num_sites: int = 2) -> Manifest:
    sites = [_site(directory / f"site-{k:03d}.h5", seed=k, attrs={"site": k})
             for k in range(num_sites)]
    test = write_shard(directory / "test.h5", kind="test", splits={"test": _data(60, seed=99)},
                       num_classes=3)
    manifest = build_manifest(sites=sites, test=test, source={"kind": "unit"}, partition="iid",
                              seed=0)
    write_manifest(directory, manifest)
    return manifest


def test_manifest_round_trip_and_global_normalization(tmp_path):
    manifest = _shard_set(tmp_path)
    loaded = load_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.num_sites == 2 and loaded.image_shape == SHAPE and loaded.num_classes == 3
    assert loaded.site_path(tmp_path, 1) == tmp_path / "site-001.h5"
    assert loaded.test_path(tmp_path) == tmp_path / "test.h5"
    assert loaded.total_samples("train") == 600
    everything = np.concatenate([read_shard(tmp_path / f"site-{k:03d}.h5").splits["train"].images
                                 for k in range(2)]) / 255.0
    np.testing.assert_allclose(loaded.normalization_mean, [everything.mean()], rtol=1e-12)
    np.testing.assert_allclose(loaded.normalization_std, [everything.std()], rtol=1e-10)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["format"] == "fedsilo-shards" and raw["format_version"] == 1
    assert raw["sites"][0]["num_samples"] == {"train": 300, "val": 40}
    assert list(raw) == ["format", "format_version", "created_by", "source", "partition", "seed",
                         "num_sites", "num_classes", "image_shape", "normalization", "sites",
                         "test"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "site-000.h5",
                                                          "site-001.h5", "test.h5"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format="other"), "'format' is 'other'"),
        (lambda m: m.update(format_version=9), "unsupported format_version 9"),
        (lambda m: m.update(num_sites=5), "'num_sites' is 5 but 'sites' lists 2"),
        (lambda m: m.pop("seed"), "missing 'seed'"),
        (lambda m: m["sites"][0].update(sha256="xyz"), "'sites[0].sha256' must be 64"),
        (lambda m: m["sites"][1].update(file="../escape.h5"),
         "'sites[1].file' must be a plain file name"),
        (lambda m: m["test"]["class_counts"].update(test=[1, 2, 3]),
         "sums to 6, not num_samples 60"),
        (lambda m: m["normalization"].update(mean=[0.1, 0.2]), "must hold 1 numbers"),
        (lambda m: m.update(image_shape=[1, 28]), "'image_shape' must be [C, H, W]"),
        # every rank builds its model from these before reading a shard: 20 TB of float32
        (lambda m: m.update(image_shape=[1, 100000, 100000]),
         "beyond the largest image fedsilo accepts"),
        (lambda m: m.update(num_classes=10**9), "beyond the 100000 fedsilo accepts"),
        # the FedAvg weights come from the train counts: a KeyError traceback before
        (lambda m: (m["sites"][0]["num_samples"].pop("train"),
                    m["sites"][0]["class_counts"].pop("train")), "lists no 'train' split"),
    ],
)
def test_malformed_manifest_names_path_and_problem(tmp_path, edit, message):
    _shard_set(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError) as info:
        load_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(info.value)
    assert message in str(info.value)


def test_missing_or_invalid_manifest(tmp_path):
    with pytest.raises(ShardError, match="no shard-set manifest at .*manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="is not valid JSON"):
        load_manifest(tmp_path)


def test_write_manifest_replaces_atomically(tmp_path):
    manifest = _shard_set(tmp_path)
    changed = dataclasses.replace(manifest, seed=7)
    write_manifest(tmp_path, changed)
    assert load_manifest(tmp_path).seed == 7
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_verify_clean_set_has_no_problems(tmp_path):
    _shard_set(tmp_path)
    assert verify_shard_set(tmp_path) == []


def test_verify_reports_missing_file_and_count_mismatch(tmp_path):
    _shard_set(tmp_path, num_sites=3)
    (tmp_path / "site-001.h5").unlink()
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["sites"][2]["num_samples"]["train"] = 301
    data["sites"][2]["class_counts"]["train"][0] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    problems = verify_shard_set(tmp_path)
    assert any("site-001.h5" in p and "not found" in p for p in problems), problems
    assert any("site-002.h5 [train]: 300 samples in the file, 301 in the manifest" in p
               for p in problems)
    assert not any("site-000.h5" in p for p in problems)


def test_verify_reports_replaced_file_and_bad_normalization(tmp_path):
    _shard_set(tmp_path)
    _site(tmp_path / "site-000.h5", seed=42)  # same counts, different pixels
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["normalization"]["mean"] = [0.9]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    problems = verify_shard_set(tmp_path)
    assert any("site-000.h5: sha256 mismatch" in p for p in problems), problems
    (tmp_path / "site-000.h5").unlink()
    _shard_set(tmp_path)  # rewrite cleanly, then break only the normalization
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["normalization"]["std"] = [0.01]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert ["normalization std" in p for p in verify_shard_set(tmp_path)] == [True]


def test_verify_without_manifest(tmp_path):
    problems = verify_shard_set(tmp_path)
    assert len(problems) == 1 and "no shard-set manifest" in problems[0]


def test_compression_threads_change_no_byte_and_chunks_are_plain_zlib(tmp_path):
    import zlib

    batches = [_data(n, seed=s, shape=(3, 20, 24)) for s, n in enumerate([300, 1, 0, 517, 9])]
    paths = []
    for threads in (1, 3):
        path = tmp_path / f"t{threads}.h5"
        with ShardWriter(path, kind="test", image_shape=(3, 20, 24), num_classes=3,
                         threads=threads) as w:
            for images, labels in batches:
                w.append("test", images, labels)
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    images = np.concatenate([b[0] for b in batches])
    shard = read_shard(paths[0]).splits["test"]
    assert np.array_equal(shard.images, images)  # partial edge chunk included
    with h5py.File(paths[0], "r") as f:
        ds = f["test/images"]
        assert ds.compression == "gzip" and ds.compression_opts == 4 and ds.shuffle
        chunk_n = ds.chunks[0]
        # every stored chunk is what HDF5's gzip+shuffle filter would store (shuffle is a
        # no-op on one-byte pixels), the edge chunk padded with zeros
        for i in range(ds.id.get_num_chunks()):
            info = ds.id.get_chunk_info(i)
            block = np.zeros((chunk_n, 3, 20, 24), np.uint8)
            part = images[info.chunk_offset[0] : info.chunk_offset[0] + chunk_n]
            block[: len(part)] = part
            assert info.filter_mask == 0
            assert (ds.id.read_direct_chunk(info.chunk_offset)[1]
                    == zlib.compress(block.tobytes(), 4))


def test_run_directory_removes_the_temporaries_a_crash_left(tmp_path):
    from fedsilo.rundir import RunDir, atomic_write_text

    run = RunDir(tmp_path / "run")
    (run.round_dir(3)).mkdir(parents=True)
    leftovers = [run.round_dir(3) / ".coordinator.pt.abc123.tmp", run.root / ".metrics.jsonl.x.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    atomic_write_text(run.config, "seed: 0\n")
    keep = run.round_dir(3) / "site-000.pt"
    keep.write_bytes(b"checkpoint")
    assert sorted(run.remove_temporaries()) == sorted(leftovers)
    assert not any(p.exists() for p in leftovers) and keep.exists() and run.config.exists()
