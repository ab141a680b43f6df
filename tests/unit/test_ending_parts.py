"""The pieces of a job's ending without MPI: the first round's wait, file modes, verdicts
that are never overwritten, the fallback to a checkpoint that loads, and a site that comes
back is not told it starts a fresh budget."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from fedsilo.errors import CheckpointError
from fedsilo.federation import (
    _loadable_round,
    _record_stop,
    _silent_coordinator,
    first_round_wait,
)
from fedsilo.rundir import RunDir, atomic_torch_save, dump_json


def test_the_first_round_follows_hang_timeout_when_only_that_is_set():
    assert first_round_wait(None, 1800.0) == 1800.0  # automatic watchdog: unchanged
    assert first_round_wait(5.0, 1800.0) == 15.0  # the case: not 1800 s
    assert first_round_wait(300.0, 1800.0) == 600.0
    assert first_round_wait(5.0, 90.0) == 90.0  # set by the user: theirs


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_private_state_is_0600_released_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    run = RunDir(tmp_path / "run")
    dump_json(run.summary, {"a": 1})
    atomic_torch_save(run.model, {"w": torch.zeros(1)})
    atomic_torch_save(run.coordinator_checkpoint(1), {"w": torch.zeros(1)})
    atomic_torch_save(run.participant_checkpoint(1, 0), {"w": torch.zeros(1)})
    atomic_torch_save(tmp_path / "site-dir" / "round-0001" / "site-000.pt", {"w": 1})
    dump_json(run.root / "departed" / "index.json", {})
    run.truncate_metrics(last_round=0)
    for released in (run.summary, run.model, run.metrics):
        assert released.stat().st_mode & 0o777 == 0o666 & ~mask, released
    for private in (run.coordinator_checkpoint(1), run.participant_checkpoint(1, 0),
                    tmp_path / "site-dir" / "round-0001" / "site-000.pt",
                    run.root / "departed" / "index.json"):
        assert private.stat().st_mode & 0o777 == 0o600, private
    assert run.checkpoints.stat().st_mode & 0o077 == 0  # made by a private write


def test_the_first_verdict_stays(tmp_path):
    run = RunDir(tmp_path)
    handle = _silent_coordinator(run, rank=2)
    handle("the start of round 3", [], "watchdog: rank 2 waited 15 s")
    _silent_coordinator(run, rank=1)("the start of round 3", [], "watchdog: rank 1 waited 15 s")
    hung = json.loads(run.hung.read_text())
    assert hung["written_by"] == 2 and hung["silent_ranks"] == [0]
    assert not dump_json(run.hung, {"other": 1}, exclusive=True)
    assert json.loads(run.hung.read_text())["written_by"] == 2
    # the teardown's SIGTERM to a continued coordinator: no requeue marker after a hang
    assert not _record_stop(run, {"signal": "SIGTERM", "exit_status": 75})
    assert not run.stopped.exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_resume_falls_back_to_the_last_checkpoint_that_loads(tmp_path, caplog):
    run = RunDir(tmp_path)
    for r in (1, 2, 3):
        atomic_torch_save(run.coordinator_checkpoint(r), {"round": r, "weights": torch.zeros(2),
                                                          "layout": [], "strategy": {}})
    data = run.coordinator_checkpoint(3).read_bytes()
    run.coordinator_checkpoint(3).write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="fedsilo"):
        assert _loadable_round(run) == (2, (3,))
    assert "resuming from round 2, the previous complete checkpoint" in caplog.text
    assert run.set_aside(3).name == "round-0003.unreadable"
    assert run.complete_rounds() == [1, 2]
    run.coordinator_checkpoint(1).write_bytes(b"not a checkpoint")
    run.coordinator_checkpoint(2).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="round-0001"):
        _loadable_round(run)  # nothing loads: the error, never a silent restart


def test_a_changed_federation_does_not_promise_a_fresh_budget(caplog):
    """match_sites cannot know a joining site left earlier: it says nothing of budgets (the
    caller, which reads departed/, says 'fresh' or 'comes back')."""
    from types import SimpleNamespace

    from fedsilo.federation import match_sites

    saved = {"num_classes": 3, "image_shape": [1, 8, 8], "test": "t", "sites": ["a", "b"]}
    now = {**saved, "sites": ["a", "b", "c"]}
    manifest = SimpleNamespace(record=lambda: now)
    with caplog.at_level(logging.INFO, logger="fedsilo"):
        site_map, departed = match_sites(saved, manifest, changed_ok=True, where="x",
                                         data_dir=Path("d"))
    assert site_map == {0: 0, 1: 1, 2: None} and departed == ()
    assert "fresh DP budget" not in caplog.text


def _round(run: RunDir, r: int) -> None:
    atomic_torch_save(run.coordinator_checkpoint(r), {"round": r, "weights": torch.zeros(2),
                                                      "layout": [], "strategy": {}})


def test_an_agreed_failure_is_recorded_once_by_the_coordinator(tmp_path):
    from fedsilo.errors import AgreedError
    from fedsilo.federation import _record_failure

    run = RunDir(tmp_path)
    _round(run, 1)
    _round(run, 2)
    exc = AgreedError("round 3 failed on rank 2/4 (participant 1): UpdateError: NaN",
                      exit_code=2, failures=((2, "UpdateError"),))
    assert not _record_failure(run, exc, rank=1)  # a participant knows it only from rank 0
    assert not run.failed.exists()
    assert _record_failure(run, exc, rank=0)
    record = json.loads(run.failed.read_text())
    assert record["ranks"] == [2] and record["errors"] == ["UpdateError"]
    assert record["written_by"] == 0 and record["agreed"] and record["exit_status"] == 2
    assert record["last_checkpoint_round"] == 2 and record["resumable"]
    assert record["resume"] == f"fedsilo train --resume {tmp_path}"
    assert "NaN" in record["message"]
    # a later teardown (another rank's exception as MPI_Abort lands) never overwrites it
    before = run.failed.read_bytes()
    assert not _record_failure(run, RuntimeError("MPI abort"), rank=3)
    assert run.failed.read_bytes() == before


def test_a_ranks_own_exception_is_recorded_by_that_rank(tmp_path):
    from fedsilo.federation import _record_failure

    run = RunDir(tmp_path)
    assert _record_failure(run, RuntimeError("a bug"), rank=3)
    record = json.loads(run.failed.read_text())
    assert record["ranks"] == [3] and record["errors"] == ["RuntimeError"]
    assert record["exit_status"] == 1 and not record["agreed"]
    assert record["last_checkpoint_round"] is None and not record["resumable"]


def test_no_failed_marker_after_a_hang(tmp_path):
    from fedsilo.federation import _record_failure

    run = RunDir(tmp_path)
    dump_json(run.hung, {"silent_ranks": [2]})
    assert not _record_failure(run, RuntimeError("aborted"), rank=1)
    assert not run.failed.exists()


def test_a_resume_keeps_the_previous_endings_as_a_record(tmp_path):
    run = RunDir(tmp_path)
    dump_json(run.stopped, {"signal": "SIGTERM"})
    dump_json(run.failed, {"ending": "failed"})
    first = {p.name: p.read_bytes() for p in (run.stopped, run.failed)}
    kept = run.keep_markers()
    assert [p.name for p in kept] == ["001-stopped.json", "002-failed.json"]
    assert not run.stopped.exists() and not run.failed.exists()
    assert {p.name.split("-", 1)[1]: p.read_bytes() for p in kept} == first
    dump_json(run.hung, {"silent_ranks": [0]})  # the next job hung: its own record
    assert [p.name for p in run.keep_markers()] == ["003-hung.json"]
    assert sorted(p.name for p in run.endings.iterdir()) == \
        ["001-stopped.json", "002-failed.json", "003-hung.json"]
    assert run.endings / "002-failed.json" in run.released_files()


def test_report_shows_a_failed_job(tmp_path):
    from fedsilo.runreport import load_run

    (tmp_path / "metrics.jsonl").write_text('{"round": 1, "acc": 0.5}\n')
    (tmp_path / "config.yaml").write_text("rounds: 3\n")
    dump_json(tmp_path / "failed.json", {"ranks": [2], "errors": ["UpdateError"],
                                         "message": "round 2 failed: NaN",
                                         "last_checkpoint_round": 1})
    run = load_run(tmp_path)
    assert run.status == "failed"
    note = next(n for n in run.notes if n.startswith("failed.json"))
    assert "rank(s) 2 (UpdateError): round 2 failed: NaN" in note
    assert f"--resume {tmp_path}' continues from round 1" in note
