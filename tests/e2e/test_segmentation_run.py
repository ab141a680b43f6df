"""Federated segmentation as a real MPI job (issue 28): image/mask pairs -> shards -> a
U-Net trained by two sites -> Dice in the metrics rows; killed and resumed, it ends with
exactly the model of an uninterrupted run; streamed from its shards, with exactly the model
of a run that holds them in memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import kill_after_checkpoint
from localjobs import local_mpirun
from PIL import Image

from fedsilo.prep.segmentation import pair_folders, prepare_segmentation

#: the jobs run on ranks forked in-process (tests/localjobs.py; faithful to mpirun by
#: test_local_faithful.py), except the one killed, which is a real mpirun
pytestmark = [pytest.mark.local, pytest.mark.mpi, pytest.mark.slow]


@pytest.fixture(scope="module")
def seg_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seg")
    (root / "img").mkdir()
    (root / "msk").mkdir()
    rng = np.random.default_rng(0)
    for patient in range(8):
        for side in "LR":
            image = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
            mask = np.zeros((32, 32), np.uint8)
            top, left = rng.integers(0, 20, 2)
            mask[top: top + 10, left: left + 8] = 1
            image[mask == 1] += 120  # the structure is brighter than the background
            name = f"P{patient}{side}"
            Image.fromarray(image).save(root / "img" / f"{name}.png")
            Image.fromarray(mask * 255).convert("1").save(root / "msk" / f"{name}_gt.png")
    pairs, bad = pair_folders(root / "img", root / "msk", group_pattern=r"P(\d)")
    assert not bad
    prepare_segmentation(pairs, out=root / "shards", sites=2, seed=0, val_fraction=0.25,
                         test_fraction=0.25)
    return root / "shards"


def _args(shards: Path, out: Path, rounds: int, *more: str) -> list[str]:
    return ["train", *more, "--set", f"data.dir={shards}", "--set", "model.name=basic_unet",
            "--set", f"rounds={rounds}", "--set", "segmentation.patch_size=16",
            "--set", "train.batch_size=4", "--set", "train.epochs=2",
            "--set", "train.optimizer=adam", "--set", "train.lr=0.01",
            "--set", "runtime.threads=1", "--out", str(out)]


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_federated_segmentation_trains_and_resumes_bit_identically_after_a_kill(seg_shards,
                                                                                tmp_path):
    rounds = 4
    crashed, full = tmp_path / "crashed", tmp_path / "full"
    job = local_mpirun(3, _args(seg_shards, full, rounds), timeout=240)
    assert job.returncode == 0, job.output[-4000:]
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for row in rows:
        assert {"dice", "iou", "hd95", "dice_per_class", "auc", "loss"} <= set(row)
        assert len(row["dice_per_class"]) == 2 and 0 <= row["dice"] <= 1
        assert set(row["participants"]) == {"0", "1"}
    assert rows[-1]["loss"] < rows[0]["loss"], rows
    summary = json.loads((full / "summary.json").read_text())
    assert summary["ending"] == "finished"

    # the same run, killed (SIGKILL, every rank) once round 2 has a complete checkpoint
    kill_after_checkpoint(3, _args(seg_shards, crashed, rounds), crashed, 2)
    job = local_mpirun(3, ["train", "--resume", str(crashed)], timeout=240)
    assert job.returncode == 0, job.output[-4000:]
    assert "resuming" in job.stderr
    assert _same(_load(crashed / "model.pt"), _load(full / "model.pt"))
    resumed = [json.loads(x) for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["dice"], r["loss"]) for r in resumed] == \
        [(r["round"], r["dice"], r["loss"]) for r in rows]


def test_streamed_and_in_memory_segmentation_end_with_identical_weights(seg_shards, tmp_path):
    """data.in_memory=false streams whole images and label maps by windows (1 MiB budget:
    windows of a few images) and cuts the same patches: the same model as held in memory."""
    models = {}
    for mode in ("true", "false"):
        job = local_mpirun(3, _args(seg_shards, tmp_path / mode, 2, "--set",
                                    f"data.in_memory={mode}", "--set",
                                    "data.memory_limit_mb=1"), timeout=240)
        assert job.returncode == 0, job.output[-4000:]
        models[mode] = _load(tmp_path / mode / "model.pt")
    assert "the coordinator streams test.h5" in job.stderr
    assert _same(models["true"], models["false"])
