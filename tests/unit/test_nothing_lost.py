"""Issue 24, "nothing lost, no traceback": a bad input is one clear error line naming the
file and key, and nothing already written is lost or changed (metrics rows after a bad
line, a file already at ``export --out``, key directories, ...)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SHARED, InProcess, Job, fedsilo_cli

from fedsilo.rundir import RunDir


def metrics_rows(rounds: range) -> list[dict]:
    return [{"round": r, "acc": r / 10, "seconds": {"round": 1.0}} for r in rounds]


def write_lines(run: RunDir, lines: list[str | bytes]) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    run.metrics.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n"
                                     for x in lines))


@pytest.fixture(autouse=True)
def _propagate(monkeypatch):
    """fedsilo's logger reaches caplog even after a command in this process set it up."""
    monkeypatch.setattr(logging.getLogger("fedsilo"), "propagate", True)


# -- metrics.jsonl and --resume ----------------------------------------------------------

def test_a_bad_line_in_the_middle_loses_no_row_on_resume(tmp_path, caplog):
    """Resuming after round 5 with a corrupt line 3: rows 1, 2, 4, 5 stay, rows of rounds
    without checkpoint go aside, the bad line goes to metrics.jsonl.corrupt with its
    number, and a warning names the file and line."""
    run = RunDir(tmp_path)
    rows = metrics_rows(range(1, 8))
    lines = [json.dumps(r) for r in rows]
    lines[2] = '{"round": 3, "acc": 0.\x00garbage'
    write_lines(run, lines)
    with caplog.at_level(logging.WARNING, logger="fedsilo"):
        run.truncate_metrics(last_round=5)
    kept = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [r["round"] for r in kept] == [1, 2, 4, 5]
    assert kept == [rows[0], rows[1], rows[3], rows[4]]
    corrupt = run.root / "metrics.jsonl.corrupt"
    assert corrupt.is_file() and "line 3" in corrupt.read_text()
    assert lines[2] in corrupt.read_text()
    dropped = run.root / "metrics.jsonl.dropped"
    assert [json.loads(x)["round"] for x in dropped.read_text().splitlines()] == [6, 7]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(run.metrics) in warned and "3" in warned


def test_read_metrics_skips_and_reports_bad_lines(tmp_path, caplog):
    run = RunDir(tmp_path)
    lines = [json.dumps(r) for r in metrics_rows(range(1, 5))]
    lines.insert(1, '{"round": "2", "acc": 1}')    # round not an int
    lines.insert(2, '{"round": 0}')                # not a positive round
    lines.insert(3, '[1, 2]')                      # not an object
    lines.insert(4, '{"round": true}')             # a bool is no round
    lines.insert(5, b'\xff\xfe not utf-8')
    lines.insert(6, "[" * 100_000 + "]" * 100_000)  # deeper than json's recursion limit
    write_lines(run, lines)
    with caplog.at_level(logging.WARNING, logger="fedsilo"):
        rows = run.read_metrics()
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(run.metrics) in warned and "2, 3, 4, 5, 6, 7" in warned


def test_resume_twice_appends_to_the_corrupt_file(tmp_path):
    run = RunDir(tmp_path)
    write_lines(run, [json.dumps(metrics_rows(range(1, 2))[0]), "not json"])
    run.truncate_metrics(last_round=1)
    with run.metrics.open("a") as handle:
        handle.write("second bad\n")
    run.truncate_metrics(last_round=1)
    corrupt = (run.root / "metrics.jsonl.corrupt").read_text()
    assert "not json" in corrupt and "second bad" in corrupt
    assert [r["round"] for r in run.read_metrics()] == [1]


# -- a model on disk, written as fedsilo train writes it (no MPI) ------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch

    from fedsilo.config import config_from_dict
    from fedsilo.modelfile import write_model
    from fedsilo.models import build_for

    where = tmp_path_factory.mktemp("model")
    config = config_from_dict({"model": {"name": "small_cnn"}})
    torch.manual_seed(0)
    model = build_for(config, in_channels=1, num_classes=2, image_size=(16, 16), weights=False)
    card = {"model": {**config.to_dict()["model"], "weights": None}, "num_classes": 2,
            "class_names": ["no", "yes"], "image_shape": [1, 16, 16],
            "normalization": {"mode": "global", "mean": [0.5], "std": [0.25]}, "round": 3,
            "selected_by": None, "threshold": None, "eval_batch_size": 64}
    write_model(where / "model.pt", model.state_dict(), card)
    return where


def card_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "model.json").read_text())


def copy_with_card(model_dir: Path, where: Path, **changes) -> Path:
    import shutil

    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_dir / "model.pt", where / "model.pt")
    (where / "model.json").write_text(json.dumps({**card_of(model_dir), **changes}))
    return where / "model.pt"


def run_patched(probe: str, argv: list[str]) -> Job:
    """``fedsilo ARGV`` through the real ``cli.main`` in a process of its own, after the
    Python lines ``probe`` (which inject an OS error)."""
    result = subprocess.run([sys.executable, "-c", probe + "\nfrom fedsilo.cli import main\n"
                             "sys.exit(main(sys.argv[1:]))\n", *argv],
                            capture_output=True, text=True, timeout=300)
    return Job(result.returncode, result.stdout, result.stderr, 0.0)


def cli_error(job, *words: str) -> str:
    """The one error line of a failed command (no traceback), checked for ``words``."""
    assert job.returncode != 0, job.output
    assert "Traceback" not in job.stderr, job.stderr
    lines = [li for li in job.stderr.splitlines() if li.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedsilo: error: "), job.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# -- fedsilo export -----------------------------------------------------------------------

def test_a_failed_export_leaves_the_file_at_out(model_dir, tmp_path, monkeypatch):
    """The exporter fails after the old file was there: the old file stays, byte for byte,
    and no temporary is left behind."""
    import torch

    from fedsilo.errors import ModelError
    from fedsilo.export import export_model

    out = tmp_path / "model.ts"
    out.write_bytes(b"the previous export")

    def broken(*args, **kwargs):
        raise RuntimeError("tracer exploded")

    monkeypatch.setattr(torch.jit, "trace", broken)
    with pytest.raises(ModelError, match="tracer exploded"):
        export_model(model_dir / "model.pt", fmt="torchscript", out=out)
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ts"]


def test_an_export_over_the_tolerance_leaves_the_file_at_out(model_dir, tmp_path,
                                                             monkeypatch):
    from fedsilo import export
    from fedsilo.errors import ModelError

    out = tmp_path / "model.ts"
    out.write_bytes(b"the previous export")
    monkeypatch.setattr(export, "TOLERANCE", -1.0)
    with pytest.raises(ModelError, match="differs from PyTorch"):
        export.export_model(model_dir / "model.pt", fmt="torchscript", out=out,
                            log=open("/dev/null", "w"))  # noqa: SIM115
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ts"]


@pytest.mark.parametrize("code, words", [
    ("ENOSPC", ("no space left", "run fedsilo export again")),
    ("EROFS", ("read-only",)),
    ("EACCES", ("cannot write",)),
])
def test_an_export_that_cannot_be_written_is_one_line(model_dir, tmp_path, code, words):
    """A full disk, a read-only file system, a directory one may not write to: one line
    naming --out and what to do (not "resume the run"), no traceback, the old file kept.
    The real command in a process of its own; the OS error is injected (tests run as root,
    for whom no directory is read-only)."""
    out = tmp_path / "model.ts"
    out.write_bytes(b"the previous export")
    fail = "os.fsync" if code == "ENOSPC" else "tempfile.mkstemp"
    probe = ("import errno, os, sys, tempfile\n"
             "def fail(*a, **k):\n"
             f"    raise OSError(errno.{code}, os.strerror(errno.{code}))\n"
             f"{fail} = fail\n")
    job = run_patched(probe, ["export", "--model", str(model_dir / "model.pt"), "--format",
                              "torchscript", "--out", str(out)])
    line = cli_error(job, str(out), *words)
    assert "resume" not in line
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ts"]


# -- key files and key directories ---------------------------------------------------------

def run_keys(*argv: str, umask: int = 0o022) -> Job:
    """The real ``fedsilo keys`` in a process of its own, under ``umask``."""
    import os

    result = subprocess.run([sys.executable, "-m", "fedsilo", "keys", *argv], text=True,
                            capture_output=True, timeout=120,
                            preexec_fn=lambda: os.umask(umask))
    return Job(result.returncode, result.stdout, result.stderr, 0.0)


SMALL_CKKS = ("--poly-modulus-degree", "4096", "--data-bits", "54", "--scale-bits", "44",
              "--sites", "4")


def mode_of(path: Path) -> int:
    import stat

    return stat.S_IMODE(path.stat().st_mode)


def test_a_participant_key_readable_by_others_is_refused(tmp_path):
    """The CKKS secret key at 0644 (or 0640): refused like an identity key, naming the file
    and the fix; once chmod 600, it loads."""
    from fedsilo.crypto.ckks import PARTICIPANT_FILE, load_keys
    from fedsilo.errors import KeyFileError

    job = run_keys("--out", str(tmp_path / "k"), *SMALL_CKKS)
    assert job.returncode == 0, job.stderr
    key = tmp_path / "k" / PARTICIPANT_FILE
    assert mode_of(key) == 0o600
    for mode in (0o644, 0o640, 0o604):
        key.chmod(mode)
        with pytest.raises(KeyFileError, match=rf"{key}.*readable by others.*"
                                               rf"'chmod 600 {key}'"):
            load_keys(key, expect="participant")
    key.chmod(0o600)
    assert load_keys(key, expect="participant").is_private


@pytest.mark.parametrize("kind", ["ckks", "identity"])
def test_key_directories_are_private_under_umask_000(tmp_path, kind):
    """Under umask 000 the key directory (and a parent this call makes) is 0700, the secret
    files 0600 and the public ones 0644; an existing directory keeps its mode."""
    out = tmp_path / "new-parent" / "keys"
    argv = SMALL_CKKS if kind == "ckks" else ("--identity", "--sites", "3")
    job = run_keys("--out", str(out), *argv, umask=0)
    assert job.returncode == 0, job.stderr
    assert mode_of(out) == 0o700 and mode_of(out.parent) == 0o700
    modes = {p.name: mode_of(p) for p in out.iterdir()}
    expected = ({"participant.key", "coordinator.ctx", "params.json"} if kind == "ckks"
                else {"site-000.key", "site-001.key", "site-002.key", "public.json"})
    assert expected <= set(modes), modes
    # secrets (*.key) 0600, the rest 0644: nothing group or world writable
    assert modes == {name: 0o600 if name.endswith(".key") else 0o644 for name in modes}
    existing = tmp_path / "existing"
    existing.mkdir()
    existing.chmod(0o750)
    job = run_keys("--out", str(existing), *argv, umask=0)
    assert job.returncode == 0, job.stderr
    assert mode_of(existing) == 0o750


@pytest.mark.parametrize("kind", ["ckks", "identity"])
def test_keys_out_naming_a_file_is_one_line(tmp_path, kind):
    target = tmp_path / "a-file"
    target.write_bytes(b"something else")
    argv = SMALL_CKKS if kind == "ckks" else ("--identity", "--sites", "3")
    cli_error(run_keys("--out", str(target), *argv), str(target), "not a directory")
    assert target.read_bytes() == b"something else"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_keys_for_a_billion_sites_are_refused_at_once(tmp_path):
    job = run_keys("--identity", "--sites", "1000000000", "--out", str(tmp_path / "k"))
    cli_error(job, "--sites 1000000000", "at most 100000")
    assert not (tmp_path / "k").exists()


# -- fedsilo predict: model cards and --out ------------------------------------------------

@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "x.png"
    Image.new("L", (16, 16), color=90).save(path)
    return path




def test_predict_with_an_absurd_image_shape_is_one_line(model_dir, image, tmp_path):
    """The real command: a card declaring 100000 x 100000 images is refused before anything
    is built, naming the card and the key; --out is not touched."""
    model = copy_with_card(model_dir, tmp_path / "m", image_shape=[1, 100_000, 100_000])
    out = tmp_path / "out.csv"
    out.write_bytes(b"previous,csv\n")
    job = fedsilo_cli(["predict", "--model", str(model), str(image), "--out", str(out)])
    cli_error(job, str(tmp_path / "m" / "model.json"), "'image_shape'")
    assert out.read_bytes() == b"previous,csv\n"


@pytest.mark.parametrize("changes, words", [
    ({"eval_batch_size": -1}, ("'eval_batch_size'",)),
    ({"eval_batch_size": "64"}, ("'eval_batch_size'",)),
    ({"image_shape": [1, 16]}, ("'image_shape'",)),
    ({"image_shape": [1, 20000, 20000]}, ("'image_shape'", "largest image")),
    ({"image_shape": [1, 0, 16]}, ("'image_shape'",)),
    ({"image_shape": [1, True, 16]}, ("'image_shape'",)),
    ({"model": None}, ("'model'",)),
    ({"model": {"name": 7}}, ("'model.name'",)),
    ({"normalization": {"mean": [0.5]}}, ("'normalization.std'",)),
    ({"normalization": {"mean": ["x"], "std": [0.2]}}, ("'normalization.mean'",)),
    ({"num_classes": 1e9}, ("'num_classes'",)),
    ({"num_classes": 3}, ("'class_names'",)),
    ({"class_names": [1, 2]}, ("'class_names'",)),
    ({"threshold": {"value": "high"}}, ("'threshold.value'",)),
    ({"round": -4}, ("'round'",)),
    ({"weights_sha256": 5}, ("'weights_sha256'",)),
])
def test_bad_model_cards_name_the_key(model_dir, image, tmp_path, capsys, changes, words):
    """Each bad key of a card: one line naming the card file and the key (never a Python
    exception's name)."""
    model = copy_with_card(model_dir, tmp_path / "m", **changes)
    line = cli_error(InProcess(capsys)(["predict", "--model", str(model), str(image)]),
                     str(tmp_path / "m" / "model.json"), *words)
    assert "Error" not in line.split("error: ", 1)[1], line


def test_a_card_without_a_key_names_the_key(model_dir, image, tmp_path, capsys):
    card = card_of(model_dir)
    for key in ("model", "normalization", "image_shape", "num_classes"):
        where = tmp_path / key
        model = copy_with_card(model_dir, where)
        (where / "model.json").write_text(json.dumps({k: v for k, v in card.items()
                                                      if k != key}))
        line = cli_error(InProcess(capsys)(["predict", "--model", str(model), str(image)]),
                         f"'{key}'")
        assert "KeyError" not in line


def test_predict_to_an_unwritable_out_is_one_line(model_dir, image, tmp_path, capsys):
    """--out under a file, --out a directory, a full disk: one line naming --out, and a file
    already there is unchanged."""
    fedsilo = InProcess(capsys)
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"kept")
    model = str(model_dir / "model.pt")
    cli_error(fedsilo(["predict", "--model", model, str(image), "--out",
                       str(blocker / "out.csv")]), "cannot write --out", str(blocker))
    cli_error(fedsilo(["predict", "--model", model, str(image), "--out", str(tmp_path)]),
              "is a directory")
    assert blocker.read_bytes() == b"kept"
    out = tmp_path / "out.csv"
    out.write_bytes(b"previous,csv\n")
    probe = ("import errno, os, sys\n"
             "def fail(*a, **k):\n"
             "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
             "os.fsync = fail\n")
    job = run_patched(probe, ["predict", "--model", model, str(image), "--out", str(out)])
    line = cli_error(job, str(out), "no space left", "run fedsilo predict again")
    assert "resume" not in line
    assert out.read_bytes() == b"previous,csv\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "out.csv"]


def test_a_good_card_still_predicts(model_dir, image, tmp_path, capsys):
    out = tmp_path / "out.csv"
    job = InProcess(capsys)(["predict", "--model", str(model_dir / "model.pt"), str(image),
                             "--out", str(out)])
    assert job.returncode == 0, job.stderr
    assert out.read_text().splitlines()[0] == "source,label,prob_no,prob_yes,predicted"


# -- fedsilo report --------------------------------------------------------------------------

RUNS = Path(__file__).resolve().parent / "runs"


def copy_run(tmp_path: Path, name: str = "dp") -> Path:
    import shutil

    return Path(shutil.copytree(RUNS / name, tmp_path / name))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def edit_row(run: Path, index: int, **changes) -> None:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows[index].update(changes)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_on_rows_of_unexpected_types_is_one_line(tmp_path):
    """The real command on valid JSON rows with a string for 'val' and a site key that is
    no site index: one line naming the file, the line and the key; nothing written."""
    run = copy_run(tmp_path)
    edit_row(run, 1, val="x")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("the previous report")
    before = snapshot(tmp_path)
    job = fedsilo_cli(["report", str(run), "--out", str(out)])
    cli_error(job, f"{run / 'metrics.jsonl'} line 2", "'val'")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("edit, words", [
    ({"epsilon": {"a": 1.0}}, ("'epsilon'", "'a'")),
    ({"epsilon": {"0": "x"}}, ("epsilon.0",)),
    ({"acc": "0.9"}, ("'acc'",)),
    ({"acc": 10 ** 400}, ("'acc'",)),
    ({"seconds": [1, 2]}, ("'seconds'",)),
    ({"seconds": {"round": {"x": 1}}}, ("seconds.round",)),
    ({"stopped": {"1.5": 3}}, ("'stopped'",)),
    ({"overlapped": None}, ("'overlapped'",)),
])
def test_report_rows_of_unexpected_types_name_the_key(tmp_path, capsys, edit, words):
    run = copy_run(tmp_path)
    edit_row(run, 2, **edit)
    before = snapshot(tmp_path)
    line = cli_error(InProcess(capsys)(["report", str(run), "--out", str(tmp_path / "out")]),
                     f"{run / 'metrics.jsonl'} line 3", *words)
    assert "Error" not in line.split("error: ", 1)[1], line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("text, words", [
    ("[" * 100_000 + "]" * 100_000, ("config.yaml", "nested deeper")),
    ("rounds: 3\n" + "".join("  " * i + "a:\n" for i in range(40)) + "  " * 40 + "b: 1\n",
     ("config.yaml", "nested deeper")),
    ("x: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
     + "".join(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}' if i else '*a'] * 10)}]\n"
               for i in range(8)), ("config.yaml", "values")),
    ("dp: [1, 2]\n", ("config.yaml", "'dp'")),
    ("dp:\n  sites: 7\n", ("config.yaml", "'dp.sites'")),
])
def test_report_on_an_absurd_config_is_one_line(tmp_path, capsys, text, words):
    run = copy_run(tmp_path)
    (run / "config.yaml").write_text(text)
    before = snapshot(tmp_path)
    cli_error(InProcess(capsys)(["report", str(run), "--out", str(tmp_path / "out")]), *words)
    assert snapshot(tmp_path) == before


def test_report_skips_a_bad_line_but_keeps_the_rows_after_it(tmp_path):
    from fedsilo.runreport import load_run

    run = copy_run(tmp_path, "plain")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    loaded = load_run(run)
    assert [r["round"] for r in loaded.rows] == [1, 3, 4, 5]
    assert any("line(s) 2 of metrics.jsonl" in note for note in loaded.notes)


# -- data_prep readers ---------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"hello, not a zip", bytes(range(256)) * 12,
                                     b"\x93NUMPY\x01\x00v\x00{'descr': '|O'"])
def test_a_npz_that_is_no_zip_is_named_so(tmp_path, content):
    source = tmp_path / "pneumonia.npz"
    source.write_bytes(content)
    job = fedsilo_cli(["prep", "medmnist", "--source", str(source), "--sites", "2",
                       "--out", str(tmp_path / "shards")])
    line = cli_error(job, str(source), "not a valid .npz file")
    assert "allow_pickle" not in line and "pickled" not in line
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").iterdir())


def test_random_bytes_as_mnist_idx_files_are_named(tmp_path):
    import numpy as np

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    noise = np.random.default_rng(0)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(noise.bytes(5000))
    job = fedsilo_cli(["prep", "torchvision", "--dataset", "MNIST", "--root", str(tmp_path),
                       "--sites", "2", "--out", str(tmp_path / "shards")])
    line = cli_error(job, "idx", "not an IDX file")
    assert "AssertionError" not in line


def test_prep_medmnist_by_name_refuses_another_sets_file(tmp_path):
    """``prep medmnist --name bloodmnist`` given PneumoniaMNIST's file (renamed): refused,
    naming the file and what differs, not merely a note that the md5 differs."""
    pytest.importorskip("medmnist")
    from fedsilo.errors import DataError
    from fedsilo.prep.medmnist import load_medmnist_by_name

    real = SHARED / "data" / "pneumoniamnist.npz"
    if not real.is_file():
        pytest.skip(f"{real} is not here")
    (tmp_path / "bloodmnist.npz").symlink_to(real)
    with pytest.raises(DataError, match=r"bloodmnist.npz.*not MedMNIST bloodmnist.*channels"):
        load_medmnist_by_name("bloodmnist", root=tmp_path)
    (tmp_path / "pneumoniamnist.npz").symlink_to(real)  # its own name: read
    source = load_medmnist_by_name("pneumoniamnist", root=tmp_path)
    assert source.provenance["name"] == "pneumoniamnist" and len(source.splits["train"][1]) == 4708
