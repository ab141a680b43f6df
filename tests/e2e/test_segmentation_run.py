"""Federated segmentation as a multi-rank job (issue 28): image/mask pairs -> shards -> a
U-Net trained by two sites -> Dice in the metrics rows; resumed, it ends with exactly the
model of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from localjobs import local_mpirun
from PIL import Image

from fedsilo.prep.segmentation import pair_folders, prepare_segmentation

#: the jobs run on ranks forked in-process (tests/localjobs.py; faithful to mpirun by
#: test_local_faithful.py)
pytestmark = [pytest.mark.local, pytest.mark.slow]


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


def _args(shards: Path, out: Path, rounds: int) -> list[str]:
    return ["train", "--set", f"data.dir={shards}", "--set", "model.name=basic_unet",
            "--set", f"rounds={rounds}", "--set", "segmentation.patch_size=16",
            "--set", "train.batch_size=4", "--set", "train.epochs=2",
            "--set", "train.optimizer=adam", "--set", "train.lr=0.01",
            "--set", "runtime.threads=1", "--out", str(out)]


def test_federated_segmentation_trains_and_resumes_bit_identically(seg_shards, tmp_path):
    short, full = tmp_path / "short", tmp_path / "full"
    job = local_mpirun(3, _args(seg_shards, full, 2), timeout=240)
    assert job.returncode == 0, job.output[-4000:]
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert {"dice", "iou", "hd95", "dice_per_class", "auc", "loss"} <= set(row)
        assert len(row["dice_per_class"]) == 2 and 0 <= row["dice"] <= 1
        assert set(row["participants"]) == {"0", "1"}
    assert rows[-1]["loss"] < rows[0]["loss"], rows
    summary = json.loads((full / "summary.json").read_text())
    assert summary["ending"] == "finished"

    assert local_mpirun(3, _args(seg_shards, short, 1), timeout=240).returncode == 0
    job = local_mpirun(3, ["train", "--resume", str(short), "--set", "rounds=2"], timeout=240)
    assert job.returncode == 0, job.output[-4000:]
    a = torch.load(short / "model.pt", weights_only=True)
    b = torch.load(full / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
