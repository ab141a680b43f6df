"""The in-process tier is faithful: one job under a real ``mpirun`` and on forked ranks
over :class:`fedsilo.comm.local.LocalComm` ends with bit-identical weights and records.

Every test that runs its jobs in-process (``local_mpirun``) rests on this one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import mpirun
from localjobs import local_mpirun

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

COMMON = ("--set", "rounds=2", "--set", "runtime.threads=1", "--set", "runtime.progress=off")


def _measured(row: dict) -> dict:
    """A metrics row without what the clock measured."""
    row = {k: v for k, v in row.items() if k != "seconds"}
    row["participants"] = {site: {k: v for k, v in stats.items() if not k.endswith("_s")}
                           for site, stats in row["participants"].items()}
    return row


@pytest.mark.parametrize("extra", [(), ("--set", "strategy.name=trimmed_mean",
                                         "--set", "strategy.trim=0.25")],
                         ids=["reduce", "gatherv"])
def test_in_process_ranks_end_exactly_as_mpirun_ranks(shards3: Path, tmp_path: Path,
                                                      extra: tuple[str, ...]) -> None:
    runs = {}
    for name, launch in (("mpirun", mpirun), ("local", local_mpirun)):
        run = tmp_path / name
        job = launch(4, ["train", "--set", f"data.dir={shards3}", *COMMON, *extra,
                         "--out", str(run)], timeout=300)
        assert job.returncode == 0, job.output[-4000:]
        assert "finished: test acc" in job.stderr
        runs[name] = run
    real = torch.load(runs["mpirun"] / "model.pt", weights_only=True)
    local = torch.load(runs["local"] / "model.pt", weights_only=True)
    assert real.keys() == local.keys()
    assert all(torch.equal(real[k], local[k]) for k in real)
    rows = {name: [_measured(json.loads(line))
                   for line in (run / "metrics.jsonl").read_text().splitlines()]
            for name, run in runs.items()}
    assert len(rows["local"]) == 2 and rows["local"] == rows["mpirun"]
