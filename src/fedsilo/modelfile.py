"""A trained model on disk: the weights as a plain ``state_dict`` (``model.pt``, ``best.pt``)
and, beside each, a JSON *model card* (``model.json``, ``best.json``) saying how to use them:
the architecture, the image shape and channels, the pixel normalization, the class names,
the round it comes from and, for binary tasks, a decision threshold.

The weights file stays what it always was (``torch.load(path, weights_only=True)`` gives a
``state_dict``), so nothing that reads it breaks; the card carries the sha256 of the weights
it describes, so a card never silently describes other weights.  Loading never unpickles
anything: the weights go through ``weights_only=True``, the card through ``json``.

>>> card_path(Path("runs/x/best.pt")).as_posix()
'runs/x/best.json'
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedsilo.errors import ModelError
from fedsilo.shards import sha256_file

#: the card format this fedsilo writes and reads
CARD_FORMAT = 1


def card_path(weights: Path) -> Path:
    """The card beside a weights file: ``model.pt`` -> ``model.json``."""
    return weights.with_suffix(".json")


@dataclass(frozen=True)
class ModelCard:
    """What :func:`load_model` needs besides the weights (the JSON card, parsed)."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    round: int | None
    threshold: float | None
    #: everything the card holds, as written (selection, rule, versions...)
    raw: Mapping[str, Any]

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return self.image_shape[1], self.image_shape[2]


def write_model(path: Path, state_dict: Mapping[str, Any], card: Mapping[str, Any]) -> None:
    """``path`` (the state_dict) and its card, each written atomically; the card last, with
    the weights' sha256."""
    from fedsilo.rundir import atomic_torch_save, atomic_write_text

    atomic_torch_save(path, dict(state_dict))
    full = {"fedsilo_model_card": CARD_FORMAT, "weights": path.name,
            "weights_sha256": sha256_file(path), **card}
    atomic_write_text(card_path(path), json.dumps(full, indent=2) + "\n")


def resolve_model_path(given: str | Path) -> Path:
    """``given`` as a weights file: a run directory means its ``model.pt``."""
    path = Path(given)
    if path.is_dir():
        if not (path / "model.pt").is_file():
            what = "a run that has not finished" if (path / "metrics.jsonl").is_file() \
                else "not a fedsilo run directory"
            raise ModelError(f"{path} holds no model.pt ({what}); give a run directory "
                             f"of a finished run, or RUN_DIR/model.pt or RUN_DIR/best.pt")
        return path / "model.pt"
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    return path


def read_card(weights: Path) -> ModelCard:
    """The card beside ``weights``, checked (ModelError on anything wrong)."""
    path = card_path(weights)
    if not path.is_file():
        raise ModelError(f"{weights} has no model card {path.name} beside it: it is not a "
                         f"model written by fedsilo train (which writes model.pt with "
                         f"model.json, best.pt with best.json)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not a readable model card: {exc}") from None
    if not isinstance(data, dict) or data.get("fedsilo_model_card") != CARD_FORMAT:
        raise ModelError(f"{path} is not a fedsilo model card (format "
                         f"{CARD_FORMAT}): 'fedsilo_model_card' is "
                         f"{data.get('fedsilo_model_card') if isinstance(data, dict) else None!r}")
    try:
        model, norm = data["model"], data["normalization"]
        shape = tuple(int(v) for v in data["image_shape"])
        num_classes = int(data["num_classes"])
        names = data.get("class_names") or [str(k) for k in range(num_classes)]
        threshold = data.get("threshold")
        card = ModelCard(
            name=str(model["name"]), num_classes=num_classes,
            image_shape=(shape[0], shape[1], shape[2]),
            mean=tuple(float(v) for v in norm["mean"]),
            std=tuple(float(v) for v in norm["std"]),
            class_names=tuple(str(c) for c in names),
            round=data.get("round"),
            threshold=None if threshold is None else float(threshold["value"]),
            raw=data)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelError(f"{path} is not a complete model card: {type(exc).__name__} "
                         f"{exc}") from None
    if len(shape) != 3 or card.channels not in (1, 3) or min(shape) < 1 \
            or len(card.mean) != card.channels or len(card.std) != card.channels \
            or len(card.class_names) != num_classes or num_classes < 2 \
            or not all(math.isfinite(v) for v in card.mean + card.std) \
            or min(card.std) <= 0:
        raise ModelError(f"{path}: inconsistent model card (image_shape {list(shape)}, "
                         f"{num_classes} classes, {len(card.class_names)} class names, "
                         f"mean {list(card.mean)}, std {list(card.std)})")
    return card


def load_model(given: str | Path) -> tuple[Any, ModelCard, Path]:
    """The model (a torch module in eval mode, on CPU), its card and its weights path, from a
    run directory or a weights file with its card.  Only ModelError for a bad file."""
    import torch

    from fedsilo.config import config_from_dict
    from fedsilo.errors import ConfigError
    from fedsilo.models import build_for

    weights = resolve_model_path(given)
    card = read_card(weights)
    expected = card.raw.get("weights_sha256")
    if expected and sha256_file(weights) != expected:
        raise ModelError(f"{weights} is not the file its card {card_path(weights).name} "
                         f"describes (sha256 differs): the weights were replaced or changed")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable or unsafe file is one answer
        raise ModelError(f"{weights} cannot be loaded as weights (torch.load with "
                         f"weights_only=True): {str(exc).splitlines()[0][:300]}") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                 for k, v in state.items()):
        raise ModelError(f"{weights} holds a {type(state).__name__}, not a state_dict of "
                         f"tensors")
    try:
        config = config_from_dict({"model": dict(card.raw["model"])})
    except ConfigError as exc:
        raise ModelError(f"{card_path(weights)} describes a model this fedsilo cannot build: "
                         f"{exc}") from None
    torch.manual_seed(0)  # the weights replace every initial value
    model = build_for(config, in_channels=card.channels, num_classes=card.num_classes,
                      image_size=card.size, weights=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:400]
        raise ModelError(f"{weights} holds weights of another architecture than "
                         f"{card.name!r} for {card.channels}x{card.size[0]}x{card.size[1]} "
                         f"images and {card.num_classes} classes: {first}") from None
    model.eval()
    return model, card, weights
