"""Run configuration: a YAML file plus ``--set key=value`` overrides, frozen and validated.

The schema is declarative (pydantic dataclasses, one module per section: ``data``,
``model``, ``train``, ``strategy``, ``dp``, ``secure``, ``run``); ``root`` ties the sections
together with the rules between them, ``io`` reads YAML and ``--set``, and ``schema`` turns
every bad value into one :class:`~fedsilo.errors.ConfigError` naming its dotted key.  No
module here imports a model or a strategy: their names are looked up in the registries of
``plugins``.  The configuration is loaded once (on rank 0 under MPI).

>>> cfg = load_config(None, overrides=["rounds=3", "model.name=resnet18"])
>>> cfg.rounds, cfg.model.name, cfg.train.epochs
(3, 'resnet18', 1)
>>> load_config(None, overrides=["train.epochz=2"])
Traceback (most recent call last):
...
fedsilo.errors.ConfigError: unknown config key 'train.epochz'; known keys of 'train': batch_size, channels_last, epochs, lr, lr_decay, max_steps, momentum, normalize_steps, optimizer, precision, round_deadline_s, weight_decay
"""  # noqa: E501

from fedsilo.config.data import AugmentConfig, DataConfig
from fedsilo.config.dp import (
    MAX_NOISE_MULTIPLIER,
    MAX_TARGET_EPSILON,
    MIN_NOISE_MULTIPLIER,
    SITE_DP_KEYS,
    DPConfig,
    DPValidationConfig,
    SiteDP,
    UserDPConfig,
)
from fedsilo.config.io import apply_override, config_from_dict, dump_config, load_config
from fedsilo.config.model import TORCHVISION, ModelConfig, names_torchvision_weights
from fedsilo.config.root import Config
from fedsilo.config.run import (
    CheckpointConfig,
    EvalConfig,
    ParticipationConfig,
    RuntimeConfig,
    SegmentationConfig,
)
from fedsilo.config.schema import coerce_value
from fedsilo.config.secure import AggregationConfig, HEConfig
from fedsilo.config.strategy import StrategyConfig
from fedsilo.config.train import TrainConfig

__all__ = [
    "MAX_NOISE_MULTIPLIER", "MAX_TARGET_EPSILON", "MIN_NOISE_MULTIPLIER", "SITE_DP_KEYS",
    "TORCHVISION", "AggregationConfig", "AugmentConfig", "CheckpointConfig", "Config",
    "DPConfig", "DPValidationConfig", "DataConfig", "EvalConfig", "HEConfig", "ModelConfig",
    "ParticipationConfig",
    "RuntimeConfig", "SegmentationConfig", "SiteDP", "StrategyConfig", "TrainConfig",
    "UserDPConfig", "apply_override", "coerce_value", "config_from_dict", "dump_config",
    "load_config", "names_torchvision_weights",
]
