"""Fuzzing the readers of files a user (or a crash) can hand fedsilo (issue 24): whatever
the bytes, each reader returns something usable or raises its own FedsiloError subclass
(one line), never another exception, and ``--resume`` never loses a row.

No MPI and no torch; each test runs in a few seconds (``max_examples`` below; the counts
and their cost are recorded in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.errors import DataError, KeyFileError, ModelError, ReportError

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: any JSON value, small
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


# -- metrics.jsonl and --resume ----------------------------------------------------------

rows = st.builds(lambda r, acc: {"round": r, "acc": acc},
                 st.integers(1, 50), st.floats(0, 1))
bad_lines = st.one_of(
    st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b and b.strip()),
    json_values.map(lambda v: _dumps(v).encode()).filter(lambda b: b.strip() != b""),
    st.builds(lambda r: _dumps({"round": r}).encode(),
              st.integers(-5, 0) | st.booleans() | st.text(max_size=3) | st.floats()),
)
lines = st.lists(st.one_of(rows.map(lambda r: ("row", r)), bad_lines.map(lambda b: ("bad", b))),
                 max_size=12)


def _is_row(line: bytes) -> bool:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return False
    index = value.get("round") if isinstance(value, dict) else None
    return isinstance(index, int) and not isinstance(index, bool) and index >= 1


@FUZZ
@given(lines=lines, last_round=st.integers(0, 50), torn=st.booleans())
def test_resume_keeps_every_row_up_to_its_round(lines, last_round, torn):
    """``truncate_metrics`` keeps exactly the rows of rounds ≤ last_round, in order,
    whatever lines surround them; every other line is moved aside, none is lost."""
    from fedsilo.rundir import RunDir

    encoded = [_dumps(x).encode() if kind == "row" else x for kind, x in lines]
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp)
        text = b"\n".join(encoded) + (b"" if torn else b"\n")
        run.metrics.write_bytes(text)
        run.truncate_metrics(last_round=last_round)
        expected = [json.loads(x) for x in encoded if _is_row(x)]
        kept = [json.loads(x) for x in run.metrics.read_bytes().splitlines()]
        assert kept == [r for r in expected if r["round"] <= last_round]
        corrupt = Path(tmp, "metrics.jsonl.corrupt")
        dropped = Path(tmp, "metrics.jsonl.dropped")
        bad = [(n, x) for n, x in enumerate(encoded, start=1) if x.strip() and not _is_row(x)]
        assert (corrupt.read_bytes() if corrupt.exists() else b"") == \
            b"".join(b"line %d: " % n + x + b"\n" for n, x in bad)
        later = [r for r in expected if r["round"] > last_round]
        assert ([json.loads(x) for x in dropped.read_bytes().splitlines()]
                if dropped.exists() else []) == later
        assert run.read_metrics() == kept


# -- fedsilo report: metrics rows, config.yaml, summary.json --------------------------------

row_fields = st.fixed_dictionaries({}, optional={
    key: json_values for key in ("acc", "auc", "loss", "val", "seconds", "bytes", "epsilon",
                                 "delta", "stopped", "user_epsilon", "user_delta",
                                 "overlapped")})
site_maps = st.dictionaries(st.sampled_from(["0", "1", "2", "x", "01", "-1"]),
                            st.none() | st.floats() | st.integers() | st.text(max_size=3),
                            max_size=3)


@FUZZ
@given(fields=st.lists(row_fields, min_size=1, max_size=4),
       epsilon=st.lists(site_maps, min_size=1, max_size=4),
       config=st.one_of(json_values.map(_dumps), st.text(max_size=60)),
       summary=st.one_of(st.none(), json_values.map(_dumps), st.text(max_size=30)))
def test_report_reads_any_rows_or_names_what_is_wrong(fields, epsilon, config, summary):
    """A run directory of valid-JSON rows with any values at the keys the report reads,
    any config.yaml and summary.json: a page (the HTML without plots, and the time stacks
    the plot draws), or one ReportError."""
    from fedsilo.runplots import time_stacks
    from fedsilo.runreport import load_run, render_html

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text = "".join(_dumps({"round": i + 1, **f, "epsilon": e}) + "\n"
                       for i, (f, e) in enumerate(zip(fields, epsilon)))
        (root / "metrics.jsonl").write_text(text)
        (root / "config.yaml").write_text(config)
        if summary is not None:
            (root / "summary.json").write_text(summary)
        try:
            run = load_run(root)
        except ReportError as exc:
            assert "\n" not in str(exc)
            return
        page = render_html([run], {})
        assert page.startswith("<!doctype html>")
        time_stacks([r for r in run.rows if r.get("seconds")])


# -- model cards ------------------------------------------------------------------------

GOOD_CARD = {"fedsilo_model_card": 1, "weights": "model.pt", "weights_sha256": "0" * 64,
             "model": {"name": "small_cnn"}, "num_classes": 2, "class_names": ["a", "b"],
             "image_shape": [1, 16, 16],
             "normalization": {"mode": "global", "mean": [0.5], "std": [0.25]},
             "round": 3, "threshold": None, "eval_batch_size": 64}
card_values = st.one_of(json_values, st.integers(-(2**40), 2**40),
                        st.lists(st.integers(-3, 200_000), max_size=4),
                        st.lists(st.floats(), max_size=3))


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted(GOOD_CARD)), card_values, max_size=3),
       removed=st.sets(st.sampled_from(sorted(GOOD_CARD)), max_size=2))
def test_a_model_card_is_read_within_bounds_or_refused(changes, removed):
    """Any card: a ModelCard whose every figure is in range, or one ModelError line naming
    the card file."""
    from fedsilo import modelfile

    data = {k: v for k, v in {**GOOD_CARD, **changes}.items() if k not in removed}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.json").write_text(_dumps(data))
        try:
            card = modelfile.read_card(Path(tmp) / "model.pt")
        except ModelError as exc:
            assert str(Path(tmp) / "model.json") in str(exc) and "\n" not in str(exc)
            return
    from fedsilo.shards import manifest

    channels, height, width = card.image_shape
    assert channels in (1, 3) and channels * height * width <= manifest.MAX_IMAGE_VALUES
    assert 1 <= min(height, width) and max(height, width) <= manifest.MAX_IMAGE_SIDE
    assert 2 <= card.num_classes == len(card.class_names) <= modelfile.MAX_CLASSES
    assert 1 <= card.eval_batch_size <= modelfile.MAX_BATCH
    assert len(card.mean) == len(card.std) == channels and min(card.std) > 0
    assert card.threshold is None or 0 <= card.threshold <= 1


@FUZZ
@given(data=st.binary(max_size=300))
def test_a_card_of_random_bytes_is_refused(data):
    from fedsilo.modelfile import read_card

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.json").write_bytes(data)
        with pytest.raises(ModelError):
            read_card(Path(tmp) / "model.pt")


# -- CKKS key files ---------------------------------------------------------------------

@FUZZ
@given(header=st.one_of(st.binary(max_size=60), json_values.map(lambda v: _dumps(v).encode())),
       magic=st.booleans(), mode=st.sampled_from([0o600, 0o400, 0o640, 0o644, 0o606]),
       secret=st.booleans())
def test_a_key_file_header_is_read_or_refused(header, magic, mode, secret):
    """Header parsing (no TenSEAL context is built): a dict header, or one KeyFileError; a
    secret key file readable by others is always refused."""
    from fedsilo.crypto import ckks

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "participant.key"
        path.write_bytes((ckks._MAGIC if magic else b"") + header + b"\nbody")
        path.chmod(mode)
        try:
            parsed, body = ckks._read(path, secret=secret)
        except KeyFileError as exc:
            assert "\n" not in str(exc)
            return
    assert isinstance(parsed, dict) and body.endswith(b"body")
    assert not (secret and mode & 0o077)


# -- data_prep: .npz and IDX ---------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=400))
def test_a_npz_of_random_bytes_is_a_data_error(data):
    from fedsilo.prep.medmnist import load_medmnist

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npz"
        path.write_bytes(data)
        with pytest.raises(DataError):
            load_medmnist(path)


@FUZZ
@given(data=st.binary(max_size=64), code=st.sampled_from([0x08, 0x0B, 0x0C, 0x07]),
       dims=st.lists(st.integers(0, 6), min_size=0, max_size=4), extra=st.integers(-3, 3),
       raw=st.booleans())
def test_an_idx_file_is_checked_or_named(data, code, dims, extra, raw):
    """Random bytes, or an IDX header whose items are cut short or overlong: a DataError,
    or a file whose size is exactly what its header says."""
    from fedsilo.prep.tvdatasets import check_idx

    if raw:
        content = data
    else:
        size = int(np.prod(dims)) * {0x08: 1, 0x0B: 2, 0x0C: 4}.get(code, 1)
        content = bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) \
            + bytes(max(0, size + extra))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train-images-idx3-ubyte"
        path.write_bytes(content)
        try:
            check_idx(path)
        except DataError as exc:
            assert str(path) in str(exc)
            return
    assert content[:2] == b"\0\0" and 1 <= content[3] <= 4
