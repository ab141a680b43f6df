"""The sections of how a run goes: participation, evaluation, checkpoints, the runtime."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic.dataclasses import dataclass

from fedsilo.config.schema import SECTION_CONFIG, Bool, Float, Int, Str, bool_words, check, setting


@dataclass(frozen=True, config=SECTION_CONFIG)
class ParticipationConfig:
    """Partial participation: each round trains ``max(min, ceil(fraction · n))`` of the n
    sites still in the federation, sampled without replacement from (seed, round)."""

    fraction: Float = setting(1.0, gt=0, le=1)
    min: Int = setting(1, ge=1)
    seed: Int = setting(0, ge=0, lt=2**63)


@dataclass(frozen=True, config=SECTION_CONFIG)
class EvalConfig:
    #: evaluate the global model on the test shard every N rounds (and always at the end)
    every: Int = setting(1, ge=1)
    batch_size: Int = setting(256, ge=1)


@dataclass(frozen=True, config=SECTION_CONFIG)
class CheckpointConfig:
    #: checkpoint every N rounds (and always after the last)
    every: Int = setting(1, ge=1)
    #: complete checkpoints kept on disk (older ones are deleted)
    keep: Int = setting(2, ge=1)
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
    site_dir: Str | None = None

    def __post_init__(self) -> None:
        check(self.site_dir is None or ("{site}" in self.site_dir
                                        and self.site_dir.count("{") == 1),
              "checkpoint.site_dir", "must name each site's own directory with one "
              "'{site}' (the site index), e.g. /data/hospital-{site}/fedsilo-state")


@dataclass(frozen=True, config=SECTION_CONFIG)
class RuntimeConfig:
    #: auto: cuda:(node-local rank mod device count) when CUDA is present, else cpu
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: torch threads per rank; 0 = the node's cores divided among its ranks
    threads: Int = setting(0, ge=0, le=1024, why="0: the node's cores divided among its ranks")
    #: progress bar on rank 0: auto (only on a TTY), on, off
    progress: Annotated[Literal["auto", "on", "off"], bool_words("on", "off")] = "auto"
    #: rank 0 writes TensorBoard event files to RUN_DIR/tensorboard/ as the run goes
    tensorboard: Bool = False
    #: precision of the summed updates on the wire.  float64 makes the sum exact in practice,
    #: so results do not depend on how sites are placed on ranks or on the Reduce's
    #: grouping (docs/strategies.md); fixed: 64-bit fixed point (aggregation.frac_bits), an
    #: integer sum that is exact in any order, on any number of nodes; float32 halves the
    #: bytes of the Reduce
    reduce_dtype: Literal["float32", "float64", "fixed"] = "float32"
    #: watchdog: end the job when a rank is silent this long in a round (seconds); null:
    #: automatic, 10x the slowest round so far and at least 300 s (docs/training.md)
    hang_timeout_s: Float | None = setting(None, gt=0, le=1e7,
                                           why="seconds, or null: automatic")
    #: watchdog: the allowance for loading the data and the first round after a (re)start
    first_round_timeout_s: Float = setting(1800.0, gt=0, le=1e7, why="seconds")
    #: the coordinator evaluates and checkpoints a round while the participants train the
    #: next one (same results and checkpoints; false: before the next round starts)
    overlap_eval: Bool = True


@dataclass(frozen=True, config=SECTION_CONFIG)
class SegmentationConfig:
    """Training and evaluation of segmentation shard sets (docs/segmentation.md)."""

    #: side of the square patches training crops from whole images, and of the sliding
    #: window evaluation and prediction use
    patch_size: Int = setting(128, ge=8, le=4096)
    #: probability that a patch is centred on a foreground pixel (nnU-Net's oversampling)
    foreground: Float = setting(0.5, ge=0, le=1)
    #: random flips and 90-degree rotations, of image and mask together
    augment: Bool = True
    #: overlap of neighbouring sliding windows, as a fraction of the window
    overlap: Float = setting(0.25, ge=0, lt=1)
    #: weight of (1 - soft Dice) beside the cross-entropy in the loss
    dice_weight: Float = setting(1.0, ge=0)
