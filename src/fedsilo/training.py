"""Local training and evaluation on one rank (torch; no MPI here).

The batch order is drawn with an explicit ``torch.Generator``, so a round's training is a
pure function of (weights, seed, round, site) (and, under DP, of the site's secret, see
``privacy/secret.py``): that is what makes ``--resume`` bit-identical without shipping RNG
state around.  Where the batches come from (a split held in memory or streamed from its
shard, ``loading.py``) changes nothing in them; augmentation draws from its own generator,
derived from the same (seed, round, site) (:func:`augment_seed`).

Mixed precision (``train.precision``) runs the forward pass under ``torch.autocast``;
fp16 scales the loss with a ``GradScaler`` (a fresh one each round, like the optimizer).
"""

from __future__ import annotations

import contextlib
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from fedsilo import metrics
from fedsilo.config import TrainConfig
from fedsilo.loading import Split, Transform, in_order
from fedsilo.loading import TensorSplit as TensorSplit  # re-exported: tests build it
from fedsilo.runtime import without_dynamo
from fedsilo.seeds import derive_seed
from fedsilo.selection import threshold_counts


@dataclass(frozen=True)
class LocalStats:
    steps: int
    samples: int
    loss: float
    seconds: float


def round_lr(config: TrainConfig, round_index: int) -> float:
    """The local learning rate of round ``round_index`` (1-based)."""
    return config.lr * config.lr_decay ** (round_index - 1)


def channels_last_for(setting: bool | str, *, model: nn.Module, device: torch.device,
                      dp: bool) -> bool:
    """``train.channels_last`` for this rank: the setting, or for ``auto``: on exactly when
    the model has 2-D convolutions and trains on a CPU without DP-SGD (oneDNN's convolutions
    run faster in the channels-last format there; under DP-SGD and on GPUs it is not
    measured yet, so it stays off).

    >>> channels_last_for("auto", model=nn.Conv2d(1, 2, 3), device=torch.device("cpu"), dp=False)
    True
    >>> channels_last_for("auto", model=nn.Linear(2, 2), device=torch.device("cpu"), dp=False)
    False
    >>> channels_last_for(True, model=nn.Linear(2, 2), device=torch.device("cpu"), dp=True)
    True
    """
    if setting != "auto":
        return bool(setting)
    return (device.type == "cpu" and not dp
            and any(isinstance(m, nn.Conv2d) for m in model.modules()))


def make_optimizer(model: nn.Module, config: TrainConfig, *, round_index: int = 1
                   ) -> torch.optim.Optimizer:
    lr = round_lr(config, round_index)
    if config.optimizer == "adam":
        return _Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    return _SGD(model.parameters(), lr=lr, momentum=config.momentum,
                weight_decay=config.weight_decay)


#: torch's optimizers, stepping without importing torch._dynamo (runtime.defer_dynamo_import)
_SGD, _Adam = without_dynamo(torch.optim.SGD), without_dynamo(torch.optim.Adam)


def gradient_corrections(params: Sequence[tuple[torch.Tensor, int, int]], *, mu: float = 0.0,
                         drift: torch.Tensor | None = None) -> Callable[..., None]:
    """An optimizer step pre-hook that adds FedProx's μ(w − w⁰) (Li et al. 2020; w⁰ = the
    weights when the hook is made, i.e. the round's global model) and SCAFFOLD's drift
    correction c − c_k (Karimireddy et al. 2020; ``drift`` flat, indexed by each
    parameter's ``(offset, numel)``) to every gradient just before the step.

    It runs after DP-SGD has clipped and noised the gradient: both terms are functions of
    public or already privatized quantities, so they cost no privacy and are not clipped.
    """
    anchors = [p.detach().clone() for p, _, _ in params] if mu else None

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for i, (p, offset, numel) in enumerate(params):
                if p.grad is None:
                    continue
                if anchors is not None:
                    p.grad.add_(p - anchors[i], alpha=mu)
                if drift is not None:
                    p.grad.add_(drift[offset: offset + numel].view_as(p))

    return hook


def sgd_travel(lr: float, momentum: float, steps: int) -> float:
    """How far ``steps`` steps of SGD (heavy-ball ``momentum``, buffer starting at zero) move
    the weights per unit of a constant gradient: K·lr without momentum, and
    lr/(1−β) · (K − β(1 − β^K)/(1 − β)) with it.  SCAFFOLD divides a site's drift by it.

    >>> sgd_travel(0.1, 0.0, 5)
    0.5
    >>> round(sgd_travel(0.1, 0.9, 1), 6)  # the first step has no momentum yet
    0.1
    """
    if momentum == 0:
        return lr * steps
    beta = momentum
    return lr / (1 - beta) * (steps - beta * (1 - beta ** steps) / (1 - beta))


def round_seed(seed: int, round_index: int, site: int) -> int:
    """A seed for one site's work in one round, independent of every other (site, round):
    63 bits, torch's seed range (:func:`fedsilo.seeds.derive_seed`)."""
    return derive_seed(seed, round_index, site, bits=63)


def planned_steps(num_samples: int, config: TrainConfig) -> int:
    """Local steps of a full round of :func:`train_local` on ``num_samples`` samples."""
    steps = config.epochs * -(-num_samples // config.batch_size)
    return steps if config.max_steps is None else min(steps, config.max_steps)


def augment_seed(seed: int, round_index: int, site: int) -> int:
    """The seed of a site's augmentation draws in one round: apart from the batch order's
    (:func:`round_seed`), so turning augmentation on does not change which batches come."""
    return derive_seed(seed, round_index, site, _AUGMENT_TAG, bits=63)


#: the extra tag that sets augmentation's seed apart from the batch order's
_AUGMENT_TAG = 1


def epoch_batches(num_samples: int, config: TrainConfig, generator: torch.Generator
                  ) -> Iterator[torch.Tensor]:
    """The index batches of one round: per epoch one ``torch.randperm`` from ``generator``,
    cut into ``batch_size`` pieces, at most ``max_steps`` in all."""
    steps = 0
    for _ in range(config.epochs):
        order = torch.randperm(num_samples, generator=generator)
        for begin in range(0, num_samples, config.batch_size):
            if config.max_steps is not None and steps >= config.max_steps:
                return
            yield order[begin: begin + config.batch_size]
            steps += 1


class Precision:
    """``train.precision`` on one device: the autocast context of the forward pass, and for
    fp16 a ``GradScaler`` around backward and step."""

    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, precision: str, device: torch.device) -> None:
        self.dtype = self.DTYPES.get(precision)
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> ContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)  # unscales first: the step pre-hooks see true gradients
        self.scaler.update()


def train_local(model: nn.Module, data: Split, *, config: TrainConfig,
                optimizer: torch.optim.Optimizer, generator: torch.Generator,
                deadline: float | None = None, augment: Transform | None = None,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                ) -> LocalStats:
    """Run ``config.epochs`` epochs (or ``config.max_steps`` steps) of minibatch training.

    ``deadline`` (a ``time.perf_counter()`` value): stop before the first step that would
    begin after it; the stats say how many steps were done.  ``augment``: applied to each
    batch's raw pixels before normalization.  ``loss_fn``: the batch's mean loss (default
    cross-entropy; segmentation's is Dice + cross-entropy over label maps).
    """
    start = time.perf_counter()
    model.train()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    precision = Precision(config.precision, data.labels.device)
    steps, samples, loss_sum = 0, 0, 0.0
    order = epoch_batches(len(data), config, generator)
    with closing(data.batches(order, transform=augment)) as batches:
        for images, labels in batches:
            if deadline is not None and time.perf_counter() >= deadline:
                break
            if config.channels_last is True:  # "auto" is resolved by the participant
                images = images.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                loss = loss_fn(model(images), labels)
            precision.backward_step(loss, optimizer)
            steps += 1
            samples += int(labels.shape[0])
            loss_sum += float(loss.detach()) * int(labels.shape[0])
    return LocalStats(steps=steps, samples=samples, loss=loss_sum / max(samples, 1),
                      seconds=time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, *, batch_size: int,
             thresholds: np.ndarray | None = None) -> dict[str, Any]:
    """Loss, accuracy and AUC (MedMNIST conventions) of ``model`` on ``data``; with
    ``thresholds`` (binary tasks), also ``counts``: the confusion counts at each
    (:func:`fedsilo.selection.threshold_counts`)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    probs, loss_sum = [], 0.0
    with closing(data.batches(in_order(len(data), batch_size))) as batches:
        for images, labels in batches:
            logits = model(images)
            loss_sum += float(loss_fn(logits, labels))
            probs.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
    labels = data.labels.cpu().numpy()
    all_probs = np.concatenate(probs) if probs else np.zeros((0, 2))
    result: dict[str, Any] = {
        "loss": loss_sum / max(len(data), 1),
        "acc": metrics.accuracy(labels, all_probs),
        "auc": metrics.auc(labels, all_probs),
        "num_samples": len(data),
    }
    if thresholds is not None:
        result["counts"] = threshold_counts(labels, all_probs, thresholds)
    return result


class ClassificationTask:
    """Classification as the roles use it (``tasks.py``): the functions above."""

    name = "classification"
    dense = False
    loss = None
    #: DP-SGD's per-sample loss (None: its own cross-entropy)
    sample_loss = None

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width

    def load(self, sources: Sequence[Any], *, data: Any, device: torch.device, who: str
             ) -> list[Any]:
        from fedsilo.loading import load_splits

        return list(load_splits(sources, data=data, device=device, who=who))

    def train_transform(self, augmenter: Any, generator: torch.Generator
                        ) -> Transform | None:
        return None if augmenter is None else augmenter.bind(generator)

    def check_output(self, logits: torch.Tensor, num_classes: int) -> str | None:
        if logits.shape[-1] != num_classes:
            return f"outputs {logits.shape[-1]} classes, the shard set has {num_classes}"
        return None

    def evaluate(self, model: nn.Module, data: Split, *, batch_size: int,
                 thresholds: np.ndarray | None = None) -> dict[str, Any]:
        return evaluate(model, data, batch_size=batch_size, thresholds=thresholds)
