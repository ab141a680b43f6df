"""Using a run's model (issue #17): best.pt chosen on federated validation, its decision
threshold, ``fedsilo predict`` and ``fedsilo export``, and their errors on bad input.

One real 4-rank MPI run (module-scoped) serves every assertion on a finished run; a
second, interrupted and resumed, checks that the best so far survives ``--resume``.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import InProcess, Job, fedsilo_cli
from localjobs import local_mpirun

#: the jobs run on ranks forked in-process (tests/localjobs.py; faithful to mpirun by
#: test_local_faithful.py)
pytestmark = [pytest.mark.local, pytest.mark.slow]

ROUNDS = 4


def train_args(shards: Path, out: Path, *, rounds: int) -> list[str]:
    # a learning rate high enough that the global model swings from round to round: the
    # best model is then an early one (round 1 here), not simply the last, and the resume
    # test below starts after it
    return ["train", "--set", f"data.dir={shards}", "--set", f"rounds={rounds}",
            "--set", "train.lr=0.3", "--set", "train.batch_size=32",
            "--set", "checkpoint.keep=10", "--set", "checkpoint.threshold=youden",
            "--out", str(out)]


@pytest.fixture(scope="module")
def shards2(tmp_path_factory) -> Path:
    """A binary, label-skewed 3-site synthetic shard set (a threshold needs two classes)."""
    out = tmp_path_factory.mktemp("binary") / "set"
    job = fedsilo_cli(["prep", "synthetic", "--samples", "600", "--classes", "2", "--sites", "3",
                       "--partition", "dirichlet:0.5", "--seed", "1", "--out", str(out)])
    assert job.returncode == 0, job.output
    return out


@pytest.fixture(scope="module")
def run(shards2: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "run"
    job = local_mpirun(4, train_args(shards2, out, rounds=ROUNDS), timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    return out


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def flat_state(state: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([state[k].reshape(-1).numpy() for k in sorted(state)])


# -- model selection ---------------------------------------------------------------------


def test_best_is_the_model_with_the_lowest_federated_validation_loss(run: Path) -> None:
    rows, summary = rows_of(run), summary_of(run)
    # row r's val is of the model the round started from (after round r - 1); the final
    # model's is in summary.json; round 0 (the initial model) is no candidate
    candidates = {r["round"] - 1: r["val"]["loss"] for r in rows if r["round"] >= 2}
    candidates[ROUNDS] = summary["val"]["loss"]
    expected = min(candidates, key=lambda k: (candidates[k], k))  # earliest among equals
    best = summary["best"]
    assert expected < ROUNDS  # the selection is not simply the final model
    assert best["metric"] == "val_loss"
    assert best["round"] == expected, (best, candidates)
    assert best["value"] == candidates[expected]
    test_row = next(r for r in rows if r["round"] == expected)
    assert best["test"]["acc"] == test_row["acc"]  # the selected model's test, reported
    card = json.loads((run / "best.json").read_text())
    assert card["round"] == expected and card["selected_by"] == {"metric": "val_loss",
                                                                 "value": best["value"]}


def test_best_pt_holds_the_global_model_of_its_round(run: Path) -> None:
    best = summary_of(run)["best"]
    weights = flat_state(torch.load(run / "best.pt", weights_only=True))
    if best["round"] == ROUNDS:
        expected = flat_state(torch.load(run / "model.pt", weights_only=True))
    else:
        checkpoint = run / "checkpoints" / f"round-{best['round']:04d}" / "coordinator.pt"
        expected = torch.load(checkpoint, weights_only=True)["weights"].numpy()
    assert np.array_equal(weights, expected)


def test_the_threshold_is_the_best_on_the_pooled_validation_splits(run: Path, shards2: Path,
                                                                   tmp_path: Path) -> None:
    """Summed per-site counts at the grid give what the pooled val splits give."""
    from fedsilo.selection import choose_threshold, threshold_counts

    out = tmp_path / "sites.csv"
    sites = sorted(str(p) for p in shards2.glob("site-*.h5"))
    job = fedsilo_cli(["predict", "--model", str(run / "best.pt"), *sites, "--out", str(out)])
    assert job.returncode == 0, job.output
    val = [r for r in read_csv(out) if ":val[" in r["source"]]
    assert len(val) == summary_of(run)["best"]["val"]["num_samples"]
    scores = np.array([float(r["prob_1"]) for r in val])
    labels = np.array([int(r["label"]) for r in val])
    expected = choose_threshold(threshold_counts(labels, scores), rule="youden")
    assert summary_of(run)["best"]["threshold"] == expected
    assert json.loads((run / "best.json").read_text())["threshold"]["value"] == expected
    assert {r["threshold"] for r in val} == {repr(expected)}
    at = [r["predicted_at_threshold"] == ("1" if float(r["prob_1"]) > expected else "0")
          for r in val]
    assert all(at)


def test_the_coordinator_checkpoint_holds_the_best_so_far(run: Path) -> None:
    """At round r the candidates are the models after rounds 1..r-1 (row r validated the
    model after r - 1); the checkpoint holds the best of them, weights included."""
    rows = rows_of(run)
    for r in range(2, ROUNDS + 1):
        state = torch.load(run / "checkpoints" / f"round-{r:04d}" / "coordinator.pt",
                           weights_only=True)
        seen = {row["round"] - 1: row["val"]["loss"] for row in rows if 2 <= row["round"] <= r}
        expected = min(seen, key=lambda k: (seen[k], k))
        meta = json.loads(state["best"])
        assert (meta["round"], meta["value"]) == (expected, seen[expected])
        earlier = torch.load(run / "checkpoints" / f"round-{expected:04d}" / "coordinator.pt",
                             weights_only=True)
        assert torch.equal(state["best_weights"], earlier["weights"])


def test_the_best_so_far_survives_resume(run: Path, tmp_path: Path) -> None:
    """The run as a crash after round 2 would have left it, resumed: the same best.pt."""
    part = tmp_path / "part"
    shutil.copytree(run, part, ignore=shutil.ignore_patterns(
        "round-0003", "round-0004", "model.*", "best.*", "summary.json", "report"))
    job = local_mpirun(4, ["train", "--resume", str(part)], timeout=300)
    assert job.returncode == 0, job.output[-3000:]
    assert summary_of(part)["resumed_from_round"] == 2
    assert summary_of(part)["best"] == summary_of(run)["best"]
    assert np.array_equal(flat_state(torch.load(part / "best.pt", weights_only=True)),
                          flat_state(torch.load(run / "best.pt", weights_only=True)))


# -- predict and export ------------------------------------------------------------------


def test_predict_on_the_test_shard_gives_the_run_s_test_accuracy(run: Path, shards2: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "test.csv"
    job = fedsilo_cli(["predict", "--model", str(run), str(shards2 / "test.h5"),
                       "--out", str(out)])
    assert job.returncode == 0, job.output
    rows = read_csv(out)
    accuracy = sum(r["predicted"] == r["label"] for r in rows) / len(rows)
    assert accuracy == summary_of(run)["test"]["acc"]  # exactly: the same computation
    assert f"accuracy {accuracy:.4f} on {len(rows)} labelled" in job.stderr
    probs = np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in rows])
    assert np.allclose(probs.sum(axis=1), 1.0)


def test_predict_on_image_files_folders_and_dicom(run: Path, shards2: Path,
                                                  tmp_path: Path) -> None:
    """PNG at the model's size, an RGB PNG of another size (converted and resized as prep
    does) and a DICOM series folder: the PNG's probabilities are the shard's."""
    from PIL import Image

    from fedsilo.shards import read_shard

    images = read_shard(shards2 / "test.h5").splits["test"].images[:3, 0]
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    Image.fromarray(np.stack([images[1]] * 3, axis=-1)).resize((40, 40)).save(tmp_path / "b.png")
    write_dicom(tmp_path / "series" / "IM0001", images[2])
    out = tmp_path / "preds.csv"
    job = fedsilo_cli(["predict", "--model", str(run / "model.pt"), str(tmp_path / "a.png"),
                       str(tmp_path / "b.png"), str(tmp_path / "series"), "--out", str(out)])
    assert job.returncode == 0, job.output
    rows = read_csv(out)
    assert [Path(r["source"]).name for r in rows] == ["a.png", "b.png", "IM0001"]
    reference = read_csv_from_shard(run, shards2, tmp_path)
    # the same pixels, the same numbers (up to float32 summation order in a smaller batch)
    assert float(rows[0]["prob_1"]) == pytest.approx(float(reference[0]["prob_1"]), abs=1e-6)
    # an 8-bit DICOM with a full-range window: the same pixels too
    assert float(rows[2]["prob_1"]) == pytest.approx(float(reference[2]["prob_1"]), abs=1e-6)
    assert rows[0]["prob_1"] != rows[1]["prob_1"] != rows[2]["prob_1"]


def read_csv_from_shard(run: Path, shards2: Path, tmp_path: Path) -> list[dict[str, str]]:
    out = tmp_path / "shard.csv"
    job = fedsilo_cli(["predict", "--model", str(run / "model.pt"), str(shards2 / "test.h5"),
                       "--out", str(out)])
    assert job.returncode == 0, job.output
    return read_csv(out)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_pytorch(run: Path, shards2: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / ("model.pt" if fmt == "torchscript" else "model.onnx")
    job = fedsilo_cli(["export", "--model", str(run / "best.pt"), "--format", fmt,
                       "--out", str(out)], timeout=300)
    assert job.returncode == 0, job.output
    line = next(li for li in job.stdout.splitlines() if "max |PyTorch" in li)
    assert float(line.split("= ")[1].split()[0]) <= 1e-5 and line.endswith(": ok")
    # independently: the export on real test images against predict's probabilities
    from fedsilo.modelfile import read_card
    from fedsilo.shards import read_shard

    card = read_card(run / "best.pt")
    pixels = read_shard(shards2 / "test.h5").splits["test"].images[:50].astype(np.float32)
    x = (pixels / 255.0 - np.float32(card.mean[0])) / np.float32(card.std[0])
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"images": x})[0]
        meta = json.loads(session.get_modelmeta().custom_metadata_map["fedsilo"])
    else:
        files = {"fedsilo.json": ""}
        module = torch.jit.load(str(out), _extra_files=files)
        logits = module(torch.from_numpy(x)).detach().numpy()
        meta = json.loads(files["fedsilo.json"])
    assert meta["image_shape"] == list(card.image_shape)
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    reference = read_csv_from_shard_best(run, shards2, tmp_path)[:50]
    expected = np.array([float(r["prob_1"]) for r in reference])
    assert np.max(np.abs(probs[:, 1] - expected)) < 1e-5


def read_csv_from_shard_best(run: Path, shards2: Path, tmp_path: Path) -> list[dict[str, str]]:
    out = tmp_path / "best.csv"
    job = fedsilo_cli(["predict", "--model", str(run / "best.pt"), str(shards2 / "test.h5"),
                       "--out", str(out)])
    assert job.returncode == 0, job.output
    return read_csv(out)


# -- bad input -----------------------------------------------------------------------------




def one_line_error(job: Job, *words: str) -> None:
    assert job.returncode == 2, job.output
    assert "Traceback" not in job.output, job.output
    lines = [li for li in job.stderr.splitlines() if li.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedsilo: error: "), job.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def copy_model(run: Path, where: Path, *, card: dict | None = None) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "model.pt", where / "model.pt")
    data = json.loads((run / "model.json").read_text()) if card is None else card
    (where / "model.json").write_text(json.dumps(data))
    return where / "model.pt"


def test_bad_models_are_one_line_errors(run: Path, shards2: Path, tmp_path: Path,
                                         capsys) -> None:
    fedsilo = InProcess(capsys)
    test = str(shards2 / "test.h5")
    # not a run directory, a missing file
    one_line_error(fedsilo(["predict", "--model", str(tmp_path), test]),
                   "not a fedsilo run directory")
    one_line_error(fedsilo(["predict", "--model", str(tmp_path / "nope.pt"), test]),
                   "not found")
    # weights without a card
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "model.pt", bare / "weights.pt")
    one_line_error(fedsilo(["predict", "--model", str(bare / "weights.pt"), test]),
                   "no model card")
    card = json.loads((run / "model.json").read_text())
    # a pickle that is no state_dict (weights_only refuses it: nothing is unpickled)
    evil = tmp_path / "evil"
    path = copy_model(run, evil, card={k: v for k, v in card.items() if k != "weights_sha256"})
    torch.save({"x": np.arange(3)}, path)
    one_line_error(fedsilo(["predict", "--model", str(path), test]), "weights_only=True")
    torch.save([1, 2, 3], path)
    one_line_error(fedsilo(["export", "--model", str(path), "--format", "onnx",
                                "--out", str(tmp_path / "x.onnx")]), "not a state_dict")
    # weights replaced behind the card's back
    swapped = copy_model(run, tmp_path / "swapped")
    torch.save({"a": torch.zeros(2)}, swapped)
    one_line_error(fedsilo(["predict", "--model", str(swapped), test]), "sha256 differs")
    # a card naming another architecture
    other = copy_model(run, tmp_path / "other", card={**card, "model": {"name": "dp_cnn"}})
    one_line_error(fedsilo(["predict", "--model", str(other), test]),
                   "another architecture", "dp_cnn")
    one_line_error(fedsilo(["export", "--model", str(other), "--format", "torchscript",
                                "--out", str(tmp_path / "x.pt")]), "another architecture")
    # a card that is not one
    (tmp_path / "other" / "model.json").write_text("[1, 2]")
    one_line_error(fedsilo(["predict", "--model", str(other), test]), "not a fedsilo model")


def test_bad_images_are_one_line_errors(run: Path, tmp_path: Path, capsys) -> None:
    fedsilo = InProcess(capsys)
    model = str(run / "model.pt")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    one_line_error(fedsilo(["predict", "--model", model, str(broken)]), "unreadable image")
    one_line_error(fedsilo(["predict", "--model", model, str(tmp_path / "missing.png")]),
                   "input not found")
    (tmp_path / "empty").mkdir()
    one_line_error(fedsilo(["predict", "--model", model, str(tmp_path / "empty")]),
                   "no image")
    other = tmp_path / "other.h5"
    job = fedsilo_cli(["prep", "synthetic", "--samples", "60", "--classes", "2", "--sites", "1",
                       "--size", "16", "16", "--out", str(tmp_path / "small")])
    assert job.returncode == 0, job.output
    shutil.copy(tmp_path / "small" / "test.h5", other)  # 16x16: no silent resize of a shard
    one_line_error(fedsilo(["predict", "--model", model, str(other)]), "the model takes")


def test_a_grayscale_image_for_an_rgb_model_is_refused(tmp_path: Path) -> None:
    """RGB -> grayscale is prep's conversion; grayscale -> RGB would invent colour."""
    from PIL import Image

    from fedsilo.errors import DataError
    from fedsilo.modelfile import ModelCard
    from fedsilo.predict import read_image

    card = ModelCard(name="small_cnn", num_classes=2, image_shape=(3, 8, 8), mean=(0.5,) * 3,
                     std=(0.2,) * 3, class_names=("a", "b"), round=1, threshold=None, raw={})
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(DataError, match="1-channel image, but the model takes 3-channel"):
        read_image(tmp_path / "gray.png", card)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "rgb.png")
    assert read_image(tmp_path / "rgb.png", card).shape == (3, 8, 8)
    gray_card = ModelCard(name="small_cnn", num_classes=2, image_shape=(1, 8, 8), mean=(0.5,),
                          std=(0.2,), class_names=("a", "b"), round=1, threshold=None, raw={})
    assert read_image(tmp_path / "rgb.png", gray_card).shape == (1, 8, 8)


def write_dicom(path: Path, gray: np.ndarray) -> Path:
    """An 8-bit MONOCHROME2 DICOM file (secondary capture) without a window."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    # the display pipeline stretches min..max when there is no window: a full-range window
    # keeps the stored values as they are
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PixelData = np.ascontiguousarray(gray, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
