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
from fedsilo.shards import manifest as manifest_bounds
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
    #: the batch size of the coordinator's test evaluation (predict repeats it)
    eval_batch_size: int = 256
    #: classification, or segmentation (then ``patch_size`` and ``overlap``: the model
    #: takes patch_size² windows, slid over whole images; docs/segmentation.md)
    task: str = "classification"
    patch_size: int | None = None
    overlap: float = 0.25

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return self.image_shape[1], self.image_shape[2]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """What the model itself takes: the images, or for segmentation one window."""
        if self.patch_size is None:
            return self.image_shape
        return self.image_shape[0], self.patch_size, self.patch_size


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


#: bounds on what a card may declare, checked before anything is built from it: images and
#: classes as a shard set's manifest bounds them (a model fedsilo trained always fits), the
#: evaluation batch (an int32), and the size of the card file itself
MAX_CLASSES = manifest_bounds.MAX_CLASSES
MAX_BATCH = 2**31 - 1
MAX_CARD_BYTES = 16 << 20


def read_card(weights: Path) -> ModelCard:
    """The card beside ``weights``, checked (ModelError naming the file and the key on
    anything wrong: types, ranges and sizes, before anything is built from it)."""
    path = card_path(weights)
    if not path.is_file():
        raise ModelError(f"{weights} has no model card {path.name} beside it: it is not a "
                         f"model written by fedsilo train (which writes model.pt with "
                         f"model.json, best.pt with best.json)")
    try:
        if path.stat().st_size > MAX_CARD_BYTES:
            raise ModelError(f"{path} is {path.stat().st_size} bytes, more than a model card "
                             f"ever is (at most {MAX_CARD_BYTES}); not read")
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ModelError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:  # not UTF-8 or JSON, or nested too deep
        reason = "nested too deep" if isinstance(exc, RecursionError) else \
            " ".join(str(exc).split())[:200]
        raise ModelError(f"{path} is not a readable model card (not JSON: {reason})") from None
    version = data.get("fedsilo_model_card") if isinstance(data, dict) else None
    if not isinstance(data, dict) or isinstance(version, bool) or version != CARD_FORMAT:
        raise ModelError(f"{path} is not a fedsilo model card (format "
                         f"{CARD_FORMAT}): 'fedsilo_model_card' is {_show(version)}")
    card = _Card(path, data)
    model = card.mapping("model")
    name = model.get("name")
    if not isinstance(name, str) or not name:
        raise ModelError(f"{path}: 'model.name' must be a model name; got {_show(name)}")
    shape = card.image_shape()
    num_classes = card.integer("num_classes", low=2, high=MAX_CLASSES)
    names = data.get("class_names")
    if names is None:
        names = [str(k) for k in range(num_classes)]
    elif not isinstance(names, list) or len(names) != num_classes \
            or not all(isinstance(c, str) for c in names):
        raise ModelError(f"{path}: 'class_names' must be null or a list of {num_classes} "
                         f"strings (num_classes); got {_show(names)}")
    norm = card.mapping("normalization")
    mean = card.figures(norm.get("mean"), "normalization.mean", count=shape[0])
    std = card.figures(norm.get("std"), "normalization.std", count=shape[0], positive=True)
    threshold = data.get("threshold")
    probability = None
    if threshold is not None:
        value = threshold.get("value") if isinstance(threshold, dict) else None
        probability = _real(value)
        if probability is None or not 0.0 <= probability <= 1.0:
            raise ModelError(f"{path}: 'threshold.value' must be a probability in [0, 1]; "
                             f"got {_show(value)}")
    round_index = data.get("round")
    if round_index is not None:
        round_index = card.integer("round", low=0, high=2**31 - 1)
    batch = data.get("eval_batch_size")
    batch_size = 256 if batch is None else card.integer("eval_batch_size", low=1,
                                                         high=MAX_BATCH)
    sha = data.get("weights_sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
        raise ModelError(f"{path}: 'weights_sha256' must be a sha256 in hex; got {_show(sha)}")
    task = data.get("task", "classification")
    patch_size, overlap = None, 0.25
    if task == "segmentation":
        seg = card.mapping("segmentation")
        patch_size = seg.get("patch_size")
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) \
                or not 8 <= patch_size <= 4096:
            raise ModelError(f"{path}: 'segmentation.patch_size' must be an integer in "
                             f"[8, 4096]; got {_show(patch_size)}")
        overlap_value = _real(seg.get("overlap"))
        if overlap_value is None or not 0.0 <= overlap_value < 1.0:
            raise ModelError(f"{path}: 'segmentation.overlap' must be a number in [0, 1); "
                             f"got {_show(seg.get('overlap'))}")
        overlap = overlap_value
    elif task != "classification":
        raise ModelError(f"{path}: 'task' must be classification or segmentation; got "
                         f"{_show(task)}")
    return ModelCard(name=name, num_classes=num_classes, image_shape=shape, mean=mean, std=std,
                     class_names=tuple(names), round=round_index, threshold=probability,
                     raw=data, eval_batch_size=batch_size, task=task, patch_size=patch_size,
                     overlap=overlap)


class _Card:
    """Checked reads of the keys of a card's JSON object, each error naming file and key."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.data.get(key)
        if not isinstance(value, dict):
            raise ModelError(f"{self.path}: {key!r} must be an object; got {_show(value)}")
        return value

    def integer(self, key: str, *, low: int, high: int) -> int:
        value = self.data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ModelError(f"{self.path}: {key!r} must be an integer in [{low}, {high}]; "
                             f"got {_show(value)}")
        return value

    def image_shape(self) -> tuple[int, int, int]:
        value = self.data.get("image_shape")
        if not isinstance(value, list) or len(value) != 3 or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ModelError(f"{self.path}: 'image_shape' must be [channels, height, width] "
                             f"(3 integers); got {_show(value)}")
        channels, height, width = value
        if channels not in (1, 3) or min(height, width) < 1:
            raise ModelError(f"{self.path}: 'image_shape' {_show(value)} is out of range: 1 or "
                             f"3 channels, sides of at least 1 pixel")
        problem = manifest_bounds.image_shape_problem(value, 2)
        if problem is not None:
            raise ModelError(f"{self.path}: {problem}")
        return channels, height, width

    def figures(self, value: Any, key: str, *, count: int,
                positive: bool = False) -> tuple[float, ...]:
        numbers = [_real(v) for v in value] if isinstance(value, list) else []
        good = [v for v in numbers if v is not None and math.isfinite(v)
                and (not positive or v > 0)]
        if len(good) != count or len(numbers) != count:
            what = "positive numbers" if positive else "finite numbers"
            raise ModelError(f"{self.path}: {key!r} must be a list of {count} {what} (one per "
                             f"channel of 'image_shape'); got {_show(value)}")
        return tuple(good)


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a JSON number a float holds, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _show(value: Any) -> str:
    """``value`` in an error message, short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


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
                      image_size=card.input_shape[1:], weights=False,
                      dense=card.task == "segmentation")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:400]
        raise ModelError(f"{weights} holds weights of another architecture than "
                         f"{card.name!r} for {card.channels}x{card.size[0]}x{card.size[1]} "
                         f"images and {card.num_classes} classes: {first}") from None
    model.eval()
    return model, card, weights
