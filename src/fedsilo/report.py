"""What the coordinator records: one metrics row per round (``metrics.jsonl``) and the job's
``summary.json``.

Both are built from what the round's messages carry (:mod:`fedsilo.messages`) and from the
coordinator's own state; under DP they hold only what the sites may release
(docs/privacy.md: no losses, validation metrics or timings of a site).
"""

from __future__ import annotations

import pickle
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from fedsilo import __version__
from fedsilo.aggregate import weighted_validation
from fedsilo.messages import FinalSiteReport, RankReport, RoundPlan
from fedsilo.roles import noised_validation, private
from fedsilo.tasks import fields_of_test

if TYPE_CHECKING:
    from fedsilo.coordinator import Coordinator


def metrics_row(coordinator: Coordinator, plan: RoundPlan, ranks: Sequence[RankReport],
                timer: Any, test: dict[str, Any] | None, *,
                info: dict[str, Any]) -> dict[str, Any]:
    """The round's row: test metrics, federated validation, each contributing site's
    released figures, who sat out and why, privacy spent, where the time went and what
    crossed MPI.  ``info`` is what the transport said about the aggregation."""
    config = coordinator.config
    dp_private = private(config)
    seconds = dict(timer.seconds)
    everyone = [r for rank in ranks for r in rank.sites]
    reports = [r for r in everyone if r.contributed]
    if not dp_private:  # under DP, sites report no timings (side channel)
        seconds["local_train_max"] = max((r.train_s or 0.0 for r in reports), default=0.0)
        seconds["local_val_max"] = max((r.val_s or 0.0 for r in reports), default=0.0)
        # the critical path of local work: the slowest rank's training + validation (a
        # rank with several sites trains them in turn)
        per_rank = [sum((r.train_s or 0.0) + (r.val_s or 0.0) for r in rank.sites
                        if r.contributed) for rank in ranks]
        seconds["local_compute_max"] = max(per_rank, default=0.0)
    seconds["round"] = timer.total()  # provisional: finish_round adds the checkpoint
    if dp_private:
        # the wait for the slowest site follows its Poisson batch sizes (a side channel of
        # its private data): under DP a reader gets the round's time in whole seconds only
        seconds.pop("local", None)
        seconds.pop("coordination", None)
    numel = coordinator.layout.numel
    active = len(plan.ranks)
    weight_bytes = numel * 4
    row: dict[str, Any] = {"round": plan.round}
    if test is not None:
        row.update(fields_of_test(test))
    if not dp_private:
        row["val"] = weighted_validation([r.val for r in reports if r.val is not None])
    row["participants"] = {str(r.site): r.released() for r in reports}
    if config.dp.enabled:
        row["epsilon"] = {str(k): v["epsilon"] for k, v in sorted(coordinator.privacy.items())}
        row["delta"] = {str(k): v["delta"] for k, v in sorted(coordinator.privacy.items())}
        row["stopped"] = {str(k): v for k, v in sorted(coordinator.stopped.items())}
    row["sampled"] = list(plan.participants)
    # planned sites that did not contribute, and why (budget, deadline, error)
    row["sat_out"] = [r.site for r in everyone if not r.contributed and r.site in plan.weights]
    row["dropped"] = {str(r.site): r.error or r.reason for r in everyone
                      if not r.contributed and r.site in plan.weights}
    if coordinator.user_accountant is not None:
        row.update(user_epsilon_row(coordinator.user_accountant, delta=config.dp.delta))
    row["seconds"] = seconds
    # what crossed MPI: the weights to each active rank (and SCAFFOLD's control
    # variate), and each active rank's sum (twice as wide for SCAFFOLD, or in float64),
    # or for non-linear strategies every contributing update
    strategy = coordinator.strategy
    control = 2 if strategy.control_variates else 1
    wide = 2 if coordinator.reduce_buffer.dtype == np.float64 else 1
    row["bytes"] = {
        "broadcast": weight_bytes * active * control,
        "reduce": weight_bytes * active * control * wide if strategy.linear
        else weight_bytes * len(reports),
        "metadata": len(pickle.dumps(plan)) + len(pickle.dumps(list(ranks)))}
    secure = config.aggregation.secure
    if secure == "masks":
        # uint64 in the ring: 8 bytes per value from every active rank
        row["bytes"]["reduce"] = coordinator.reduce_buffer.size * 8 * active
        row["masks"] = {"reduce_s": info.get("reduce_s"), "bytes_per_param": 8.0}
    if secure != "none":
        row["contributors"] = len(reports)
        if len(reports) < config.aggregation.min_contributors:
            row["refused"] = (f"{len(reports)} contributor(s) < aggregation.min_contributors"
                              f" = {config.aggregation.min_contributors}")
    if coordinator.keys is not None and not row.get("refused"):
        row["he"] = he_row([rank for rank in ranks if rank.he is not None], info=info,
                           numel=numel, received_floats=coordinator.reduce_buffer.size,
                           private=dp_private)
        # every active participant sends its ciphertext to the coordinator, which sends
        # the encrypted total to the aggregator, which returns the float32 sum
        sent = row["he"]["coordinator_receives_bytes"] - coordinator.reduce_buffer.size * 4
        row["bytes"]["reduce"] = (sent + row["he"]["aggregator_receives_bytes"]
                                  + weight_bytes * control)
    return row


def user_epsilon_row(accountant: Any, *, delta: float) -> dict[str, Any]:
    """User-level ε: the largest over the sites, against the readers of the released
    models (``user_epsilon``), against the coordinator (``user_epsilon_coordinator``, None
    when it has no guarantee: central noise) and against one other participant
    (``user_epsilon_participant``: it knows its own share of distributed noise), and per
    site."""
    eps = accountant.epsilon(delta=delta)
    released, coordinator = eps["released"], eps["coordinator"]
    participant = eps["participant"]
    return {
        "user_epsilon": max(released.values(), default=0.0),
        "user_epsilon_coordinator": None if any(v is None for v in coordinator.values())
        else max(coordinator.values(), default=0.0),
        # against one other participant, which knows its own noise share
        "user_epsilon_participant": None if any(v is None for v in participant.values())
        else max(participant.values(), default=0.0),
        "user_epsilon_per_site": {str(k): v for k, v in released.items()},
        "user_delta": delta}


def he_row(ranks: Sequence[RankReport], *, info: dict[str, Any], numel: int,
           received_floats: int, private: bool = False) -> dict[str, Any]:
    """Encrypted aggregation figures: one ciphertext per participant rank, named by the
    sites it sums ("0", or "0+1").  Under DP (``private``) no per-site figure: each site's
    encryption time and ciphertext size go to the coordinator only, and the row holds the
    totals."""
    figures = {"+".join(str(r.site) for r in rank.sites): rank.he for rank in ranks
               if rank.he is not None}
    sizes = {name: he["ciphertext_bytes"] for name, he in figures.items()}
    if private:
        return {"reduce_s": info.get("reduce_s"), "add_s": info.get("add_s"),
                "decrypt_s": info.get("decrypt_s"),
                "ciphertext_bytes_total": sum(sizes.values()),
                "coordinator_receives_bytes": sum(sizes.values()) + received_floats * 4,
                "aggregator_receives_bytes": info.get("total_bytes", 0)}
    return {
        "encrypt_s": max(he["encrypt_s"] for he in figures.values()),
        "reduce_s": info.get("reduce_s"),
        "add_s": info.get("add_s"),
        "decrypt_s": info.get("decrypt_s"),
        "encrypt_s_per_site": {name: he["encrypt_s"] for name, he in figures.items()},
        "ciphertext_bytes": sizes,
        "ciphertext_bytes_per_param": max(sizes.values()) / numel,
        # what the coordinator receives: each rank's ciphertext (it cannot decrypt them)
        # and the float32 aggregate; what a participant receives: at most the total
        "coordinator_receives_bytes": sum(sizes.values()) + received_floats * 4,
        # the encrypted total's own size (none sent: no aggregate this round)
        "aggregator_receives_bytes": info.get("total_bytes", 0),
    }


def job_summary(coordinator: Coordinator, finals: Sequence[FinalSiteReport]) -> dict[str, Any]:
    """``summary.json``: the run, its final test metrics, federated validation (without
    DP) and the privacy each site spent."""
    config = coordinator.config
    rows = coordinator.run_dir.read_metrics()
    summary: dict[str, Any] = {
        "fedsilo_version": __version__,
        "rounds": config.rounds,
        "rounds_completed": rows[-1]["round"] if rows else 0,
        "model": config.model.name,
        "num_parameters": coordinator.layout.numel,
        "participants": {str(k): {"num_samples": v} for k, v in coordinator.num_samples.items()},
        "test": coordinator.last_test,
        "best_acc": max((r["acc"] for r in rows if isinstance(r.get("acc"), (int, float))
                         and not isinstance(r["acc"], bool)), default=None),
        "seconds_this_process": time.perf_counter() - coordinator.started,
        "resumed_from_round": coordinator.resume_round or None,
        # the model selected on federated validation, and decision thresholds (docs/model.md)
        **coordinator.model_records,
    }
    if not private(config):  # under DP, validation metrics stay on the sites
        summary["val"] = weighted_validation([r.val for r in finals if r.val is not None])
        summary["val_per_site"] = {str(r.site): r.val for r in finals}
    elif noised_validation(config) and coordinator.final_val:
        # the sites' noised validation histograms of the final model, summed (dp.validation)
        summary["val"] = {**coordinator.final_val, "noised": True}
    if config.dp.enabled:
        summary["privacy"] = {str(r.site): {
            "epsilon": r.privacy["epsilon"], "delta": r.privacy["delta"],
            "target_epsilon": r.privacy["target_epsilon"],
            "noise_multiplier": r.privacy["noise_multiplier"],
            "sample_rate": r.privacy["sample_rate"], "steps": r.privacy["steps"],
            "accountant": config.dp.accountant,
            "grad_sample_mode": r.privacy["grad_sample_mode"],
            "stopped_round": coordinator.stopped.get(r.site),
            **({"validation_releases": r.privacy["validation_releases"],
                "validation_noise_multiplier": r.privacy["validation_noise_multiplier"]}
               if "validation_releases" in r.privacy else {}),
        } for r in finals if r.privacy is not None}
        summary["stopped"] = {str(k): v for k, v in sorted(coordinator.stopped.items())}
    if coordinator.user_accountant is not None:
        accountant, user_dp = coordinator.user_accountant, config.dp.user
        eps = user_epsilon_row(accountant, delta=config.dp.delta)
        summary["user_privacy"] = {
            "epsilon": eps["user_epsilon"],
            "epsilon_coordinator": eps["user_epsilon_coordinator"],
            "epsilon_participant": eps["user_epsilon_participant"],
            "epsilon_per_site": eps["user_epsilon_per_site"],
            "rounds_per_site": {str(k): v for k, v in accountant.rounds().items()},
            "rounds": max(accountant.rounds().values(), default=0),
            "delta": config.dp.delta, "noise_multiplier": user_dp.noise_multiplier,
            "clip_norm": user_dp.clip_norm, "noise": user_dp.noise,
            "neighbouring": "one site's whole contribution added or removed",
            "sampling_amplification": False, "accountant": "rdp"}
    return summary
