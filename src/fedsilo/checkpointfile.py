"""The one reader of checkpoint files: ``torch.load(weights_only=True)`` (never an arbitrary
unpickle), then every key a resume uses checked for its type and shape, so a truncated,
foreign or hand-edited ``.pt`` ends the resume with one :class:`CheckpointError` naming the
file and the key, never a KeyError or AttributeError deep in a restore.

What is checked is what the writers (``Coordinator.state_dict``/``Participant.state_dict``)
put there; the figures' meaning (the model's size, the site's index, the accountant's
mechanism) is checked by the restore, against the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from fedsilo.errors import CheckpointError

#: the keys of a coordinator checkpoint: (required, check), check returning what is wrong
_Check = Callable[[Any], "str | None"]


def _tensor(ndim: int | None = 1, *, floating: bool = False,
            uint8: bool = False) -> _Check:
    def check(value: Any) -> str | None:
        import torch

        if not torch.is_tensor(value):
            return f"must be a tensor, got {type(value).__name__}"
        if ndim is not None and value.ndim != ndim:
            return f"must be a {ndim}-D tensor, got shape {list(value.shape)}"
        if floating and not value.is_floating_point():
            return f"must hold floating-point values, got {value.dtype}"
        if uint8 and value.dtype != torch.uint8:
            return f"must hold bytes (uint8), got {value.dtype}"
        return None
    return check


def _json_object(*sections: str) -> _Check:
    """A JSON text holding an object whose ``sections`` (where present) are objects or null."""
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return f"must be JSON text, got {type(value).__name__}"
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return "is not valid JSON"
        if not isinstance(parsed, dict):
            return f"must hold a JSON object, got {type(parsed).__name__}"
        for name in sections:
            if parsed.get(name) is not None and not isinstance(parsed[name], dict):
                return f"'{name}' must be an object, got {type(parsed[name]).__name__}"
            if name in ("reports", "stopped") and any(
                    not (k.isdigit() and len(k) < 10) for k in parsed.get(name) or {}):
                return f"'{name}' must be keyed by site indexes"
        return None
    return check


def _of(kind: type | tuple[type, ...], what: str) -> _Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            return f"must be {what}, got {type(value).__name__}"
        return None
    return check


def _strings(value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return "must be a list of names"
    return None


def _arrays(value: Any) -> str | None:
    import numpy as np
    import torch

    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return "must map names to arrays"
    for name, array in value.items():
        if not (torch.is_tensor(array) or isinstance(array, np.ndarray)):
            return f"'{name}' must be an array, got {type(array).__name__}"
    return None


def _shard_set(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        return f"must be an object, got {type(value).__name__}"
    for key, kind in (("num_classes", int), ("image_shape", list), ("test", str),
                      ("sites", list)):
        if not isinstance(value.get(key), kind):
            return f"'{key}' must be {kind.__name__}"
    if not all(isinstance(s, str) for s in value["sites"]):
        return "'sites' must list digests"
    return None


def _optional(check: _Check) -> _Check:
    return lambda value: None if value is None else check(value)


COORDINATOR_KEYS: dict[str, tuple[bool, _Check]] = {
    "weights": (True, _tensor(floating=True)),
    "layout": (True, _strings),
    "strategy": (True, _arrays),
    "privacy": (False, _json_object("reports", "stopped", "user_accountant")),
    "metrics_row": (False, _optional(_json_object())),
    "best": (False, _optional(_json_object("val"))),
    "best_weights": (False, _optional(_tensor(floating=True))),
    "secret": (False, _tensor(uint8=True)),
    "shard_set": (False, _shard_set),
    "last_test": (False, _optional(_of(dict, "an object"))),
}

SITE_KEYS: dict[str, tuple[bool, _Check]] = {
    "round": (True, _of(int, "an integer")),
    "site": (True, _of(int, "an integer")),
    "rounds_trained": (True, _of(int, "an integer")),
    "secure_policy": (False, _json_object()),
    "privacy": (False, _of(dict, "an object")),
    "control": (False, _tensor(floating=True)),
    "secret": (False, _tensor(uint8=True)),
}


def read_state(path: Path, keys: dict[str, tuple[bool, _Check]]) -> dict[str, Any]:
    """The checkpoint at ``path``, its ``keys`` checked; a CheckpointError otherwise.

    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "site-000.pt"
    >>> torch.save({"round": 1, "site": 0, "rounds_trained": "1"}, path)
    >>> read_state(path, SITE_KEYS)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fedsilo.errors.CheckpointError: checkpoint ...: 'rounds_trained' must be an integer, got str
    """
    from fedsilo.rundir import load_torch

    state = load_torch(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a fedsilo checkpoint (it holds a "
                              f"{type(state).__name__}, not a dictionary)")
    for key, (required, check) in keys.items():
        if key not in state:
            if required:
                raise CheckpointError(f"checkpoint {path} has no {key!r}: not a complete "
                                      f"fedsilo checkpoint")
            continue
        problem = check(state[key])
        if problem:
            raise CheckpointError(f"checkpoint {path}: {key!r} {problem}")
    return state


def read_coordinator_state(path: Path) -> dict[str, Any]:
    """A coordinator checkpoint (``coordinator.pt``), checked."""
    return read_state(path, COORDINATOR_KEYS)


def read_site_state(path: Path) -> dict[str, Any]:
    """A participant's checkpoint (``site-NNN.pt``), checked."""
    return read_state(path, SITE_KEYS)
