"""Where a rank computes: its torch device and its share of the node's cores."""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(requested: int, *, local_size: int) -> int:
    """Give this rank ``requested`` threads, or (0) an equal share of the node's cores, so
    that ranks sharing a node do not thrash."""
    threads = requested or max(1, available_cores() // max(local_size, 1))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    return threads


def select_device(choice: str, *, local_rank: int, is_coordinator: bool) -> torch.device:
    """``auto``: ``cuda:(local rank mod device count)`` when CUDA is present, else cpu."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from fedsilo.errors import ConfigError
        raise ConfigError("runtime.device is 'cuda' but CUDA is not available on this node")
    return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
