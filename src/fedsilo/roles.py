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
from typing import Any, Collection

import numpy as np
import torch

from fedsilo.comm import World
from fedsilo.config import Config
from fedsilo.errors import ModelError
from fedsilo.models import build_for
from fedsilo.rundir import RunDir
from fedsilo.runtime import configure_threads, defer_dynamo_import, select_device
from fedsilo.shards import Manifest, check_listed_shard
from fedsilo.tasks import build_task
from fedsilo.transport import Transport
from fedsilo.verification import plan_weights, user_weights  # noqa: F401 - re-exported
from fedsilo.weights import WeightLayout


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


def uses_secret(config: Config) -> bool:
    """Whether a site's mechanisms draw randomness (DP-SGD, or a user-level noise share)."""
    return config.dp.enabled or (config.dp.user.enabled and config.dp.user.noise == "distributed")


def checkpoint_due(config: Config, round_index: int) -> bool:
    return round_index % config.checkpoint.every == 0 or round_index == config.rounds


def reduce_buffer(config: Config, layout: WeightLayout, *, control_variates: bool,
                  pinned: bool) -> np.ndarray:
    """Where a rank's sum of weighted updates is built (participants) or lands
    (coordinator): float32, or float64 with runtime.reduce_dtype (not under CKKS, which
    decrypts to float32); twice the model for SCAFFOLD's control variates."""
    width = layout.numel * (2 if control_variates else 1)
    if config.runtime.reduce_dtype == "float64" and not config.he.enabled:
        return np.empty(width, dtype=np.float64)
    return layout.empty(pinned=pinned) if not control_variates \
        else np.empty(width, dtype=np.float32)
