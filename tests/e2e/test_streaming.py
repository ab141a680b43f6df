"""Streamed shards train the same model as shards held in memory, as a multi-rank job."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from localjobs import local_mpirun

#: the jobs run on ranks forked in-process (tests/localjobs.py; faithful to mpirun by
#: test_local_faithful.py)
pytestmark = [pytest.mark.local, pytest.mark.slow]


def test_streamed_and_in_memory_runs_end_with_identical_weights(shards3: Path,
                                                                tmp_path: Path) -> None:
    models = {}
    for mode in ("true", "false"):
        run = tmp_path / mode
        job = local_mpirun(4, ["train", "--set", f"data.dir={shards3}", "--set", "rounds=2",
                         "--set", "train.batch_size=32", "--set", "train.max_steps=6",
                         "--set", f"data.in_memory={mode}", "--set", "data.memory_limit_mb=1",
                         "--out", str(run)], timeout=240)
        assert job.returncode == 0, job.output[-4000:]
        models[mode] = torch.load(run / "model.pt", weights_only=True)
    assert "the coordinator streams test.h5" in job.stderr
    assert models["true"].keys() == models["false"].keys()
    assert all(torch.equal(models["true"][k], models["false"][k]) for k in models["true"])
