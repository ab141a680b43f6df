"""The ``train`` section: local training on each participant, per round."""

from __future__ import annotations

from typing import Literal

from pydantic.dataclasses import dataclass

from fedsilo.config.schema import SECTION_CONFIG, Bool, Float, Int, setting


@dataclass(frozen=True, config=SECTION_CONFIG)
class TrainConfig:
    """Local training on each participant, per round."""

    epochs: Int = setting(1, ge=1)
    batch_size: Int = setting(64, ge=1)
    lr: Float = setting(0.01, gt=0)
    #: the local learning rate of round r is lr * lr_decay ** (r - 1); damps the round-to-round
    #: swings of the global model when sites are strongly non-IID
    lr_decay: Float = setting(1.0, gt=0, le=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: Float = setting(0.9, ge=0, lt=1)
    weight_decay: Float = setting(0.0, ge=0)
    #: cap on local steps per round (None: whole epochs)
    max_steps: Int | None = setting(None, ge=1)
    #: stragglers: a participant still training this many seconds after it received the
    #: round's weights stops at its next step and contributes the steps it completed,
    #: weighted by the fraction of its planned steps (None: no deadline)
    round_deadline_s: Float | None = setting(None, gt=0, why="or null for no deadline")
    #: FedNova-style normalization (Wang et al. 2020): each update is divided by its number
    #: of local steps and the aggregate rescaled by the weighted mean step count
    normalize_steps: Bool = False
    #: the forward pass in fp32, or under autocast in bf16 or fp16 (fp16 with loss scaling;
    #: not under DP-SGD).  Evaluation stays fp32
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: train in the channels_last memory format: true, false, or auto (on for a model with
    #: 2-D convolutions trained on a CPU without DP-SGD, where oneDNN's convolutions are
    #: faster in it: benchmarks/RESULTS.md)
    channels_last: Literal["auto"] | Bool = "auto"
