"""What each rank does between the collectives of a round: the coordinator and a participant.

Neither class calls MPI; :mod:`fedsilo.federation` owns the order of collectives.
Participant ``k`` is MPI rank ``k`` and owns shard ``site-(k-1)``; no other rank opens it.
"""

from __future__ import annotations

import json
import logging
import pickle
import secrets
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
from fedsilo.errors import (CheckpointError, DataError, FedsiloError, KeyFileError, ModelError,
                             PolicyError, UpdateError)
from fedsilo.models import build_model
from fedsilo.participation import assign_sites, rank_of_sites, sample_sites
from fedsilo.privacy import userlevel
from fedsilo.privacy.secret import Purpose, SecretStream, check_secret, new_secret
from fedsilo.privacy.user_accounting import UserAccounting
from fedsilo.progress import RoundProgress
from fedsilo.rundir import RunDir, atomic_torch_save, dump_json, finite_json, load_torch
from fedsilo.runtime import configure_threads, select_device
from fedsilo.errors import ShardError
from fedsilo.shards import Manifest, check_shard, read_shard
from fedsilo.strategies import build_strategy
from fedsilo.training import (LocalStats, TensorSplit, evaluate, gradient_corrections,
                              make_optimizer, planned_steps, round_lr, round_seed, sgd_travel,
                              train_local)
from fedsilo.weights import WeightLayout

log = logging.getLogger("fedsilo")

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

    def identity_summary(self) -> str | None:
        """Masks: the sha256 of the public key list this rank read (None: the coordinator)."""
        return None

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
    #: the site's privacy secret (DP): the key of every draw its mechanisms make; only this
    #: rank and the site's own 0600 checkpoint ever hold it (privacy/secret.py)
    secret: bytes | None = None

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
            info = check_shard(path, kind="site",
                               expected_sha256=entry.sha256 if config.data.verify_hashes else None,
                               image_shape=tuple(manifest.image_shape),
                               num_classes=manifest.num_classes, required_splits=("train", "val"))
            _check_counts(entry, info, path)
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
        if _uses_secret(config):
            for site in self.sites:  # a resumed run replaces it with the checkpoint's
                site.secret = new_secret()
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
        #: masked aggregation: the sites' identity keys, pairwise keys, and the uint64 buffer
        self.ring_buffer: np.ndarray | None = None
        if config.aggregation.secure == "masks":
            self._load_identities()
        self._last_reports: dict[int, tuple[bool, bool]] = {}
        if self.resume_round:
            for site in self.sites:
                self._load_checkpoint(site, self.resume_round)

    def _load_identities(self) -> None:
        import hashlib

        from fedsilo.crypto.identity import load_identity, load_public_keys

        key_dir = Path(self.config.aggregation.keys)
        self.public_keys = load_public_keys(key_dir)
        missing = sorted(set(range(self.manifest.num_sites)) - set(self.public_keys))
        if missing:
            raise KeyFileError(f"{key_dir / 'public.json'} lists no identity key for site(s) "
                               f"{missing} of the shard set; issue keys for all "
                               f"{self.manifest.num_sites} sites with 'fedsilo keys --identity "
                               f"--sites {self.manifest.num_sites} --out DIR'")
        self.identities = {site.index: load_identity(key_dir, site.index,
                                                     public_keys=self.public_keys)
                           for site in self.sites}
        self._public_digest = hashlib.sha256((key_dir / "public.json").read_bytes()).hexdigest()
        self._pair_keys: dict[tuple[int, int], bytes] = {}
        self.ring_buffer = np.empty(self.reduce_buffer.size, dtype=np.uint64)

    def identity_summary(self) -> str | None:
        return getattr(self, "_public_digest", None)

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
        if site.secret is not None:
            state["secret"] = torch.tensor(list(site.secret), dtype=torch.uint8)
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
            site.privacy.load_state_dict(state["privacy"],
                                         remaining_rounds=self.config.rounds - round_index)
        if site.secret is not None:
            if "secret" not in state:
                raise CheckpointError(
                    f"checkpoint {path} holds no privacy secret: it was written by a fedsilo "
                    f"whose DP noise followed from config.seed, so its privacy guarantee does "
                    f"not hold; start a new run instead of resuming this one")
            site.secret = check_secret(bytes(state["secret"].tolist()))
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
        error: FedsiloError | None = self._check_plan(plan)
        for site in self.sites:
            if error is not None:
                reports.append(self._sit_out(site, round_index, reason="job failed"))
                continue
            report, error = self._site_round(site, plan, deadline, rows)
            shared = error is None and site.index in plan["weights"] \
                and self._add_noise_share(site, plan)
            # in_sum: whether the site adds anything to the sum (its update, or its noise
            # share); masked aggregation masks exactly the sites that do
            report["in_sum"] = bool(report["contributed"] or shared)
            reports.append(report)
        if error is None and self.ring_buffer is not None and self.world.rank in plan["ranks"]:
            error = self._check_headroom(plan)
        if error is not None:
            self.reduce_buffer.fill(0)
        self._last_reports = {r["site"]: (r["contributed"], r.get("in_sum", False))
                              for r in reports}
        if not self.strategy.linear:
            self.rows = np.stack(rows) if rows else None
        he = None
        if self.codec is not None and error is None and self.world.rank in plan["ranks"]:
            he = self._encrypt_update(round_index)
        return {"sites": reports, "he": he}, error

    def _check_plan(self, plan: dict[str, Any]) -> PolicyError | None:
        """A participant's own check of what the coordinator asks of its sites: each weight
        must be the one the manifest and the strategy give (so no site is singled out or
        inflated); under user-level DP, the noise its share adds is computed here, not taken
        from the plan."""
        mine = [site.index for site in self.sites if site.index in plan["weights"]]
        if not mine:
            return None
        expected = _plan_weights(self.config, self.strategy, self.manifest, plan["participants"])
        for index in mine:
            asked, own = plan["weights"][index], expected.get(index)
            if own is None or not np.isclose(asked, own, rtol=1e-9, atol=0.0):
                return PolicyError(
                    f"participant {index} (site-{index:03d}) refuses round {plan['round']}: the "
                    f"coordinator asks for weight {asked!r}, but the manifest and strategy "
                    f"{self.config.strategy.name!r} give {own!r} for the sampled sites "
                    f"{list(plan['participants'])}")
        return None

    def _add_noise_share(self, site: Site, plan: dict[str, Any]) -> bool:
        """User-level DP, distributed noise: every planned site adds its share, whether or not
        it contributes an update this round (so the noise on the sum never shrinks when a
        site sits out), drawn from its own secret.  Returns whether it added one."""
        user_dp = self.config.dp.user
        if not user_dp.enabled or user_dp.noise != "distributed":
            return False
        std = userlevel.noise_std(noise_multiplier=user_dp.noise_multiplier,
                                  clip_norm=user_dp.clip_norm,
                                  weights=_user_weights(self.strategy, self.manifest),
                                  num_shares=len(plan["participants"]))
        numel = self.layout.numel
        stream = SecretStream(site.secret, purpose=Purpose.USER_NOISE,
                              round_index=plan["round"], step=0)
        stream.fill_gaussian(self.contribution, std=std)
        self.reduce_buffer[:numel] += self.contribution
        return True

    # -- masked secure aggregation ------------------------------------------------------

    def _check_headroom(self, plan: dict[str, Any]) -> UpdateError | None:
        """Masks: this rank's sum must fit the fixed-point ring with room for every rank's
        (each rank checks its own, so every partial sum of the Reduce fits)."""
        from fedsilo.crypto.masks import check_headroom

        peak = float(np.abs(self.reduce_buffer).max()) if self.reduce_buffer.size else 0.0
        try:
            check_headroom(peak, frac_bits=self.config.aggregation.frac_bits,
                           num_terms=len(plan["ranks"]))
        except UpdateError as exc:
            return UpdateError(f"rank {self.world.rank} (sites "
                               f"{[s.index for s in self.sites]}), round {plan['round']}: {exc}")
        return None

    def check_outcome(self, outcome: dict[str, Any]) -> PolicyError | None:
        """Secure aggregation: the coordinator's account of who contributed must match what
        this rank's sites did, and a round with fewer than aggregation.min_contributors
        contributors is refused (this participant sends nothing)."""
        floor = self.config.aggregation.min_contributors
        for site, (contributed, in_sum) in self._last_reports.items():
            if (site in outcome["contributors"]) != contributed \
                    or (site in outcome["in_sum"]) != in_sum:
                return PolicyError(
                    f"participant {site} (site-{site:03d}) refuses round {outcome['round']}: the "
                    f"coordinator lists contributors {outcome['contributors']}, which "
                    f"misstates this site (contributed: {contributed})")
        refused = len(outcome["contributors"]) < floor
        if refused != outcome["refused"]:
            return PolicyError(f"round {outcome['round']}: the coordinator's refusal flag "
                               f"({outcome['refused']}) does not follow from "
                               f"{len(outcome['contributors'])} contributor(s) and "
                               f"aggregation.min_contributors = {floor}")
        if refused and any(c for c, _ in self._last_reports.values()):
            log.warning("round %d is refused: %d site(s) contributed, fewer than "
                        "aggregation.min_contributors = %d, so no update of this rank is "
                        "sent", outcome["round"], len(outcome["contributors"]), floor)
        return None

    def mask_contribution(self, outcome: dict[str, Any]) -> None:
        """Quantize this rank's sum into ``ring_buffer`` and add each of its sites' pairwise
        masks with its neighbours in the round's mask graph (crypto/masks.py)."""
        from fedsilo.crypto.masks import add_masks, mask_graph, quantize, sparse_degree

        aggregation = self.config.aggregation
        quantize(self.reduce_buffer, frac_bits=aggregation.frac_bits, out=self.ring_buffer)
        members = outcome["in_sum"]
        degree = None if aggregation.mask_degree == 0 \
            else sparse_degree(len(members)) if aggregation.mask_degree < 0 \
            else aggregation.mask_degree
        graph = mask_graph(members, degree=degree,
                           seed=outcome["nonce"] + outcome["round"].to_bytes(4, "little"))
        for site in self.sites:
            if site.index not in graph:
                continue
            keys = {peer: self._pair_key(site.index, peer) for peer in graph[site.index]}
            add_masks(self.ring_buffer, site=site.index, pair_keys=keys,
                      round_index=outcome["round"], nonce=outcome["nonce"])

    def _pair_key(self, site: int, peer: int) -> bytes:
        from fedsilo.crypto.masks import pair_key

        if (site, peer) not in self._pair_keys:
            self._pair_keys[site, peer] = pair_key(self.identities[site], self.public_keys[peer],
                                                   own_site=site, peer_site=peer)
        return self._pair_keys[site, peer]

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
        # under DP, metrics of the site's private data without noise never leave it
        validation = None if _private(self.config) else \
            evaluate(self.model, site.val_data, batch_size=self.config.eval.batch_size)
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
            # added to the rank's sum (user-level DP's distributed share follows, in
            # local_round)
            np.multiply(self.delta, np.float32(scale), out=self.contribution)
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
        report = {"site": site.index, "num_samples": len(site.train_data),
                  "steps": stats.steps, "planned_steps": planned, "contributed": True,
                  "privacy": self._privacy_report(site)}
        if not _private(self.config):
            # Under DP these would be side channels: the loss and validation metrics are
            # computed on private data without noise, and the timings follow the Poisson
            # batch sizes.  Reports go to the coordinator only (World.agree_report).
            report.update(train_loss=stats.loss, train_s=stats.seconds, val=validation,
                          val_s=val_seconds, checkpoint_s=now - begin_ckpt,
                          local_s=now - begin)
        return report, None

    def _train(self, site: Site, round_index: int, deadline: float | None
               ) -> tuple[LocalStats, int]:
        """Local training of ``site`` from the global weights (already loaded)."""
        # config.seed governs what is not a privacy mechanism (the batch order without DP);
        # DP-SGD draws from the site's secret instead
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
                                                     secret=site.secret,
                                                     round_index=round_index,
                                                     deadline=deadline))
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
        if user_dp.enabled:  # DP-FedAvg: clip Δ_k before weighting (its norm stays here)
            userlevel.clip_in_place(self.delta, clip_norm=user_dp.clip_norm)
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

    def outcome(self, plan: dict[str, Any], reports: Sequence[Any]) -> None:
        raise AssertionError("only the coordinator summarizes a round")

    def finish_round(self, plan: dict[str, Any], reports: Sequence[Any] | None, timer: Any, *,
                     outcome: dict[str, Any], transport: dict[str, Any] | None) -> None:
        pass

    def final_validation(self) -> tuple[dict[str, Any], None]:
        self.layout.load(self.model, self.global_weights)
        reports = []
        for site in self.sites:
            report = {"site": site.index, "privacy": self._privacy_report(site)}
            if not _private(self.config):  # under DP, validation metrics stay on the site
                report["val"] = evaluate(self.model, site.val_data,
                                         batch_size=self.config.eval.batch_size)
            reports.append(report)
        return {"sites": reports}, None

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
        info = check_shard(path, kind="test",
                           expected_sha256=manifest.test.sha256 if config.data.verify_hashes
                           else None, image_shape=tuple(manifest.image_shape),
                           num_classes=manifest.num_classes, required_splits=("test",))
        _check_counts(manifest.test, info, path)
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
        if config.he.enabled:
            from fedsilo.crypto import CODECS
            from fedsilo.crypto.ckks import COORDINATOR_FILE, load_keys

            # only the public context: the coordinator never opens the participant key; it
            # can add ciphertexts, not decrypt them
            self.keys = load_keys(Path(config.he.keys) / COORDINATOR_FILE, expect="coordinator")
            self.codec = CODECS.get("ckks")(keys=self.keys)
        self.payload = None  # the coordinator adds nothing to an encrypted sum
        #: masked aggregation: where the ring sum lands, and this launch's mask nonce (fresh
        #: per launch, so a retried round never reuses a mask)
        self.ring_buffer = np.empty(width, dtype=np.uint64) \
            if config.aggregation.secure == "masks" else None
        self.mask_nonce = secrets.token_bytes(8)
        self.last_test: dict[str, Any] | None = None
        #: each participant's latest privacy report, and the round a site stopped in
        self.privacy: dict[int, dict[str, Any]] = {}
        self.stopped: dict[int, int] = {}
        user_dp = config.dp.user
        self.user_accountant = UserAccounting(
            noise_multiplier=user_dp.noise_multiplier, noise=user_dp.noise,
            secure=config.aggregation.secure != "none") if user_dp.enabled else None
        #: central user-level noise: the coordinator's own secret (its 0600 checkpoint)
        self.secret = new_secret() if user_dp.enabled and user_dp.noise == "central" else None
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
        if state["weights"].numel() != self.layout.numel:
            raise CheckpointError(
                f"checkpoint {path} holds {state['weights'].numel()} weights, but model "
                f"{self.config.model.name!r} on this shard set ({self.manifest.num_classes} "
                f"classes, images {tuple(self.manifest.image_shape)}) has {self.layout.numel}: "
                f"the shard set or the model changed since the checkpoint")
        self.global_weights[:] = state["weights"].numpy()
        self.strategy.load_state_dict({k: v.numpy() if torch.is_tensor(v) else v
                                       for k, v in state["strategy"].items()})
        self.last_test = state.get("last_test")
        privacy = json.loads(state.get("privacy", "{}"))
        self.privacy = {int(k): v for k, v in privacy.get("reports", {}).items()}
        self.stopped = {int(k): v for k, v in privacy.get("stopped", {}).items()}
        if self.user_accountant is not None:
            self.user_accountant.load_state_dict(privacy["user_accountant"])
        if self.secret is not None:
            if "secret" not in state:
                raise CheckpointError(f"checkpoint {path} holds no privacy secret for the "
                                      f"central user-level noise; start a new run")
            self.secret = check_secret(bytes(state["secret"].tolist()))
        #: the checkpoint's metrics row, restored if metrics.jsonl lost it (restore_metrics_row)
        self._checkpoint_row = json.loads(state["metrics_row"]) \
            if state.get("metrics_row") else None

    def restore_metrics_row(self) -> None:
        """Resume: a crash between the checkpoint and metrics.jsonl loses no row (called once
        every rank has accepted the resume)."""
        row = getattr(self, "_checkpoint_row", None)
        rows = self.run_dir.read_metrics()
        if row is not None and (not rows or rows[-1]["round"] < self.resume_round):
            self.run_dir.append_metrics(row)

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
        weights = _plan_weights(self.config, self.strategy, self.manifest, participants)
        return {"round": round_index, "stop": False, "participants": participants,
                "weights": weights,
                # the participant ranks that take part: the others idle (no weights, no upload)
                "ranks": sorted({self.rank_of_site[k] for k in participants})}

    def local_round(self, plan: dict[str, Any]) -> tuple[None, None]:
        return None, None  # the coordinator adds nothing to the sum (World.reduce_sum)

    def outcome(self, plan: dict[str, Any], reports: Sequence[Any]) -> dict[str, Any]:
        """What every rank learns of the round after the reports: who contributed (site
        indexes only), which sites add to the sum, and whether a secure round is refused."""
        sites = [r for rank in reports[1:] for r in rank["sites"]]
        contributors = sorted(r["site"] for r in sites if r["contributed"])
        secure = self.config.aggregation.secure != "none"
        return {"round": plan["round"], "nonce": self.mask_nonce, "ranks": plan["ranks"],
                "contributors": contributors,
                "in_sum": sorted(r["site"] for r in sites if r.get("in_sum")),
                "rows_per_rank": {rank: sum(r["contributed"] for r in report["sites"])
                                  for rank, report in enumerate(reports) if rank},
                "refused": secure and len(contributors) < self.config.aggregation.min_contributors}

    def check_outcome(self, outcome: dict[str, Any]) -> None:
        return None

    def unmask(self) -> None:
        """Masks: the ring sum, dequantized into the float buffer the strategy reads."""
        from fedsilo.crypto.masks import dequantize

        dequantize(self.ring_buffer, frac_bits=self.config.aggregation.frac_bits,
                   out=self.reduce_buffer)

    def finish_round(self, plan: dict[str, Any], reports: Sequence[Any] | None, timer: Any, *,
                     outcome: dict[str, Any], transport: dict[str, Any] | None) -> None:
        round_index = plan["round"]
        ranks = reports[1:]
        sites = [r for rank in ranks for r in rank["sites"]]
        self._note_privacy(round_index, sites)
        contributors = [r for r in sites if r["contributed"]]
        if outcome["refused"]:
            log.warning("round %d is refused by the participants: %d site(s) contributed, "
                        "fewer than aggregation.min_contributors = %d; the global model stays "
                        "as it was", round_index, len(contributors),
                        self.config.aggregation.min_contributors)
            contributors = []
        self.transport_info = transport
        with timer("server_step"):
            if contributors:
                aggregate = self._user_level_sum(plan) if self.user_accountant is not None \
                    else self._aggregate(plan, contributors)
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
            self.user_accountant.spend_round(planned=plan["participants"])
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
                **({} if self.secret is None else
                   {"secret": torch.tensor(list(self.secret), dtype=torch.uint8)}),
            })
            self.run_dir.prune(keep=self.config.checkpoint.keep, current=round_index)
            row["seconds"]["checkpoint"] = time.perf_counter() - begin
        row["seconds"]["round"] = timer.total()  # everything, the checkpoint included
        self.run_dir.append_metrics(row)
        self.progress.update(round_index, row)

    def _user_level_sum(self, plan: dict[str, Any]) -> np.ndarray:
        """User-level DP: the released sum Σ w_k clip(Δ_k) + N(0, σ²S²), then divided by the
        planned sites' total weight.  The noise goes on the sum itself, before any rescale, and
        nothing is renormalized over the sites that contributed (their number is not public
        to the model's readers, and renormalizing would scale the noise down with it)."""
        numel = self.layout.numel
        aggregate = self.aggregate
        if aggregate is not self.reduce_buffer:
            np.copyto(aggregate, self.reduce_buffer, casting="same_kind")
        user_dp = self.config.dp.user
        if user_dp.noise == "central":
            std = userlevel.noise_std(noise_multiplier=user_dp.noise_multiplier,
                                      clip_norm=user_dp.clip_norm,
                                      weights=_user_weights(self.strategy, self.manifest))
            noise = np.empty(numel, dtype=np.float32)
            SecretStream(self.secret, purpose=Purpose.USER_NOISE, round_index=plan["round"],
                         step=0).fill_gaussian(noise, std=std)
            aggregate[:numel] += noise
        planned = sum(plan["weights"].values())  # public: who was asked, not who answered
        aggregate[:numel] *= np.float32(1.0 / planned)
        return aggregate

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
        if not _private(self.config):  # under DP, sites report no timings (side channel)
            seconds["local_train_max"] = max((r["train_s"] for r in reports), default=0.0)
            seconds["local_val_max"] = max((r["val_s"] for r in reports), default=0.0)
            # the critical path of local work: the slowest rank's training + validation (a
            # rank with several sites trains them in turn)
            per_rank = [sum(r["train_s"] + r["val_s"] for r in rank["sites"] if r["contributed"])
                        for rank in ranks]
            seconds["local_compute_max"] = max(per_rank, default=0.0)
        seconds["round"] = timer.total()  # provisional: finish_round adds the checkpoint
        active = len(plan["ranks"])
        weight_bytes = self.layout.numel * 4
        row: dict[str, Any] = {"round": plan["round"]}
        if test is not None:
            row.update(acc=test["acc"], auc=test["auc"], loss=test["loss"])
        if not _private(self.config):
            row["val"] = _weighted_validation(reports)
        row["participants"] = {str(r["site"]): _site_row(r) for r in reports}
        if self.config.dp.enabled:
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
            row.update(self._user_epsilon_row())
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
        if self.config.aggregation.secure == "masks":
            # uint64 in the ring: 8 bytes per value from every active rank
            row["bytes"]["reduce"] = len(self.ring_buffer) * 8 * active
            row["masks"] = {"reduce_s": (self.transport_info or {}).get("reduce_s"),
                            "bytes_per_param": 8.0}
        if self.config.aggregation.secure != "none":
            row["contributors"] = len(reports)
            if len(reports) < self.config.aggregation.min_contributors:
                row["refused"] = (f"{len(reports)} contributor(s) < aggregation.min_contributors"
                                  f" = {self.config.aggregation.min_contributors}")
        if self.keys is not None and not row.get("refused"):
            row["he"] = self._he_row([rank for rank in ranks if rank["he"] is not None])
            # every active participant sends its ciphertext to the coordinator, which sends
            # the encrypted total to the aggregator, which returns the float32 sum
            sizes = list(row["he"]["ciphertext_bytes"].values())
            row["bytes"]["reduce"] = sum(sizes) + max(sizes) + weight_bytes * control
        return row

    def _user_epsilon_row(self) -> dict[str, Any]:
        """User-level ε: the largest over the sites, against the readers of the released
        models (``user_epsilon``) and against the coordinator (``user_epsilon_coordinator``,
        None when it has no guarantee: central noise), and per site."""
        eps = self.user_accountant.epsilon(delta=self.config.dp.delta)
        released, coordinator = eps["released"], eps["coordinator"]
        return {
            "user_epsilon": max(released.values(), default=0.0),
            "user_epsilon_coordinator": None if any(v is None for v in coordinator.values())
            else max(coordinator.values(), default=0.0),
            "user_epsilon_per_site": {str(k): v for k, v in released.items()},
            "user_delta": self.config.dp.delta}

    def _he_row(self, ranks: Sequence[dict[str, Any]]) -> dict[str, Any]:
        info = getattr(self, "transport_info", None) or {}
        # one ciphertext per participant rank, named by the sites it sums ("0", or "0+1")
        names = ["+".join(str(r["site"]) for r in rank["sites"]) for rank in ranks]
        sizes = {name: rank["he"]["ciphertext_bytes"] for name, rank in zip(names, ranks)}
        return {
            "encrypt_s": max(rank["he"]["encrypt_s"] for rank in ranks),
            "reduce_s": info.get("reduce_s"),
            "add_s": info.get("add_s"),
            "decrypt_s": info.get("decrypt_s"),
            "encrypt_s_per_site": {name: rank["he"]["encrypt_s"]
                                   for name, rank in zip(names, ranks)},
            "ciphertext_bytes": sizes,
            "ciphertext_bytes_per_param": max(sizes.values()) / self.layout.numel,
            # what the coordinator receives: each rank's ciphertext (it cannot decrypt them)
            # and the float32 aggregate; what a participant receives: at most the total
            "coordinator_receives_bytes": sum(sizes.values()) + len(self.reduce_buffer) * 4,
            "aggregator_receives_bytes": max(sizes.values()),
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
            "best_acc": max((r["acc"] for r in rows if "acc" in r), default=None),
            "seconds_this_process": time.perf_counter() - self.started,
            "resumed_from_round": self.resume_round or None,
        }
        if not _private(self.config):  # under DP, validation metrics stay on the sites
            summary["val"] = _weighted_validation(validations)
            summary["val_per_site"] = {str(r["site"]): r["val"] for r in validations}
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
            eps = self._user_epsilon_row()
            summary["user_privacy"] = {
                "epsilon": eps["user_epsilon"],
                "epsilon_coordinator": eps["user_epsilon_coordinator"],
                "epsilon_per_site": eps["user_epsilon_per_site"],
                "rounds_per_site": {str(k): v for k, v in self.user_accountant.rounds().items()},
                "rounds": max(self.user_accountant.rounds().values(), default=0),
                "delta": self.config.dp.delta, "noise_multiplier": user_dp.noise_multiplier,
                "clip_norm": user_dp.clip_norm, "noise": user_dp.noise,
                "neighbouring": "one site's whole contribution added or removed",
                "sampling_amplification": False, "accountant": "rdp"}
        dump_json(self.run_dir.summary, summary)
        log.info("finished: test acc %.4f auc %.4f loss %.4f -> %s", self.last_test["acc"],
                 self.last_test["auc"], self.last_test["loss"], self.run_dir.root)


def _check_counts(entry: Any, info: Any, path: Path) -> None:
    """Every figure the manifest gives for a shard must be what the shard holds: the FedAvg
    weights are computed from it."""
    for split, n in sorted(entry.num_samples.items()):
        real_n = info.num_samples.get(split)
        real_counts = tuple(info.class_counts.get(split, ()))
        if real_n != n or real_counts != tuple(entry.class_counts.get(split, ())):
            raise ShardError(
                f"{path}: the manifest says split {split!r} holds {n} samples with class counts "
                f"{list(entry.class_counts.get(split, ()))}, the shard holds {real_n} with "
                f"{list(real_counts)}; the manifest does not describe this shard (re-run "
                f"'fedsilo prep verify' or prepare the set again)")


def _private(config: Config) -> bool:
    """Whether a DP guarantee covers this run: then nothing computed on a site's private data
    without noise (losses, validation metrics, update norms, timings) leaves the site."""
    return config.dp.enabled or config.dp.user.enabled


def _uses_secret(config: Config) -> bool:
    """Whether a site's mechanisms draw randomness (DP-SGD, or a user-level noise share)."""
    return config.dp.enabled or (config.dp.user.enabled and config.dp.user.noise == "distributed")


def _user_weights(strategy: Any, manifest: Manifest) -> dict[int, float]:
    """User-level DP's fixed weights: n_k / Σn over every site of the federation, whoever is
    sampled or contributes (renormalizing over a sample would let one site's absence change
    every other weight, doubling the sensitivity)."""
    return strategy.client_weights({k: int(site.num_samples["train"])
                                    for k, site in enumerate(manifest.sites)})


def _plan_weights(config: Config, strategy: Any, manifest: Manifest,
                  participants: Sequence[int]) -> dict[int, float]:
    """The weight of each sampled site's update: the strategy's weights over the sample, or
    (user-level DP) the fixed federation-wide weights."""
    if config.dp.user.enabled:
        fixed = _user_weights(strategy, manifest)
        return {k: fixed[k] for k in participants}
    return strategy.client_weights({k: int(manifest.sites[k].num_samples["train"])
                                    for k in participants})


def _checkpoint_due(config: Config, round_index: int) -> bool:
    return round_index % config.checkpoint.every == 0 or round_index == config.rounds


#: what a site's report may carry into metrics.jsonl (the DP-sensitive ones are absent
#: from the report under DP, see Participant._site_round)
_SITE_ROW_KEYS = ("num_samples", "steps", "planned_steps", "train_loss", "train_s", "val_s",
                  "checkpoint_s", "local_s")


def _site_row(report: dict[str, Any]) -> dict[str, Any]:
    row = {key: report[key] for key in _SITE_ROW_KEYS if key in report}
    if "val" in report:
        row.update(val_acc=report["val"]["acc"], val_auc=report["val"]["auc"])
    if report.get("privacy") is not None:
        row["epsilon"] = report["privacy"]["epsilon"]
    return row


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
