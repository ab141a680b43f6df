"""A participant rank: trains its sites on their own shards and contributes their updates.

Participant ``k`` is MPI rank ``k`` and owns shard ``site-(k-1)`` (or, with fewer ranks than
sites, a contiguous block of sites, trained in turn: ``fedsilo.participation``); no other rank
opens it.  One round on this rank reads::

    check the plan  ·  per site: train, update, weight, add to the rank's sum
    ·  transport.prepare  ·  RankReport  ->  (outcome)  ->  Contribution -> transport

A site's data, its accountant, its control variate and its privacy secret stay on this rank
and in its own 0600 checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsilo.aggregate import contribution_factor, count_nonfinite
from fedsilo.checkpointfile import read_site_state
from fedsilo.errors import CheckpointError, DataError, FedsiloError, PolicyError, UpdateError
from fedsilo.loading import Split
from fedsilo.messages import (
    Contribution,
    FinalSiteReport,
    RankReport,
    RoundOutcome,
    RoundPlan,
    SiteReport,
)
from fedsilo.participation import assign_sites
from fedsilo.privacy import userlevel
from fedsilo.privacy.secret import Purpose, SecretStream, check_secret, new_secret
from fedsilo.roles import (
    Role,
    checkpoint_due,
    noised_validation,
    private,
    reduce_buffer,
    user_weights,
    uses_secret,
)
from fedsilo.rundir import atomic_torch_save
from fedsilo.selection import histogram_edges, histogram_from_edge_counts, threshold_grid
from fedsilo.shards import SplitReader
from fedsilo.strategies import build_strategy
from fedsilo.training import (
    LocalStats,
    augment_seed,
    channels_last_for,
    gradient_corrections,
    make_optimizer,
    planned_steps,
    round_lr,
    round_seed,
    sgd_travel,
    train_local,
)
from fedsilo.transport import transport_for
from fedsilo.verification import (
    check_outcome,
    check_plan,
    round_fingerprint,
    secure_policy,
    weakened,
)
from fedsilo.weights import WeightLayout

log = logging.getLogger("fedsilo")


@dataclass
class Site:
    """One site's data and the state that stays with it on its rank."""

    index: int
    train_data: Split
    val_data: Split
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


@dataclass
class LocalUpdate:
    """What one site's round leaves for the rank's sum: Δ_k is in ``Participant.delta``."""

    #: the factor Δ_k enters the sum with: p_k f_k
    scale: float
    #: SCAFFOLD: Δc_k and the factor it enters the sum with (p_k)
    control_delta: np.ndarray | None = None
    control_scale: float = 0.0


class Participant(Role):
    """A participant rank: one site (``site-(rank-1)``), or several in turn when the shard
    set has more sites than there are participant ranks (``fedsilo.participation``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        world, manifest, config = self.world, self.manifest, self.config
        self.strategy = build_strategy(config.strategy.name, dict(config.strategy.options))
        indexes = assign_sites(num_sites=manifest.num_sites,
                               num_ranks=world.num_participants)[world.rank - 1]
        self.sites = self._load_sites(indexes)
        self._check_model_fits(self.sites[0].train_data.sample(1))
        #: the training settings of this rank, train.channels_last resolved (auto: by device)
        self.train_config = replace(config.train, channels_last=channels_last_for(
            config.train.channels_last, model=self.model, device=self.device,
            dp=config.dp.enabled))
        if self.train_config.channels_last:
            self.model.to(memory_format=torch.channels_last)
            log.debug("channels_last memory format (train.channels_last=%s)",
                      config.train.channels_last)
        #: data.augment: the training batches' transform (torchvision only when it is on)
        self.augmenter = None
        if config.data.augment.enabled:
            from fedsilo.augment import Augmenter

            self.augmenter = Augmenter(config.data.augment, image_shape=manifest.image_shape,
                                       views=config.dp.augmult if config.dp.enabled else 1)
        # whatever the first optimizer still costs (torch._dynamo if something imported it:
        # runtime.defer_dynamo_import), pay it now, before any round's deadline clock runs
        make_optimizer(self.model, config.train)
        numel = self.layout.numel
        self.local_weights = self.layout.empty(pinned=self.pinned)
        self.delta = self.layout.empty()
        self.contribution = self.layout.empty()
        #: the rank's sum of its sites' weighted updates: what the transport adds up
        self.reduce_buffer = reduce_buffer(config, self.layout, pinned=self.pinned,
                                           control_variates=self.strategy.control_variates)
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
                    sample=site.train_data.sample(2), mode=config.dp.grad_sample_mode,
                    shared=first, augmult=config.dp.augmult,
                    sample_loss=self.task.sample_loss, dense=self.task.dense,
                    validation_sigma=config.dp.validation.noise_multiplier
                    if noised_validation(config) else None,
                    validation_releases=config.dp.validation.releases(config.rounds))
                first = first or site.privacy
        for site in self.sites:
            if self.strategy.control_variates:
                site.control = np.zeros(numel, dtype=np.float32)
            if uses_secret(config):  # a resumed run replaces it with the checkpoint's
                site.secret = new_secret()
        codec, self.identities = None, None
        if config.he.enabled:
            from fedsilo.crypto.params import validate

            codec = self._load_ckks("participant")
            validate(self.keys.params, num_participants=manifest.num_sites)
        if config.aggregation.secure in ("masks", "ckks"):  # CKKS masks what it encrypts
            from fedsilo.crypto.masks import SiteIdentities

            # CKKS: the identity keys come with the key set (fedsilo keys --out DIR)
            key_dir = config.he.keys if config.he.enabled else config.aggregation.keys
            self.identities = SiteIdentities(key_dir, sites=indexes,
                                             num_sites=manifest.num_sites)
        self.transport = transport_for(config, self.strategy, codec=codec,
                                       identities=self.identities)
        #: each site's (contributed, in_sum) last round: checked against the outcome
        self._last_reports: dict[int, tuple[bool, bool]] = {}
        #: the round this participant expects next, by its own count (verification.py)
        self.next_round = self.resume_round + 1
        #: the plan of the round under way (checked against its outcome)
        self._plan: RoundPlan | None = None
        if self.resume_round:
            for site in self.sites:
                was = site.index if self.site_map is None else self.site_map[site.index]
                back = self.returning.get(site.index)
                if was is not None:
                    self._check_resume_point(site.index if self.site_map is None else was)
                    self._load_checkpoint(site, self.resume_round, saved_as=was)
                elif back is not None and back["file"] is not None:  # left, now back
                    self._load_checkpoint(site, back["round"], saved_as=back["site"],
                                          path=self.run_dir.root / "departed" / back["file"])
                # else: the site joins now, with fresh state

    def _check_resume_point(self, saved_as: int) -> None:
        """A coordinator that rolls a resume back several rounds would have this site train
        rounds again that it already released (the same DP noise on other weights): refuse
        when the site itself saved a round beyond what a crash can leave unrecorded (the
        coordinator records a round up to one round later, ``runtime.overlap_eval``)."""
        every = self.config.checkpoint.every
        newest = self.run_dir.newest_site_round(saved_as)
        if newest is not None and newest > self.resume_round + 2 * every:
            raise PolicyError(
                f"participant {saved_as} refuses to resume from round {self.resume_round}: it "
                f"saved its own state of round {newest} already, so the rounds in between "
                f"were trained and released (a rolled-back resume would draw their DP noise "
                f"again for other weights)")

    def _load_sites(self, indexes: list[int]) -> list[Site]:
        """This rank's sites' train and val splits, held in memory or streamed from their
        shards (``data.in_memory``, ``loading.py``)."""
        sources = []
        for index in indexes:
            path = self._shard_path(self.manifest.sites[index], kind="site")
            train = SplitReader(path, "train", cache_bytes=0)
            val = SplitReader(path, "val", cache_bytes=0)
            mean, std = self._normalization(train)
            sources += [(train, mean, std), (val, mean, std)]
        splits = self.task.load(sources, data=self.config.data, device=self.device,
                                who=f"participant rank {self.world.rank}")
        return [Site(index=index, train_data=splits[2 * i], val_data=splits[2 * i + 1])
                for i, index in enumerate(indexes)]

    def identity_summary(self) -> str | None:
        return None if self.identities is None else self.identities.digest

    # -- state that stays on this rank --------------------------------------------------

    def state_dict(self, site: Site, round_index: int) -> dict[str, Any]:
        # The batch order follows (seed, round, site) and the DP draws the site's secret, so
        # no RNG state is needed to continue exactly: accountants, control variates, secret.
        state: dict[str, Any] = {"round": round_index, "site": site.index,
                                 "rounds_trained": site.rounds_trained,
                                 "secure_policy": json.dumps(secure_policy(self.config))}
        if site.privacy is not None:
            state["privacy"] = site.privacy.state_dict()
        if site.control is not None:
            state["control"] = torch.from_numpy(site.control.copy())
        if site.secret is not None:
            state["secret"] = torch.tensor(list(site.secret), dtype=torch.uint8)
        return state

    def _save(self, site: Site, round_index: int) -> None:
        path = self.run_dir.participant_checkpoint(round_index, site.index)
        if self.run_dir.site_dir is not None:  # the site's own directory, not the run's
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_torch_save(path, self.state_dict(site, round_index))
        self.run_dir.prune_site(site.index, keep=self.config.checkpoint.keep)

    def _load_checkpoint(self, site: Site, round_index: int, *, saved_as: int,
                         path: Path | None = None) -> None:
        """Restore ``site``'s state from its checkpoint of ``round_index``, where it was
        site ``saved_as`` (its own index unless the federation changed); ``path``: an
        archived one (a site that left and came back)."""
        path = path or self.run_dir.participant_checkpoint(round_index, saved_as)
        state = read_site_state(path)
        if state.get("site") != saved_as or state.get("round") != round_index:
            raise CheckpointError(f"checkpoint {path} belongs to site {state.get('site')} round "
                                  f"{state.get('round')}, expected site {saved_as} round "
                                  f"{round_index}")
        site.rounds_trained = int(state["rounds_trained"])
        saved = state.get("secure_policy")
        # config.yaml sits in the shared run directory, which the coordinator writes: the
        # site's own checkpoint says what it agreed to, and a resume may not weaken it
        changes = [] if saved is None else weakened(json.loads(saved), secure_policy(self.config))
        if changes:
            raise PolicyError(f"participant {site.index} refuses to resume: since it saved "
                              f"{path}, the run's secure aggregation or sampling was weakened "
                              f"({'; '.join(changes)}); start a new run to change them")
        if site.privacy is not None:
            if "privacy" not in state:
                raise CheckpointError(f"checkpoint {path} has no privacy accountant, but this "
                                      f"run trains with DP (dp.enabled); resume it without DP")
            site.privacy.load_state_dict(state["privacy"],
                                         remaining_rounds=self.config.rounds - self.resume_round)
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

    def local_round(self, plan: RoundPlan) -> tuple[RankReport, FedsiloError | None]:
        """Train each of this rank's sites that the plan samples, in turn; returns the
        rank's report and the first error that ends the job (None if none)."""
        begin = time.perf_counter()
        deadline = None if self.config.train.round_deadline_s is None \
            else begin + self.config.train.round_deadline_s
        self.reduce_buffer.fill(0)
        rows: list[np.ndarray] = []
        reports: list[SiteReport] = []
        error: FedsiloError | None = self._check_plan(plan)
        for site in self.sites:
            if error is not None:
                reports.append(self._sit_out(site, plan.round, reason="job failed"))
                continue
            report, error = self._site_round(site, plan, deadline, rows)
            shared = error is None and site.index in plan.weights \
                and self._add_noise_share(site, plan)
            # in_sum: whether the site adds anything to the sum (its update, or its noise
            # share); masked aggregation masks exactly the sites that do
            report.in_sum = bool(report.contributed or shared)
            reports.append(report)
        if not self.strategy.linear:
            self.rows = np.stack(rows) if rows else None
        he = None
        if error is None and self.world.rank in plan.ranks:
            he, error = self.transport.prepare(self.contribution_of_rank(), plan=plan,
                                               rank=self.world.rank)
        if error is not None:
            self.reduce_buffer.fill(0)
        self._last_reports = {r.site: (r.contributed, r.in_sum) for r in reports}
        return RankReport(sites=reports, he=he), error

    def contribution_of_rank(self) -> Contribution:
        """What this rank hands the transport this round."""
        return Contribution(total=self.reduce_buffer, rows=self.rows,
                            sites=tuple(site.index for site in self.sites))

    def _check_plan(self, plan: RoundPlan) -> PolicyError | None:
        """A participant's own check of the coordinator's plan (``verification.py``): the
        round by its own count, the sample from the public participation policy, every
        sampled site's weight, the team; under user-level DP, the noise its share adds is
        computed here, not taken from the plan."""
        expected, self.next_round = self.next_round, plan.round + 1
        self._plan = plan
        return check_plan(plan, expected_round=expected, config=self.config,
                          strategy=self.strategy, manifest=self.manifest,
                          num_ranks=self.world.num_participants,
                          out_of_budget={site.index: site.privacy is not None
                                         and not site.privacy.round_fits()
                                         for site in self.sites})

    def _add_noise_share(self, site: Site, plan: RoundPlan) -> bool:
        """User-level DP, distributed noise: every planned site adds its share, whether or not
        it contributes an update this round (so the noise on the sum never shrinks when a
        site sits out), drawn from its own secret.  Returns whether it added one."""
        user_dp = self.config.dp.user
        if not user_dp.enabled or user_dp.noise != "distributed":
            return False
        assert site.secret is not None, "a site with a noise share holds a secret"
        std = userlevel.noise_std(noise_multiplier=user_dp.noise_multiplier,
                                  clip_norm=user_dp.clip_norm,
                                  weights=user_weights(self.strategy, self.manifest),
                                  num_shares=len(plan.participants))
        stream = SecretStream(site.secret, purpose=Purpose.USER_NOISE, round_index=plan.round,
                              step=0)
        stream.fill_gaussian(self.contribution, std=std)
        self.reduce_buffer[:self.layout.numel] += self.contribution
        return True

    def check_outcome(self, outcome: RoundOutcome) -> PolicyError | None:
        """Secure aggregation: the outcome must be of the planned round and told alike to
        every participant, its account of who contributed must match what this rank's sites
        did, and a round with fewer than aggregation.min_contributors contributors is
        refused (this participant sends nothing)."""
        floor = self.config.aggregation.min_contributors
        assert self._plan is not None, "an outcome follows a plan"
        error = check_outcome(outcome, self._plan)
        # the coordinator could tell each participant something else: they compare, among
        # themselves, a fingerprint of what they were told (the coordinator is not on
        # this communicator, so it cannot relay or alter what they compare)
        told = round_fingerprint(self._plan, outcome, self.session)
        if self.peers is not None:
            with self.world.watched(f"the participants' comparison of round {outcome.round}"):
                everyone = self.peers.allgather(told)
        if self.peers is not None and len(set(everyone)) > 1:
            error = error or PolicyError(
                f"participant refuses round {outcome.round}: the coordinator told the "
                f"participants different plans or outcomes for this round")
        if error is not None:
            return error
        for site, (contributed, in_sum) in self._last_reports.items():
            if (site in outcome.contributors) != contributed \
                    or (site in outcome.in_sum) != in_sum:
                return PolicyError(
                    f"participant {site} (site-{site:03d}) refuses round {outcome.round}: the "
                    f"coordinator lists contributors {list(outcome.contributors)}, which "
                    f"misstates this site (contributed: {contributed})")
        refused = len(outcome.contributors) < floor
        if refused != outcome.refused:
            return PolicyError(f"round {outcome.round}: the coordinator's refusal flag "
                               f"({outcome.refused}) does not follow from "
                               f"{len(outcome.contributors)} contributor(s) and "
                               f"aggregation.min_contributors = {floor}")
        if refused and any(c for c, _ in self._last_reports.values()):
            log.warning("round %d is refused: %d site(s) contributed, fewer than "
                        "aggregation.min_contributors = %d, so no update of this rank is "
                        "sent", outcome.round, len(outcome.contributors), floor)
        return None

    def _site_round(self, site: Site, plan: RoundPlan, deadline: float | None,
                    rows: list[np.ndarray]) -> tuple[SiteReport, FedsiloError | None]:
        round_index = plan.round
        privacy = site.privacy
        if privacy is not None and site.index in plan.weights and not privacy.round_fits():
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
        if site.index not in plan.weights:
            return self._sit_out(site, round_index, reason="not planned"), None
        if deadline is not None and time.perf_counter() >= deadline:
            return self._sit_out(site, round_index, reason="deadline"), None
        begin = time.perf_counter()
        self.layout.load(self.model, self.global_weights)
        try:  # a shard that turns unreadable (streamed splits) fails the site's round here
            # under DP, metrics of the site's private data without noise never leave it
            validation = None if private(self.config) else \
                self.task.evaluate(self.model, site.val_data,
                                   batch_size=self.config.eval.batch_size,
                                   thresholds=self._threshold_grid())
            val_counts = None if validation is None else validation.pop("counts", None)
            val_hist = self._noised_validation(site, model_round=round_index - 1) \
                if self._validation_due(round_index - 1) else None
            val_seconds = time.perf_counter() - begin
            stats, planned = self._train(site, round_index, deadline)
            if stats.steps == 0:
                return self._sit_out(site, round_index, reason="deadline"), None
            update = self._update(site, round_index, stats, planned, plan.weights[site.index])
        except (DataError, UpdateError) as exc:
            # DP: the accountant has already recorded every step taken (engine.train_round)
            report = self._sit_out(site, round_index, reason="error")
            if self.config.on_participant_error == "skip":
                log.warning("%s is dropped from round %d: %s", site.name, round_index, exc)
                report.error = f"{type(exc).__name__}: {exc}"
                return report, None
            return report, exc
        numel = self.layout.numel
        if self.strategy.linear:
            # u_k = p_k f_k Δ_k in float32 (bit-identical wherever the site runs), added to
            # the rank's sum (user-level DP's distributed share follows, in local_round)
            np.multiply(self.delta, np.float32(update.scale), out=self.contribution)
            self.reduce_buffer[:numel] += self.contribution
        else:
            rows.append(self.delta.copy())
        if update.control_delta is not None:
            np.multiply(update.control_delta, np.float32(update.control_scale),
                        out=self.contribution)
            self.reduce_buffer[numel:] += self.contribution
            site.control += update.control_delta
        site.rounds_trained += 1
        begin_ckpt = time.perf_counter()
        if checkpoint_due(self.config, round_index):
            self._save(site, round_index)
        now = time.perf_counter()
        report = SiteReport(site=site.index, num_samples=len(site.train_data), contributed=True,
                            steps=stats.steps, planned_steps=planned,
                            privacy=self._privacy_report(site), val_hist=val_hist)
        if not private(self.config):
            # Under DP these would be side channels: the loss and validation metrics are
            # computed on private data without noise, and the timings follow the Poisson
            # batch sizes.  Reports go to the coordinator only (World.agree_report).
            report.train_loss, report.train_s, report.val = stats.loss, stats.seconds, validation
            report.val_counts = val_counts
            report.val_s, report.checkpoint_s = val_seconds, now - begin_ckpt
            report.local_s = now - begin
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
        # augmentation (and segmentation's patches) draw apart from the batch order
        augment = self.task.train_transform(self.augmenter, torch.Generator().manual_seed(
            augment_seed(self.config.seed, round_index, site.index)))
        if site.privacy is None:
            stats = train_local(self.model, site.train_data, config=self.train_config,
                                optimizer=optimizer, generator=generator, deadline=deadline,
                                augment=augment, loss_fn=self.task.loss)
            return stats, planned_steps(len(site.train_data), self.config.train)
        stats = LocalStats(*site.privacy.train_round(site.train_data, optimizer=optimizer,
                                                     secret=site.secret,
                                                     round_index=round_index,
                                                     deadline=deadline, augment=augment))
        return stats, site.privacy.steps_per_round

    def _corrections(self, site: Site) -> Any:
        """A step pre-hook adding FedProx's μ(w − w_global) and SCAFFOLD's c − c_k to each
        gradient (after DP-SGD's clipping and noise: both are functions of public or already
        privatized quantities), or None."""
        mu = float(self.strategy.proximal_mu)
        drift = None
        if self.global_control is not None and site.control is not None:  # SCAFFOLD
            drift = torch.from_numpy(self.global_control - site.control).to(self.device)
        if not mu and drift is None:
            return None
        return gradient_corrections(self._param_views, mu=mu, drift=drift)

    def _update(self, site: Site, round_index: int, stats: LocalStats, planned: int,
                weight: float) -> LocalUpdate:
        """Δ_k into ``self.delta`` (clipped under user-level DP), and the factors it and
        SCAFFOLD's Δc_k enter the rank's sum with."""
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
        factor = contribution_factor(stats.steps, planned,
                                     normalize_steps=self.config.train.normalize_steps)
        if self.keys is not None:
            self._check_encryptable(site, round_index, factor)
        control_delta = None
        if self.global_control is not None:  # SCAFFOLD
            # option II: c_k+ = c_k − c + (w − w_k) / (K η); K η generalized to SGD with
            # momentum as the distance K steps travel per unit of constant gradient
            train = self.config.train
            travel = sgd_travel(round_lr(train, round_index), train.momentum, stats.steps)
            control_delta = -self.global_control - self.delta / np.float32(travel)
        return LocalUpdate(scale=weight * factor, control_delta=control_delta,
                           control_scale=weight)

    def _check_encryptable(self, site: Site, round_index: int, factor: float) -> None:
        # The masked ring holds sums below its value bound (crypto/ring.py); checking each
        # weighted update against bound / ranks bounds every partial sum too.
        from fedsilo.crypto.ring import ring_encoding

        ranks = self.world.num_participants
        limit = ring_encoding(self.keys.params, num_terms=ranks).value_bound / ranks
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

    def _sit_out(self, site: Site, round_index: int, *, reason: str) -> SiteReport:
        """The report of a site that does not contribute this round (its update is zero)."""
        if checkpoint_due(self.config, round_index):
            self._save(site, round_index)
        return SiteReport(site=site.index, num_samples=len(site.train_data), contributed=False,
                          reason=reason, privacy=self._privacy_report(site))

    # -- the end of the job -------------------------------------------------------------

    def final_validation(self) -> tuple[list[FinalSiteReport], DataError | None]:
        self.layout.load(self.model, self.global_weights)
        reports: list[FinalSiteReport] = []
        for site in self.sites:
            report = FinalSiteReport(site=site.index)
            if noised_validation(self.config) and site.privacy is not None:
                try:
                    report.val_hist = self._noised_validation(site,
                                                              model_round=self.config.rounds)
                except DataError as exc:
                    return reports, exc
            report.privacy = self._privacy_report(site)
            if not private(self.config):  # under DP, validation metrics stay on the site
                try:
                    validation = self.task.evaluate(self.model, site.val_data,
                                                    batch_size=self.config.eval.batch_size,
                                                    thresholds=self._threshold_grid())
                except DataError as exc:  # a streamed shard that turned unreadable
                    return reports, exc
                report.val_counts = validation.pop("counts", None)
                report.val = validation
            reports.append(report)
        return reports, None

    def _validation_due(self, model_round: int) -> bool:
        """dp.validation: whether the sites validate the global model of ``model_round`` in
        a round (every dp.validation.every rounds; the final model at the job's end)."""
        every = self.config.dp.validation.every
        return noised_validation(self.config) and 1 <= model_round < self.config.rounds \
            and model_round % every == 0

    def _noised_validation(self, site: Site, *, model_round: int) -> dict[str, Any] | None:
        """dp.validation: the histogram of ``site``'s validation scores under the loaded
        global model, noised from its secret and accounted in its ε (privacy/engine.py);
        nothing else of the validation leaves the site."""
        assert site.privacy is not None and site.secret is not None, "DP-SGD is on"
        bins = self.config.dp.validation.bins
        exact = self.task.evaluate(self.model, site.val_data,
                                   batch_size=self.config.eval.batch_size,
                                   thresholds=histogram_edges(bins))
        hist = histogram_from_edge_counts(exact["counts"])
        noised = site.privacy.release_validation(
            np.array(hist["pos"] + hist["neg"], dtype=np.float64), secret=site.secret,
            round_index=model_round)
        if noised is None:
            return None
        return {"pos": [float(v) for v in noised[:bins]],
                "neg": [float(v) for v in noised[bins:]]}

    def _threshold_grid(self) -> np.ndarray | None:
        """checkpoint.threshold on a binary task: the grid the validation counts are at."""
        return threshold_grid(self.config.checkpoint.threshold, self.manifest.num_classes)

    def finish_job(self, reports: Any) -> None:
        pass


def _param_slices(model: nn.Module, layout: WeightLayout) -> list[tuple[torch.Tensor, int, int]]:
    """Each trainable parameter with its offset and length in the flat layout."""
    offsets = dict(zip(layout.names, layout.offsets))
    return [(p, offsets[name], p.numel()) for name, p in model.named_parameters()
            if p.requires_grad and name in offsets]
