"""A torchvision model through the federation, as a multi-rank job: ``tv:resnet18`` adapted to
28 px grey images, made DP-ready (BatchNorm → GroupNorm, residuals out of place), trained
under DP-SGD with its first blocks frozen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from localjobs import local_mpirun

from fedsilo.config import config_from_dict
from fedsilo.models import build_for

#: the jobs run on ranks forked in-process (tests/localjobs.py; faithful to mpirun by
#: test_local_faithful.py)
pytestmark = [pytest.mark.local, pytest.mark.slow]


def test_a_torchvision_model_trains_under_dp_with_frozen_blocks(shards1: Path,
                                                                tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = local_mpirun(2, ["train", "--set", f"data.dir={shards1}", "--set", "rounds=1",
                     "--set", "model.name=tv:resnet18", "--set", "model.train_layers=1",
                     "--set", "dp.enabled=true", "--set", "dp.noise_multiplier=1.0",
                     "--set", "train.batch_size=16", "--set", "train.max_steps=2",
                     "--set", "eval.batch_size=64", "--out", str(run)], timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    assert "BatchNorm2d → GroupNorm" in job.stderr and "training layer4, fc only" in job.stderr
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["round"] == 1 and row["epsilon"]["0"] > 0

    # model.pt is the adapted model's plain state dict; frozen weights came back unchanged
    config = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    torch.manual_seed(config.seed)
    initial = build_for(config, in_channels=1, num_classes=3, image_size=(28, 28))
    state = torch.load(run / "model.pt", weights_only=True)
    initial_state = {k: v.clone() for k, v in initial.state_dict().items()}
    initial.load_state_dict(state)
    assert torch.equal(state["layer1.0.conv1.weight"], initial_state["layer1.0.conv1.weight"])
    assert not torch.equal(state["fc.weight"], initial_state["fc.weight"])
