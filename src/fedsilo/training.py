"""Local training and evaluation on one rank (torch; no MPI here).

Batches are drawn from tensors held in memory with an explicit ``torch.Generator``, so a
round's training is a pure function of (weights, seed, round, site) (and, under DP, of the
site's secret, see ``privacy/secret.py``): that is what makes ``--resume`` bit-identical
without shipping RNG state around.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedsilo import metrics
from fedsilo.config import TrainConfig
from fedsilo.seeds import derive_seed


@dataclass(frozen=True)
class TensorSplit:
    """Normalized images (float32, NCHW) and labels (int64) of one split, on a device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray, *, mean, std,
                    device: torch.device) -> "TensorSplit":
        x = torch.from_numpy(np.ascontiguousarray(images))
        x = x.to(torch.float32) / 255.0 if images.dtype == np.uint8 else x.to(torch.float32)
        mean_t = torch.as_tensor(np.asarray(mean, dtype=np.float32)).view(1, -1, 1, 1)
        std_t = torch.as_tensor(np.asarray(std, dtype=np.float32)).view(1, -1, 1, 1)
        x = (x - mean_t) / std_t
        return cls(x.to(device), torch.from_numpy(labels.astype(np.int64)).to(device))


@dataclass(frozen=True)
class LocalStats:
    steps: int
    samples: int
    loss: float
    seconds: float


def round_lr(config: TrainConfig, round_index: int) -> float:
    """The local learning rate of round ``round_index`` (1-based)."""
    return config.lr * config.lr_decay ** (round_index - 1)


def make_optimizer(model: nn.Module, config: TrainConfig, *, round_index: int = 1
                   ) -> torch.optim.Optimizer:
    lr = round_lr(config, round_index)
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


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


def train_local(model: nn.Module, data: TensorSplit, *, config: TrainConfig,
                optimizer: torch.optim.Optimizer, generator: torch.Generator,
                deadline: float | None = None) -> LocalStats:
    """Run ``config.epochs`` epochs (or ``config.max_steps`` steps) of minibatch training.

    ``deadline`` (a ``time.perf_counter()`` value): stop before the first step that would
    begin after it; the stats say how many steps were done.
    """
    start = time.perf_counter()
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    steps, samples, loss_sum = 0, 0, 0.0
    for _ in range(config.epochs):
        order = torch.randperm(len(data), generator=generator).to(data.labels.device)
        for begin in range(0, len(data), config.batch_size):
            if config.max_steps is not None and steps >= config.max_steps:
                break
            if deadline is not None and time.perf_counter() >= deadline:
                break
            index = order[begin: begin + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(data.images[index]), data.labels[index])
            loss.backward()
            optimizer.step()
            steps += 1
            samples += int(index.numel())
            loss_sum += float(loss.detach()) * int(index.numel())
    return LocalStats(steps=steps, samples=samples, loss=loss_sum / max(samples, 1),
                      seconds=time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorSplit, *, batch_size: int) -> dict[str, float]:
    """Loss, accuracy and AUC (MedMNIST conventions) of ``model`` on ``data``."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    probs, loss_sum = [], 0.0
    for begin in range(0, len(data), batch_size):
        logits = model(data.images[begin: begin + batch_size])
        loss_sum += float(loss_fn(logits, data.labels[begin: begin + batch_size]))
        probs.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
    labels = data.labels.cpu().numpy()
    all_probs = np.concatenate(probs) if probs else np.zeros((0, 2))
    return {
        "loss": loss_sum / max(len(data), 1),
        "acc": metrics.accuracy(labels, all_probs),
        "auc": metrics.auc(labels, all_probs),
        "num_samples": len(data),
    }
