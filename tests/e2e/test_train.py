"""prep → train → resume, as multi-rank jobs: in-process ranks, and a real mpirun where a
launch, a signal or a kill is the point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import kill_after_checkpoint, mpirun
from localjobs import local_mpirun

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


def train_args(shards: Path, out: Path, *extra: str, rounds: int = 3) -> list[str]:
    return ["train", "--set", f"data.dir={shards}", "--set", f"rounds={rounds}",
            "--set", "train.lr=0.05", "--set", "train.batch_size=32", *extra, "--out", str(out)]


def load_model(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_train_writes_the_run_directory(shards3: Path, tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "small_cnn"}, "checkpoint": {"keep": 2},
                                      "train": {"epochs": 1}}))
    run = tmp_path / "run"
    job = mpirun(4, ["train", "--config", str(config), *train_args(shards3, run, rounds=3)[1:]],
                 timeout=240)
    assert job.returncode == 0, job.output[-4000:]

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["rounds"] == 3 and resolved["train"]["lr"] == 0.05
    assert Path(resolved["data"]["dir"]).is_absolute()

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert {"acc", "auc", "loss", "val", "seconds", "bytes", "participants"} <= set(row)
        assert {"broadcast", "local", "aggregate", "evaluate", "coordination", "round",
                "local_train_max"} <= set(row["seconds"])
        assert set(row["participants"]) == {"0", "1", "2"}
        assert row["bytes"]["broadcast"] > 0 and row["bytes"]["reduce"] > 0
    # the synthetic data has class structure: the federation learns it (chance is 1/3)
    assert rows[-1]["acc"] > 0.6, rows[-1]
    assert rows[-1]["loss"] < rows[0]["loss"]

    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-0002", "round-0003"]
    assert sorted(p.name for p in (run / "checkpoints" / "round-0003").iterdir()) == [
        "coordinator.pt", "site-000.pt", "site-001.pt", "site-002.pt"]
    # the row a checkpoint keeps (a resume restores it when metrics.jsonl lost it) is the
    # row written, but for the checkpoint's own seconds (a restored row once lacked
    # "overlapped" and seconds.round)
    kept = json.loads(torch.load(run / "checkpoints" / "round-0003" / "coordinator.pt",
                                 weights_only=True)["metrics_row"])
    written = dict(rows[-1], seconds={k: v for k, v in rows[-1]["seconds"].items()
                                      if k != "checkpoint"})
    assert kept == written

    state = load_model(run / "model.pt")  # a plain state_dict, no pickled objects
    from fedsilo.models import build_model
    model = build_model("small_cnn", in_channels=1, num_classes=3, image_size=(28, 28))
    model.load_state_dict(state)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["test"]["acc"] == rows[-1]["acc"]
    assert set(summary["val_per_site"]) == {"0", "1", "2"}
    # rank 0 logs one line per round when not on a terminal
    assert job.stderr.count("INFO round ") == 3


def test_two_ranks_one_participant(shards1: Path, tmp_path: Path) -> None:
    job = local_mpirun(2, train_args(shards1, tmp_path / "run", "--set", "runtime.progress=on",
                               rounds=2), timeout=180)
    assert job.returncode == 0, job.output[-4000:]
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    # a tqdm bar instead of log lines (as on a terminal), redrawn in place, with the last
    # round's metrics (text-mode pipes turn the bar's \r into \n)
    bar = [line for line in job.stderr.splitlines() if line.startswith("round 2/2 |")]
    assert bar and "acc " in bar[-1] and "INFO round " not in job.stderr, job.stderr[-2000:]


def test_resume_after_a_crash_is_bit_identical(shards3: Path, tmp_path: Path) -> None:
    """Also: the coordinator's evaluation and checkpoint overlapped with the next round's
    training (runtime.overlap_eval, the default, in the crashed run) give the same metrics,
    checkpoints and model as done in turn (the reference)."""
    rounds = 6
    reference = tmp_path / "reference"
    job = local_mpirun(4, train_args(shards3, reference, "--set", "runtime.overlap_eval=false",
                               rounds=rounds), timeout=300)
    assert job.returncode == 0, job.output[-4000:]

    # Same run, killed (SIGKILL, every rank) once round 2 has a complete checkpoint.
    crashed = tmp_path / "crashed"
    kill_after_checkpoint(4, train_args(shards3, crashed, rounds=rounds), crashed, 2)

    job = local_mpirun(4, ["train", "--resume", str(crashed)], timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    assert "resuming" in job.stderr

    expected, actual = load_model(reference / "model.pt"), load_model(crashed / "model.pt")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs after resume"
    rows_ref = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    rows_res = [json.loads(x) for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows_res] == list(range(1, rounds + 1))
    assert [r["acc"] for r in rows_res] == [r["acc"] for r in rows_ref]
    for ref, res in zip(rows_ref, rows_res):
        assert [ref[k] for k in ("acc", "auc", "loss", "val")] == \
            [res[k] for k in ("acc", "auc", "loss", "val")]
        assert "overlapped" not in ref and res["overlapped"] == ["evaluate", "checkpoint"]
    assert json.loads((crashed / "summary.json").read_text())["resumed_from_round"] >= 2
    last = Path("checkpoints") / f"round-{rounds:04d}" / "coordinator.pt"
    a, b = (torch.load(run / last, weights_only=True) for run in (reference, crashed))
    assert torch.equal(a["weights"], b["weights"])
    assert a["last_test"] == b["last_test"] and a["privacy"] == b["privacy"]


def test_resume_extends_a_finished_run(shards1: Path, tmp_path: Path) -> None:
    """A finished 2-round run resumed with rounds=3 equals a 3-round run."""
    short, full = tmp_path / "short", tmp_path / "full"
    assert local_mpirun(2, train_args(shards1, short, rounds=2), timeout=180).returncode == 0
    assert local_mpirun(2, train_args(shards1, full, rounds=3), timeout=180).returncode == 0
    job = local_mpirun(2, ["train", "--resume", str(short), "--set", "rounds=3"], timeout=180)
    assert job.returncode == 0, job.output[-3000:]
    a, b = load_model(short / "model.pt"), load_model(full / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_help_lists_defaults() -> None:
    for argv in (["--help"], ["train", "--help"], ["demo", "--help"], ["budget", "--help"],
                 ["prep", "medmnist", "--help"]):
        out = subprocess.run([sys.executable, "-m", "fedsilo", *argv], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        if argv != ["--help"]:
            assert "(default:" in out.stdout, argv


def test_signal_stops_at_a_round_boundary_and_auto_resume_finishes_identically(
        shards1: Path, tmp_path: Path) -> None:
    """SLURM's --signal=USR1@T (or pre-emption's SIGTERM) reaches every task: the run stops
    after a complete round with exit status 75, and a requeued job resumes it exactly."""
    from fedsilo.stopping import EXIT_PREEMPTED
    rounds = 8
    reference = tmp_path / "reference"
    assert mpirun(2, train_args(shards1, reference, rounds=rounds), timeout=240).returncode == 0

    run = tmp_path / "run"
    from fedsilo.launch import mpirun_command, rank_environment
    args = train_args(shards1, run, "--auto-resume", rounds=rounds)
    process = subprocess.Popen(mpirun_command(2, args), env=rank_environment(2),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    marker = run / "checkpoints" / "round-0002" / "coordinator.pt"
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # the ranks (not mpirun, which does not forward USR1) get the signal, as under srun
    ranks = subprocess.run(["pgrep", "-f", f"fedsilo train.*--out {run}$"], capture_output=True,
                           text=True).stdout.split()
    ranks = [int(p) for p in ranks if int(p) != process.pid]
    assert len(ranks) == 2, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "received SIGUSR1" in output and not (run / "model.pt").exists()
    marker = json.loads((run / "stopped.json").read_text())  # what batch scripts look at
    assert marker["exit_status"] == EXIT_PREEMPTED and marker["signal"] == "SIGUSR1"
    stopped_after = max(json.loads(x)["round"]
                        for x in (run / "metrics.jsonl").read_text().splitlines())
    assert stopped_after < rounds

    # the requeued job: same command line
    job = mpirun(2, args, timeout=240)
    assert job.returncode == 0, job.output[-3000:]
    assert "--auto-resume" in job.stderr and "holds a run" in job.stderr
    assert not (run / "stopped.json").exists()
    a, b = load_model(reference / "model.pt"), load_model(run / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_mpirun_leaves_a_marker_and_a_resumable_run(shards1: Path,
                                                                tmp_path: Path) -> None:
    """SIGTERM to mpirun itself (a user's Ctrl-C elsewhere, a scheduler without --signal):
    Open MPI passes it on and kills the ranks soon after, often before the round boundary.
    The coordinator writes stopped.json the moment the signal arrives, naming the last
    complete checkpoint, and the run resumes from it."""
    from fedsilo.launch import mpirun_command, rank_environment
    from fedsilo.rundir import RunDir

    run = tmp_path / "run"
    process = subprocess.Popen(mpirun_command(2, train_args(shards1, run, rounds=500)),
                               env=rank_environment(2), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    marker = run / "checkpoints" / "round-0001" / "coordinator.pt"
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output[-3000:]
    stopped = json.loads((run / "stopped.json").read_text())
    assert stopped["signal"] == "SIGTERM" and stopped["exit_status"] == 75, stopped
    last = RunDir(run).complete_rounds()[-1]
    assert stopped.get("last_checkpoint_round", last) <= last
    job = mpirun(2, ["train", "--resume", str(run), "--set", f"rounds={last}"], timeout=240)
    assert job.returncode == 0, job.output[-3000:]
    assert not (run / "stopped.json").exists()
