"""Fuzzing the rest of the files fedsilo reads (issue 24, after test_fuzz_readers.py):
``config.yaml`` (and ``--set``), ``manifest.json``, the run markers, ``public.json`` and
the CKKS key files, HDF5 shards, checkpoints and the prep sources (CSV labels, images,
DICOM).  Each valid file is mutated (types, sizes, depth, truncation, garbage, huge
numbers) and fed to the reader the command uses: it works, or it ends with one
FedsiloError line naming the file (and the key where there is one), and no file that was
already there changes.

No MPI; the counts per format and their cost are in docs/records.md.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from fedsilo.errors import FedsiloError

#: a modest number of cases each: the whole file stays well under a minute on 2 cores
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                # a failure is shown as found: shrinking these inputs can take minutes
                phases=[Phase.explicit, Phase.generate])
FEW = settings(FUZZ, max_examples=25)

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
           | st.text(max_size=8) | st.sampled_from([10**400, -1, 0, 2**63, 1e308]))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=10)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(exc: BaseException, *names: str) -> None:
    text = str(exc)
    assert isinstance(exc, FedsiloError), repr(exc)
    assert "\n" not in text and "Traceback" not in text
    for name in names:
        assert name in text, (name, text)


def _mutate_json(value: Any, path: list[Any], new: Any, remove: bool) -> Any:
    """``value`` with the item at ``path`` (indexes taken modulo, so any path lands)
    replaced by ``new``, or removed."""
    if not path or not isinstance(value, (dict, list)) or not value:
        return new
    keys = sorted(value) if isinstance(value, dict) else list(range(len(value)))
    key = keys[path[0] % len(keys)]
    copy = dict(value) if isinstance(value, dict) else list(value)
    if remove and len(path) == 1:
        del copy[key]
    else:
        copy[key] = _mutate_json(value[key], path[1:], new, remove)
    return copy


paths = st.lists(st.integers(0, 40), min_size=1, max_size=4)
text_damage = st.one_of(
    st.builds(lambda cut: ("cut", cut), st.floats(0, 1)),
    st.builds(lambda at, junk: ("junk", at, junk), st.floats(0, 1), st.binary(max_size=12)),
    st.just(("deep",)), st.just(("huge",)), st.just(("none",)))


def _damage(data: bytes, how: tuple[Any, ...]) -> bytes:
    if how[0] == "cut":
        return data[: int(len(data) * how[1])]
    if how[0] == "junk":
        at = int(len(data) * how[1])
        return data[:at] + how[2] + data[at + len(how[2]):]
    if how[0] == "deep":
        return b"[" * 1500 + b"]" * 1500
    if how[0] == "huge":
        return b"9" * 5000
    return data


def _cli(argv: list[str]) -> tuple[int, str]:
    """``fedsilo ARGV`` in this process: its exit status and what it wrote to stderr."""
    import contextlib

    from fedsilo.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    return status, err.getvalue()


# -- config.yaml and --set (fedsilo train, budget, baseline: load_config) -------------------

@functools.lru_cache(maxsize=1)
def _good_config() -> dict[str, Any]:
    from fedsilo.config import load_config

    return load_config(None).to_dict()


@FUZZ
@given(path=paths, new=json_values, remove=st.booleans(), damage=text_damage)
def test_a_config_file_is_read_or_names_the_key(path, new, remove, damage):
    """A mutated config.yaml: a Config, or one ConfigError naming the file (and the key
    where a key is wrong)."""
    from fedsilo.config import load_config

    data = _mutate_json(_good_config(), path, new, remove)
    try:
        text = yaml.safe_dump(data).encode()
    except yaml.YAMLError:
        return
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "config.yaml"
        file.write_bytes(_damage(text, damage))
        before = _digests(Path(tmp))
        try:
            load_config(file)
        except FedsiloError as exc:
            _one_line(exc, str(file))
        assert _digests(Path(tmp)) == before


override_keys = st.one_of(
    st.sampled_from(["rounds", "train.lr", "train.batch_size", "dp.enabled", "dp.sites.1",
                     "model.name", "runtime.hang_timeout_s", "seed", "a.b.c", "rounds.x",
                     "", ".", "train..lr"]),
    st.text(max_size=10))
override_values = st.one_of(
    json_values.map(json.dumps), st.text(max_size=20),
    st.sampled_from(["[" * 1500, "9" * 5000, "1e999", "-1", "{a: {b: {c: 1}}}", "!!python/int 1",
                     "&a [*a]", "0x7fffffffffffffffff"]))


@FUZZ
@given(items=st.lists(st.tuples(override_keys, override_values), min_size=1, max_size=3))
def test_set_overrides_are_read_or_name_the_override(items):
    from fedsilo.config import load_config

    overrides = [f"{k}={v}" for k, v in items]
    try:
        load_config(None, overrides=overrides)
    except FedsiloError as exc:
        _one_line(exc)


@settings(FUZZ, max_examples=10)
@given(path=paths, new=json_values, remove=st.booleans())
def test_budget_reads_any_config_or_says_why(path, new, remove):
    """``fedsilo budget --config``: a plan, or exit 2 with one line on stderr."""
    data = _mutate_json(_good_config(), path, new, remove)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "config.yaml"
        file.write_text(yaml.safe_dump(data))
        status, err = _cli(["budget", "--config", str(file), "--samples", "100",
                            "--noise-multiplier", "1.0"])
    assert status in (0, 2) and "Traceback" not in err
    if status:
        assert err.startswith("fedsilo: error: ") and err.count("\n") == 1


# -- manifest.json and shards (train's shard checks, prep verify, budget) --------------------

@functools.lru_cache(maxsize=1)
def _shard_set() -> Path:
    """A small valid shard set (2 sites), made once per session."""
    from fedsilo.cli import main

    out = Path(tempfile.mkdtemp(prefix="fuzz-shards-"))
    assert main(["prep", "synthetic", "--samples", "120", "--classes", "2", "--size", "8", "8",
                 "--sites", "2", "--out", str(out / "set")]) == 0
    return out / "set"


@FUZZ
@given(path=paths, new=json_values, remove=st.booleans(), damage=text_damage)
def test_a_manifest_is_read_or_names_the_key(path, new, remove, damage):
    from fedsilo.shards import MANIFEST_FILE, load_manifest

    source = _shard_set()
    data = _mutate_json(json.loads((source / MANIFEST_FILE).read_text()), path, new, remove)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / MANIFEST_FILE
        file.write_bytes(_damage(json.dumps(data).encode(), damage))
        before = _digests(Path(tmp))
        try:
            manifest = load_manifest(tmp)
        except FedsiloError as exc:
            _one_line(exc, str(file))
        else:
            assert manifest.num_sites == len(manifest.sites)
        assert _digests(Path(tmp)) == before


@FEW
@given(path=paths, new=json_values, remove=st.booleans())
def test_prep_verify_reads_any_manifest_or_says_why(path, new, remove):
    from fedsilo.shards import MANIFEST_FILE

    source = _shard_set()
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "set"
        shutil.copytree(source, target)
        data = _mutate_json(json.loads((target / MANIFEST_FILE).read_text()), path, new, remove)
        (target / MANIFEST_FILE).write_text(json.dumps(data))
        before = _digests(target)
        status, err = _cli(["prep", "verify", str(target)])
        assert _digests(target) == before
    assert "Traceback" not in err and status in (0, 1, 2)


shard_edits = st.one_of(
    st.builds(lambda cut: ("cut", cut), st.floats(0, 0.999)),
    st.builds(lambda at, junk: ("junk", at, junk), st.floats(0, 1), st.binary(min_size=1,
                                                                               max_size=64)),
    st.builds(lambda split, name: ("drop", split, name), st.sampled_from(["train", "val"]),
              st.sampled_from(["images", "labels", None])),
    st.builds(lambda split, name, dtype, shape: ("dataset", split, name, dtype, shape),
              st.sampled_from(["train", "val"]), st.sampled_from(["images", "labels"]),
              st.sampled_from(["u1", "i8", "f4", "f8", "S3", "?", "c8"]),
              st.lists(st.integers(0, 9), min_size=0, max_size=5)),
    st.builds(lambda split, name, n: ("huge", split, name, n), st.sampled_from(["train", "val"]),
              st.sampled_from(["images", "labels"]), st.sampled_from([2**31, 2**40, 2**50])),
    st.builds(lambda where, key, value: ("attr", where, key, value),
              st.sampled_from(["", "train", "val"]),
              st.sampled_from(["fedsilo_format", "kind", "num_classes", "image_shape",
                               "num_samples", "class_counts", "pixel_count", "pixel_sum",
                               "pixel_sumsq"]),
              st.one_of(st.integers(-(2**62), 2**62), st.floats(allow_nan=True),
                        st.text(max_size=5), st.lists(st.integers(-5, 2**40), max_size=5))),
)


def _edit_shard(path: Path, edit: tuple[Any, ...]) -> None:
    import h5py

    if edit[0] in ("cut", "junk"):
        path.write_bytes(_damage(path.read_bytes(), edit))
        return
    with h5py.File(path, "r+") as f:
        if edit[0] == "drop":
            del f[edit[1] if edit[2] is None else f"{edit[1]}/{edit[2]}"]
        elif edit[0] == "dataset":
            del f[f"{edit[1]}/{edit[2]}"]
            f.create_dataset(f"{edit[1]}/{edit[2]}", shape=tuple(edit[4]), dtype=edit[3])
        elif edit[0] == "huge":
            old = f[f"{edit[1]}/{edit[2]}"]
            shape, dtype = (edit[3], *old.shape[1:]), old.dtype
            del f[f"{edit[1]}/{edit[2]}"]
            f.create_dataset(f"{edit[1]}/{edit[2]}", shape=shape, dtype=dtype,
                             chunks=(1, *shape[1:]))
        else:
            target = f if not edit[1] else f[edit[1]]
            value = edit[3]
            target.attrs[edit[2]] = np.asarray(value) if isinstance(value, list) else value


@FUZZ
@given(edits=st.lists(shard_edits, min_size=1, max_size=2))
# found in a full run: images and labels both declared 2**31 rows kept the check scanning
# (and its block list growing to 20 GB) instead of naming the attributes' disagreement
@example(edits=[("huge", "train", "images", 2**31), ("huge", "train", "labels", 2**31)])
def test_a_shard_is_checked_or_named(edits):
    """``check_shard`` (every rank's first look at its shard, and prep verify's): a ShardInfo
    whose figures hold, or one ShardError naming the file; within a second or so even when
    a dataset declares 2**50 images."""
    from fedsilo.shards import check_shard

    source = _shard_set() / "site-000.h5"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "site-000.h5"
        shutil.copy(source, path)
        for edit in edits:
            try:
                _edit_shard(path, edit)
            except (OSError, KeyError, ValueError, TypeError):
                pass  # an edit h5py cannot make on an already damaged file
        before = _digests(Path(tmp))
        try:
            info = check_shard(path, kind="site")
        except FedsiloError as exc:
            _one_line(exc, str(path))
        else:
            assert info.num_samples["train"] >= 1
            for split, n in info.num_samples.items():
                assert sum(info.class_counts[split]) == n
        assert _digests(Path(tmp)) == before


@functools.lru_cache(maxsize=1)
def _seg_shard() -> Path:
    """A small valid segmentation shard (a site's train and val splits), made once."""
    from fedsilo.shards import ShardWriter

    out = Path(tempfile.mkdtemp(prefix="fuzz-seg-")) / "site-000.h5"
    rng = np.random.default_rng(0)
    with ShardWriter(out, kind="site", image_shape=(1, 12, 10), num_classes=3,
                     masks=True) as writer:
        for split, n in (("train", 5), ("val", 2)):
            masks = rng.integers(0, 3, (n, 12, 10), dtype=np.uint8)
            writer.append(split, rng.integers(0, 256, (n, 1, 12, 10), dtype=np.uint8),
                          masks.reshape(n, -1).max(1).astype(np.int64), masks=masks)
    return out


seg_edits = st.one_of(
    shard_edits,
    st.builds(lambda split: ("drop", split, "masks"), st.sampled_from(["train", "val"])),
    st.builds(lambda split, dtype, shape: ("dataset", split, "masks", dtype, shape),
              st.sampled_from(["train", "val"]), st.sampled_from(["u1", "i8", "f4", "S3"]),
              st.lists(st.integers(0, 13), min_size=0, max_size=4)),
    st.builds(lambda split, n: ("huge", split, "masks", n), st.sampled_from(["train", "val"]),
              st.sampled_from([6, 2**31, 2**40])),
    st.builds(lambda split, at, value: ("pixel", split, at, value),
              st.sampled_from(["train", "val"]), st.integers(0, 10**6), st.integers(0, 255)),
    st.builds(lambda where, key, value: ("attr", where, key, value),
              st.sampled_from(["", "train", "val"]),
              st.sampled_from(["task", "num_classes", "pixel_class_counts"]),
              st.one_of(st.integers(-5, 300), st.text(max_size=14),
                        st.sampled_from(["segmentation", "classification"]),
                        st.lists(st.integers(-5, 2**40), max_size=4))),
)


def _edit_seg_shard(path: Path, edit: tuple[Any, ...]) -> None:
    if edit[0] != "pixel":
        _edit_shard(path, edit)
        return
    import h5py

    with h5py.File(path, "r+") as f:
        masks = f[f"{edit[1]}/masks"]
        if masks.size:
            flat = edit[2] % masks.size
            index = np.unravel_index(flat, masks.shape)
            masks[tuple(int(i) for i in index)] = edit[3]


@FUZZ
@given(edits=st.lists(seg_edits, min_size=1, max_size=2))
def test_a_segmentation_shard_is_checked_and_its_masks_read_or_named(edits):
    """A segmentation shard's readers: ``check_shard`` (masks scanned: shape, values, pixel
    counts), ``read_masks`` and the streamed split's ``MaskReader``: what they give holds
    (label maps of the images' size, every value a class), or one ShardError naming the
    file; nothing changes on disk."""
    from fedsilo.shards import MaskReader, check_shard, read_masks

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "site-000.h5"
        shutil.copy(_seg_shard(), path)
        for edit in edits:
            try:
                _edit_seg_shard(path, edit)
            except (OSError, KeyError, ValueError, TypeError, OverflowError):
                pass  # an edit h5py cannot make on an already damaged file
        before = _digests(Path(tmp))
        try:
            info = check_shard(path, kind="site", task="segmentation")
        except FedsiloError as exc:
            _one_line(exc, str(path))
        else:
            assert info.pixel_class_counts is not None and info.mask_sha256 is not None
            for split, n in info.num_samples.items():
                shape = info.image_shape[1:]
                assert sum(info.pixel_class_counts[split]) == n * shape[0] * shape[1]
        for split in ("train", "val"):
            try:
                masks = read_masks(path, split)
            except FedsiloError as exc:
                _one_line(exc, str(path))
            else:
                assert masks.dtype == np.uint8 and masks.ndim == 3
                assert not masks.size or int(masks.max()) < 256
            try:
                reader = MaskReader(path, split)
            except FedsiloError as exc:
                _one_line(exc, str(path))
                continue
            try:
                rows = np.arange(0, reader.num_samples, 2)[:3]
                got = reader.read(rows)
                assert got.shape == (rows.size, *reader.shape[1:])
                assert not got.size or int(got.max()) < reader.num_classes
            except FedsiloError as exc:
                _one_line(exc, str(path))
            finally:
                reader.close()
        assert _digests(Path(tmp)) == before


# -- run markers and summary.json (fedsilo report; train --resume keeps them) ---------------

MARKERS = ("stopped.json", "hung.json", "failed.json", "summary.json")


@FUZZ
@given(marker=st.sampled_from(MARKERS), content=st.one_of(json_values.map(json.dumps),
                                                          st.binary(max_size=60).map(repr)),
       damage=text_damage)
def test_report_reads_any_marker_or_names_it(marker, content, damage):
    from fedsilo.runreport import load_run, render_html

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "metrics.jsonl").write_text(json.dumps({"round": 1, "acc": 0.5}) + "\n")
        (root / "config.yaml").write_text("rounds: 3\n")
        (root / marker).write_bytes(_damage(content.encode(), damage))
        before = _digests(root)
        try:
            run = load_run(root)
        except FedsiloError as exc:
            _one_line(exc, marker)
        else:
            assert render_html([run], {}).startswith("<!doctype html>")
        assert _digests(root) == before


# -- public.json and the CKKS key files (train with aggregation.secure) ----------------------

@functools.lru_cache(maxsize=1)
def _key_dirs() -> tuple[Path, Path]:
    from fedsilo.crypto.ckks import generate_keys
    from fedsilo.crypto.identity import generate_identities
    from fedsilo.crypto.params import CKKSParams

    root = Path(tempfile.mkdtemp(prefix="fuzz-keys-"))
    generate_identities(root / "ids", num_sites=3)
    generate_keys(root / "ckks", CKKSParams(), num_participants=2)
    return root / "ids", root / "ckks"


@FUZZ
@given(path=paths, new=json_values, remove=st.booleans(), damage=text_damage)
def test_public_json_is_read_or_named(path, new, remove, damage):
    from fedsilo.crypto.identity import PUBLIC_FILE, load_public_keys

    ids, _ = _key_dirs()
    data = _mutate_json(json.loads((ids / PUBLIC_FILE).read_text()), path, new, remove)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / PUBLIC_FILE
        file.write_bytes(_damage(json.dumps(data).encode(), damage))
        try:
            keys = load_public_keys(tmp)
        except FedsiloError as exc:
            _one_line(exc, str(file))
        else:
            assert sorted(keys) == list(range(len(keys))) and len(keys) >= 2


@FEW
@given(kind=st.sampled_from(["participant", "coordinator"]), damage=text_damage,
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=4))
def test_a_ckks_key_body_is_loaded_or_named(kind, damage, flips):
    """A damaged TenSEAL context after a valid header: a key set, or one KeyFileError."""
    from fedsilo.crypto.ckks import COORDINATOR_FILE, PARTICIPANT_FILE, load_keys

    _, ckks = _key_dirs()
    name = PARTICIPANT_FILE if kind == "participant" else COORDINATOR_FILE
    header, _, body = (ckks / name).read_bytes().partition(b"\n")
    body = bytearray(_damage(body, damage) if damage[0] in ("cut", "junk") else body)
    for at, xor in flips:
        if body:
            body[int(at * (len(body) - 1))] ^= xor
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / name
        file.write_bytes(header + b"\n" + bytes(body))
        file.chmod(0o600)
        try:
            load_keys(file, expect=kind)
        except FedsiloError as exc:
            _one_line(exc, str(file))


# -- checkpoints (train --resume, report never: torch.load(weights_only=True) only) --------

def _coordinator_state() -> dict[str, Any]:
    import torch

    return {"round": 2, "weights": torch.zeros(10), "layout": ["a", "b"],
            "strategy": {}, "privacy": json.dumps({"reports": {}, "stopped": {}}),
            "metrics_row": json.dumps({"round": 2, "acc": 0.5}),
            "shard_set": {"num_classes": 2, "image_shape": [1, 8, 8], "test": "t",
                          "sites": ["a", "b"]},
            "last_test": {"acc": 0.5}}


checkpoint_values = st.one_of(
    json_values, st.just("tensor"), st.just("matrix"), st.just("bytes"))


def _value(kind: Any) -> Any:
    import torch

    if kind == "tensor":
        return torch.ones(3, dtype=torch.float64)
    if kind == "matrix":
        return torch.zeros(2, 5)
    if kind == "bytes":
        return b"\x00\x01"
    return kind


@FUZZ
@given(key=st.sampled_from(["round", "weights", "layout", "strategy", "privacy", "metrics_row",
                            "shard_set", "last_test", "best", "best_weights", "secret"]),
       new=checkpoint_values, remove=st.booleans(), damage=text_damage, top=st.booleans())
def test_a_coordinator_checkpoint_is_read_or_named(key, new, remove, damage, top):
    """The coordinator's checkpoint through the reader every resume uses: a state whose
    keys have the types restoring needs, or one CheckpointError naming the file and key."""
    from fedsilo.checkpointfile import read_coordinator_state
    from fedsilo.rundir import atomic_torch_save

    state: Any = _coordinator_state()
    if remove:
        state.pop(key, None)
    else:
        state[key] = _value(new)
    if top:
        state = _value(new)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "coordinator.pt"
        buffer = io.BytesIO()
        try:
            atomic_torch_save(path, state)
        except Exception:  # noqa: BLE001 - torch cannot save it: nothing to read
            return
        path.write_bytes(_damage(path.read_bytes(), damage))
        del buffer
        before = _digests(Path(tmp))
        try:
            loaded = read_coordinator_state(path)
        except FedsiloError as exc:
            _one_line(exc, str(path))
        else:
            assert loaded["weights"].ndim == 1 and isinstance(loaded["layout"], list)
        assert _digests(Path(tmp)) == before


# -- prep sources: CSV labels, images, DICOM ------------------------------------------------

def _png(size: int = 8) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.arange(size * size, dtype=np.uint8).reshape(size, size)).save(out, "PNG")
    return out.getvalue()


@FUZZ
@given(damage=text_damage, flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)),
                                          max_size=3),
       size=st.sampled_from([(8, 8), None]), channels=st.sampled_from([1, 3, None]))
def test_an_image_is_decoded_or_named(damage, flips, size, channels):
    from fedsilo.prep.images import ImageDecoder
    from fedsilo.prep.records import BadInput

    data = bytearray(_damage(_png(), damage))
    for at, xor in flips:
        if data:
            data[int(at * (len(data) - 1))] ^= xor
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.png"
        path.write_bytes(bytes(data))
        result = ImageDecoder(channels=channels, size=size)(str(path))
    if isinstance(result, BadInput):
        assert str(path) in result.message()
    else:
        assert result.dtype == np.uint8 and result.ndim == 3


@functools.lru_cache(maxsize=1)
def _dicom() -> bytes:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = generate_uid()
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 8, 8, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


@FUZZ
@given(damage=text_damage, flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)),
                                          max_size=4),
       tags=st.dictionaries(st.sampled_from(["Rows", "Columns", "BitsAllocated", "BitsStored",
                                             "NumberOfFrames", "SamplesPerPixel",
                                             "WindowCenter", "WindowWidth",
                                             "RescaleSlope", "PhotometricInterpretation"]),
                            st.one_of(st.integers(0, 70000), st.sampled_from(["x", "RGB",
                                                                               "MONOCHROME1"])),
                            max_size=2))
def test_a_dicom_file_is_decoded_or_named(damage, flips, tags):
    import pydicom

    from fedsilo.prep.dicom import DicomDecoder
    from fedsilo.prep.records import BadInput

    data = _dicom()
    if tags:
        ds = pydicom.dcmread(io.BytesIO(data))
        for name, value in tags.items():
            try:
                setattr(ds, name, value)
            except (ValueError, TypeError, OverflowError):
                pass
        out = io.BytesIO()
        try:
            ds.save_as(out)
        except Exception:  # noqa: BLE001 - pydicom cannot write it: nothing to read
            return
        data = out.getvalue()
    data = bytearray(_damage(data, damage))
    for at, xor in flips:
        if data:
            data[int(at * (len(data) - 1))] ^= xor
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.dcm"
        path.write_bytes(bytes(data))
        result = DicomDecoder()(str(path))
    if isinstance(result, BadInput):
        assert str(path) in result.message()
    else:
        assert result.dtype == np.uint8 and result.ndim == 3


csv_cells = st.one_of(st.sampled_from(["a.png", "b.png", "missing.png", "../x", "", "0", "1",
                                       "cat", "9" * 400]), st.text(max_size=6))


@FUZZ
@given(header=st.lists(st.sampled_from(["path", "label", "site", "", "x"]), max_size=4),
       rows=st.lists(st.lists(csv_cells, max_size=5), max_size=6), damage=text_damage)
def test_a_labels_csv_is_read_or_named(header, rows, damage):
    from fedsilo.prep.records import read_label_file

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("a.png", "b.png"):
            (root / name).write_bytes(_png())
        text = "\n".join(",".join(r) for r in [header, *rows]).encode()
        labels = root / "labels.csv"
        labels.write_bytes(_damage(text, damage))
        before = _digests(root)
        try:
            records = read_label_file(labels, root=root, skip_bad=True)
        except FedsiloError as exc:
            _one_line(exc, str(labels))
        else:
            assert len(records) >= 1
        assert _digests(root) == before


def test_the_fuzzed_shard_set_is_valid():
    """The control: the unmutated files each fuzz test starts from are read."""
    from fedsilo.checkpointfile import read_coordinator_state
    from fedsilo.rundir import atomic_torch_save
    from fedsilo.shards import check_shard, load_manifest

    load_manifest(_shard_set())
    check_shard(_shard_set() / "site-000.h5", kind="site")
    info = check_shard(_seg_shard(), kind="site", task="segmentation")
    assert info.num_samples == {"train": 5, "val": 2} and info.mask_sha256 is not None
    with tempfile.TemporaryDirectory() as tmp:
        atomic_torch_save(Path(tmp) / "c.pt", _coordinator_state())
        read_coordinator_state(Path(tmp) / "c.pt")
    pytest.importorskip("tenseal")


# -- the DP state a checkpoint keeps (a site's accountant, the user-level accountants) -----

_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**60, 2**60),
                     st.booleans(), st.none(), st.text(max_size=3))
_segments = st.lists(st.one_of(st.tuples(_numbers, _numbers, _numbers).map(list),
                               st.lists(_numbers, max_size=4), _numbers), max_size=4)


@FUZZ
@given(history=st.one_of(_segments, _numbers),
       mechanism=st.sampled_from(["rdp", "prv", "gdp", 7, None]))
def test_a_saved_privacy_history_is_read_or_refused(history, mechanism):
    """Whatever a checkpoint holds as a site's accountant, it loads as a history that
    spends what it says (σ > 0 finite, q in (0, 1], steps >= 0) or ends in one
    CheckpointError: an entry with σ = inf or steps < 0 would understate ε."""
    import math

    from fedsilo.errors import CheckpointError
    from fedsilo.privacy.accounting import PrivacyAccountant

    accountant = PrivacyAccountant("rdp")
    try:
        accountant.load_state_dict({"mechanism": mechanism, "history": history})
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        return
    assert mechanism == "rdp"
    for sigma, rate, steps in accountant.history:
        assert math.isfinite(sigma) and sigma > 0 and 0 < rate <= 1 and steps >= 0


@FUZZ
@given(state=st.one_of(_numbers, st.dictionaries(
    st.sampled_from(["released", "coordinator", "participant", "exposed", "x"]),
    st.one_of(_numbers, st.lists(_numbers, max_size=3),
              st.dictionaries(st.one_of(st.text(max_size=3), st.sampled_from(["0", "12"])),
                              st.one_of(_numbers, st.just({"mechanism": "rdp",
                                                           "history": [[1.0, 0.1, 3]]})),
                              max_size=2)), max_size=4)))
def test_a_saved_user_level_accountant_is_read_or_refused(state):
    from fedsilo.errors import CheckpointError
    from fedsilo.privacy.user_accounting import UserAccounting

    accountant = UserAccounting.__new__(UserAccounting)
    try:
        accountant.load_state_dict(state)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
