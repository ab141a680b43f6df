"""``fedsilo prep segmentation``: pairs never mismatch, a patient never straddles sites or
the test set, bad pairs are named (or skipped and listed), and the shards hold what the
manifest says (issue 28)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fedsilo.errors import DataError, ShardError
from fedsilo.prep.segmentation import pair_csv, pair_folders, prepare_segmentation
from fedsilo.shards import load_manifest, read_masks, read_shard, verify_shard_set

SIZE = (24, 20)  # H, W


def _image_of(key: int) -> np.ndarray:
    """An RGB image whose red channel encodes ``key``; its mask is drawn from the image."""
    rng = np.random.default_rng(key)
    image = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    image[..., 0] = key
    return image


def _mask_of(image: np.ndarray) -> np.ndarray:
    return (image[..., 1] > 128).astype(np.uint8)


def _write_set(folder, names, *, mask_suffix="_mask", one_bit=True):
    """Images named ``names`` (a shuffled order), masks with ``mask_suffix``; returns
    {name: key}."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    keys = {}
    order = list(names)
    random.Random(3).shuffle(order)  # written in another order than listed
    for key, name in enumerate(order, start=1):
        image = _image_of(key)
        Image.fromarray(image).save(folder / "images" / f"{name}.png")
        mask = _mask_of(image)
        out = Image.fromarray(mask * 255).convert("1") if one_bit else Image.fromarray(mask * 255)
        out.save(folder / "masks" / f"{name}{mask_suffix}.png")
        keys[name] = key
    return keys


# names where a careless prefix match pairs the wrong files
TRICKY = ["img_1", "img_10", "img_1L", "img_11", "Image_01", "Image_01L", "Image_01R",
          "Image_02L", "Image_02R", "Image_03L", "Image_03R", "img_2", "img_12"]


def test_shuffled_names_never_pair_the_wrong_mask(tmp_path):
    keys = _write_set(tmp_path, TRICKY)
    pairs, bad = pair_folders(tmp_path / "images", tmp_path / "masks")
    assert bad == [] and len(pairs) == len(TRICKY)
    assert all(p.mask.stem == f"{p.image.stem}_mask" for p in pairs)
    prepare_segmentation(pairs, out=tmp_path / "out", sites=2, seed=1, val_fraction=0.2,
                         test_fraction=0.3)
    seen = 0
    for path in sorted((tmp_path / "out").glob("*.h5")):
        shard = read_shard(path)
        for split, data in shard.splits.items():
            masks = read_masks(path, split)
            for image, mask in zip(data.images, masks):
                hwc = image.transpose(1, 2, 0)
                assert hwc[0, 0, 0] in keys.values()
                np.testing.assert_array_equal(mask, _mask_of(hwc))
                seen += 1
    assert seen == len(TRICKY)
    assert verify_shard_set(tmp_path / "out") == []


def test_a_child_never_straddles_sites_or_the_test_set(tmp_path):
    names = [f"Image_{child:02d}{eye}" for child in range(1, 13) for eye in "LR"]
    keys = _write_set(tmp_path, names, mask_suffix="_1stHO")
    pairs, _ = pair_folders(tmp_path / "images", tmp_path / "masks",
                            group_pattern=r"Image_(\d+)")
    manifest = prepare_segmentation(pairs, out=tmp_path / "out", sites=3, seed=5,
                                    val_fraction=0.3, test_fraction=0.25)
    child_of_key = {key: name[6:8] for name, key in keys.items()}
    where: dict[str, set[str]] = {}
    for path in sorted((tmp_path / "out").glob("*.h5")):
        for split, data in read_shard(path).splits.items():
            for image in data.images:
                child = child_of_key[int(image[0, 0, 0])]
                where.setdefault(child, set()).add(f"{path.name}/{split}")
    assert len(where) == 12 and all(len(places) == 1 for places in where.values()), where
    groups = manifest.segmentation["groups"]
    assert sorted(c for f in groups.values() for g in f.values() for c in g) == \
        sorted(name[6:8] for name in names)
    assert load_manifest(tmp_path / "out").task == "segmentation"


def test_bad_pairs_are_errors_naming_the_file_or_skipped_and_listed(tmp_path):
    _write_set(tmp_path, ["a", "b", "c", "d", "e"])
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "masks" / "b_mask.png")
    Image.fromarray(np.full(SIZE, 7, np.uint8)).save(tmp_path / "masks" / "c_mask.png")
    (tmp_path / "masks" / "d_mask.png").unlink()
    pairs, bad = pair_folders(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(DataError) as info:
        prepare_segmentation(pairs, out=tmp_path / "out", sites=1, pre_bad=bad,
                             test_fraction=0.3)
    text = str(info.value)
    assert "b_mask.png: size mismatch" in text and "c_mask.png: unknown label values [7]" in text
    assert "d.png: missing mask" in text
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="no usable"):  # skipping every pair leaves none
        prepare_segmentation(pairs[1:3], out=tmp_path / "none", sites=1, skip_bad=True)
    manifest = prepare_segmentation(pairs, out=tmp_path / "out", sites=1, pre_bad=bad,
                                    skip_bad=True, test_fraction=0.5, val_fraction=0)
    assert sorted(item["path"].rsplit("/", 1)[1] for item in manifest.skipped) == \
        ["b_mask.png", "c_mask.png", "d.png"]
    saved = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(saved["skipped"]) == 3 and saved["segmentation"]["image_size"] == list(SIZE)


def test_a_csv_of_pairs_and_label_maps(tmp_path):
    (tmp_path / "x").mkdir()
    rows = ["image,mask,group"]
    for i in range(6):
        Image.fromarray(np.full(SIZE, i * 10, np.uint8)).save(tmp_path / "x" / f"s{i}.tif")
        label = np.zeros(SIZE, np.uint8)
        label[: i + 1, :3] = i % 3  # a label map with classes 0..2
        Image.fromarray(label).save(tmp_path / "x" / f"m{i}.png")
        rows.append(f"x/s{i}.tif,x/m{i}.png,p{i // 2}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    pairs = pair_csv(tmp_path / "pairs.csv")
    manifest = prepare_segmentation(pairs, out=tmp_path / "out", sites=2, num_classes=3,
                                    test_fraction=0.34, val_fraction=0)
    counts = manifest.segmentation["pixel_class_counts"]
    total = sum(np.array(v) for f in counts.values() for v in f.values())
    # class 1 on images 1 and 4 (2 and 5 rows of 3), class 2 on 2 and 5 (3 and 6 rows)
    assert total.tolist() == [6 * SIZE[0] * SIZE[1] - 21 - 27, 21, 27]


def test_read_masks_refuses_a_classification_shard(tmp_path):
    from fedsilo.shards import write_shard

    write_shard(tmp_path / "c.h5", kind="test", num_classes=2,
                splits={"test": (np.zeros((2, 1, 3, 3), np.uint8), np.array([0, 1]))})
    with pytest.raises(ShardError, match="not a segmentation shard"):
        read_masks(tmp_path / "c.h5", "test")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400), flip=st.integers(0, 4000), value=st.integers(0, 255))
def test_read_masks_of_damaged_files_is_a_shard_error(data, flip, value):
    """Random bytes, or a good shard with one byte changed: masks come back valid, or a
    ShardError names the file."""
    import tempfile
    from pathlib import Path

    from fedsilo.shards import ShardWriter

    folder = Path(tempfile.mkdtemp())
    junk = folder / "junk.h5"
    junk.write_bytes(data)
    with pytest.raises(ShardError, match="junk.h5"):
        read_masks(junk, "test")
    good = folder / "good.h5"
    with ShardWriter(good, kind="test", image_shape=(1, 4, 4), num_classes=2, masks=True) as w:
        w.append("test", np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 1]),
                 masks=np.eye(4, dtype=np.uint8)[None].repeat(2, 0))
    raw = bytearray(good.read_bytes())
    raw[flip % len(raw)] = value
    good.write_bytes(bytes(raw))
    try:
        masks = read_masks(good, "test")
    except ShardError as exc:
        assert "good.h5" in str(exc)
    else:
        assert masks.dtype == np.uint8 and masks.ndim == 3 and int(masks.max()) < 2


def test_dicom_images_with_their_masks_beside_them(tmp_path):
    """CT-like DICOM slices (16-bit, a modality LUT) with PNG masks in the same folder:
    the .dcm files are the images, each mask pairs with its slice, the pixels are the
    DICOM decoder's (as `prep dicom`), and each patient stays on one site."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_prep_sources import write_dicom

    from fedsilo.prep.dicom import DicomDecoder

    folder = tmp_path / "ct"
    names = [f"patient{p}_slice{s}" for p in range(1, 5) for s in range(3)]
    rng = np.random.default_rng(0)
    expected = {}
    for name in names:
        raw = rng.integers(0, 4096, SIZE, dtype=np.uint16)
        path = write_dicom(folder / f"{name}.dcm", raw, slope=1.0, intercept=-1024.0,
                           center=40.0, width=400.0)
        image = DicomDecoder(channels=1)(str(path))
        mask = (raw > 2048).astype(np.uint8)
        Image.fromarray(mask * 255).save(folder / f"{name}_mask.png")
        expected[image.tobytes()] = (mask, name.split("_")[0])
    pairs, bad = pair_folders(folder, folder, group_pattern=r"patient(\d+)")
    assert bad == [] and len(pairs) == len(names)
    assert all(p.image.suffix == ".dcm" and p.mask.name == f"{p.image.stem}_mask.png"
               for p in pairs)
    prepare_segmentation(pairs, out=tmp_path / "out", sites=2, seed=0, val_fraction=0.0,
                         test_fraction=0.25, channels=1)
    files_of: dict[str, set[str]] = {}  # patient -> the shard files holding its slices
    seen = 0
    for path in sorted((tmp_path / "out").glob("*.h5")):
        shard = read_shard(path)
        for split, data in shard.splits.items():
            for image, mask in zip(data.images, read_masks(path, split)):
                true_mask, patient = expected[image.tobytes()]
                np.testing.assert_array_equal(mask, true_mask)
                files_of.setdefault(patient, set()).add(path.name)
                seen += 1
    assert seen == len(names)
    assert all(len(files) == 1 for files in files_of.values()), files_of
    assert verify_shard_set(tmp_path / "out") == []
    manifest = load_manifest(tmp_path / "out")
    assert manifest.image_shape == (1, *SIZE)


def test_masks_beside_images_need_dicom_images(tmp_path):
    _write_set(tmp_path, ["a", "b"])
    with pytest.raises(DataError, match="holds no DICOM image"):
        pair_folders(tmp_path / "images", tmp_path / "images")


def _edit_masks(path, split, edit):
    import h5py

    with h5py.File(path, "r+") as f:
        edit(f[split])


@pytest.mark.parametrize("damage", ["unknown class", "flipped pixel", "flipped and recounted",
                                    "other shape", "dropped"])
def test_prep_verify_reports_a_corrupted_mask(tmp_path, damage):
    """``prep verify`` reads every label map: a value outside the classes, pixels changed
    (against the stored and the manifest's pixel counts and mask sha256, even where whoever
    changed them fixed the counts), a map of another shape than its image, no masks."""
    from fedsilo.cli import main

    _write_set(tmp_path, [f"Image_{k:02d}" for k in range(8)])
    pairs, _ = pair_folders(tmp_path / "images", tmp_path / "masks")
    prepare_segmentation(pairs, out=tmp_path / "out", sites=2, seed=0, val_fraction=0,
                         test_fraction=0.25)
    site = tmp_path / "out" / "site-001.h5"
    assert verify_shard_set(tmp_path / "out") == []

    def flip(group, recount=False):
        masks = group["masks"]
        before = int(masks[0, 2, 3])
        masks[0, 2, 3] = 1 - before
        if recount:
            counts = group.attrs["pixel_class_counts"]
            counts[before] -= 1
            counts[1 - before] += 1
            group.attrs["pixel_class_counts"] = counts

    def reshape(group):
        del group["masks"]
        group.create_dataset("masks", data=np.zeros((group["images"].shape[0], 20, 24),
                                                    np.uint8))

    edits = {"unknown class": lambda g: g["masks"].__setitem__((1, 0, 0), 7),
             "flipped pixel": flip, "flipped and recounted": lambda g: flip(g, recount=True),
             "other shape": reshape, "dropped": lambda g: g.__delitem__("masks")}
    _edit_masks(site, "train", edits[damage])
    problems = verify_shard_set(tmp_path / "out")
    expected = {
        "unknown class": r"site-001.h5 \[train\]: label value 7 in the masks is outside \[0, 2\)",
        "flipped pixel": r"site-001.h5 \[train\]: pixel_class_counts attribute .* disagrees "
                         r"with the masks",
        "flipped and recounted": r"site-001.h5 \[train\]: mask pixel counts per class .* in the"
                                 r" file, .* in the manifest",
        "other shape": r"site-001.h5 \[train\]: masks \(\d+, 20, 24\) do not match images",
        "dropped": r"site-001.h5 \[train\]: a segmentation split needs 'images' and 'masks'",
    }[damage]
    assert any(__import__("re").search(expected, p) for p in problems), problems
    assert any("sha256 mismatch" in p for p in problems)  # the file's bytes changed too
    if damage == "flipped and recounted":
        assert any("masks sha256 mismatch" in p for p in problems), problems
    assert main(["prep", "verify", str(tmp_path / "out")]) != 0
    # the run's own check of the shard (every rank, before training) refuses it as well,
    # by its content or, where the counts were fixed, by the manifest's sha256
    from fedsilo.shards import check_shard

    sha = load_manifest(tmp_path / "out").sites[1].sha256
    with pytest.raises(ShardError, match="site-001.h5"):
        check_shard(site, kind="site", task="segmentation",
                    expected_sha256=sha if damage == "flipped and recounted" else None)
