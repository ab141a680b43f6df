"""The centralized baseline (``fedsilo baseline``), the report beside a federated run, and a
site's personal model (``fedsilo personalize``), without MPI.

One small synthetic 3-site shard set and one 2-round baseline on it are shared by the
module; the baseline's run directory is also the finished run that ``personalize`` starts
from (it holds config.yaml and model.pt, as a federated run does).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import fedsilo_cli

from fedsilo.baseline import PooledReader, pooled_digest, run_baseline
from fedsilo.cli import main
from fedsilo.errors import ConfigError
from fedsilo.modelfile import load_model
from fedsilo.runreport import baseline_gaps, load_run, load_runs, write_report
from fedsilo.shards import SplitReader, load_manifest, read_shard

RUNS = Path(__file__).resolve().parent / "runs"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baseline") / "shards"
    assert main(["prep", "synthetic", "--samples", "360", "--classes", "3", "--sites", "3",
                 "--partition", "dirichlet:0.5", "--seed", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baseline-run") / "base"
    run_baseline(config_path=None, out_dir=str(out), overrides=[
        f"data.dir={shards}", "model.name=dp_cnn", "rounds=2", "train.batch_size=32",
        "train.lr=0.05", "runtime.threads=1"])
    return out


def _union_digest(shards: Path) -> tuple[str, int, list[int]]:
    """sha256 of every site's training split (images, then labels), read with h5py directly,
    site 0 first: what the baseline must have trained on; its size and class counts."""
    manifest = load_manifest(shards)
    images, labels = [], []
    for entry in manifest.sites:
        split = read_shard(shards / entry.file, splits=["train"]).splits["train"]
        images.append(split.images)
        labels.append(split.labels)
    pixels, classes = np.concatenate(images), np.concatenate(labels).astype("<i8")
    digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes() + classes.tobytes())
    return digest.hexdigest(), len(classes), np.bincount(classes, minlength=3).tolist()


def test_a_pooled_split_is_the_sites_splits_end_to_end(shards):
    manifest = load_manifest(shards)
    readers = [SplitReader(shards / e.file, "train", cache_bytes=0) for e in manifest.sites]
    pool = PooledReader(readers, split="train")
    parts = [read_shard(shards / e.file, splits=["train"]).splits["train"]
             for e in manifest.sites]
    images = np.concatenate([p.images for p in parts])
    assert pool.num_samples == len(images) == manifest.total_samples("train")
    assert np.array_equal(pool.labels(), np.concatenate([p.labels for p in parts]))
    rng = np.random.default_rng(0)
    rows = np.unique(rng.integers(0, pool.num_samples, size=50))  # across every boundary
    rows = np.union1d(rows, pool.starts[1:-1])  # the first row of each later site
    assert np.array_equal(pool.read(rows), images[rows])
    with pytest.raises(IndexError):
        pool.read(np.array([pool.num_samples]))
    assert pooled_digest(pool) == _union_digest(shards)[0]
    pool.close()


def test_the_baseline_sees_exactly_the_union_of_the_training_splits(shards, baseline):
    """Counts, class counts and hashes against the manifest, and the content of what it
    trained on against the sites' training splits read independently (no val, no test)."""
    manifest = load_manifest(shards)
    data = json.loads((baseline / "summary.json").read_text())["data"]
    digest, count, counts = _union_digest(shards)
    assert data["train"]["num_samples"] == count == manifest.total_samples("train")
    assert data["train"]["class_counts"] == counts == np.sum(
        [e.class_counts["train"] for e in manifest.sites], axis=0).tolist()
    assert data["train"]["sha256"] == digest
    assert [s["file"] for s in data["sites"]] == [e.file for e in manifest.sites]
    assert [s["sha256"] for s in data["sites"]] == [e.sha256 for e in manifest.sites]
    assert [s["num_samples"] for s in data["sites"]] == \
        [e.num_samples["train"] for e in manifest.sites]
    assert data["val"]["num_samples"] == manifest.total_samples("val")
    assert data["test"]["sha256"] == manifest.test.sha256
    # and what each round trained on: one pass over every pooled image
    rows = [json.loads(line) for line in (baseline / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"]["samples"] for r in rows] == [count, count]


def test_the_baseline_is_a_run_directory_the_report_reads(baseline):
    run = load_run(baseline)
    assert run.centralized and run.status == "finished"
    assert [r["round"] for r in run.rows] == [1, 2]
    assert all({"acc", "auc", "loss", "val", "seconds"} <= set(r) for r in run.rows)
    summary = json.loads((baseline / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["test"]["acc"] == run.rows[-1]["acc"]
    assert (baseline / "config.yaml").is_file()
    model, card, _ = load_model(baseline / "model.pt")  # predict and export read it alike
    assert card.name == "dp_cnn" and card.raw["centralized"] is True


def _shifted(source: Path, out: Path, *, by: float) -> Path:
    """A copy of a federated run's text files, made into a 'baseline' better by ``by``."""
    out.mkdir()
    shutil.copy(source / "config.yaml", out / "config.yaml")
    rows = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.update(centralized=True, acc=row["acc"] + by, auc=row["auc"] + by / 2)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((source / "summary.json").read_text())
    summary["test"] = {**summary["test"], "acc": summary["test"]["acc"] + by,
                       "auc": summary["test"]["auc"] + by / 2}
    summary["centralized"] = True
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def test_the_report_puts_the_gap_to_the_baseline_beside_a_federated_run(tmp_path):
    base = _shifted(RUNS / "plain", tmp_path / "pooled", by=0.1)
    runs = load_runs([RUNS / "plain", base])
    (gap,) = baseline_gaps(runs)
    fed_rows = [json.loads(line) for line in (RUNS / "plain" / "metrics.jsonl").open()]
    assert gap.rounds == [r["round"] for r in fed_rows if "acc" in r]
    assert gap.acc == pytest.approx([0.1] * len(gap.rounds))
    assert gap.auc == pytest.approx([0.05] * len(gap.rounds))
    assert gap.final_acc == pytest.approx(0.1) and gap.final_auc == pytest.approx(0.05)
    page = write_report([RUNS / "plain", base], out=tmp_path / "cmp").read_text()
    assert "gap to the centralized baseline (plain vs pooled)" in page
    assert 'class="gap-acc" data-value="0.1' in page or 'data-value="0.09999' in page
    assert (tmp_path / "cmp" / "gap.png").read_bytes().startswith(PNG)
    assert 'id="plot-gap"' in page and "(centralized baseline)" in page
    # without a baseline, nothing of it
    alone = write_report([RUNS / "plain"], out=tmp_path / "alone").read_text()
    assert "gap to the centralized baseline" not in alone
    assert not (tmp_path / "alone" / "gap.png").exists()


# -- personalize -------------------------------------------------------------------------

#: runs ``fedsilo personalize`` with every file it opens recorded: Python's own opens (an
#: audit hook) and HDF5's (h5py.File, which opens in C, below the audit hook)
_TRACE = """
import json, os, sys
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        opened.append(os.path.realpath(os.fsdecode(args[0])))
sys.addaudithook(hook)
import h5py
class File(h5py.File):
    def __init__(self, name, *args, **kwargs):
        if isinstance(name, (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(name)))
        super().__init__(name, *args, **kwargs)
h5py.File = File
from fedsilo.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as handle:
    json.dump(opened, handle)
sys.exit(code)
"""


def test_a_personal_model_reads_only_its_own_site(shards, baseline, tmp_path):
    trace, out = tmp_path / "opened.json", tmp_path / "site1.pt"
    result = subprocess.run(
        [sys.executable, "-c", _TRACE, str(trace), "personalize", str(baseline), "--site", "1",
         "--epochs", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    opened = {Path(p) for p in json.loads(trace.read_text())}
    in_shards = {p.name for p in opened if p.parent == shards.resolve()}
    assert in_shards == {"manifest.json", "site-001.h5"}, in_shards
    assert "global" in result.stdout and "personal" in result.stdout


def test_a_personal_model_is_written_private_with_its_card_and_never_over_a_file(
        shards, baseline, tmp_path, capsys):
    out = tmp_path / "site0.pt"
    assert main(["personalize", str(baseline), "--site", "0", "--layers", "all",
                 "--epochs", "2", "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert stat.S_IMODE(out.with_suffix(".json").stat().st_mode) == 0o600
    model, card, _ = load_model(out)  # fedsilo predict reads it as any model
    info = card.raw["personalized"]
    assert info["site"] == 0 and info["layers"] == "all" and info["epochs"] == 2
    assert set(info["validation"]) == {"global", "personal"}
    printed = capsys.readouterr().out
    assert f"{info['validation']['personal']['acc']:.4f}" in printed
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="never overwrites"):
        from fedsilo.personalize import personalize

        personalize(str(baseline), site=0, out=str(out))
    assert out.read_bytes() == before


def test_head_fine_tuning_changes_only_the_head(shards, baseline, tmp_path):
    import torch

    from fedsilo.models import adapt

    out = tmp_path / "head.pt"
    assert main(["personalize", str(baseline), "--site", "2", "--out", str(out)]) == 0
    global_state = torch.load(baseline / "model.pt", weights_only=True)
    personal = torch.load(out, weights_only=True)
    head = adapt.head_name(load_model(out)[0])  # dp_cnn's: the last Linear, classifier.4
    changed = {k for k in global_state if not torch.equal(global_state[k], personal[k])}
    assert changed == {f"{head}.weight", f"{head}.bias"}, changed


@pytest.mark.parametrize("argv, expected", [
    (["personalize", "{missing}", "--site", "0", "--out", "{tmp}/a.pt"],
     "no such run directory"),
    (["personalize", "{base}", "--site", "9", "--out", "{tmp}/a.pt"], "--site 9: unknown site"),
    (["personalize", "{base}", "--site", "0", "--out", "{tmp}/x.pt"], "never overwrites"),
    (["personalize", "{base}", "--site", "0", "--out", "{base}/mine.pt"],
     "inside the run directory"),
    (["personalize", "{shards}", "--site", "0", "--out", "{tmp}/a.pt"],
     "not a fedsilo run directory"),
    (["baseline", "--set", "data.dir={shards}", "--out", "{base}"], "already holds a run"),
    (["baseline", "--set", "data.dir={missing}", "--out", "{tmp}/b"], "manifest"),
])
def test_bad_input_is_one_clear_line(argv, expected, shards, baseline, tmp_path):
    values = {"missing": str(tmp_path / "nowhere"), "tmp": str(tmp_path), "base": str(baseline),
              "shards": str(shards)}
    (tmp_path / "x.pt").write_bytes(b"a site's own file")
    job = fedsilo_cli([a.format(**values) for a in argv], timeout=120)
    assert job.returncode == 2, job.output
    lines = job.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsilo: error: "), job.stderr
    assert expected in lines[0] and "Traceback" not in job.output
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b").exists()
    assert (tmp_path / "x.pt").read_bytes() == b"a site's own file"
    assert not (baseline / "mine.pt").exists()


def test_a_streamed_pooled_set_trains_the_same_model(shards, tmp_path):
    """data.in_memory=false streams the pooled split through the same PooledReader
    (windows of rows across the sites' files): the batches, and so the model, are the
    ones held in memory give."""
    import torch

    common = [f"data.dir={shards}", "model.name=dp_cnn", "rounds=1", "train.batch_size=32",
              "train.lr=0.05", "runtime.threads=1"]
    for mode in ("true", "false"):
        run_baseline(config_path=None, out_dir=str(tmp_path / mode),
                     overrides=[*common, f"data.in_memory={mode}"])
    held = torch.load(tmp_path / "true" / "model.pt", weights_only=True)
    streamed = torch.load(tmp_path / "false" / "model.pt", weights_only=True)
    assert all(torch.equal(held[k], streamed[k]) for k in held)
