"""What each rank does between the collectives of a round: the coordinator and a participant.

Neither class calls MPI; :mod:`fedsilo.federation` owns the order of collectives.
Participant ``k`` is MPI rank ``k`` and owns shard ``site-(k-1)``; no other rank opens it.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from fedsilo import __version__
from fedsilo.aggregate import count_nonfinite
from fedsilo.comm import World
from fedsilo.config import Config
from fedsilo.errors import CheckpointError, DataError, FedsiloError, ModelError, UpdateError
from fedsilo.models import build_model
from fedsilo.participation import assign_sites, rank_of_sites, sample_sites
from fedsilo.privacy import PrivacyAccountant, userlevel
from fedsilo.progress import RoundProgress
from fedsilo.rundir import RunDir, atomic_torch_save, dump_json, finite_json, load_torch
from fedsilo.runtime import configure_threads, select_device
from fedsilo.shards import Manifest, check_shard, read_shard
from fedsilo.strategies import build_strategy
from fedsilo.training import (LocalStats, TensorSplit, evaluate, gradient_corrections,
                              make_optimizer, planned_steps, round_lr, round_seed, sgd_travel,
                              train_local)
from fedsilo.weights import WeightLayout

log = logging.getLogger("fedsilo")

#: seeds the user-level DP noise apart from every other random stream of a (round, site)
_NOISE_STREAM = 0x5EED_D9


class _Role:
    """What both roles share: device, threads, the model and its flat weight buffers."""

    def __init__(self, *, world: World, config: Config, manifest: Manifest, run_dir: RunDir,
                 resume_round: int) -> None:
        self.world, self.config, self.manifest, self.run_dir = world, config, manifest, run_dir
        self.resume_round = resume_round
        self.threads = configure_threads(config.runtime.threads, local_size=world.local_size)
        self.device = select_device(config.runtime.device, local_rank=world.local_rank,
                                    is_coordinator=world.is_coordinator)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        channels, height, width = manifest.image_shape
        self.model = build_model(config.model.name, in_channels=channels,
                                 num_classes=manifest.num_classes, image_size=(height, width),
                                 norm_groups=config.model.norm_groups).to(self.device)
        self.layout = WeightLayout.of(self.model)
        self.pinned = self.device.type == "cuda"
        self.global_weights = self.layout.flatten(self.model,
                                                  out=self.layout.empty(pinned=self.pinned))
        #: encrypted aggregation: the loaded key file and (participants) the codec
        self.keys: Any = None
        self.codec: Any = None

    def key_summary(self) -> dict[str, Any] | None:
        """What this rank tells the others about its keys: ids and parameters, no key."""
        return None if self.keys is None else self.keys.summary()

    def _check_model_fits(self, sample: torch.Tensor) -> None:
        try:
            with torch.no_grad():
                self.model.eval()
                logits = self.model(sample[:1])
        except RuntimeError as exc:
            raise ModelError(f"model {self.config.model.name!r} cannot process images of shape "
                             f"{tuple(sample.shape[1:])}: {exc}") from None
        if logits.shape[-1] != self.manifest.num_classes:
            raise ModelError(f"model {self.config.model.name!r} outputs {logits.shape[-1]} "
                             f"classes, the shard set has {self.manifest.num_classes}")

    def _normalization(self, split: Any) -> tuple[Any, Any]:
        mode = self.config.data.normalize
        if mode == "none":
            channels = self.manifest.image_shape[0]
            return [0.0] * channels, [1.0] * channels
        if mode == "site" and split is not None:
            return split.mean, np.maximum(split.std, 1e-6)
        return self.manifest.normalization_mean, np.maximum(self.manifest.normalization_std, 1e-6)


@dataclass
class Site:
    """One site's data and the state that stays with it on its rank."""

    index: int
    train_data: TensorSplit
    val_data: TensorSplit
    privacy: Any = None
    #: SCAFFOLD: this site's control variate c_k (float32, model-sized)
    control: np.ndarray | None = None
    rounds_trained: int = 0

    @property
    def name(self) -> str:
        return f"participant {self.index} (site-{self.index:03d})"


class Participant(_Role):
    """A participant rank: one site (``site-(rank-1)``), or several in turn when the shard
    set has more sites than there are participant ranks (``fedsilo.participation``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        world, manifest, config = self.world, self.manifest, self.config
        self.strategy = build_strategy(config.strategy.name, dict(config.strategy.options))
        indexes = assign_sites(num_sites=manifest.num_sites,
                               num_ranks=world.num_participants)[world.rank - 1]
        self.sites: list[Site] = []
        for index in indexes:
            entry = manifest.sites[index]
            path = Path(config.data.dir) / entry.file
            check_shard(path, kind="site",
                        expected_sha256=entry.sha256 if config.data.verify_hashes else None,
                        image_shape=tuple(manifest.image_shape),
                        num_classes=manifest.num_classes, required_splits=("train", "val"))
            shard = read_shard(path)
            mean, std = self._normalization(shard.splits["train"])
            train = shard.splits["train"]
            val = shard.splits["val"]
            self.sites.append(Site(
                index=index,
                train_data=TensorSplit.from_arrays(train.images, train.labels, mean=mean,
                                                   std=std, device=self.device),
                val_data=TensorSplit.from_arrays(val.images, val.labels, mean=mean, std=std,
                                                 device=self.device)))
            del shard
        self._check_model_fits(self.sites[0].train_data.images)
        numel = self.layout.numel
        self.local_weights = self.layout.empty(pinned=self.pinned)
        self.delta = self.layout.empty()
        self.contribution = self.layout.empty()
        width = 2 * numel if self.strategy.control_variates else numel
        # the rank's sum of its sites' weighted updates: what the Reduce (or CKKS) adds up
        wide = config.runtime.reduce_dtype == "float64" and not config.he.enabled
        self.reduce_buffer = np.empty(width, dtype=np.float64) if wide \
            else self.layout.empty(pinned=self.pinned) if width == numel \
            else np.empty(width, dtype=np.float32)
        #: non-linear strategies: this round's unweighted updates, one row per contributor
        self.rows: np.ndarray | None = None
        self.global_control = np.zeros(numel, dtype=np.float32) \
            if self.strategy.control_variates else None
        self._param_views = _param_slices(self.model, self.layout)
        if config.dp.enabled:
            from fedsilo.privacy.engine import ParticipantPrivacy

            first = None
            for site in self.sites:
                site.privacy = ParticipantPrivacy(
                    self.model, site=site.index, settings=config.dp.for_site(site.index),
                    mechanism=config.dp.accountant, num_samples=len(site.train_data),
                    train=config.train, rounds=config.rounds, model_name=config.model.name,
                    sample=site.train_data.images, mode=config.dp.grad_sample_mode,
                    shared=first)
                first = first or site.privacy
        if self.strategy.control_variates:
            for site in self.sites:
                site.control = np.zeros(numel, dtype=np.float32)
        #: this round's serialized ciphertext (encrypted aggregation only)
        self.payload: bytes | None = None
        if config.he.enabled:
            from fedsilo.crypto import CODECS
            from fedsilo.crypto.ckks import PARTICIPANT_FILE, load_keys
            from fedsilo.crypto.params import validate

            self.keys = load_keys(Path(config.he.keys) / PARTICIPANT_FILE, expect="participant",
                                  num_threads=self.threads)
            validate(self.keys.params, num_participants=manifest.num_sites)
            self.codec = CODECS.get("ckks")(keys=self.keys)
        if self.resume_round:
            for site in self.sites:
                self._load_checkpoint(site, self.resume_round)

    # -- state that stays on this rank --------------------------------------------------

    def state_dict(self, site: Site, round_index: int) -> dict[str, Any]:
        # Each round's randomness is derived from (seed, round, site), so no RNG state is
        # needed to continue exactly: only accountants and control variates are saved.
        state: dict[str, Any] = {"round": round_index, "site": site.index,
                                 "rounds_trained": site.rounds_trained}
        if site.privacy is not None:
            state["privacy"] = site.privacy.state_dict()
        if site.control is not None:
            state["control"] = torch.from_numpy(site.control.copy())
        return state

    def _save(self, site: Site, round_index: int) -> None:
        atomic_torch_save(self.run_dir.participant_checkpoint(round_index, site.index),
                          self.state_dict(site, round_index))

    def _load_checkpoint(self, site: Site, round_index: int) -> None:
        path = self.run_dir.participant_checkpoint(round_index, site.index)
        state = load_torch(path)
        if state.get("site") != site.index or state.get("round") != round_index:
            raise CheckpointError(f"checkpoint {path} belongs to site {state.get('site')} round "
                                  f"{state.get('round')}, expected site {site.index} round "
                                  f"{round_index}")
        site.rounds_trained = int(state["rounds_trained"])
        if site.privacy is not None:
            if "privacy" not in state:
                raise CheckpointError(f"checkpoint {path} has no privacy accountant, but this "
                                      f"run trains with DP (dp.enabled); resume it without DP")
            site.privacy.load_state_dict(state["privacy"])
        if site.control is not None:
            if "control" not in state:
                raise CheckpointError(f"checkpoint {path} has no control variate, but strategy "
                                      f"{self.config.strategy.name!r} keeps one per site")
            site.control[:] = state["control"].numpy()

    # -- a round ----------------------------------------------------------------------

    def plan(self, round_index: int) -> None:  # only the coordinator plans
        raise AssertionError("participants do not plan rounds")

    def local_round(self, plan: dict[str, Any]) -> tuple[dict[str, Any], FedsiloError | None]:
        """Train each of this rank's sites that the plan samples, in turn; returns the
        rank's report (one per site, and the rank's encryption figures) and the first error
        that ends the job (None if none)."""
        round_index = plan["round"]
        begin = time.perf_counter()
        deadline = None if self.config.train.round_deadline_s is None \
            else begin + self.config.train.round_deadline_s
        self.reduce_buffer.fill(0)
        rows: list[np.ndarray] = []
        reports: list[dict[str, Any]] = []
        error: FedsiloError | None = None
        for site in self.sites:
            if error is not None:
                reports.append(self._sit_out(site, round_index, reason="job failed"))
                continue
            report, error = self._site_round(site, plan, deadline, rows)
            reports.append(report)
        if error is not None:
            self.reduce_buffer.fill(0)
        if not self.strategy.linear:
            self.rows = np.stack(rows) if rows else None
        he = None
        if self.codec is not None and error is None and self.world.rank in plan["ranks"]:
            he = self._encrypt_update(round_index)
        return {"sites": reports, "he": he}, error

    def _site_round(self, site: Site, plan: dict[str, Any], deadline: float | None,
                    rows: list[np.ndarray]) -> tuple[dict[str, Any], FedsiloError | None]:
        round_index = plan["round"]
        privacy = site.privacy
        if privacy is not None and site.index in plan["weights"] and not privacy.round_fits():
            if self.config.dp.budget_policy == "abort":
                return self._sit_out(site, round_index, reason="budget"), \
                    privacy.budget_error(round_index)
            if privacy.stopped_round is None:
                privacy.stopped_round = round_index
                log.warning("participant %d stops contributing in round %d: another round "
                            "would take ε from %.3f to %.3f > budget %s", site.index,
                            round_index, privacy.epsilon, privacy.next_round_epsilon(),
                            privacy.settings.target_epsilon)
            return self._sit_out(site, round_index, reason="budget"), None
        if site.index not in plan["weights"]:
            return self._sit_out(site, round_index, reason="not planned"), None
        if deadline is not None and time.perf_counter() >= deadline:
            return self._sit_out(site, round_index, reason="deadline"), None
        weight = plan["weights"][site.index]
        begin = time.perf_counter()
        self.layout.load(self.model, self.global_weights)
        validation = evaluate(self.model, site.val_data, batch_size=self.config.eval.batch_size)
        val_seconds = time.perf_counter() - begin
        try:
            stats, planned = self._train(site, round_index, deadline)
            if stats.steps == 0:
                return self._sit_out(site, round_index, reason="deadline"), None
            update = self._update(site, round_index, stats, planned, weight)
        except (DataError, UpdateError) as exc:
            # DP: the accountant has already recorded every step taken (engine.train_round)
            if self.config.on_participant_error == "skip":
                log.warning("%s is dropped from round %d: %s", site.name, round_index, exc)
                report = self._sit_out(site, round_index, reason="error")
                report["error"] = f"{type(exc).__name__}: {exc}"
                return report, None
            return self._sit_out(site, round_index, reason="error"), exc
        scale, control_scale = update
        numel = self.layout.numel
        if self.strategy.linear:
            # u_k = scale · Δ_k in float32 (bit-identical wherever the site runs), then
            # added to the rank's sum; user-level DP's distributed share goes on u_k
            np.multiply(self.delta, np.float32(scale), out=self.contribution)
            user_dp = self.config.dp.user
            if user_dp.enabled and user_dp.noise == "distributed":
                userlevel.add_noise(self.contribution, std=plan["user_noise_std"],
                                    seed=(self.config.seed, round_index, site.index,
                                          _NOISE_STREAM))
            self.reduce_buffer[:numel] += self.contribution
        else:
            rows.append(self.delta.copy())
        if self.strategy.control_variates:
            np.multiply(self._control_delta, np.float32(control_scale), out=self.contribution)
            self.reduce_buffer[numel:] += self.contribution
            site.control += self._control_delta
        site.rounds_trained += 1
        begin_ckpt = time.perf_counter()
        if _checkpoint_due(self.config, round_index):
            self._save(site, round_index)
        now = time.perf_counter()
        return {"site": site.index, "num_samples": len(site.train_data),
                "steps": stats.steps, "planned_steps": planned,
                "train_loss": stats.loss, "train_s": stats.seconds, "val": validation,
                "val_s": val_seconds, "checkpoint_s": now - begin_ckpt,
                "local_s": now - begin, "contributed": True,
                "privacy": self._privacy_report(site), "update_norm": self._update_norm}, None

    def _train(self, site: Site, round_index: int, deadline: float | None
               ) -> tuple[LocalStats, int]:
        """Local training of ``site`` from the global weights (already loaded)."""
        seed = round_seed(self.config.seed, round_index, site.index)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        optimizer = make_optimizer(self.model, self.config.train, round_index=round_index)
        corrections = self._corrections(site)
        if corrections is not None:
            optimizer.register_step_pre_hook(corrections)
        if site.privacy is None:
            stats = train_local(self.model, site.train_data, config=self.config.train,
                                optimizer=optimizer, generator=generator, deadline=deadline)
            return stats, planned_steps(len(site.train_data), self.config.train)
        stats = LocalStats(*site.privacy.train_round(site.train_data, optimizer=optimizer,
                                                     generator=generator, deadline=deadline))
        return stats, site.privacy.steps_per_round

    def _corrections(self, site: Site) -> Any:
        """A step pre-hook adding FedProx's μ(w − w_global) and SCAFFOLD's c − c_k to each
        gradient (after DP-SGD's clipping and noise: both are functions of public or already
        privatized quantities), or None."""
        mu = float(self.strategy.proximal_mu)
        drift = None
        if self.strategy.control_variates:
            drift = torch.from_numpy(self.global_control - site.control).to(self.device)
        if not mu and drift is None:
            return None
        return gradient_corrections(self._param_views, mu=mu, drift=drift)

    def _update(self, site: Site, round_index: int, stats: LocalStats, planned: int,
                weight: float) -> tuple[float, float]:
        """Δ_k into ``self.delta`` (clipped under user-level DP, noised for its share), SCAFFOLD's
        Δc_k; returns the factors the rank's sum takes Δ_k and Δc_k with."""
        self.layout.flatten(self.model, out=self.local_weights)
        np.subtract(self.local_weights, self.global_weights, out=self.delta)
        bad = count_nonfinite(self.delta)
        if bad:
            raise UpdateError(f"{site.name} produced an update with {bad} non-finite values "
                              f"(NaN/Inf) in round {round_index}; lower train.lr or check its "
                              f"data")
        user_dp = self.config.dp.user
        self._update_norm = None
        if user_dp.enabled:  # DP-FedAvg: clip Δ_k before weighting, noise share after
            self._update_norm = userlevel.clip_in_place(self.delta, clip_norm=user_dp.clip_norm)
        # stragglers: a partial round counts for the share of its planned steps it did, or
        # (FedNova) every update is per step and the coordinator rescales the sum
        factor = 1.0 / stats.steps if self.config.train.normalize_steps \
            else stats.steps / planned
        if self.codec is not None:
            self._check_encryptable(site, round_index, factor)
        if self.strategy.control_variates:
            # option II: c_k+ = c_k − c + (w − w_k) / (K η); K η generalized to SGD with
            # momentum as the distance K steps travel per unit of constant gradient
            train = self.config.train
            travel = sgd_travel(round_lr(train, round_index), train.momentum, stats.steps)
            self._control_delta = -self.global_control - self.delta / np.float32(travel)
        return weight * factor, weight

    def _check_encryptable(self, site: Site, round_index: int, factor: float) -> None:
        # The precision guarantee holds while every value stays below max_abs; checking
        # each weighted update against max_abs · weight bounds every partial sum too.
        limit = self.keys.params.max_abs
        peak = float(np.abs(self.delta).max()) * factor if self.delta.size else 0.0
        if peak > limit:
            raise UpdateError(
                f"{site.name} produced an update with |delta| = {peak:.3g} in round "
                f"{round_index}, beyond the {limit:g} the CKKS parameters can encrypt exactly; "
                f"lower train.lr or create keys with a smaller --scale-bits")

    def _privacy_report(self, site: Site) -> dict[str, Any] | None:
        if site.privacy is None:
            return None
        report = site.privacy.report()
        # the coordinator plans the next round with this: a site that cannot afford it sits out
        report["next_round_fits"] = site.privacy.round_fits()
        return report

    def _sit_out(self, site: Site, round_index: int, *, reason: str) -> dict[str, Any]:
        """The report of a site that does not contribute this round (its update is zero)."""
        if _checkpoint_due(self.config, round_index):
            self._save(site, round_index)
        return {"site": site.index, "num_samples": len(site.train_data), "contributed": False,
                "reason": reason, "privacy": self._privacy_report(site)}

    def _encrypt_update(self, round_index: int) -> dict[str, Any]:
        """Encrypt this rank's sum (one ciphertext per rank; a rank with nothing to add
        encrypts zeros, as the tree sums one ciphertext per participant rank)."""
        begin = time.perf_counter()
        ciphertext = self.codec.encrypt(self.reduce_buffer)
        self.payload = self.codec.to_bytes(ciphertext)
        del ciphertext
        return {"encrypt_s": time.perf_counter() - begin,
                "ciphertext_bytes": len(self.payload)}

    def decrypt_aggregate(self, total: Any) -> dict[str, Any]:
        """On the aggregating participant: decrypt the encrypted sum into ``reduce_buffer``."""
        begin = time.perf_counter()
        self.codec.decrypt_into(total, self.reduce_buffer)
        return {"decrypt_s": time.perf_counter() - begin}

    def finish_round(self, plan: dict[str, Any], reports: Sequence[Any], timer: Any) -> None:
        pass

    def final_validation(self) -> tuple[dict[str, Any], None]:
        self.layout.load(self.model, self.global_weights)
        return {"sites": [{"site": site.index,
                           "val": evaluate(self.model, site.val_data,
                                           batch_size=self.config.eval.batch_size),
                           "privacy": self._privacy_report(site)} for site in self.sites]}, None

    def finish_job(self, reports: Sequence[Any]) -> None:
        pass


def _param_slices(model: nn.Module, layout: WeightLayout) -> list[tuple[torch.Tensor, int, int]]:
    """Each trainable parameter with its offset and length in the flat layout."""
    offsets = dict(zip(layout.names, layout.offsets))
    return [(p, offsets[name], p.numel()) for name, p in model.named_parameters()
            if p.requires_grad and name in offsets]


class Coordinator(_Role):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config, manifest = self.config, self.manifest
        path = Path(config.data.dir) / manifest.test.file
        check_shard(path, kind="test",
                    expected_sha256=manifest.test.sha256 if config.data.verify_hashes else None,
                    image_shape=tuple(manifest.image_shape), num_classes=manifest.num_classes,
                    required_splits=("test",))
        split = read_shard(path).splits["test"]
        mean, std = self._normalization(None)
        self.test_data = TensorSplit.from_arrays(split.images, split.labels, mean=mean, std=std,
                                                 device=self.device)
        self._check_model_fits(self.test_data.images)
        self.strategy = build_strategy(config.strategy.name, dict(config.strategy.options))
        self.strategy.setup(self.layout.numel)
        self.num_samples = {i: int(site.num_samples["train"]) for i, site in enumerate(manifest.sites)}
        self.rank_of_site = rank_of_sites(num_sites=manifest.num_sites,
                                          num_ranks=self.world.num_participants)
        width = self.layout.numel * (2 if self.strategy.control_variates else 1)
        wide = config.runtime.reduce_dtype == "float64" and not config.he.enabled
        #: where the Reduce (or the decrypted sum) lands, and the float32 aggregate
        self.reduce_buffer = np.empty(width, dtype=np.float64) if wide \
            else self.layout.empty(pinned=self.pinned) if not self.strategy.control_variates \
            else np.empty(width, dtype=np.float32)
        self.aggregate = np.empty(width, dtype=np.float32) if wide else self.reduce_buffer
        #: non-linear strategies: this round's individual updates, gathered
        self.rows: np.ndarray | None = None
        #: the aggregating participant's report of the last encrypted reduction
        self.he_round: dict[str, Any] | None = None
        if config.he.enabled:
            from fedsilo.crypto.ckks import COORDINATOR_FILE, load_keys

            # only the public context: the coordinator never opens the participant key
            self.keys = load_keys(Path(config.he.keys) / COORDINATOR_FILE, expect="coordinator")
        self.last_test: dict[str, Any] | None = None
        #: each participant's latest privacy report, and the round a site stopped in
        self.privacy: dict[int, dict[str, Any]] = {}
        self.stopped: dict[int, int] = {}
        self.user_accountant = PrivacyAccountant("rdp") if config.dp.user.enabled else None
        self.started = time.perf_counter()
        if self.resume_round:
            self._load_checkpoint(self.resume_round)
        self._control_buffer: np.ndarray | None = None
        self.progress = RoundProgress(total=config.rounds, done=self.resume_round,
                                      mode=config.runtime.progress)
        log.info("%d participants (%d sites), model %s with %d parameters (%.1f MB per "
                 "transfer), %d threads per rank, device %s", self.world.num_participants,
                 len(self.num_samples), config.model.name,
                 self.layout.numel, self.layout.numel * 4 / 1e6, self.threads, self.device)

    @property
    def global_control(self) -> np.ndarray | None:
        """SCAFFOLD's server control variate c (a send buffer for the broadcast), else None."""
        control = self.strategy.server_control
        if control is None:
            return None
        if self._control_buffer is None:
            self._control_buffer = np.empty_like(control)
        np.copyto(self._control_buffer, control)
        return self._control_buffer

    def _load_checkpoint(self, round_index: int) -> None:
        path = self.run_dir.coordinator_checkpoint(round_index)
        state = load_torch(path)
        if list(state.get("layout", [])) != list(self.layout.names):
            raise CheckpointError(f"checkpoint {path} holds a different model than "
                                  f"{self.config.model.name!r}")
        self.global_weights[:] = state["weights"].numpy()
        self.strategy.load_state_dict({k: v.numpy() if torch.is_tensor(v) else v
                                       for k, v in state["strategy"].items()})
        self.last_test = state.get("last_test")
        privacy = json.loads(state.get("privacy", "{}"))
        self.privacy = {int(k): v for k, v in privacy.get("reports", {}).items()}
        self.stopped = {int(k): v for k, v in privacy.get("stopped", {}).items()}
        if self.user_accountant is not None:
            self.user_accountant.load_state_dict(privacy["user_accountant"])
        rows = self.run_dir.read_metrics()
        if (not rows or rows[-1]["round"] < round_index) and state.get("metrics_row"):
            self.run_dir.append_metrics(json.loads(state["metrics_row"]))

    def plan(self, round_index: int) -> dict[str, Any]:
        if self.config.dp.budget_policy == "stop":
            for site, report in sorted(self.privacy.items()):
                if not report["next_round_fits"]:
                    self._mark_stopped(site, round_index)
        available = [k for k in sorted(self.num_samples) if k not in self.stopped]
        if not available:
            log.warning("every participant has spent its privacy budget; the job ends before "
                        "round %d", round_index)
            return {"round": round_index, "stop": True, "participants": [], "weights": {},
                    "ranks": []}
        share = self.config.participation
        participants = sample_sites(available, fraction=share.fraction, minimum=share.min,
                                    seed=share.seed, round_index=round_index)
        weights = self.strategy.client_weights({k: self.num_samples[k] for k in participants})
        plan = {"round": round_index, "stop": False, "participants": participants,
                "weights": weights,
                # the participant ranks that take part: the others idle (no weights, no upload)
                "ranks": sorted({self.rank_of_site[k] for k in participants})}
        user_dp = self.config.dp.user
        if user_dp.enabled:
            plan["user_noise_std"] = userlevel.noise_std(
                noise_multiplier=user_dp.noise_multiplier, clip_norm=user_dp.clip_norm,
                weights=weights, share=user_dp.noise == "distributed")
        return plan

    def local_round(self, plan: dict[str, Any]) -> tuple[None, None]:
        return None, None  # the coordinator adds nothing to the sum (World.reduce_sum)

    def finish_round(self, plan: dict[str, Any], reports: Sequence[Any], timer: Any) -> None:
        round_index = plan["round"]
        ranks = reports[1:]
        sites = [r for rank in ranks for r in rank["sites"]]
        self._note_privacy(round_index, sites)
        contributors = [r for r in sites if r["contributed"]]
        with timer("server_step"):
            if contributors:
                aggregate = self._aggregate(plan, contributors)
                if self.user_accountant is not None and self.config.dp.user.noise == "central":
                    userlevel.add_noise(aggregate[: self.layout.numel],
                                        std=plan["user_noise_std"],
                                        seed=(self.config.seed, round_index, _NOISE_STREAM))
                fraction = len(contributors) / len(self.num_samples)
                self.strategy.server_step(self.global_weights, aggregate,
                                          out=self.global_weights, fraction=fraction)
                if count_nonfinite(self.global_weights):
                    raise UpdateError(f"the aggregated model of round {round_index} is not "
                                      f"finite")
            else:
                log.warning("round %d: no participant contributed; the global model stays as "
                            "it was", round_index)
        if self.user_accountant is not None:
            # one Gaussian mechanism per round over the sites, subsampled at the planned
            # participation fraction (the usual approximation for fixed-size sampling)
            self.user_accountant.spend(noise_multiplier=self.config.dp.user.noise_multiplier,
                                       sample_rate=self.config.participation.fraction,
                                       num_steps=1)
        test = None
        if round_index % self.config.eval.every == 0 or round_index == self.config.rounds:
            with timer("evaluate"):
                self.layout.load(self.model, self.global_weights)
                test = evaluate(self.model, self.test_data, batch_size=self.config.eval.batch_size)
            self.last_test = test
        row = self._metrics_row(plan, ranks, timer, test)
        if _checkpoint_due(self.config, round_index):
            begin = time.perf_counter()
            atomic_torch_save(self.run_dir.coordinator_checkpoint(round_index), {
                "round": round_index,
                "weights": torch.from_numpy(self.global_weights.copy()),
                "layout": list(self.layout.names),
                "strategy": {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
                             for k, v in self.strategy.state_dict().items()},
                "last_test": self.last_test,
                "privacy": json.dumps({
                    "reports": self.privacy, "stopped": self.stopped,
                    "user_accountant": self.user_accountant.state_dict()
                    if self.user_accountant is not None else None}),
                # the row goes in too: a crash between this file and metrics.jsonl loses nothing
                "metrics_row": json.dumps(finite_json(row)),
                "fedsilo_version": __version__,
            })
            self.run_dir.prune(keep=self.config.checkpoint.keep, current=round_index)
            row["seconds"]["checkpoint"] = time.perf_counter() - begin
        row["seconds"]["round"] = timer.total()  # everything, the checkpoint included
        self.run_dir.append_metrics(row)
        self.progress.update(round_index, row)

    def _aggregate(self, plan: dict[str, Any], contributors: Sequence[dict[str, Any]]
                   ) -> np.ndarray:
        """The weighted mean update (float32) from what the transport delivered.

        Participants sent ``p_k f_k Δ_k`` with the planned weights p_k (Σ p = 1 over the
        planned sites) and f_k the share of its planned steps site k did (or 1/τ_k under
        ``normalize_steps``).  Sites that sat out, were dropped or stopped early make the
        weights sum to less than one: the sum is renormalized over those that contributed.
        """
        numel = self.layout.numel
        p = {r["site"]: plan["weights"][r["site"]] for r in contributors}
        total = sum(p.values())
        if self.config.train.normalize_steps:  # FedNova: τ_eff Σ p_k Δ_k / τ_k, p renormalized
            tau = sum(p[r["site"]] * r["steps"] for r in contributors) / total
            scale = tau / total
        else:
            done = sum(p[r["site"]] * r["steps"] / r["planned_steps"] for r in contributors)
            scale = 1.0 / done
        if not self.strategy.linear:
            rows = self.rows
            self.rows = None
            if self.config.train.normalize_steps:
                tau_k = np.array([r["steps"] for r in contributors], dtype=np.float32)
                rows *= (np.float32(tau) / tau_k)[:, None]
            weights = np.array([p[r["site"]] / total for r in contributors])
            return self.strategy.combine(rows, weights)
        aggregate = self.aggregate
        if aggregate is not self.reduce_buffer:
            np.copyto(aggregate, self.reduce_buffer, casting="same_kind")
        if abs(scale - 1.0) > 1e-6:
            aggregate[:numel] *= np.float32(scale)
        if self.strategy.control_variates and abs(total - 1.0) > 1e-6:
            aggregate[numel:] *= np.float32(1.0 / total)
        return aggregate

    def _note_privacy(self, round_index: int, reports: Sequence[dict[str, Any]]) -> None:
        for r in reports:
            if r.get("privacy") is not None:
                self.privacy[r["site"]] = r["privacy"]
            if not r["contributed"] and r["reason"] == "budget":
                self._mark_stopped(r["site"], round_index)

    def _mark_stopped(self, site: int, round_index: int) -> None:
        """Site ``site`` cannot afford round ``round_index``: plans leave it out from there."""
        if site in self.stopped:
            return
        self.stopped[site] = round_index
        report = self.privacy[site]
        log.warning("participant %d has spent its privacy budget (ε = %.3f of %s, δ = %g) and "
                    "stops contributing from round %d; %d participant(s) continue", site,
                    report["epsilon"], report["target_epsilon"], report["delta"], round_index,
                    len(self.num_samples) - len(self.stopped))

    def _metrics_row(self, plan: dict[str, Any], ranks: Sequence[dict[str, Any]], timer: Any,
                     test: dict[str, Any] | None) -> dict[str, Any]:
        seconds = dict(timer.seconds)
        everyone = [r for rank in ranks for r in rank["sites"]]
        reports = [r for r in everyone if r["contributed"]]
        seconds["local_train_max"] = max((r["train_s"] for r in reports), default=0.0)
        seconds["local_val_max"] = max((r["val_s"] for r in reports), default=0.0)
        # the critical path of local work: the slowest rank's training + validation (a rank
        # with several sites trains them in turn)
        per_rank = [sum(r["train_s"] + r["val_s"] for r in rank["sites"] if r["contributed"])
                    for rank in ranks]
        seconds["local_compute_max"] = max(per_rank, default=0.0)
        seconds["round"] = timer.total()  # provisional: finish_round adds the checkpoint
        active = len(plan["ranks"])
        weight_bytes = self.layout.numel * 4
        row: dict[str, Any] = {"round": plan["round"]}
        if test is not None:
            row.update(acc=test["acc"], auc=test["auc"], loss=test["loss"])
        row["val"] = _weighted_validation(reports)
        row["participants"] = {str(r["site"]): {
            "num_samples": r["num_samples"], "steps": r["steps"],
            "planned_steps": r["planned_steps"], "train_loss": r["train_loss"],
            "train_s": r["train_s"], "val_s": r["val_s"], "checkpoint_s": r["checkpoint_s"],
            "local_s": r["local_s"], "val_acc": r["val"]["acc"], "val_auc": r["val"]["auc"],
        } for r in reports}
        if self.config.dp.enabled:
            for r in reports:
                row["participants"][str(r["site"])]["epsilon"] = r["privacy"]["epsilon"]
            row["epsilon"] = {str(k): v["epsilon"] for k, v in sorted(self.privacy.items())}
            row["delta"] = {str(k): v["delta"] for k, v in sorted(self.privacy.items())}
            row["stopped"] = {str(k): v for k, v in sorted(self.stopped.items())}
        row["sampled"] = list(plan["participants"])
        # planned sites that did not contribute, and why (budget, deadline, error)
        row["sat_out"] = [r["site"] for r in everyone
                          if not r["contributed"] and r["site"] in plan["weights"]]
        row["dropped"] = {str(r["site"]): r.get("error", r["reason"]) for r in everyone
                          if not r["contributed"] and r["site"] in plan["weights"]}
        if self.user_accountant is not None:
            row["user_epsilon"] = self.user_accountant.epsilon(delta=self.config.dp.delta)
            row["user_delta"] = self.config.dp.delta
            for r in reports:
                row["participants"][str(r["site"])]["update_norm"] = r["update_norm"]
        row["seconds"] = seconds
        # what crossed MPI: the weights to each active rank (and SCAFFOLD's control
        # variate), and each active rank's sum (twice as wide for SCAFFOLD, or in float64),
        # or for non-linear strategies every contributing update
        control = 2 if self.strategy.control_variates else 1
        wide = 2 if self.reduce_buffer.dtype == np.float64 else 1
        row["bytes"] = {
            "broadcast": weight_bytes * active * control,
            "reduce": weight_bytes * active * control * wide if self.strategy.linear
            else weight_bytes * len(reports),
            "metadata": len(pickle.dumps(plan)) + len(pickle.dumps(list(ranks)))}
        if self.keys is not None:
            row["he"] = self._he_row([rank for rank in ranks if rank["he"] is not None])
            # the tree: every participant but the aggregator sends one ciphertext-sized
            # message; the aggregator sends the plaintext aggregate to the coordinator
            sizes = list(row["he"]["ciphertext_bytes"].values())
            row["bytes"]["reduce"] = sum(sizes) - sizes[0] + weight_bytes * control
        return row

    def _he_row(self, ranks: Sequence[dict[str, Any]]) -> dict[str, Any]:
        info = self.he_round or {}
        # one ciphertext per participant rank, named by the sites it sums ("0", or "0+1")
        names = ["+".join(str(r["site"]) for r in rank["sites"]) for rank in ranks]
        sizes = {name: rank["he"]["ciphertext_bytes"] for name, rank in zip(names, ranks)}
        return {
            "encrypt_s": max(rank["he"]["encrypt_s"] for rank in ranks),
            "reduce_s": info.get("reduce_s"),
            "decrypt_s": info.get("decrypt_s"),
            "encrypt_s_per_site": {name: rank["he"]["encrypt_s"]
                                   for name, rank in zip(names, ranks)},
            "ciphertext_bytes": sizes,
            "ciphertext_bytes_per_param": max(sizes.values()) / self.layout.numel,
            # what the coordinator receives: the plaintext aggregate only, float32
            "coordinator_receives_bytes": len(self.reduce_buffer) * 4,
        }

    def final_validation(self) -> tuple[None, None]:
        return None, None

    def finish_job(self, reports: Sequence[Any]) -> None:
        self.progress.close()
        if self.last_test is None or self.resume_round == self.config.rounds:
            self.layout.load(self.model, self.global_weights)
            self.last_test = evaluate(self.model, self.test_data,
                                      batch_size=self.config.eval.batch_size)
        atomic_torch_save(self.run_dir.model, self.layout.to_state_dict(self.global_weights))
        rows = self.run_dir.read_metrics()
        validations = [r for rank in reports[1:] for r in rank["sites"]]
        summary = {
            "fedsilo_version": __version__,
            "rounds": self.config.rounds,
            "rounds_completed": rows[-1]["round"] if rows else 0,
            "model": self.config.model.name,
            "num_parameters": self.layout.numel,
            "participants": {str(k): {"num_samples": v} for k, v in self.num_samples.items()},
            "test": self.last_test,
            "val": _weighted_validation(validations),
            "val_per_site": {str(r["site"]): r["val"] for r in validations},
            "best_acc": max((r["acc"] for r in rows if "acc" in r), default=None),
            "seconds_this_process": time.perf_counter() - self.started,
            "resumed_from_round": self.resume_round or None,
        }
        if self.config.dp.enabled:
            summary["privacy"] = {str(r["site"]): {
                "epsilon": r["privacy"]["epsilon"], "delta": r["privacy"]["delta"],
                "target_epsilon": r["privacy"]["target_epsilon"],
                "noise_multiplier": r["privacy"]["noise_multiplier"],
                "sample_rate": r["privacy"]["sample_rate"], "steps": r["privacy"]["steps"],
                "accountant": self.config.dp.accountant,
                "grad_sample_mode": r["privacy"]["grad_sample_mode"],
                "stopped_round": self.stopped.get(r["site"]),
            } for r in validations}
            summary["stopped"] = {str(k): v for k, v in sorted(self.stopped.items())}
        if self.user_accountant is not None:
            user_dp = self.config.dp.user
            summary["user_privacy"] = {
                "epsilon": self.user_accountant.epsilon(delta=self.config.dp.delta),
                "delta": self.config.dp.delta, "noise_multiplier": user_dp.noise_multiplier,
                "clip_norm": user_dp.clip_norm, "noise": user_dp.noise,
                "rounds": self.user_accountant.num_steps, "accountant": "rdp"}
        dump_json(self.run_dir.summary, summary)
        log.info("finished: test acc %.4f auc %.4f loss %.4f -> %s", self.last_test["acc"],
                 self.last_test["auc"], self.last_test["loss"], self.run_dir.root)


def _checkpoint_due(config: Config, round_index: int) -> bool:
    return round_index % config.checkpoint.every == 0 or round_index == config.rounds


def _weighted_validation(reports: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Federated validation: sample-weighted mean of the sites' own validation metrics."""
    total = sum(r["val"]["num_samples"] for r in reports)
    if not total:
        return {}
    out = {}
    for key in ("acc", "loss"):
        out[key] = sum(r["val"][key] * r["val"]["num_samples"] for r in reports) / total
    aucs = [(r["val"]["auc"], r["val"]["num_samples"]) for r in reports
            if not np.isnan(r["val"]["auc"])]
    if aucs:
        out["auc"] = sum(a * n for a, n in aucs) / sum(n for _, n in aucs)
    out["num_samples"] = total
    return out
