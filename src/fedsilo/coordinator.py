"""The coordinator (MPI rank 0): plans each round, turns the transport's sum into the new
global model, evaluates it on the test shard and records the round.

One round on the coordinator reads::

    plan  ->  (reports)  ->  outcome  ->  Aggregate from the transport
    ->  weighted mean update (aggregate.py)  ->  server step (strategy)  ->  test  ->  record

It holds no site's data and, under secure aggregation, sees only the sum.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from fedsilo import __version__
from fedsilo.aggregate import (
    count_nonfinite,
    renormalization,
    step_normalized,
    weighted_validation,
)
from fedsilo.boardlog import BoardLog
from fedsilo.checkpointfile import read_coordinator_state
from fedsilo.errors import CheckpointError, UpdateError
from fedsilo.messages import (
    Aggregate,
    Contribution,
    FinalSiteReport,
    RankReport,
    RoundOutcome,
    RoundPlan,
    SiteReport,
)
from fedsilo.modelfile import write_model
from fedsilo.participation import rank_of_sites
from fedsilo.privacy import userlevel
from fedsilo.privacy.secret import Purpose, SecretStream, check_secret, new_secret
from fedsilo.progress import RoundProgress
from fedsilo.report import job_summary, metrics_row
from fedsilo.roles import (
    Role,
    checkpoint_due,
    noised_validation,
    plan_weights,
    private,
    reduce_buffer,
    user_weights,
)
from fedsilo.rundir import atomic_torch_save, dump_json, finite_json
from fedsilo.selection import (
    BestModel,
    choose_threshold,
    counts_from_histogram,
    metrics_from_counts,
    resolve_best_by,
    sum_counts,
    sum_histograms,
)
from fedsilo.shards import SplitReader
from fedsilo.strategies import build_strategy
from fedsilo.tasks import fields_of_test
from fedsilo.transport import transport_for
from fedsilo.verification import planned_sample

log = logging.getLogger("fedsilo")


class Coordinator(Role):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config, manifest = self.config, self.manifest
        # held in memory or streamed from test.h5 (data.in_memory, loading.py)
        mean, std = self._normalization(None)
        reader = SplitReader(self._shard_path(manifest.test, kind="test"), "test",
                             cache_bytes=0)
        self.test_data = self.task.load([(reader, mean, std)], data=config.data,
                                        device=self.device, who="the coordinator")[0]
        self._check_model_fits(self.test_data.sample(1))
        self.strategy = build_strategy(config.strategy.name, dict(config.strategy.options))
        self.strategy.setup(self.layout.numel)
        self.num_samples = {i: int(site.num_samples["train"])
                            for i, site in enumerate(manifest.sites)}
        self.rank_of_site = rank_of_sites(num_sites=manifest.num_sites,
                                          num_ranks=self.world.num_participants)
        #: where the transport's sum lands, and the float32 aggregate the strategy reads
        self.reduce_buffer = reduce_buffer(config, self.layout, pinned=self.pinned,
                                           control_variates=self.strategy.control_variates)
        self.aggregate_buffer = self.reduce_buffer if self.reduce_buffer.dtype == np.float32 \
            else np.empty(self.reduce_buffer.size, dtype=np.float32)
        # only the public context under CKKS: the coordinator never opens the participant
        # key; it can add ciphertexts, not decrypt them
        codec = self._load_ckks("coordinator") if config.he.enabled else None
        self.transport = transport_for(config, self.strategy, codec=codec)
        self.last_test: dict[str, Any] | None = None
        #: model selection by federated validation (checkpoint.best_by; docs/model.md)
        metric = resolve_best_by(config.checkpoint.best_by, private=private(config),
                                 noised=noised_validation(config))
        self.best = BestModel(metric) if metric is not None else None
        #: the final model's federated validation and summed confusion counts (finish_job)
        self.final_val: dict[str, Any] | None = None
        self.final_counts: dict[str, Any] | None = None
        #: what summary.json says of best.pt and the thresholds (written by finish_job)
        self.model_records: dict[str, Any] = {}
        #: each participant's latest privacy report, and the round a site stopped in
        self.privacy: dict[int, dict[str, Any]] = {}
        self.stopped: dict[int, int] = {}
        #: the round the final model is of: config.rounds, or the last round before every
        #: site had spent its privacy budget (the job then ends there, cleanly)
        self.final_round = config.rounds
        user_dp = config.dp.user
        self.user_accountant: Any = None
        if user_dp.enabled:  # Opacus's accountants: imported only by runs that account
            from fedsilo.privacy.user_accounting import UserAccounting

            self.user_accountant = UserAccounting(
                noise_multiplier=user_dp.noise_multiplier, noise=user_dp.noise,
                secure=config.aggregation.secure != "none")
        #: central user-level noise: the coordinator's own secret (its 0600 checkpoint)
        self.secret = new_secret() if user_dp.enabled and user_dp.noise == "central" else None
        self.started = time.perf_counter()
        #: the checkpoint's metrics row, restored if metrics.jsonl lost it
        self._checkpoint_row: dict[str, Any] | None = None
        if self.resume_round:
            self._load_checkpoint(self.resume_round)
        self._control_buffer: np.ndarray | None = None
        self.progress = RoundProgress(total=config.rounds, done=self.resume_round,
                                      mode=config.runtime.progress)
        #: TensorBoard events (runtime.tensorboard), opened at the first round: by then a
        #: resume has settled metrics.jsonl, whose rows it continues from
        self.board: BoardLog | None = None
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
        state = read_coordinator_state(path)
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
        # a changed federation (--sites-changed): per-site state follows each site to its
        # new index; a departed site's goes, a joining site starts without any
        now_of = {int(k): int(k) for k in range(self.manifest.num_sites)} \
            if self.site_map is None else \
            {was: k for k, was in self.site_map.items() if was is not None}
        self.privacy = {now_of[int(k)]: v for k, v in privacy.get("reports", {}).items()
                        if int(k) in now_of}
        self.stopped = {now_of[int(k)]: v for k, v in privacy.get("stopped", {}).items()
                        if int(k) in now_of}
        if self.user_accountant is not None:
            self.user_accountant.load_state_dict(privacy["user_accountant"], renumber=now_of)
            for site, back in self.returning.items():  # left earlier, back with its data
                self.user_accountant.restore_site(site, back["user_accountant"])
        if self.secret is not None:
            if "secret" not in state:
                raise CheckpointError(f"checkpoint {path} holds no privacy secret for the "
                                      f"central user-level noise; start a new run")
            self.secret = check_secret(bytes(state["secret"].tolist()))
        if state.get("metrics_row"):
            self._checkpoint_row = json.loads(state["metrics_row"])
        if self.best is not None and state.get("best"):
            weights = state.get("best_weights")
            self.best.load_state_dict({"meta": json.loads(state["best"]),
                                       "weights": None if weights is None else weights.numpy()})

    def restore_metrics_row(self) -> None:
        """Resume: a crash between the checkpoint and metrics.jsonl loses no row (called once
        every rank has accepted the resume)."""
        rows = self.run_dir.read_metrics()
        if self._checkpoint_row is not None \
                and (not rows or rows[-1]["round"] < self.resume_round):
            self.run_dir.append_metrics(self._checkpoint_row)

    # -- a round ----------------------------------------------------------------------

    def plan(self, round_index: int) -> RoundPlan:
        if self.config.dp.budget_policy == "stop":
            for site, report in sorted(self.privacy.items()):
                if not report["next_round_fits"]:
                    self._mark_stopped(site, round_index)
        available = [k for k in sorted(self.num_samples) if k not in self.stopped]
        if not available:
            log.warning("every participant has spent its privacy budget; the job ends before "
                        "round %d", round_index)
            self.final_round = round_index - 1
            # every site listed as stopped: the federation tells this end from a signal's
            return RoundPlan(round=round_index, stop=True, stopped=tuple(sorted(self.stopped)))
        # the same public computation every participant repeats (verification.check_plan)
        stopped = tuple(sorted(self.stopped))
        participants = planned_sample(self.config, num_sites=self.manifest.num_sites,
                                      round_index=round_index, stopped=stopped)
        return RoundPlan(round=round_index, participants=tuple(participants),
                         weights=plan_weights(self.config, self.strategy, self.manifest,
                                              participants),
                         ranks=tuple(sorted({self.rank_of_site[k] for k in participants})),
                         stopped=stopped)

    def local_round(self, plan: RoundPlan) -> tuple[None, None]:
        return None, None  # the coordinator adds nothing to the sum

    def contribution_of_rank(self) -> Contribution:
        """The coordinator's side of the transport: the buffer the sum lands in."""
        return Contribution(total=self.reduce_buffer)

    def outcome(self, plan: RoundPlan, reports: Sequence[RankReport | None]) -> RoundOutcome:
        """What every rank learns of the round after the reports: who contributed (site
        indexes only), which sites add to the sum, and whether a secure round is refused."""
        sites = [r for rank in reports[1:] if rank is not None for r in rank.sites]
        contributors = tuple(sorted(r.site for r in sites if r.contributed))
        secure = self.config.aggregation.secure != "none"
        return RoundOutcome(
            round=plan.round, ranks=plan.ranks,
            contributors=contributors,
            in_sum=tuple(sorted(r.site for r in sites if r.in_sum)),
            rows_per_rank={rank: sum(r.contributed for r in report.sites)
                           for rank, report in enumerate(reports) if rank and report},
            refused=secure and len(contributors) < self.config.aggregation.min_contributors)

    def check_outcome(self, outcome: RoundOutcome) -> None:
        return None

    def finish_round(self, plan: RoundPlan, reports: Sequence[Any], timer: Any, *,
                     outcome: RoundOutcome, aggregate: Aggregate | None) -> Callable[[], None]:
        """The round's server step, now; returns what is left to do, its record: the test
        evaluation, the checkpoint and the metrics row.  The round loop runs that record
        while the participants train the next round (``runtime.overlap_eval``), or at once.
        Everything the record writes is fixed here, so both give the same files."""
        round_index = plan.round
        ranks: list[RankReport] = list(reports[1:])
        sites = [r for rank in ranks for r in rank.sites]
        self._note_privacy(round_index, sites)
        contributors = [r for r in sites if r.contributed]
        self._offer_best(round_index - 1, contributors)
        if outcome.refused:
            log.warning("round %d is refused by the participants: %d site(s) contributed, "
                        "fewer than aggregation.min_contributors = %d; the global model stays "
                        "as it was", round_index, len(contributors),
                        self.config.aggregation.min_contributors)
            contributors = []
        with timer("server_step"):
            if contributors and aggregate is not None:
                update = self._user_level_mean(plan, aggregate) \
                    if self.user_accountant is not None \
                    else self._weighted_mean(plan, contributors, aggregate)
                fraction = len(contributors) / len(self.num_samples)
                self.strategy.server_step(self.global_weights, update,
                                          out=self.global_weights, fraction=fraction)
                if count_nonfinite(self.global_weights):
                    raise UpdateError(f"the aggregated model of round {round_index} is not "
                                      f"finite")
            else:
                log.warning("round %d: no participant contributed; the global model stays as "
                            "it was", round_index)
        if self.user_accountant is not None:
            self.user_accountant.spend_round(planned=plan.participants)
        # the row and the checkpoint's privacy state as they stand now: the next round's
        # plan may mark sites stopped before the record runs
        row = metrics_row(self, plan, ranks, timer, None,
                          info=aggregate.info if aggregate is not None else {})
        stopped = dict(self.stopped)
        critical = timer.total()
        overlapped = self.config.runtime.overlap_eval

        def record() -> None:
            self._record_round(round_index, row, stopped=stopped, critical=critical,
                               overlapped=overlapped)

        return record

    def _record_round(self, round_index: int, row: dict[str, Any], *, stopped: dict[int, int],
                      critical: float, overlapped: bool) -> None:
        """Round ``round_index``'s test evaluation, checkpoint and metrics row.  The global
        weights, the strategy's state and the privacy reports are those of the round's end
        until the next round's server step, which comes after this."""
        seconds = row["seconds"]
        extra = 0.0
        if round_index % self.config.eval.every == 0 or round_index == self.config.rounds:
            begin = time.perf_counter()
            self.layout.load(self.model, self.global_weights)
            test = self.task.evaluate(self.model, self.test_data,
                                      batch_size=self.config.eval.batch_size)
            self.last_test = test
            seconds["evaluate"] = time.perf_counter() - begin
            extra += seconds["evaluate"]
            # the test metrics come right after the round number, as they always have
            rest = {k: v for k, v in row.items() if k != "round"}
            row.clear()
            row.update(round=round_index, **fields_of_test(test), **rest)
        if overlapped:  # before the checkpoint, which keeps the row for a resume
            row["overlapped"] = ["evaluate", "checkpoint"]

        def round_seconds() -> float:
            # the round as the federation waited for it: with the record overlapped, its
            # evaluation and checkpoint ran during the next round's training; whole seconds
            # under DP (report.metrics_row says why)
            waited = critical if overlapped else critical + extra
            return float(round(waited)) if private(self.config) else waited

        seconds["round"] = round_seconds()  # the checkpoint's copy of the row has it too
        if checkpoint_due(self.config, round_index):
            begin = time.perf_counter()
            self._save(round_index, row, stopped=stopped)
            self.run_dir.prune(keep=self.config.checkpoint.keep, current=round_index)
            seconds["checkpoint"] = time.perf_counter() - begin
            extra += seconds["checkpoint"]
        seconds["round"] = round_seconds()
        self.run_dir.append_metrics(row)
        self.progress.update(round_index, row)
        if self.config.runtime.tensorboard:
            if self.board is None:
                self.board = BoardLog(self.run_dir.root, rows=self.run_dir.read_metrics()[:-1])
            self.board.write(row)

    def _save(self, round_index: int, row: dict[str, Any], *,
              stopped: dict[int, int] | None = None) -> None:
        atomic_torch_save(self.run_dir.coordinator_checkpoint(round_index), {
            "round": round_index,
            "weights": torch.from_numpy(self.global_weights.copy()),
            "layout": list(self.layout.names),
            "strategy": {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
                         for k, v in self.strategy.state_dict().items()},
            "last_test": self.last_test,
            "privacy": json.dumps({
                "reports": self.privacy,
                "stopped": self.stopped if stopped is None else stopped,
                "user_accountant": self.user_accountant.state_dict()
                if self.user_accountant is not None else None}),
            # the row goes in too: a crash between this file and metrics.jsonl loses nothing
            "metrics_row": json.dumps(finite_json(row)),
            "fedsilo_version": __version__,
            "shard_set": self.manifest.record(),
            **self._best_state(),
            **({} if self.secret is None else
               {"secret": torch.tensor(list(self.secret), dtype=torch.uint8)}),
        })

    def _float_sum(self, aggregate: Aggregate) -> np.ndarray:
        """The transport's sum as float32, in the buffer the strategy reads."""
        out = self.aggregate_buffer
        assert aggregate.total is not None, "a linear strategy's transport delivers a sum"
        if aggregate.total is not out:
            np.copyto(out, aggregate.total, casting="same_kind")
        return out

    def _user_level_mean(self, plan: RoundPlan, aggregate: Aggregate) -> np.ndarray:
        """User-level DP: the released sum Σ w_k clip(Δ_k) + N(0, σ²S²), then divided by the
        planned sites' total weight.  The noise goes on the sum itself, before any rescale, and
        nothing is renormalized over the sites that contributed (their number is not public
        to the model's readers, and renormalizing would scale the noise down with it)."""
        numel = self.layout.numel
        total = self._float_sum(aggregate)
        user_dp = self.config.dp.user
        if user_dp.noise == "central":
            assert self.secret is not None
            std = userlevel.noise_std(noise_multiplier=user_dp.noise_multiplier,
                                      clip_norm=user_dp.clip_norm,
                                      weights=user_weights(self.strategy, self.manifest))
            noise = np.empty(numel, dtype=np.float32)
            SecretStream(self.secret, purpose=Purpose.USER_NOISE, round_index=plan.round,
                         step=0).fill_gaussian(noise, std=std)
            total[:numel] += noise
        planned = sum(plan.weights.values())  # public: who was asked, not who answered
        total[:numel] *= np.float32(1.0 / planned)
        return total

    def _weighted_mean(self, plan: RoundPlan, contributors: Sequence[SiteReport],
                       aggregate: Aggregate) -> np.ndarray:
        """The weighted mean update (float32) over the sites that contributed.

        Participants sent ``p_k f_k Δ_k`` with the planned weights p_k (Σ p = 1 over the
        planned sites) and f_k from :func:`~fedsilo.aggregate.contribution_factor`; the sum is
        renormalized over the contributors (:func:`~fedsilo.aggregate.renormalization`).
        """
        numel = self.layout.numel
        normalize = self.config.train.normalize_steps
        p = [plan.weights[r.site] for r in contributors]
        steps = [r.steps or 0 for r in contributors]  # a contributor did at least one
        if not self.strategy.linear:
            rows = aggregate.rows
            assert rows is not None, "a non-linear strategy's transport delivers the rows"
            if normalize:
                step_normalized(rows, p, steps)
            total = sum(p)
            return self.strategy.combine(rows, np.array([w / total for w in p]))
        scale = renormalization(p, steps, [r.planned_steps or 0 for r in contributors],
                                normalize_steps=normalize)
        update = self._float_sum(aggregate)
        if abs(scale - 1.0) > 1e-6:
            update[:numel] *= np.float32(scale)
        total = sum(p)
        if self.strategy.control_variates and abs(total - 1.0) > 1e-6:
            update[numel:] *= np.float32(1.0 / total)
        return update

    def _note_privacy(self, round_index: int, reports: Sequence[SiteReport]) -> None:
        for r in reports:
            if r.privacy is not None:
                self.privacy[r.site] = r.privacy
            if not r.contributed and r.reason == "budget":
                self._mark_stopped(r.site, round_index)

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

    # -- model selection (docs/model.md) ------------------------------------------------

    def _offer_best(self, model_round: int, reports: Sequence[SiteReport]) -> None:
        """The round's sites validated the global model of round ``model_round``: the
        weights the round started from, still unchanged before the server step.  The initial
        model (round 0) is no candidate."""
        if self.best is None or model_round < 1:
            return
        val, counts = self._pooled_validation(reports)
        self.best.offer(model_round, val, self.global_weights, counts=counts)

    def _pooled_validation(self, reports: Sequence[SiteReport | FinalSiteReport]
                           ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The sites' validation pooled, and the summed confusion counts (binary tasks with
        a threshold rule).  Under DP with dp.validation: both follow from the sum of the
        sites' noised histograms (post-processing of what they released), else ({}, None)."""
        if private(self.config):
            hist = sum_histograms([r.val_hist for r in reports if r.val_hist is not None])
            counts = counts_from_histogram(hist)
            return metrics_from_counts(counts), counts
        val = weighted_validation([r.val for r in reports if r.val is not None])
        return val, sum_counts([r.val_counts for r in reports if r.val_counts is not None])

    def _best_state(self) -> dict[str, Any]:
        """The best model so far, for the coordinator's checkpoint (``--resume`` keeps it)."""
        if self.best is None or self.best.weights is None:
            return {}
        state = self.best.state_dict()
        return {"best": json.dumps(finite_json(state["meta"])),
                "best_weights": torch.from_numpy(state["weights"].copy())}

    def _model_card(self, round_index: int, *, selected_by: dict[str, Any] | None,
                    threshold: float | None) -> dict[str, Any]:
        """What ``fedsilo predict`` and ``export`` need besides the weights (modelfile.py):
        the test set's preprocessing, so a prediction repeats the coordinator's test."""
        from fedsilo.models import wants_dp_fix

        config, manifest = self.config, self.manifest
        mean, std = self._normalization(None)
        # the model section rebuilds the architecture; the initial weights it named do not
        # matter any more, and auto choices are resolved (the card carries no dp section)
        model = {**config.to_dict()["model"], "weights": None,
                 "dp_fix": "on" if wants_dp_fix(config) else "off"}
        return {
            "fedsilo_version": __version__,
            "model": model,
            "num_classes": manifest.num_classes,
            "class_names": None if manifest.class_names is None else list(manifest.class_names),
            "image_shape": list(manifest.image_shape),
            "normalization": {"mode": config.data.normalize,
                              "mean": [float(v) for v in mean], "std": [float(v) for v in std]},
            "round": round_index,
            "selected_by": selected_by,
            "threshold": None if threshold is None else {
                "rule": config.checkpoint.threshold, "value": threshold, "positive_class": 1,
                "decision": "positive when p(positive class) > value"},
            "eval_batch_size": config.eval.batch_size,
            **({"task": "segmentation", "segmentation": {
                "patch_size": config.segmentation.patch_size,
                "overlap": config.segmentation.overlap}}
               if config.task == "segmentation" else {}),
        }

    def _save_models(self, finals: Sequence[FinalSiteReport]) -> None:
        """``model.pt`` (the final model) and, with model selection, ``best.pt``, each with
        its card; what summary.json says of them lands in ``self.model_records``."""
        rule = self.config.checkpoint.threshold
        val, counts = self._pooled_validation(finals)
        self.final_val, self.final_counts = val or None, counts
        final_threshold = choose_threshold(counts, rule=rule)
        write_model(self.run_dir.model, self.layout.to_state_dict(self.global_weights),
                    self._model_card(self.final_round, selected_by=None,
                                     threshold=final_threshold))
        self.model_records = {}
        if rule != "none":
            self.model_records["threshold"] = {"rule": rule, "value": final_threshold}
        best = self.best
        if best is not None:
            best.offer(self.final_round, val, self.global_weights, counts=counts)
        if best is None or best.weights is None or best.round is None:
            for stale in (self.run_dir.best, self.run_dir.best.with_suffix(".json")):
                stale.unlink(missing_ok=True)  # from an earlier launch that selected
            return
        best_threshold = choose_threshold(best.counts, rule=rule)
        write_model(self.run_dir.best, self.layout.to_state_dict(best.weights),
                    self._model_card(best.round, threshold=best_threshold,
                                     selected_by={"metric": best.metric, "value": best.value}))
        record = best.record() or {}
        row = next((r for r in self.run_dir.read_metrics()
                    if r.get("round") == best.round and "acc" in r), None)
        record["test"] = None if row is None else \
            {k: row[k] for k in ("acc", "auc", "loss") if k in row}
        if rule != "none":
            record["threshold"] = best_threshold
        self.model_records["best"] = record

    # -- the end of the job -------------------------------------------------------------

    def final_validation(self) -> tuple[None, None]:
        return None, None

    def finish_job(self, reports: Sequence[Any]) -> None:
        self.progress.close()
        if self.board is not None:
            self.board.close()
        if self.last_test is None or self.resume_round == self.final_round \
                or self.final_round < self.config.rounds:  # (the round may not be evaluated)
            self.layout.load(self.model, self.global_weights)
            self.last_test = self.task.evaluate(self.model, self.test_data,
                                                batch_size=self.config.eval.batch_size)
        finals: list[FinalSiteReport] = [r for rank in reports[1:] for r in rank]
        self._save_models(finals)
        summary = job_summary(self, finals)
        # the one marker of this ending: summary.json, also when the budgets ended the job
        summary["ending"] = "finished" if self.final_round == self.config.rounds \
            else "budget spent"
        if self.final_round < self.config.rounds:
            summary["budget_spent"] = {
                "before_round": self.final_round + 1,
                "message": f"every site had spent its privacy budget before round "
                           f"{self.final_round + 1} of {self.config.rounds}; the model is "
                           f"round {self.final_round}'s"}
        dump_json(self.run_dir.summary, summary)
        dice = f" dice {self.last_test['dice']:.4f}" if "dice" in self.last_test else ""
        log.info("finished: test acc %.4f auc %.4f loss %.4f%s -> %s", self.last_test["acc"],
                 self.last_test["auc"], self.last_test["loss"], dice, self.run_dir.root)


if TYPE_CHECKING:
    from fedsilo.roles import PlanningRole

    def _honours_the_contract(coordinator: Coordinator) -> PlanningRole:
        return coordinator  # mypy checks the coordinator against the round's protocol
