"""What both roles of a round share, and the policies both must compute alike.

The coordinator (:mod:`fedsilo.coordinator`) plans, sums and records a round; a participant
(:mod:`fedsilo.participant`) trains its sites and contributes.  Neither calls MPI:
:mod:`fedsilo.federation` owns the order of collectives, and a
:mod:`~fedsilo.transport` adds the contributions up.  The messages between them are the
dataclasses of :mod:`fedsilo.messages`; the metrics rows and the summary are
:mod:`fedsilo.report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Protocol, Sequence

import numpy as np
import torch

from fedsilo.comm import World
from fedsilo.config import Config
from fedsilo.errors import ConfigError, ModelError
from fedsilo.models import build_for
from fedsilo.rundir import RunDir
from fedsilo.runtime import configure_threads, defer_dynamo_import, select_device
from fedsilo.shards import Manifest, check_listed_shard
from fedsilo.tasks import build_task
from fedsilo.transport import Transport
from fedsilo.verification import plan_weights, user_weights  # noqa: F401 - re-exported
from fedsilo.weights import WeightLayout

if TYPE_CHECKING:
    from fedsilo.errors import FedsiloError
    from fedsilo.messages import (
        Aggregate,
        Contribution,
        FinalSiteReport,
        RankReport,
        RoundOutcome,
        RoundPlan,
    )


class RoundRole(Protocol):
    """What the round (:mod:`fedsilo.federation`) asks of every rank's role, in its order.

    Start-up: ``key_summary`` and ``identity_summary`` (what each rank read, compared on
    every rank), ``peers`` and ``session`` set by the federation.  Each round: the
    ``global_weights`` (and SCAFFOLD's ``global_control``) broadcast into, ``local_round``
    (train the rank's sampled sites; its report and any foreseeable error, agreed on by
    every rank), ``check_outcome`` (secure modes: each participant checks what the
    coordinator summarized against its own sites), ``contribution_of_rank`` (what the
    ``transport`` adds up).  The end: ``final_validation`` and ``finish_job``.

    A :class:`~fedsilo.participant.Participant` does the work; the coordinator trains no
    site, so its local round, check and validation are empty.  What only the coordinator
    does is :class:`PlanningRole`.
    """

    transport: Transport
    #: the participants' own communicator (None on the coordinator)
    peers: Any
    #: secure modes: the fingerprint of the participants' joint seed ("" elsewhere)
    session: str
    global_weights: np.ndarray

    @property
    def global_control(self) -> np.ndarray | None: ...
    def key_summary(self) -> dict[str, Any] | None: ...
    def identity_summary(self) -> str | None: ...
    def local_round(self, plan: RoundPlan) -> tuple[RankReport | None,
                                                    FedsiloError | None]: ...
    def contribution_of_rank(self) -> Contribution: ...
    def check_outcome(self, outcome: RoundOutcome) -> FedsiloError | None: ...
    def final_validation(self) -> tuple[list[FinalSiteReport] | None,
                                        FedsiloError | None]: ...
    def finish_job(self, reports: Sequence[Any]) -> None: ...


class PlanningRole(RoundRole, Protocol):
    """The coordinator's part besides (:class:`~fedsilo.coordinator.Coordinator`): it plans
    each round, summarizes the ranks' reports into the round's outcome, and runs the
    server step, returning the round's record (evaluation, checkpoint, metrics row) for the
    federation to run while the next round trains."""

    def restore_metrics_row(self) -> None: ...
    def plan(self, round_index: int) -> RoundPlan: ...
    def outcome(self, plan: RoundPlan, reports: Sequence[RankReport | None]) -> RoundOutcome: ...
    def finish_round(self, plan: RoundPlan, reports: Sequence[Any], timer: Any, *,
                     outcome: RoundOutcome,
                     aggregate: Aggregate | None) -> Callable[[], None]: ...


class Role:
    """What both roles share: device, threads, the model and its flat weight buffers."""

    def __init__(self, *, world: World, config: Config, manifest: Manifest, run_dir: RunDir,
                 resume_round: int, site_map: dict[int, int | None] | None = None,
                 returning: dict[int, dict[str, Any]] | None = None,
                 checked: Collection[Path] = ()) -> None:
        self.world, self.config, self.manifest, self.run_dir = world, config, manifest, run_dir
        self.resume_round = resume_round
        #: a resume on a changed federation: each site's index in the checkpoint (None: it
        #: joins now); None when the federation is the one the checkpoint was trained on
        self.site_map = site_map
        #: sites that left earlier and come back with the same data: their archived state
        #: (``departed/index.json`` entries, federation.py)
        self.returning = returning or {}
        #: the shard paths this rank already checked against the manifest at start-up
        self.checked = set(checked)
        if noised_validation(config) and manifest.num_classes != 2:
            raise ConfigError(f"dp.validation releases a histogram of p(positive class), for "
                              f"binary tasks; this shard set has {manifest.num_classes} "
                              f"classes: set dp.validation.enabled=false")
        self.threads = configure_threads(config.runtime.threads, local_size=world.local_size)
        defer_dynamo_import()  # an optimizer no longer costs an import of torch._dynamo
        self.device = select_device(config.runtime.device, local_rank=world.local_rank,
                                    is_coordinator=world.is_coordinator)
        #: classification or segmentation (tasks.py): loading, loss, evaluation
        self.task = build_task(config)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        channels, height, width = manifest.image_shape
        self.model = build_for(config, in_channels=channels, num_classes=manifest.num_classes,
                               image_size=self.task.image_size(height, width),
                               dense=self.task.dense).to(self.device)
        self.layout = WeightLayout.of(self.model)
        self.pinned = self.device.type == "cuda"
        self.global_weights = self.layout.flatten(self.model,
                                                  out=self.layout.empty(pinned=self.pinned))
        #: encrypted aggregation: the loaded key file
        self.keys: Any = None
        #: how this rank's contribution is added up (set by the role: it holds the keys)
        self.transport: Transport
        #: participants: the participants' own communicator, without the coordinator (set by
        #: the federation); None on the coordinator
        self.peers: Any = None
        #: secure modes, participants: the fingerprint of the joint session seed (set by
        #: the federation; crypto/session.py)
        self.session = ""

    def key_summary(self) -> dict[str, Any] | None:
        """What this rank tells the others about its keys: ids and parameters, no key."""
        return None if self.keys is None else self.keys.summary()

    def identity_summary(self) -> str | None:
        """Masks: the sha256 of the public key list this rank read (None: the coordinator)."""
        return None

    def _load_ckks(self, kind: str) -> Any:
        """The CKKS key file of this role (``kind``: participant or coordinator) and a codec."""
        from fedsilo.crypto import CODECS
        from fedsilo.crypto.ckks import COORDINATOR_FILE, PARTICIPANT_FILE, load_keys

        name = PARTICIPANT_FILE if kind == "participant" else COORDINATOR_FILE
        self.keys = load_keys(Path(self.config.he.keys) / name, expect=kind,
                              **({"num_threads": self.threads} if kind == "participant" else {}))
        workers = (self.config.he.workers or self.threads) if kind == "participant" else 1
        return CODECS.get("ckks")(keys=self.keys, workers=workers)

    def _shard_path(self, entry: Any, *, kind: str) -> Path:
        """The path of the shard ``entry`` of the manifest, checked against it (already, when
        the torch-free check at start-up did it: :func:`fedsilo.federation.run_job`); the
        role reads it batch by batch (``loading.py``)."""
        config = self.config
        path = self.manifest.path_of(entry, config.data.dir)
        if path not in self.checked:
            check_listed_shard(self.manifest, config.data.dir, entry, kind=kind,
                               verify_hash=config.data.verify_hashes)
        return path

    def _check_model_fits(self, sample: torch.Tensor) -> None:
        try:
            with torch.no_grad():
                self.model.eval()
                logits = self.model(sample[:1])
        except RuntimeError as exc:
            raise ModelError(f"model {self.config.model.name!r} cannot process images of shape "
                             f"{tuple(sample.shape[1:])}: {exc}") from None
        problem = self.task.check_output(logits, self.manifest.num_classes)
        if problem is not None:
            raise ModelError(f"model {self.config.model.name!r} {problem}")

    def _normalization(self, split: Any) -> tuple[Any, Any]:
        mode = self.config.data.normalize
        if mode == "none":
            channels = self.manifest.image_shape[0]
            return [0.0] * channels, [1.0] * channels
        if mode == "site" and split is not None:
            return split.mean, np.maximum(split.std, 1e-6)
        return self.manifest.normalization_mean, np.maximum(self.manifest.normalization_std, 1e-6)



def private(config: Config) -> bool:
    """Whether a DP guarantee covers this run: then nothing computed on a site's private data
    without noise (losses, validation metrics, update norms, timings) leaves the site."""
    return config.dp.enabled or config.dp.user.enabled


def noised_validation(config: Config) -> bool:
    """Whether the sites release noised validation histograms under DP-SGD (dp.validation):
    the only validation figures that leave a site under DP."""
    return config.dp.enabled and config.dp.validation.enabled


def uses_secret(config: Config) -> bool:
    """Whether a site's mechanisms draw randomness (DP-SGD, or a user-level noise share)."""
    return config.dp.enabled or (config.dp.user.enabled and config.dp.user.noise == "distributed")


def checkpoint_due(config: Config, round_index: int) -> bool:
    return round_index % config.checkpoint.every == 0 or round_index == config.rounds


def reduce_buffer(config: Config, layout: WeightLayout, *, control_variates: bool,
                  pinned: bool) -> np.ndarray:
    """Where a rank's sum of weighted updates is built (participants) or lands
    (coordinator): float32, or float64 with runtime.reduce_dtype float64 or fixed (the
    rank's sites are summed in float64 before the fixed-point encoding; not under CKKS, which
    decrypts to float32); twice the model for SCAFFOLD's control variates."""
    width = layout.numel * (2 if control_variates else 1)
    if config.runtime.reduce_dtype in ("float64", "fixed") and not config.he.enabled:
        return np.empty(width, dtype=np.float64)
    return layout.empty(pinned=pinned) if not control_variates \
        else np.empty(width, dtype=np.float32)
