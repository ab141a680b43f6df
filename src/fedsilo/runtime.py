"""Where a rank computes: its torch device and its share of the node's cores."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from typing import Any, Callable

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


#: the optimizer methods torch wraps in ``torch._disable_dynamo`` (torch/optim/optimizer.py)
_OPTIMIZER_METHODS = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


def defer_dynamo_import() -> list[str]:
    """Keep building and stepping an optimizer from importing ``torch._dynamo``.

    torch imports ``torch._dynamo`` (and SymPy) the first time an optimizer is built or
    stepped, only to keep ``torch.compile`` out of the optimizer's methods: 1.1-1.5 s of
    every training rank's start-up on this machine, the largest single cost after
    ``import torch`` (benchmarks/RESULTS.md).  fedsilo never compiles, and nothing can be
    compiling in a process that has not imported ``torch._dynamo``; so until it is
    imported, these methods are simply called, and once it is (a user's ``torch.compile``,
    a library that imports it) they take torch's own path again, on that call and every
    later one.  Two hooks:

    - the four methods wrapped in ``torch._disable_dynamo`` (``add_param_group``,
      ``zero_grad``, ``state_dict``, ``load_state_dict``): the per-function cache that
      wrapper reads first (``fn.__dynamo_disable``) gets :func:`_until_dynamo`;
    - ``step`` (which imports ``torch._dynamo`` for a graph break): the optimizer classes of
      :func:`without_dynamo` call the undecorated step under ``torch.no_grad()``, which is
      what torch's decorator does for a non-differentiable optimizer outside compilation.

    A torch that drops either hook leaves this a no-op (the start-up cost comes back, no
    result changes), which ``tests/unit/test_runtime.py`` catches.  Returns the methods
    deferred.
    """
    deferred = []
    for name in _OPTIMIZER_METHODS:
        fn = getattr(getattr(torch.optim.Optimizer, name, None), "__wrapped__", None)
        if fn is None or getattr(fn, "__dynamo_disable", None) is not None:
            continue
        fn.__dynamo_disable = _until_dynamo(fn)
        deferred.append(name)
    return deferred


def _until_dynamo(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" in sys.modules:  # something may compile: torch's own path
            import torch._dynamo

            disabled = torch._dynamo.disable(fn, True, wrapping=False)
            fn.__dynamo_disable = disabled  # type: ignore[attr-defined]
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)
    return call


class _StepWithoutDynamo:
    """Mixin: ``step`` without the ``torch._dynamo`` import (see :func:`defer_dynamo_import`)."""

    def step(self, closure: Any = None) -> Any:
        parent = super().step  # type: ignore[misc]
        raw = inspect.unwrap(parent)
        if (raw is parent or "torch._dynamo" in sys.modules
                or self.defaults.get("differentiable")):  # type: ignore[attr-defined]
            return parent(closure)
        with torch.no_grad():
            return raw(self, closure)


def without_dynamo(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` (a torch optimizer) whose ``step`` does not import ``torch._dynamo``."""
    return type(cls.__name__, (_StepWithoutDynamo, cls), {"__module__": __name__})


def select_device(choice: str, *, local_rank: int, is_coordinator: bool) -> torch.device:
    """``auto``: ``cuda:(local rank mod device count)`` when CUDA is present, else cpu."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from fedsilo.errors import ConfigError
        raise ConfigError("runtime.device is 'cuda' but CUDA is not available on this node")
    return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
