"""Run configuration: a YAML file plus ``--set key=value`` overrides, frozen and validated.

The configuration is loaded once (on rank 0 under MPI) into frozen dataclasses that check
themselves; unknown keys and ill-typed values fail with the key's dotted path.

>>> cfg = load_config(None, overrides=["rounds=3", "model.name=resnet18"])
>>> cfg.rounds, cfg.model.name, cfg.train.epochs
(3, 'resnet18', 1)
>>> load_config(None, overrides=["train.epochz=2"])
Traceback (most recent call last):
...
fedsilo.errors.ConfigError: unknown config key 'train.epochz'; known keys of 'train': batch_size, channels_last, epochs, lr, lr_decay, max_steps, momentum, normalize_steps, optimizer, precision, round_deadline_s, weight_decay
"""  # noqa: E501

from __future__ import annotations

import collections.abc
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from fedsilo.errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation of training batches, per sample (torchvision.transforms.v2; docs/
    data-loading.md).  Every default is off."""

    #: RandomResizedCrop back to the image size, of an area in [crop_scale, 1] (1: off)
    crop_scale: float = 1.0
    #: RandomHorizontalFlip (p = 0.5)
    flip: bool = False
    #: RandomRotation by up to this many degrees either way (0: off)
    rotation: float = 0.0
    #: ColorJitter of brightness, contrast and saturation by this factor (RGB shards only)
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        _check(0 < self.crop_scale <= 1, "data.augment.crop_scale", "must be in (0, 1]")
        _check(0 <= self.rotation <= 180, "data.augment.rotation", "must be in [0, 180]")
        _check(0 <= self.color_jitter <= 1, "data.augment.color_jitter", "must be in [0, 1]")

    @property
    def enabled(self) -> bool:
        return self.crop_scale < 1 or self.flip or self.rotation > 0 or self.color_jitter > 0


@dataclass(frozen=True)
class DataConfig:
    #: directory of the shard set written by ``fedsilo prep``
    dir: str = "shards"
    #: pixel normalization: global (manifest statistics, combined from per-site sums),
    #: site (each participant its own statistics; the coordinator uses global), none ([0, 1])
    normalize: Literal["global", "site", "none"] = "global"
    #: verify every shard's sha256 against the manifest before training
    verify_hashes: bool = True
    #: hold a rank's splits in memory (true), stream them from their shards (false), or
    #: auto: in memory when their raw pixels fit in memory_limit_mb
    in_memory: Literal["auto", "true", "false"] = "auto"
    #: the memory a rank's data may take (MiB): the auto choice, and for streamed splits
    #: the chunk cache and the windows of batches read ahead
    memory_limit_mb: int = 1024
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        _check(self.memory_limit_mb >= 1, "data.memory_limit_mb", "must be >= 1")


def names_torchvision_weights(weights: str) -> bool:
    """Whether ``model.weights`` names torchvision weights (``DEFAULT``, ``IMAGENET1K_V2``)
    rather than a file: upper-case letters, digits and ``_``, and no such file exists.

    >>> names_torchvision_weights("IMAGENET1K_V2"), names_torchvision_weights("w/resnet.pth")
    (True, False)
    """
    return weights.replace("_", "").isalnum() and weights.upper() == weights \
        and not os.path.exists(weights)


@dataclass(frozen=True)
class ModelConfig:
    """The model (docs/models.md): a zoo name, or ``tv:ARCH`` for any torchvision
    classification model, adapted to the shards' channels, classes and image size."""

    #: small_cnn, dp_cnn, resnet18, or tv:ARCH (tv:resnet50, tv:densenet121, tv:vit_b_16...)
    name: str = "small_cnn"
    #: groups of GroupNorm layers (ResNet); channels must be divisible by it.  The DP fix
    #: gives a BatchNorm of C channels gcd(norm_groups, C) groups
    norm_groups: int = 32
    #: initial weights: a state_dict file (torch.load(weights_only=True)), or for tv: models
    #: torchvision's weights name (DEFAULT, IMAGENET1K_V1...; torch hub's cache); null: random
    weights: str | None = None
    #: tv: models: first layers for the image size: auto (small-image stem up to 64 px),
    #: small, imagenet (torchvision's stem as is)
    stem: Literal["auto", "small", "imagenet"] = "auto"
    #: make the model DP-SGD-ready (BatchNorm -> GroupNorm, no in-place ops, as Opacus's
    #: ModuleValidator.fix): on, off, auto (on exactly when dp.enabled)
    dp_fix: Literal["auto", "on", "off"] = "auto"
    #: what trains (the rest stays frozen): all, head (the last Linear layer), or N (the
    #: last N blocks and the head)
    train_layers: Literal["all", "head"] | int = "all"

    def __post_init__(self) -> None:
        from fedsilo.models import MODELS, TORCHVISION

        if self.name.startswith(TORCHVISION):
            # read from torchvision's source: no rank imports torch to check a name
            from fedsilo.models.tvnames import check_name, check_weights

            arch = check_name(self.name)  # fails early with the known names
            if self.weights is not None and names_torchvision_weights(self.weights):
                check_weights(arch, self.weights)
        else:
            MODELS.get(self.name)  # fails early with the known names
            _check(self.stem == "auto", "model.stem", "applies to tv: models only")
            _check(self.weights is None or not names_torchvision_weights(self.weights),
                   "model.weights",
                   f"names torchvision weights ({self.weights}), which only tv: models have; "
                   f"give a .pth file for {self.name}")
        _check(self.norm_groups >= 1, "model.norm_groups", "must be >= 1")
        _check(self.weights is None or bool(self.weights.strip()), "model.weights",
               "must be a file path, a torchvision weights name, or null")
        _check(not isinstance(self.train_layers, int) or self.train_layers >= 1,
               "model.train_layers", "must be all, head, or a number of blocks >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each participant, per round."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    #: the local learning rate of round r is lr * lr_decay ** (r - 1); damps the round-to-round
    #: swings of the global model when sites are strongly non-IID
    lr_decay: float = 1.0
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    #: cap on local steps per round (None: whole epochs)
    max_steps: int | None = None
    #: stragglers: a participant still training this many seconds after it received the
    #: round's weights stops at its next step and contributes the steps it completed,
    #: weighted by the fraction of its planned steps (None: no deadline)
    round_deadline_s: float | None = None
    #: FedNova-style normalization (Wang et al. 2020): each update is divided by its number
    #: of local steps and the aggregate rescaled by the weighted mean step count
    normalize_steps: bool = False
    #: the forward pass in fp32, or under autocast in bf16 or fp16 (fp16 with loss scaling;
    #: not under DP-SGD).  Evaluation stays fp32
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: train in the channels_last memory format: true, false, or auto (on for a model with
    #: 2-D convolutions trained on a CPU without DP-SGD, where oneDNN's convolutions are
    #: faster in it: benchmarks/RESULTS.md)
    channels_last: Literal["auto"] | bool = "auto"

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(0 < self.lr_decay <= 1, "train.lr_decay", "must be in (0, 1]")
        _check(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1")
        _check(self.round_deadline_s is None or self.round_deadline_s > 0,
               "train.round_deadline_s", "must be > 0 (or null for no deadline)")


@dataclass(frozen=True)
class StrategyConfig:
    """Server strategy: ``name`` plus that strategy's own options (validated by it)."""

    name: str = "fedavg"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fedsilo.strategies import STRATEGIES

        options = STRATEGIES.get(self.name).validate_options(self.options)
        # keep the coerced values ("1e-3" -> 0.001), so a dump holds numbers
        object.__setattr__(self, "options", {k: getattr(options, k) for k in self.options})


@dataclass(frozen=True)
class ParticipationConfig:
    """Partial participation: each round trains ``max(min, ceil(fraction · n))`` of the n
    sites still in the federation, sampled without replacement from (seed, round)."""

    fraction: float = 1.0
    min: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _check(0 < self.fraction <= 1, "participation.fraction", "must be in (0, 1]")
        _check(self.min >= 1, "participation.min", "must be >= 1")
        _check(0 <= self.seed < 2**63, "participation.seed", "must be in [0, 2^63)")


@dataclass(frozen=True)
class SegmentationConfig:
    """Training and evaluation of segmentation shard sets (docs/segmentation.md)."""

    #: side of the square patches training crops from whole images, and of the sliding
    #: window evaluation and prediction use
    patch_size: int = 128
    #: probability that a patch is centred on a foreground pixel (nnU-Net's oversampling)
    foreground: float = 0.5
    #: random flips and 90-degree rotations, of image and mask together
    augment: bool = True
    #: overlap of neighbouring sliding windows, as a fraction of the window
    overlap: float = 0.25
    #: weight of (1 - soft Dice) beside the cross-entropy in the loss
    dice_weight: float = 1.0

    def __post_init__(self) -> None:
        _check(8 <= self.patch_size <= 4096, "segmentation.patch_size", "must be in [8, 4096]")
        _check(0 <= self.foreground <= 1, "segmentation.foreground", "must be in [0, 1]")
        _check(0 <= self.overlap < 1, "segmentation.overlap", "must be in [0, 1)")
        _check(self.dice_weight >= 0, "segmentation.dice_weight", "must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    #: evaluate the global model on the test shard every N rounds (and always at the end)
    every: int = 1
    batch_size: int = 256

    def __post_init__(self) -> None:
        _check(self.every >= 1, "eval.every", "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    #: checkpoint every N rounds (and always after the last)
    every: int = 1
    #: complete checkpoints kept on disk (older ones are deleted)
    keep: int = 2
    #: model selection: keep the global model with the best federated validation metric as
    #: RUN_DIR/best.pt (docs/model.md).  auto: val_loss, and none under DP (no validation
    #: metric leaves a site there); none: no best.pt
    best_by: Literal["auto", "none", "val_loss", "val_acc", "val_auc"] = "auto"
    #: binary tasks: a decision threshold on the positive-class probability, chosen on the
    #: sites' summed validation confusion counts (none: keep 0.5; youden: max TPR - FPR;
    #: accuracy: max accuracy), stored with model.pt and best.pt
    threshold: Literal["none", "youden", "accuracy"] = "none"
    #: where each site keeps its private state (its secret, accountant, control variate:
    #: its checkpoints), outside the shared run directory: a path with ``{site}`` (the site
    #: index), e.g. ``/hospital-{site}/fedsilo-state`` (docs/privacy.md, 'Released and
    #: private'); null: RUN_DIR/checkpoints, beside the coordinator's
    site_dir: str | None = None

    def __post_init__(self) -> None:
        _check(self.every >= 1, "checkpoint.every", "must be >= 1")
        _check(self.keep >= 1, "checkpoint.keep", "must be >= 1")
        _check(self.site_dir is None or ("{site}" in self.site_dir
                                         and self.site_dir.count("{") == 1),
               "checkpoint.site_dir", "must name each site's own directory with one "
               "'{site}' (the site index), e.g. /data/hospital-{site}/fedsilo-state")


@dataclass(frozen=True)
class RuntimeConfig:
    #: auto: cuda:(node-local rank mod device count) when CUDA is present, else cpu
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: torch threads per rank; 0 = the node's cores divided among its ranks
    threads: int = 0
    #: progress bar on rank 0: auto (only on a TTY), on, off
    progress: Literal["auto", "on", "off"] = "auto"
    #: rank 0 writes TensorBoard event files to RUN_DIR/tensorboard/ as the run goes
    tensorboard: bool = False
    #: precision of the summed updates on the wire.  float64 makes the sum exact in practice,
    #: so results do not depend on how sites are placed on ranks or on the Reduce's
    #: grouping (docs/strategies.md); float32 halves the bytes of the Reduce
    reduce_dtype: Literal["float32", "float64"] = "float32"
    #: watchdog: end the job when a rank is silent this long in a round (seconds); null:
    #: automatic, 10x the slowest round so far and at least 300 s (docs/training.md)
    hang_timeout_s: float | None = None
    #: watchdog: the allowance for loading the data and the first round after a (re)start
    first_round_timeout_s: float = 1800.0
    #: the coordinator evaluates and checkpoints a round while the participants train the
    #: next one (same results and checkpoints; false: before the next round starts)
    overlap_eval: bool = True

    def __post_init__(self) -> None:
        _check(0 <= self.threads <= 1024, "runtime.threads",
               "must be in [0, 1024] (0: the node's cores divided among its ranks)")
        _check(self.hang_timeout_s is None or 0 < self.hang_timeout_s <= 1e7,
               "runtime.hang_timeout_s", "must be in (0, 1e7] seconds (or null: automatic)")
        _check(0 < self.first_round_timeout_s <= 1e7, "runtime.first_round_timeout_s",
               "must be in (0, 1e7] seconds")


#: keys a ``dp.sites.K`` override may set (the rest is job-wide)
SITE_DP_KEYS = ("target_epsilon", "noise_multiplier", "delta", "max_grad_norm")

#: σ range of every noise multiplier, configured or searched for (``noise_multiplier_for``).
#: Below 0.01 one step already spends ε in the thousands whatever the sampling rate, and
#: Opacus's accountants stop computing (GDP's exp(1/σ²) overflows below σ ≈ 0.04, PRV cannot
#: discretise); above 1e4 the noise swamps any gradient (RDP's ε sits at its floor long before).
MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER = 0.01, 1e4
#: the largest budget ε one may ask for: past it a "budget" promises no privacy at all
#: (e^ε, the bound on the likelihood ratio, overflows a double from ε ≈ 709 on)
MAX_TARGET_EPSILON = 1e4


@dataclass(frozen=True)
class SiteDP:
    """The sample-level DP settings that apply to one participant (after its overrides)."""

    target_epsilon: float | None
    noise_multiplier: float | None
    delta: float
    max_grad_norm: float


@dataclass(frozen=True)
class UserDPConfig:
    """User-level (site-level) DP-FedAvg (McMahan et al. 2018): clip each participant's
    model delta to ``clip_norm``, add Gaussian noise of σ·C·max_k w_k to the sum."""

    enabled: bool = False
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    #: central: the coordinator adds the noise; distributed: each of the P participants
    #: adds an independent share N(0, σ²C²max_w²/P) before sending (composes with encryption)
    noise: Literal["central", "distributed"] = "central"

    def __post_init__(self) -> None:
        _check_positive("dp.user.clip_norm", self.clip_norm)
        _check_noise_multiplier("dp.user.noise_multiplier", self.noise_multiplier)


@dataclass(frozen=True)
class DPValidationConfig:
    """Model and threshold selection under DP (binary tasks; docs/privacy.md, "Validation
    under DP"): each site releases its validation scores as a histogram per class with
    Gaussian noise of std ``noise_multiplier`` on every count (drawn from its secret), and
    accounts each release in its own ε; the coordinator chooses best.pt and the decision
    threshold on the noised sums."""

    enabled: bool = False
    #: σ of each released count (a validation example moves one count by 1)
    noise_multiplier: float = 10.0
    #: equal-width bins of the positive-class probability (the thresholds are their edges)
    bins: int = 10
    #: the sites validate the global model every N rounds, and the final model
    every: int = 5

    def __post_init__(self) -> None:
        _check_noise_multiplier("dp.validation.noise_multiplier", self.noise_multiplier)
        _check(2 <= self.bins <= 100, "dp.validation.bins", "must be in [2, 100]")
        _check(self.every >= 1, "dp.validation.every", "must be >= 1")

    def releases(self, rounds: int) -> int:
        """Validation releases a site makes over a job of ``rounds`` rounds (at most)."""
        return (rounds - 1) // self.every + 1


@dataclass(frozen=True)
class DPConfig:
    """Sample-level DP-SGD on every participant (see docs/privacy.md).

    ``sites`` overrides the settings of single participants; its keys are **site indexes
    0..P-1** (the ``site-00K.h5`` shard, run by MPI rank K+1), e.g.
    ``sites: {2: {target_epsilon: 3}}`` or ``--set dp.sites.2.target_epsilon=3``.
    """

    enabled: bool = False
    #: the per-site budget ε; with noise_multiplier unset, σ is chosen to spend exactly
    #: this over the planned job (rounds × local steps).  None: no budget (ε only reported)
    target_epsilon: float | None = 8.0
    delta: float = 1e-5
    #: σ, given explicitly (then target_epsilon is only the enforced budget)
    noise_multiplier: float | None = None
    #: per-sample gradient clipping norm C
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    #: a participant whose next round would exceed its budget: stop contributing (the
    #: federation continues without it), or abort the whole job
    budget_policy: Literal["stop", "abort"] = "stop"
    #: per-sample clipping method: mixed (fedsilo's mixed ghost clipping: Linear, Conv2d,
    #: GroupNorm), hooks (Opacus's explicit per-sample gradients, any Opacus-supported
    #: layer), auto (mixed where it covers the model, else hooks)
    grad_sample_mode: Literal["auto", "mixed", "hooks"] = "auto"
    sites: Mapping[Any, Any] = field(default_factory=dict)
    #: augmentation multiplicity (De et al. 2022): K augmented views of each sampled image,
    #: their gradients averaged before clipping (the sensitivity stays C); needs data.augment
    augmult: int = 1
    #: user-level DP-FedAvg, independent of (and combinable with) sample-level DP-SGD;
    #: accounted over rounds at dp.delta and reported as ``user_epsilon``
    user: UserDPConfig = field(default_factory=UserDPConfig)
    #: noised federated validation, so best.pt and a threshold exist under DP
    validation: DPValidationConfig = field(default_factory=DPValidationConfig)

    def __post_init__(self) -> None:
        _check(self.augmult >= 1, "dp.augmult", "must be >= 1")
        self._check_site("dp", self.for_site(0, _sites={}))  # the job-wide settings
        sites = {}
        for key, override in self.sites.items():
            try:
                site = int(key)
            except (TypeError, ValueError):
                site = -1
            _check(site >= 0 and str(site) == str(key).strip(), f"dp.sites.{key}",
                   "must be a site index 0..P-1")
            if not isinstance(override, Mapping):
                raise ConfigError(f"config key 'dp.sites.{key}' must be a mapping, "
                                  f"got {_describe(override)}")
            clean = {}
            for name, value in override.items():
                if name not in SITE_DP_KEYS:
                    raise ConfigError(f"unknown config key 'dp.sites.{key}.{name}'; known keys "
                                      f"of 'dp.sites.{key}': {', '.join(sorted(SITE_DP_KEYS))}")
                hint = typing.get_type_hints(SiteDP)[name]
                clean[name] = coerce_value(hint, value, f"dp.sites.{key}.{name}")
            self._check_site(f"dp.sites.{key}",
                             dataclasses.replace(self.for_site(site, _sites={}), **clean))
            sites[site] = clean
        object.__setattr__(self, "sites", dict(sorted(sites.items())))

    def _check_site(self, key: str, site: SiteDP) -> None:
        """Validate one participant's resolved settings.  The job-wide ones (``key`` "dp")
        are checked first, so a site's error can only come from its own override ``key``."""
        _check_site_dp(key, site)
        if not self.enabled:
            return
        _check(site.target_epsilon is not None or site.noise_multiplier is not None, key,
               "needs target_epsilon or noise_multiplier when enabled (got null for both)")
        if self.accountant == "gdp" and site.target_epsilon is not None:
            raise ConfigError(
                f"config key '{key}.target_epsilon' sets a budget of ε = "
                f"{site.target_epsilon:.6g}, but dp.accountant=gdp cannot enforce one: GDP "
                f"(Gaussian DP) is a CLT approximation that can under-report ε; use rdp or "
                f"prv for a budget, or keep gdp for reporting only with target_epsilon: null "
                f"and an explicit noise_multiplier")

    def for_site(self, site: int, *, _sites: Mapping[int, Any] | None = None) -> SiteDP:
        """The settings of participant ``site`` (0-based): job-wide ones plus its overrides."""
        base = SiteDP(target_epsilon=self.target_epsilon, noise_multiplier=self.noise_multiplier,
                      delta=self.delta, max_grad_norm=self.max_grad_norm)
        overrides = (self.sites if _sites is None else _sites).get(site, {})
        return dataclasses.replace(base, **overrides)


def _check_site_dp(key: str, site: SiteDP) -> None:
    """Every DP number of ``site`` finite and in range (``key``: the section that set them)."""
    if site.target_epsilon is not None:
        _check_finite(f"{key}.target_epsilon", site.target_epsilon,
                      0 < site.target_epsilon <= MAX_TARGET_EPSILON,
                      f"in (0, {MAX_TARGET_EPSILON:g}]",
                      "a larger ε promises no privacy: e^ε overflows a double from ε ≈ 709; "
                      "use target_epsilon: null for no budget"
                      if site.target_epsilon > MAX_TARGET_EPSILON else "")
    if site.noise_multiplier is not None:
        _check_noise_multiplier(f"{key}.noise_multiplier", site.noise_multiplier)
    _check_finite(f"{key}.delta", site.delta, 0 < site.delta < 1, "in (0, 1)")
    _check_positive(f"{key}.max_grad_norm", site.max_grad_norm)


def _check_noise_multiplier(key: str, value: float) -> None:
    _check_finite(key, value, MIN_NOISE_MULTIPLIER <= value <= MAX_NOISE_MULTIPLIER,
                  f"in [{MIN_NOISE_MULTIPLIER:g}, {MAX_NOISE_MULTIPLIER:g}]",
                  "below, one step spends ε in the thousands and the accountants cannot "
                  "compute it; above, the noise swamps any update"
                  if not math.isnan(value) else "")


def _check_positive(key: str, value: float) -> None:
    _check_finite(key, value, value > 0, "> 0")


def _check_finite(key: str, value: float, ok: bool, expected: str, why: str = "") -> None:
    if not (math.isfinite(value) and ok):
        raise ConfigError(f"config key '{key}' must be a finite number {expected}, got "
                          f"{value:.6g}" + (f" ({why})" if why else ""))


@dataclass(frozen=True)
class HEConfig:
    """Encrypted aggregation (CKKS); keys come from ``fedsilo keys --out DIR``."""

    enabled: bool = False
    #: key directory: participants open participant.key, the coordinator coordinator.ctx only
    keys: str = "keys"
    #: processes a participant encrypts in (0: its share of the node's cores, as
    #: runtime.threads; 1: in the rank's own process)
    workers: int = 0

    def __post_init__(self) -> None:
        _check(0 <= self.workers <= 1024, "he.workers", "must be between 0 and 1024")


@dataclass(frozen=True)
class AggregationConfig:
    """How the participants' updates are summed (docs/privacy.md, docs/secure-aggregation.md).

    ``secure``: none (plain MPI_Reduce: the coordinator sees each rank's sum), masks
    (pairwise-masked secure aggregation over one MPI_Reduce: nobody short of all other
    participants together learns one site's update; identity keys from ``fedsilo keys
    --identity``), ckks (CKKS encryption, NVIDIA FLARE's trust model: the participants share
    a key, the coordinator adds ciphertexts; same as ``he.enabled: true``).
    """

    secure: Literal["none", "masks", "ckks"] = "none"
    #: a secure round with fewer contributing sites is refused by every participant
    min_contributors: int = 2
    #: masks: directory with public.json and the sites' site-NNN.key (``fedsilo keys --identity``)
    keys: str = "identity"
    #: masks: neighbours each site masks with; 0 = every other contributor (dense graph),
    #: -1 = the SecAgg+ sparse graph of O(log n) neighbours, k > 0 = k neighbours
    mask_degree: int = 0
    #: masks: fractional bits of the fixed-point encoding (resolution 2^-frac_bits)
    frac_bits: int = 32

    def __post_init__(self) -> None:
        _check(self.min_contributors >= 2, "aggregation.min_contributors",
               "must be >= 2 (one contributor's 'sum' is its own update)")
        _check(self.mask_degree >= -1, "aggregation.mask_degree",
               "must be 0 (dense), -1 (sparse, O(log n)) or a number of neighbours > 0")
        _check(8 <= self.frac_bits <= 52, "aggregation.frac_bits", "must be in [8, 52]")


@dataclass(frozen=True)
class Config:
    seed: int = 0
    rounds: int = 10
    #: classification or segmentation; auto: what the shard set's manifest says
    task: Literal["auto", "classification", "segmentation"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    #: a participant whose round fails with a foreseeable error (a data error, a non-finite
    #: update): abort the job, or skip it (the round aggregates the others; metrics say why)
    on_participant_error: Literal["abort", "skip"] = "abort"
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    he: HEConfig = field(default_factory=HEConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)

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
        _check(self.rounds >= 1, "rounds", "must be >= 1")
        _check(0 <= self.seed < 2**63, "seed", "must be in [0, 2^63) (torch's seed range)")
        from fedsilo.strategies import STRATEGIES

        strategy = STRATEGIES.get(self.strategy.name)
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
        releases under DP (docs/privacy.md): asking for them there is an error."""
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


def load_config(path: str | Path | None, *, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (YAML; None for defaults), apply ``key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}): not "
                              f"a configuration") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_one_line(exc)}") from None
        except RecursionError:
            raise ConfigError(f"config file {path} nests deeper than a configuration can "
                              f"(a YAML bomb or a generated file gone wrong)") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise ConfigError(f"config file {path} holds a value no configuration can: "
                              f"{exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping, "
                              f"got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides:
        apply_override(data, item)
    try:
        return config_from_dict(data)
    except ConfigError as exc:  # named with its file: a key is wrong in there (or in --set)
        if path is None:
            raise
        raise ConfigError(f"{path}: {exc}") from None


def config_from_dict(data: Mapping[str, Any]) -> Config:
    return _build(Config, data, "")


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict in place."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: "
                          f"{_one_line(exc)}") from None
    except RecursionError:
        raise ConfigError(f"override {item[:60]!r}...: value nests too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"override {item[:60]!r}...: {exc}") from None
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def _one_line(exc: Exception) -> str:
    """A YAML error's message on one line (PyYAML spreads it over several, with a caret)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()
                    and line.strip() != "^")


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


# -- building dataclasses from plain data ---------------------------------------------


_BOOL_WORDS = {True: ("on", "yes", "true"), False: ("off", "no", "false")}
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {what}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key '{where}' must be a mapping, got {_describe(data)}")
    if cls is StrategyConfig:
        return _build_strategy(data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; known keys of '{where}': {known}"
            )
        kwargs[key] = coerce_value(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _build_strategy(data: Mapping[str, Any], prefix: str) -> StrategyConfig:
    name = data.get("name", StrategyConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"config key '{prefix}name' must be a string, got {_describe(name)}")
    options = {k: v for k, v in data.items() if k != "name"}
    if "options" in options and isinstance(options["options"], Mapping):
        options = {**options.pop("options"), **options}  # accept the dumped form too
    return StrategyConfig(name=name, options=options)


def coerce_value(hint: Any, value: Any, key: str) -> Any:
    """``value`` as type ``hint``, or a :class:`ConfigError` naming ``key`` (a dotted path).

    The one coercion of the project: config keys and strategy options
    (:meth:`fedsilo.strategies.Strategy.validate_options`) both go through it.  Floats accept
    ints and the ``1e-3`` strings PyYAML leaves unparsed; ints accept integral floats.

    >>> coerce_value(float, "1e-3", "strategy.mu"), coerce_value(int, 3.0, "rounds")
    (0.001, 3)
    >>> coerce_value(int, 2.5, "rounds")
    Traceback (most recent call last):
    ...
    fedsilo.errors.ConfigError: config key 'rounds' must be an integer, got float 2.5
    """
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key '{key}' is invalid")
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            value = next((c for c in choices if c in _BOOL_WORDS[value]), value)
        if value not in choices:
            raise ConfigError(
                f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}"
            )
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads 1e-3 as a string; users mean a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {_describe(value)}")
        return value
    if origin in (Mapping, dict, collections.abc.Mapping) or hint in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {_describe(value)}")
        return dict(value)
    raise TypeError(f"config type {hint!r} of '{key}' is not supported")  # a bug, not user error


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, StrategyConfig):
        return {"name": obj.name, **{k: _to_plain(v) for k, v in obj.options.items()}}
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj
