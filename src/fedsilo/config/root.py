"""The whole configuration, and the rules that tie its sections together."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic.dataclasses import dataclass

from fedsilo.config.data import DataConfig
from fedsilo.config.dp import DPConfig
from fedsilo.config.model import ModelConfig
from fedsilo.config.run import (
    CheckpointConfig,
    EvalConfig,
    ParticipationConfig,
    RuntimeConfig,
    SegmentationConfig,
)
from fedsilo.config.schema import SECTION_CONFIG, Int, setting
from fedsilo.config.secure import AggregationConfig, HEConfig
from fedsilo.config.strategy import StrategyConfig, StrategySection, spec
from fedsilo.config.train import TrainConfig
from fedsilo.errors import ConfigError


@dataclass(frozen=True, config=SECTION_CONFIG)
class Config:
    seed: Int = setting(0, ge=0, lt=2**63, why="torch's seed range")
    rounds: Int = setting(10, ge=1)
    #: classification or segmentation; auto: what the shard set's manifest says
    task: Literal["auto", "classification", "segmentation"] = "auto"
    data: DataConfig = setting(default_factory=DataConfig)
    model: ModelConfig = setting(default_factory=ModelConfig)
    train: TrainConfig = setting(default_factory=TrainConfig)
    strategy: StrategySection = setting(default_factory=StrategyConfig)
    participation: ParticipationConfig = setting(default_factory=ParticipationConfig)
    #: a participant whose round fails with a foreseeable error (a data error, a non-finite
    #: update): abort the job, or skip it (the round aggregates the others; metrics say why)
    on_participant_error: Literal["abort", "skip"] = "abort"
    eval: EvalConfig = setting(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = setting(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = setting(default_factory=RuntimeConfig)
    dp: DPConfig = setting(default_factory=DPConfig)
    he: HEConfig = setting(default_factory=HEConfig)
    aggregation: AggregationConfig = setting(default_factory=AggregationConfig)
    segmentation: SegmentationConfig = setting(default_factory=SegmentationConfig)

    def __post_init__(self) -> None:
        # one switch: aggregation.secure=ckks and he.enabled=true mean the same thing
        if self.he.enabled and self.aggregation.secure == "masks":
            raise ConfigError("he.enabled=true asks for CKKS, aggregation.secure=masks for "
                              "pairwise masks: choose one (aggregation.secure)")
        if self.he.enabled != (self.aggregation.secure == "ckks"):
            secure = "ckks" if self.he.enabled else self.aggregation.secure
            object.__setattr__(self, "aggregation",
                               dataclasses.replace(self.aggregation, secure=secure))
            object.__setattr__(self, "he", dataclasses.replace(self.he, enabled=secure == "ckks"))
        strategy = spec(self.strategy.name)
        self._check_data_and_precision()
        if self.dp.user.enabled and self.train.normalize_steps:
            raise ConfigError(
                "dp.user (DP-FedAvg) cannot run with train.normalize_steps=true: FedNova "
                "rescales each clipped update by its data-dependent number of local steps, so "
                "dp.user.clip_norm no longer bounds one site's contribution and the noise no "
                "longer covers the sum's sensitivity; set train.normalize_steps=false")
        if self.dp.user.enabled and not strategy.linear:
            raise ConfigError(
                f"strategy {self.strategy.name!r} combines updates non-linearly, but "
                f"dp.user (DP-FedAvg) bounds a weighted sum's sensitivity; use a linear "
                f"strategy with dp.user, or turn dp.user off")
        if self.dp.user.enabled and getattr(strategy, "control_variates", False):
            raise ConfigError(
                f"strategy {self.strategy.name!r} sends each site's control-variate change "
                f"beside its update, but dp.user (DP-FedAvg) clips and noises only the model "
                f"update, so the control variates would leak each site's update unprotected; "
                f"use another linear strategy with dp.user")
        if self.dp.user.enabled and self.dp.user.noise == "central" \
                and self.aggregation.secure == "ckks":
            raise ConfigError(
                "dp.user.noise=central with aggregation.secure=ckks: the participant that "
                "decrypts would open the sum before the coordinator adds the noise, so no "
                "user-level guarantee would hold against it; use dp.user.noise=distributed "
                "(each site adds its share before encrypting)")
        if getattr(strategy, "control_variates", False) and self.train.optimizer != "sgd":
            raise ConfigError(
                f"strategy {self.strategy.name!r} estimates control variates from SGD steps "
                f"(option II of Karimireddy et al.); set train.optimizer=sgd")
        if self.aggregation.secure != "none" and not strategy.linear:
            raise ConfigError(
                f"strategy {self.strategy.name!r} needs each participant's update, but "
                f"aggregation.secure={self.aggregation.secure} sums updates without anyone "
                f"seeing one; use a linear strategy (a weighted sum such as fedavg) or "
                f"aggregation.secure=none")
        self._check_selection()
        self._check_segmentation()

    def _check_segmentation(self) -> None:
        """What segmentation does not offer yet is refused by name (docs/segmentation.md)."""
        if self.task != "segmentation":
            return
        if self.data.augment.enabled:
            raise ConfigError("data.augment transforms images alone, which would move them off "
                              "their masks; segmentation augments image and mask together "
                              "(segmentation.augment): turn data.augment off")
        if self.dp.augmult > 1:
            raise ConfigError("dp.augmult > 1 is not offered for segmentation yet (a patch "
                              "per sampled image and step); set dp.augmult=1")
        if self.checkpoint.threshold != "none":
            raise ConfigError("checkpoint.threshold is for binary classification; set it to "
                              "none with task=segmentation")

    def _check_selection(self) -> None:
        """Model selection and thresholds read the sites' validation figures, which no site
        releases under DP (docs/privacy.md) unless they are noised (dp.validation): asking
        for them otherwise is an error."""
        noised = self.dp.validation
        if noised.enabled and not self.dp.enabled:
            raise ConfigError("dp.validation.enabled noises each site's validation figures and "
                              "accounts them in its DP-SGD accountant; it needs dp.enabled=true")
        if noised.enabled and self.task == "segmentation":
            raise ConfigError("dp.validation is for binary classification (a histogram of the "
                              "positive-class probability); set it to false with "
                              "task=segmentation")
        if noised.enabled and self.dp.user.enabled:
            raise ConfigError("dp.validation is accounted in each site's sample-level ε; "
                              "user-level DP (dp.user) does not account it: turn one off")
        if not (self.dp.enabled or self.dp.user.enabled):
            return
        if noised.enabled:
            if self.checkpoint.best_by == "val_loss":
                raise ConfigError(
                    "config key 'checkpoint.best_by' is 'val_loss', but under DP the sites "
                    "release only a noised histogram of their validation scores "
                    "(dp.validation), from which no loss follows; use val_auc, val_acc or auto")
            return
        for key, value, off in (("best_by", self.checkpoint.best_by, ("auto", "none")),
                                ("threshold", self.checkpoint.threshold, ("none",))):
            if value not in off:
                raise ConfigError(
                    f"config key 'checkpoint.{key}' is {value!r}, but under DP no site "
                    f"releases validation figures (they are computed on private data without "
                    f"noise, docs/privacy.md); set checkpoint.{key}={off[0]}, or let the "
                    f"sites release noised validation figures (dp.validation.enabled=true)")

    def _check_data_and_precision(self) -> None:
        if self.dp.enabled and self.train.precision == "fp16":
            raise ConfigError(
                "train.precision=fp16 cannot run with dp.enabled: fp16 needs loss scaling, "
                "whose skipped steps (on an overflow in any sample's gradient) depend on the "
                "data without noise, and which scales the per-sample norms that clipping "
                "bounds; use train.precision=bf16 (no scaling; clipping is computed in fp32) "
                "or fp32")
        if self.dp.augmult > 1 and not self.dp.enabled:
            raise ConfigError(
                f"dp.augmult={self.dp.augmult} averages each sample's gradient over its views "
                f"before DP-SGD clips it; it needs dp.enabled=true (without DP, augmentation "
                f"alone gives each batch fresh views)")
        if self.dp.augmult > 1 and not self.data.augment.enabled:
            raise ConfigError(
                f"dp.augmult={self.dp.augmult} asks for {self.dp.augmult} views of each "
                f"sample, but data.augment is all off, so the views would be identical; "
                f"turn on an augmentation (data.augment.flip, crop_scale, rotation, "
                f"color_jitter) or set dp.augmult=1")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, StrategyConfig):
        return {"name": obj.name, **{k: _to_plain(v) for k, v in obj.options.items()}}
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj
