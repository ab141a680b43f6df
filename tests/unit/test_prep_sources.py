"""``fedsilo prep folder|csv|dicom``: real files written here, pixels checked end to end."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from fedsilo import cli as fedsilo_cli
from fedsilo.errors import ConfigError, DataError
from fedsilo.prep import stream
from fedsilo.prep.cli import add_parser
from fedsilo.prep.images import ImageDecoder
from fedsilo.prep.pipeline import prepare_record_shards
from fedsilo.prep.records import list_class_folders
from fedsilo.prep.stream import RecordSource
from fedsilo.shards import (
    ShardWriter,
    load_manifest,
    read_shard,
    read_shard_attrs,
    verify_shard_set,
)


def run_cli(*argv: str | Path) -> tuple[int, str]:
    """Parse with a local harness shaped like fedsilo's main; return (status, stdout)."""
    parser = argparse.ArgumentParser(prog="fedsilo")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = args.func(args)
    return status, out.getvalue()


def landed(out: Path) -> dict[bytes, tuple[str, str, int]]:
    """Every image of a shard set by its bytes: (file, split, label); asserts no repeats."""
    found: dict[bytes, tuple[str, str, int]] = {}
    manifest = load_manifest(out)
    for entry in (*manifest.sites, manifest.test):
        for split, data in read_shard(out / entry.file).splits.items():
            for image, label in zip(data.images, data.labels):
                key = image.tobytes()
                assert key not in found, "an image landed twice"
                found[key] = (entry.file, split, int(label))
    return found


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def gray_folder(root: Path, *, classes=("a", "b", "c"), per_class=8, size=(8, 8), seed=0):
    """root/<class>/NN.png of random grayscale images; {path: (1xHxW array, label)}."""
    rng = np.random.default_rng(seed)
    images = {}
    for label, name in enumerate(classes):
        for i in range(per_class):
            array = rng.integers(0, 256, size, dtype=np.uint8)
            images[save(root / name / f"{i:02d}.png", array)] = (array[None], label)
    return images


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.suffix in (".h5", ".json")}


# --- image folders --------------------------------------------------------------------


def test_folder_of_pngs_lands_pixel_exact_with_its_labels(tmp_path):
    images = gray_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "a" / "notes.txt").write_text("not an image: ignored")
    out = tmp_path / "out"
    status, text = run_cli("prep", "folder", "--source", tmp_path / "imgs", "--sites", "2",
                           "--partition", "dirichlet:1.0", "--seed", "3", "--out", out)
    assert status == 0 and "site-001.h5" in text
    manifest = load_manifest(out)
    assert manifest.class_names == ("a", "b", "c") and manifest.num_classes == 3
    assert manifest.image_shape == (1, 8, 8) and manifest.skipped is None
    assert manifest.source["kind"] == "folder" and manifest.source["num_records"] == 24
    assert text.splitlines()[2].split()[3:] == ["a", "b", "c"]  # class names head the table
    found = landed(out)
    assert len(found) == 24
    for array, label in images.values():
        assert found[array.tobytes()][2] == label
    assert verify_shard_set(out) == []


def test_rgb_png_jpeg_bmp_tiff_decode_as_pillow_does_and_convert_channels(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for label, name in enumerate(("x", "y")):
        for i, ext in enumerate(("png", "jpg", "bmp", "tif", "png", "jpeg")):
            array = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            paths.append((save(tmp_path / "imgs" / name / f"{i}.{ext}", array), label))
    for channels, mode in ((None, "RGB"), ("1", "L")):
        out = tmp_path / f"out-{mode}"
        extra = [] if channels is None else ["--channels", channels]
        run_cli("prep", "folder", "--source", tmp_path / "imgs", "--sites", "1",
                "--val-fraction", "0", "--out", out, *extra)
        found = landed(out)
        assert load_manifest(out).image_shape == ((3 if mode == "RGB" else 1), 10, 12)
        for path, label in paths:
            expected = np.asarray(Image.open(path).convert(mode))
            expected = expected.transpose(2, 0, 1) if mode == "RGB" else expected[None]
            assert found[np.ascontiguousarray(expected).tobytes()][2] == label, path


def test_size_resizes_with_antialiasing_and_mixed_sizes_need_it(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "imgs"
    sources = []
    for label, name in enumerate(("a", "b")):
        for i, shape in enumerate([(16, 16), (12, 20), (8, 8), (20, 10)]):
            sources.append((save(root / name / f"{i}.png",
                                 rng.integers(0, 256, shape, dtype=np.uint8)), label))
    checker = np.indices((16, 16)).sum(axis=0) % 2 * 255  # 1-pixel checkerboard
    sources.append((save(root / "a" / "checker.png", checker.astype(np.uint8)), 0))
    sources.append((save(root / "b" / "flat.png", np.full((20, 20), 77, np.uint8)), 1))
    with pytest.raises(DataError, match=re.escape(str(root / "a" / "1.png"))
                       + r": image is 1x12x20 .* first image \(.*0.png\) is 1x16x16; "
                         r"pass --size H W"):
        run_cli("prep", "folder", "--source", root, "--sites", "1", "--out", tmp_path / "x")
    assert not (tmp_path / "x" / "manifest.json").exists()

    out = tmp_path / "out"
    run_cli("prep", "folder", "--source", root, "--sites", "1", "--size", "8", "8",
            "--val-fraction", "0", "--out", out)
    found = landed(out)
    assert load_manifest(out).image_shape == (1, 8, 8)
    for path, label in sources:
        expected = np.asarray(Image.open(path).resize((8, 8), Image.Resampling.BILINEAR))
        assert found[expected[None].tobytes()][2] == label
    # antialiased: the checkerboard averages to mid-grey instead of aliasing to 0 or 255
    checker_out = np.asarray(Image.open(root / "a" / "checker.png").resize(
        (8, 8), Image.Resampling.BILINEAR))
    assert np.abs(checker_out.astype(int) - 128).max() <= 4 and checker_out[None].tobytes() in found
    assert np.full((1, 8, 8), 77, np.uint8).tobytes() in found  # a flat image stays flat


def test_16_bit_grayscale_maps_its_full_range_onto_8_bits(tmp_path):
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)
    path = save(tmp_path / "w.png", wide)
    assert Image.open(path).mode == "I;16"
    decoded = ImageDecoder()(str(path))
    np.testing.assert_array_equal(decoded[0], np.rint(wide / 257.0).astype(np.uint8))


# --- CSV labels, natural sites, patients ----------------------------------------------------


def csv_dataset(tmp_path: Path, *, patients_per_hospital=6, seed=4):
    """imgs/*.png + labels.csv (file, diagnosis, hospital, patient); 2 images per patient."""
    rng = np.random.default_rng(seed)
    rows, meta = ["file,diagnosis,hospital,patient"], {}
    n = 0
    for hospital in ("north", "south", "west"):
        for p in range(patients_per_hospital):
            patient = f"{hospital[0]}{p}"
            diagnosis = ("benign", "malignant")[p % 2]
            for _ in range(2):
                array = rng.integers(0, 256, (8, 8), dtype=np.uint8)
                save(tmp_path / "imgs" / f"img{n:03d}.png", array)
                rows.append(f"img{n:03d}.png,{diagnosis},{hospital},{patient}")
                meta[array[None].tobytes()] = (diagnosis, hospital, patient)
                n += 1
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return meta


def prep_csv(tmp_path: Path, out: Path, *extra: str | Path) -> tuple[int, str]:
    return run_cli("prep", "csv", "--source", tmp_path / "imgs",
                   "--labels", tmp_path / "labels.csv",
                   "--path-column", "file", "--label-column", "diagnosis", "--out", out, *extra)


def test_natural_sites_keep_patients_together_and_test_per_site(tmp_path):
    meta = csv_dataset(tmp_path)
    out = tmp_path / "out"
    status, _ = prep_csv(tmp_path, out, "--partition", "natural:hospital",
                         "--patient-column", "patient",
                         "--test-split", "per-site", "--test-fraction", "0.34")
    assert status == 0
    manifest = load_manifest(out)
    assert manifest.num_sites == 3 and manifest.class_names == ("benign", "malignant")
    assert manifest.source["natural"] == {"column": "hospital", "sites": ["north", "south", "west"]}
    hospital_of = {f"site-{k:03d}.h5": h for k, h in enumerate(("north", "south", "west"))}
    for k, name in enumerate(("north", "south", "west")):
        assert read_shard_attrs(out / f"site-{k:03d}.h5")["site_name"] == name
    placed: dict[str, tuple[str, str]] = {}
    test_hospitals = set()
    for key, (file, split, label) in landed(out).items():
        diagnosis, hospital, patient = meta[key]
        assert manifest.class_names[label] == diagnosis
        if file == "test.h5":
            test_hospitals.add(hospital)
        else:
            assert hospital_of[file] == hospital  # a site holds only its own hospital
        assert placed.setdefault(patient, (file, split)) == (file, split)  # never split
    assert test_hospitals == {"north", "south", "west"}  # every hospital gave test patients
    assert len(placed) == 18 and verify_shard_set(out) == []

    with pytest.raises(ConfigError, match="3 distinct values .* --sites is 2"):
        prep_csv(tmp_path, tmp_path / "o2", "--partition", "natural:hospital", "--sites", "2")
    with pytest.raises(ConfigError, match="no column 'ward'"):
        prep_csv(tmp_path, tmp_path / "o3", "--partition", "natural:ward")
    with pytest.raises(ConfigError, match="needs the number of sites"):
        prep_csv(tmp_path, tmp_path / "o4")
    with pytest.raises(ConfigError, match="class-folder layout has none"):
        run_cli("prep", "folder", "--source", tmp_path, "--sites", "2", "--partition", "natural:x",
                "--out", tmp_path / "o5")


def test_patient_column_keeps_patients_in_one_split_with_a_global_test(tmp_path):
    meta = csv_dataset(tmp_path)
    out = tmp_path / "out"
    prep_csv(tmp_path, out, "--sites", "2", "--partition", "dirichlet:1.0",
             "--patient-column", "patient", "--val-fraction", "0.25")
    placed: dict[str, tuple[str, str]] = {}
    for key, (file, split, _) in landed(out).items():
        assert placed.setdefault(meta[key][2], (file, split)) == (file, split)
    assert {split for _, split in placed.values()} == {"train", "val", "test"}


def test_integer_labels_are_class_indices_and_classes_fixes_names(tmp_path):
    rng = np.random.default_rng(5)
    rows = ["path,label"]
    for i in range(20):
        save(tmp_path / "imgs" / f"{i}.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
        rows.append(f"{i}.png,{(0, 2)[i % 2]}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    args = ["prep", "csv", "--source", tmp_path / "imgs", "--labels", tmp_path / "labels.csv",
            "--sites", "2"]
    run_cli(*args, "--out", tmp_path / "out")
    manifest = load_manifest(tmp_path / "out")
    assert manifest.class_names == ("0", "1", "2") and manifest.total_samples("train") > 0
    assert sum(e.class_counts["train"][1] for e in manifest.sites) == 0  # label 1: no images
    run_cli(*args, "--classes", "2,0", "--out", tmp_path / "named")
    named = load_manifest(tmp_path / "named")
    assert named.class_names == ("2", "0")
    assert named.test.class_counts["test"] == manifest.test.class_counts["test"][::2][::-1]


# --- DICOM ------------------------------------------------------------------------------------


def write_dicom(path: Path, raw: np.ndarray, *, photometric="MONOCHROME2", slope=None,
                intercept=None, center=None, width=None, rle=False, pixels=True) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (meta.MediaStorageSOPClassUID,
                                         meta.MediaStorageSOPInstanceUID)
    ds.Modality = "CT"
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    signed = raw.dtype == np.int16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16 if signed else 12, 15 if signed else 11
    ds.PixelRepresentation = int(signed)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    if pixels:
        ds.PixelData = raw.tobytes()
        if rle:
            ds.compress(RLELossless)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_jpeg_dicom(path: Path, gray: np.ndarray) -> Path:
    """8-bit MONOCHROME2 encapsulated as JPEG baseline (encoded by Pillow)."""
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG", quality=90)
    ds = pydicom.dcmread(write_dicom(path, gray.astype(np.uint16)))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def expected_window(values: np.ndarray, center: float, width: float, *, invert=False) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (linear), written out case by case."""
    x = values.astype(np.float64)
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = np.where(x <= low, 0.0,
                 np.where(x > high, 255.0, ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0))
    y = np.rint(y).astype(np.uint8)
    return 255 - y if invert else y


def expected_stretch(values: np.ndarray) -> np.ndarray:
    x = values.astype(np.float64)
    return np.rint((x - x.min()) / (x.max() - x.min()) * 255.0).astype(np.uint8)


@pytest.fixture
def dicom_set(tmp_path):
    """Seven 8x8 DICOM files covering the display pipeline, and their expected pixels."""
    rng = np.random.default_rng(6)
    root = tmp_path / "dcm"

    def raw():
        return rng.integers(0, 4096, (8, 8)).astype(np.uint16)

    hu = dict(slope=1, intercept=-1024)
    cases = []  # (path, label, stored values after rescale, how, window, invert)
    r = raw()
    cases.append((write_dicom(root / "ct1.dcm", r, **hu, center=40, width=400), "lung", r - 1024.0,
                  (40, 400), False))
    r = raw()
    cases.append((write_dicom(root / "mono1.dcm", r, photometric="MONOCHROME1", **hu, center=40,
                              width=400),
                  "lung", r - 1024.0, (40, 400), True))
    r = raw()
    cases.append((write_dicom(root / "rle.dcm", r, **hu, center=40, width=400, rle=True), "bone",
                  r - 1024.0, (40, 400), False))
    r = raw()
    cases.append((write_dicom(root / "multi.dcm", r, slope=2, intercept=-2048, center=[300, 40],
                              width=[1500, 400]),
                  "bone", r * 2.0 - 2048, (300, 1500), False))
    r = raw()
    cases.append((write_dicom(root / "plain.dcm", r), "lung", r.astype(float), None, False))
    signed = rng.integers(-1500, 2000, (8, 8)).astype(np.int16)
    cases.append((write_dicom(root / "signed.dcm", signed, slope=0.5, intercept=10, center=0,
                              width=1000),
                  "bone", signed * 0.5 + 10, (0, 1000), False))
    gray = rng.integers(20, 230, (8, 8), dtype=np.uint8)
    jpeg = write_jpeg_dicom(root / "jpeg" / "j.dcm", gray)
    cases.append((jpeg, "lung", None, "jpeg", False))
    rows = ["path,label"] + [f"{p.relative_to(root).as_posix()},{label}" for p, label, *_ in cases]
    (tmp_path / "dcm.csv").write_text("\n".join(rows) + "\n")
    return root, tmp_path / "dcm.csv", cases


def _jpeg_pixels(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    return ds.pixel_array.astype(np.float64)  # decoded by pydicom's Pillow handler


def _expected(case, window=None) -> np.ndarray:
    path, _, values, how, invert = case
    if how == "jpeg":
        values = _jpeg_pixels(path)
        return expected_stretch(values) if window is None else expected_window(values, *window)
    if window is not None:
        return expected_window(values, *window, invert=invert)
    return expected_stretch(values) if how is None else expected_window(values, *how, invert=invert)


def test_dicom_rescale_window_monochrome1_and_compressed_pixels_end_to_end(dicom_set, tmp_path):
    root, labels, cases = dicom_set
    assert pydicom.dcmread(root / "rle.dcm").file_meta.TransferSyntaxUID == RLELossless
    for window in (None, (100.0, 2000.0)):
        out = tmp_path / f"out-{window}"
        extra = [] if window is None else ["--window", *map(str, window)]
        status, _ = run_cli("prep", "dicom", "--source", root, "--labels", labels, "--sites", "1",
                            "--val-fraction", "0", "--test-fraction", "0.3", "--out", out, *extra)
        assert status == 0
        manifest = load_manifest(out)
        assert manifest.class_names == ("bone", "lung") and manifest.image_shape == (1, 8, 8)
        assert manifest.source["kind"] == "dicom" and manifest.source["decoder"]["window"] == (
            None if window is None else list(window))
        found = landed(out)
        assert len(found) == len(cases)
        for case in cases:
            expected = _expected(case, window)
            assert manifest.class_names[found[expected[None].tobytes()][2]] == case[1], case[0]
    # MONOCHROME1 is the inverse of MONOCHROME2 for the same values (0 is white)
    ct1, mono1 = _expected(cases[0]), _expected(cases[1])
    assert not np.array_equal(ct1, mono1)


def test_dicom_class_folders_and_rgb(tmp_path):
    rng = np.random.default_rng(7)
    for label in ("neg", "pos"):
        for i in range(4):
            write_dicom(tmp_path / "dcm" / label / f"{i}",
                        rng.integers(0, 4096, (8, 8)).astype(np.uint16))
    out = tmp_path / "out"
    run_cli("prep", "dicom", "--source", tmp_path / "dcm", "--sites", "1", "--channels", "3",
            "--size", "4", "4", "--out", out)
    manifest = load_manifest(out)
    assert manifest.class_names == ("neg", "pos") and manifest.image_shape == (3, 4, 4)
    assert (manifest.total_samples("train") + manifest.total_samples("val")
            + manifest.total_samples("test") == 8)
    shard = read_shard(out / "site-000.h5").splits["train"]
    assert np.array_equal(shard.images[:, 0], shard.images[:, 2])  # grayscale replicated to RGB


# --- bad input ------------------------------------------------------------------------------


def _image_base(tmp_path: Path) -> Path:
    gray_folder(tmp_path / "imgs", classes=("a", "b"), per_class=6)
    rows = ["path,label"] + [f"{c}/{i:02d}.png,{c}" for c in "ab" for i in range(6)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "imgs"


def _folder_args(tmp_path):
    return ["prep", "folder", "--source", tmp_path / "imgs", "--sites", "2"]


def _csv_args(tmp_path, *extra):
    return ["prep", "csv", "--source", tmp_path / "imgs", "--labels", tmp_path / "labels.csv",
            "--sites", "2", *extra]


def _append_row(tmp_path, row):
    with open(tmp_path / "labels.csv", "a") as f:
        f.write(row + "\n")


def case_unreadable(tmp_path):
    bad = tmp_path / "imgs" / "a" / "zz.png"
    bad.write_bytes(b"this is not an image")
    return _folder_args(tmp_path), bad, "unreadable image", 12


def case_truncated(tmp_path):
    good = save(tmp_path / "whole.png",
                np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8))
    bad = tmp_path / "imgs" / "b" / "zz.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return _folder_args(tmp_path), bad, "unreadable image: image file is truncated", 12


def case_mixed_size(tmp_path):
    bad = save(tmp_path / "imgs" / "b" / "zz.png", np.zeros((10, 10), np.uint8))
    return _folder_args(tmp_path), bad, r"image is 1x10x10 .* pass --size H W", 12


def case_empty_class_folder(tmp_path):
    (tmp_path / "imgs" / "c").mkdir()
    return _folder_args(tmp_path), tmp_path / "imgs" / "c", "class folder 'c' has no images", 12


def case_missing_image(tmp_path):
    _append_row(tmp_path, "a/ghost.png,a")
    return (_csv_args(tmp_path), tmp_path / "imgs" / "a" / "ghost.png",
            r"image not found \(.*row 14\)", 12)


def case_unknown_label(tmp_path):
    save(tmp_path / "imgs" / "c.png", np.ones((8, 8), np.uint8))
    _append_row(tmp_path, "c.png,zebra")
    return (_csv_args(tmp_path, "--classes", "a,b"), tmp_path / "imgs" / "c.png",
            r"unknown label 'zebra' .*known: \['a', 'b'\]", 12)


def case_duplicate_path(tmp_path):
    _append_row(tmp_path, "./a/03.png,b")
    return (_csv_args(tmp_path), tmp_path / "imgs" / "a" / "03.png",
            "duplicate path: row 14 repeats row 5", 12)


def case_dicom_without_pixels(tmp_path):
    rng = np.random.default_rng(8)
    for c in "ab":
        for i in range(6):
            write_dicom(tmp_path / "dcm" / c / f"{i}.dcm",
                        rng.integers(0, 4096, (8, 8)).astype(np.uint16))
    bad = write_dicom(tmp_path / "dcm" / "b" / "zz.dcm", np.zeros((8, 8), np.uint16), pixels=False)
    return (["prep", "dicom", "--source", tmp_path / "dcm", "--sites", "2"], bad,
            "DICOM file has no pixel data", 12)


BAD_CASES = [case_unreadable, case_truncated, case_mixed_size, case_empty_class_folder,
             case_missing_image, case_unknown_label, case_duplicate_path, case_dicom_without_pixels]


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c.__name__[5:])
def test_bad_input_names_its_path_or_is_skipped_and_listed(case, tmp_path):
    _image_base(tmp_path)
    argv, bad, reason, remaining = case(tmp_path)
    with pytest.raises(DataError, match=re.escape(str(bad)) + ": " + reason) as info:
        run_cli(*argv, "--out", tmp_path / "stop")
    assert "--skip-bad" in str(info.value)
    assert not (tmp_path / "stop" / "manifest.json").exists()
    assert not list((tmp_path / "stop").glob(".*.tmp")) if (tmp_path / "stop").exists() else True

    out = tmp_path / "skip"
    status, text = run_cli(*argv, "--skip-bad", "--out", out)
    assert status == 0 and "skipped 1 bad input(s); listed under 'skipped'" in text
    manifest = load_manifest(out)
    assert [item["path"] for item in manifest.skipped] == [str(bad)]
    assert re.search(reason, manifest.skipped[0]["reason"])
    total = sum(manifest.total_samples(s) for s in ("train", "val", "test"))
    assert total == remaining and verify_shard_set(out) == []


def test_a_bad_input_ends_fedsilo_prep_with_one_line_and_status_2(tmp_path, capsys):
    _image_base(tmp_path)
    bad = tmp_path / "imgs" / "a" / "zz.png"
    bad.write_bytes(b"GIF89a but not really")
    status = fedsilo_cli.main(["prep", "folder", "--source", str(tmp_path / "imgs"), "--sites", "2",
                               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith(f"fedsilo: error: {bad}: unreadable image")


def test_without_skip_bad_a_listing_error_counts_the_others(tmp_path):
    _image_base(tmp_path)
    for name in ("g1", "g2", "g3"):
        _append_row(tmp_path, f"a/{name}.png,a")
    with pytest.raises(DataError, match=r"g1.png: image not found .* \(and 2 more problem\(s\) in"):
        run_cli(*_csv_args(tmp_path), "--out", tmp_path / "out")


# --- parallel, array tasks, interruption, streaming ---------------------------------------------


def _rgb_folder(root: Path, n_per_class=12, seed=9):
    rng = np.random.default_rng(seed)
    for name in ("p", "q", "r"):
        for i in range(n_per_class):
            save(root / name / f"{i:02d}.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))


def test_workers_do_not_change_a_single_byte(tmp_path):
    _rgb_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "q" / "zz.png").write_bytes(b"broken")
    args = ["prep", "folder", "--source", tmp_path / "imgs", "--sites", "3", "--skip-bad",
            "--partition", "dirichlet:0.5", "--seed", "2"]
    run_cli(*args, "--out", tmp_path / "one")
    run_cli(*args, "--workers", "2", "--out", tmp_path / "two")
    assert files(tmp_path / "one") == files(tmp_path / "two")
    assert len(load_manifest(tmp_path / "two").skipped) == 1


def test_array_tasks_equal_the_serial_run_for_natural_sites(tmp_path, monkeypatch):
    csv_dataset(tmp_path)
    (tmp_path / "imgs" / "img005.png").write_bytes(b"broken")  # one bad image, in some shard
    common = ["--partition", "natural:hospital", "--patient-column", "patient", "--skip-bad"]
    prep_csv(tmp_path, tmp_path / "serial", *common)
    results = []
    for task in (3, 1, 0, 2):  # test.h5 is task 3 = number of sites
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        results.append(prep_csv(tmp_path, tmp_path / "array", *common, "--only", "array")[1])
    assert ["not complete yet" in r for r in results] == [True, True, True, False]
    assert files(tmp_path / "array") == files(tmp_path / "serial")
    assert len(load_manifest(tmp_path / "array").skipped) == 1
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    with pytest.raises(ConfigError, match="array task 4 is beyond this set's 4 files"):
        prep_csv(tmp_path, tmp_path / "array2", *common, "--only", "array")


class FailingDecoder:
    """Decodes like ImageDecoder, then interrupts the run at the ``fail_at``-th image."""

    def __init__(self, fail_at: int) -> None:
        self.inner, self.calls, self.fail_at = ImageDecoder(), 0, fail_at
        self.channels, self.size = None, None

    def __call__(self, path):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.inner(path)

    def describe(self):
        return self.inner.describe()


def _folder_source(root: Path, decoder) -> RecordSource:
    return RecordSource("imgs", "folder", list_class_folders(root), decoder, {"kind": "folder"})


def test_an_interrupted_run_leaves_no_partial_shard_and_a_rerun_finishes_it(tmp_path):
    _rgb_folder(tmp_path / "imgs")
    kwargs = dict(participants=3, partition="iid", seed=0)
    clean = tmp_path / "clean"
    prepare_record_shards(_folder_source(tmp_path / "imgs", ImageDecoder()), out_dir=clean,
                          **kwargs)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # 1 probe + site-000 (~9 images) + part of site-001
        prepare_record_shards(_folder_source(tmp_path / "imgs", FailingDecoder(15)), out_dir=out,
                              **kwargs)
    assert sorted(p.name for p in out.iterdir()) == ["site-000.h5"]  # no partial site-001, no tmp
    (out / ".site-001.h5.dead.tmp").write_bytes(b"left by a killed writer")
    first = (out / "site-000.h5").stat().st_mtime_ns
    prepare_record_shards(_folder_source(tmp_path / "imgs", ImageDecoder()), out_dir=out, **kwargs)
    assert (out / "site-000.h5").stat().st_mtime_ns == first  # kept, not rewritten
    assert files(out) == files(clean) and not list(out.glob(".*.tmp"))
    # a different preparation over an interrupted directory is refused, as ever
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="shard files of another preparation .*--overwrite"):
        prepare_record_shards(_folder_source(tmp_path / "imgs", ImageDecoder()), out_dir=out,
                              participants=3, partition="iid", seed=1)


def test_decoding_streams_in_bounded_chunks(tmp_path, monkeypatch):
    gray_folder(tmp_path / "imgs", classes=("a", "b"), per_class=40, size=(8, 8))
    monkeypatch.setattr(stream, "CHUNK_BYTES", 5 * 64)  # 5 images of 1x8x8 per chunk
    decoded, appended, lag, sizes = [0], [0], [], []

    class Counting(ImageDecoder):
        def __call__(self, path):
            decoded[0] += 1
            return super().__call__(path)

    real_append = ShardWriter.append

    def append(self, split, images, labels):
        appended[0] += len(labels)
        sizes.append(len(labels))
        lag.append(decoded[0] - 1 - appended[0])  # 1: the probe's decode
        real_append(self, split, images, labels)

    monkeypatch.setattr(ShardWriter, "append", append)
    prepare_record_shards(_folder_source(tmp_path / "imgs", Counting()), out_dir=tmp_path / "out",
                          participants=2, partition="iid", seed=0)
    assert appended[0] == 80 and max(sizes) == 5
    assert max(lag) <= 5  # never more than one chunk decoded ahead of the writer


# --- statistics and normalization ------------------------------------------------------------


def test_each_site_stores_its_own_normalization_and_the_manifest_the_global_one(tmp_path):
    _rgb_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    run_cli("prep", "folder", "--source", tmp_path / "imgs", "--sites", "3", "--partition",
            "dirichlet:0.3", "--out", out)
    manifest = load_manifest(out)
    pooled = []
    for entry in manifest.sites:
        train = read_shard(out / entry.file).splits["train"]
        scaled = train.images / 255.0
        np.testing.assert_allclose(train.mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-12)
        np.testing.assert_allclose(train.std, scaled.std(axis=(0, 2, 3)), rtol=1e-9)
        pooled.append(scaled)
    pooled = np.concatenate(pooled)
    np.testing.assert_allclose(manifest.normalization_mean, pooled.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(manifest.normalization_std, pooled.std(axis=(0, 2, 3)), rtol=1e-9)


def test_stats_prints_counts_and_skew_and_draws_the_class_distribution(tmp_path):
    meta = csv_dataset(tmp_path, patients_per_hospital=8)
    out = tmp_path / "out"
    prep_csv(tmp_path, out, "--partition", "natural:hospital")
    status, text = run_cli("prep", "stats", out)
    assert status == 0
    manifest = load_manifest(out)
    lines = text.splitlines()
    assert lines[1].split() == ["file", "site", "train", "val", "benign", "malignant", "skew",
                                "mean", "std"]
    for k, (entry, name) in enumerate(zip(manifest.sites, ("north", "south", "west"))):
        cells = lines[2 + k].split()
        counts = np.add(entry.class_counts["train"], entry.class_counts["val"]).tolist()
        assert cells[:6] == [entry.file, name, str(entry.num_samples["train"]),
                             str(entry.num_samples["val"]), *map(str, counts)]
        assert 0.0 <= float(cells[6]) <= 1.0
    assert lines[-2].split()[:3] == ["test.h5", "(test)",
                                     str(manifest.test.class_counts["test"][0])]
    png = out / "class-distribution.png"
    assert f"wrote {png}" in text and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(png).size[0] >= 800
    # the chart sits beside the set harmlessly
    assert len(meta) == 48 and verify_shard_set(out) == []
    status, text = run_cli("prep", "stats", out, "--plot", tmp_path / "chart.png")
    assert (tmp_path / "chart.png").is_file()


def test_manifest_round_trips_class_names_and_skipped(tmp_path):
    _image_base(tmp_path)
    (tmp_path / "imgs" / "a" / "zz.png").write_bytes(b"x")
    out = tmp_path / "out"
    run_cli(*_folder_args(tmp_path), "--skip-bad", "--out", out)
    data = json.loads((out / "manifest.json").read_text())
    assert data["class_names"] == ["a", "b"]
    assert data["skipped"] == [{"path": str(tmp_path / "imgs" / "a" / "zz.png"),
                                "reason": data["skipped"][0]["reason"]}]
    assert load_manifest(out).to_dict() == data


def test_a_transfer_syntax_no_installed_handler_reads_is_a_bad_input_naming_it(tmp_path):
    from pydicom.uid import JPEGLSLossless

    from fedsilo.prep.dicom import DicomDecoder
    from fedsilo.prep.records import BadInput

    path = write_dicom(tmp_path / "ls.dcm", np.zeros((8, 8), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 not really JPEG-LS \xff\xd9"])
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    result = DicomDecoder()(str(path))
    assert isinstance(result, BadInput) and result.path == str(path)
    assert "cannot decode the pixel data (transfer syntax JPEG-LS Lossless" in result.reason
