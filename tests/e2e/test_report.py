"""See a run: TensorBoard events written by a multi-rank job (and continued by a resume), the
tqdm bar, and ``fedsilo report`` on what the job left.

One DP job (2 sites on one participant rank, 3 rounds, ``--tensorboard``) and one resume
of it after its last checkpoint was lost are shared by every test of this module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_shards
from helpers import fedsilo_cli
from localjobs import local_mpirun
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from fedsilo.boardlog import scalars

#: the jobs run on ranks forked in-process (tests/localjobs.py; faithful to mpirun by
#: test_local_faithful.py)
pytestmark = [pytest.mark.local, pytest.mark.slow]

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The run directory after: 3 rounds, the loss of round 3's checkpoint (as a crash
    between the events and the checkpoint leaves it), and a resume from round 2."""
    base = tmp_path_factory.mktemp("report")
    shards = make_shards(base / "shards", participants=2, samples=400, partition="iid")
    run = base / "run"
    first = local_mpirun(2, ["train", "--set", f"data.dir={shards}", "--set", "rounds=3",
                       "--set", "train.batch_size=32", "--set", "train.max_steps=3",
                       "--set", "dp.enabled=true", "--set", "dp.target_epsilon=50",
                       "--set", "runtime.progress=on", "--tensorboard", "--out", str(run)],
                   timeout=240)
    assert first.returncode == 0, first.output[-4000:]
    before = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "checkpoints" / "round-0003" / "coordinator.pt").unlink()
    (run / "summary.json").unlink()
    second = local_mpirun(2, ["train", "--resume", str(run)], timeout=240)
    assert second.returncode == 0, second.output[-4000:]
    return {"run": run, "shards": shards, "first": first, "before": before}


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_events_are_the_metrics_rows(job):
    """Every scalar in TensorBoard is the metrics.jsonl figure of its round, one point per
    round and tag, across the resume: test metrics, ε per site, phase seconds, bytes."""
    rows = rows_of(job["run"])
    assert [r["round"] for r in rows] == [1, 2, 3]
    events = EventAccumulator(str(job["run"] / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    expected: dict[str, dict[int, float]] = {}
    for row in rows:
        for tag, value in scalars(row).items():
            expected.setdefault(tag, {})[row["round"]] = value
    assert set(events.Tags()["scalars"]) == set(expected)
    assert {"test/acc", "test/auc", "test/loss", "epsilon/site_0", "epsilon/site_1",
            "seconds/round", "bytes/reduce", "bytes/total"} <= set(expected)
    # under DP the wait for the slowest site (it follows the Poisson batch sizes) is not
    # released, and the round's time only in whole seconds
    assert "seconds/local" not in expected
    assert all(v == round(v) for v in expected["seconds/round"].values())
    for tag, by_round in expected.items():
        points = events.Scalars(tag)
        assert [p.step for p in points] == sorted(by_round), tag  # no duplicate, no gap
        for point in points:  # event files hold float32
            assert point.value == np.float32(by_round[point.step]), (tag, point.step)
    # under DP, no site's loss, validation or timing: neither in the rows nor the events
    assert not [t for t in expected if t.startswith("val/") or "train" in t]


def test_a_resume_purges_the_rounds_it_runs_again(job):
    """The resume's writer starts at the resumed round (purge_step): the first launch's
    points of rounds 2 and 3 are hidden, round 2 is written again from metrics.jsonl and
    round 3 anew; round 1 is not written twice."""
    files = sorted((job["run"] / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2

    def steps(path: Path) -> tuple[list[int], set[int]]:
        starts, scalar_steps = [], set()
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("session_log"):
                starts.append(event.step)
            elif event.HasField("summary"):
                scalar_steps.add(event.step)
        return starts, scalar_steps

    assert steps(files[0]) == ([], {1, 2, 3})
    assert steps(files[1]) == ([2], {2, 3})
    # the lost round ran again from the same checkpoint: the same model (CPU, bit-exact)
    assert rows_of(job["run"])[2]["acc"] == job["before"][2]["acc"]


def test_the_progress_bar_shows_rounds_and_the_last_metrics(job):
    lines = job["first"].stderr.replace("\r", "\n").splitlines()
    last = [line for line in lines if line.startswith("round 3/3 |")]
    assert last and "acc " in last[-1] and "ε " in last[-1], job["first"].stderr[-2000:]
    assert "INFO round " not in job["first"].stderr


def test_the_report_of_the_run(job, tmp_path):
    out = tmp_path / "report"
    result = fedsilo_cli(["report", str(job["run"]), "--out", str(out)])
    assert result.returncode == 0, result.output
    page = out / "report.html"
    assert result.stdout.strip().splitlines()[-1] == str(page)
    text = page.read_text()
    summary = json.loads((job["run"] / "summary.json").read_text())
    for key in ("acc", "auc", "loss"):
        assert f'class="final-{key}" data-value="{summary["test"][key]!r}"' in text
    for site, privacy in summary["privacy"].items():
        assert f'data-site="{site}"' in text and f'data-value="{privacy["epsilon"]!r}"' in text
    assert "status-finished" in text
    for name in ("test", "epsilon", "time"):
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, name
    assert not (out / "validation.png").exists()  # DP: no federated validation released


def test_a_crashed_copy_beside_the_run(job, tmp_path):
    """A copy whose metrics.jsonl was cut mid-line, reported beside the run it came from."""
    crashed = Path(shutil.copytree(job["run"], tmp_path / "crashed",
                                   ignore=shutil.ignore_patterns("checkpoints", "*.pt")))
    (crashed / "summary.json").unlink()
    text = (crashed / "metrics.jsonl").read_text()
    (crashed / "metrics.jsonl").write_text(text[: text.rindex("\n", 0, len(text) - 1) + 50])
    out = tmp_path / "both"
    result = fedsilo_cli(["report", str(job["run"]), str(crashed), "--out", str(out)])
    assert result.returncode == 0, result.output
    page = (out / "report.html").read_text()
    assert page.count("<tr data-run=") == 2
    assert "status-finished" in page and "status-interrupted" in page
    assert "(line 3) was cut mid-line" in page
    rounds = [r["round"] for r in rows_of(job["run"])]
    assert f">{rounds[-1]}/3<" in page and ">2/3<" in page


def test_a_shard_set_is_not_a_run(job):
    result = fedsilo_cli(["report", str(job["shards"])])
    assert result.returncode == 2
    assert result.stderr.strip() == (f"fedsilo: error: {job['shards']} is not a fedsilo run "
                                     f"directory (it holds neither metrics.jsonl nor config.yaml)")
