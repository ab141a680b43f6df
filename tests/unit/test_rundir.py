"""Run-directory writes and bounded error messages: what a user sees when the disk fills
or an input is absurd."""

import errno
import os

import pytest
import torch

from fedsilo.errors import CheckpointError, ConfigError, FedsiloError
from fedsilo.rundir import atomic_torch_save, load_torch


def test_a_full_disk_is_named_and_leaves_the_old_file(tmp_path, monkeypatch):
    """ENOSPC while a checkpoint is written: a CheckpointError that says so and names the
    file (not torch's inline_container.cc), the previous file intact, no temporary left."""
    path = tmp_path / "coordinator.pt"
    atomic_torch_save(path, {"round": 1})
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError, match=f"no space left on the device .* {path}"):
        atomic_torch_save(path, {"round": 2, "weights": torch.zeros(1000)})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert load_torch(path) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["coordinator.pt"]


def test_error_messages_are_bounded():
    """A 10 MB value quoted in an error must not be printed (and sent) by every rank."""
    huge = "x" * 10_000_000
    message = str(ConfigError(f"config key 'model.name' must be one of a, b; got {huge!r}"))
    assert len(message) < 2100 and "characters cut" in message
    assert message.startswith("config key 'model.name'") and message.endswith("x'")
    assert str(FedsiloError("short")) == "short"


def test_a_huge_integer_override_is_a_config_error():
    from fedsilo.config import load_config

    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides=["train.batch_size=" + "9" * 100_000])
    assert len(str(caught.value)) < 2100
