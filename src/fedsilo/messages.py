"""The messages of a round, typed: what the coordinator asks, what a rank answers, what
every rank learns afterwards.

One round reads::

    RoundPlan (coordinator -> all)  ·  local work  ·  RankReport (each rank -> coordinator)
    ·  RoundOutcome (coordinator -> all)  ·  Contribution -> transport -> Aggregate
    ·  server step  ·  metrics row

Everything here is small, pickled by ``mpi4py`` for the object collectives, and pure (no
torch, no MPI).  A report carries only what its site may release: under DP the fields
computed on private data without noise (losses, validation metrics, timings) stay None and
never leave the rank (docs/privacy.md).

>>> plan = RoundPlan(round=3, participants=(0, 2), weights={0: 0.25, 2: 0.75}, ranks=(1, 2))
>>> plan.stopping().stop, plan.stop
(True, False)
>>> SiteReport(site=2, num_samples=10, contributed=False, reason="deadline").released()
{'num_samples': 10}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

#: a site's metrics on a split: acc, auc, loss, num_samples (``training.evaluate``)
Metrics = dict[str, float]


@dataclass(frozen=True)
class RoundPlan:
    """The coordinator's plan for one round, broadcast to every rank."""

    round: int
    #: the sampled sites, sorted
    participants: tuple[int, ...] = ()
    #: each sampled site's weight (the strategy's, or user-level DP's fixed ones)
    weights: Mapping[int, float] = field(default_factory=dict)
    #: the participant ranks with a sampled site: the others idle this round
    ranks: tuple[int, ...] = ()
    #: sites out of privacy budget, left out of the sample (each checks its own listing)
    stopped: tuple[int, ...] = ()
    #: end the job before this round (a signal, or every budget spent)
    stop: bool = False
    #: watchdog: how long the coordinator waits at this round's start and for its local
    #: work (participants wait longer: fedsilo.stopping.WaitPolicy)
    wait_s: float | None = None
    local_wait_s: float | None = None

    def stopping(self) -> RoundPlan:
        """This plan, turned into the order to stop before the round."""
        return dataclasses.replace(self, stop=True)


@dataclass
class SiteReport:
    """One site's answer to a round: whether it contributed, and what it may release."""

    site: int
    num_samples: int
    contributed: bool
    #: why it did not contribute: "not planned", "budget", "deadline", "error", "job failed"
    reason: str | None = None
    #: the error that dropped it (on_participant_error: skip)
    error: str | None = None
    steps: int | None = None
    planned_steps: int | None = None
    #: DP-SGD: the site's accountant report (epsilon, delta, next_round_fits, ...)
    privacy: dict[str, Any] | None = None
    #: whether the site adds anything to the sum (its update, or a user-level noise share)
    in_sum: bool = False
    #: dp.validation: the site's validation histogram with its DP noise (released, and
    #: accounted in its ε; summed by the coordinator and never written per site)
    val_hist: dict[str, Any] | None = None
    # -- withheld under DP: computed on private data without noise ---------------------
    train_loss: float | None = None
    val: Metrics | None = None
    #: checkpoint.threshold on a binary task: validation confusion counts at the fixed
    #: threshold grid (:func:`fedsilo.selection.threshold_counts`), summed by the coordinator
    #: and never written per site
    val_counts: dict[str, Any] | None = None
    train_s: float | None = None
    val_s: float | None = None
    checkpoint_s: float | None = None
    local_s: float | None = None

    #: what may go into metrics.jsonl, when present
    ROW_KEYS = ("num_samples", "steps", "planned_steps", "train_loss", "train_s", "val_s",
                "checkpoint_s", "local_s")

    def released(self) -> dict[str, Any]:
        """The site's entry in the metrics row: the fields it reported, nothing more."""
        row = {key: getattr(self, key) for key in self.ROW_KEYS
               if getattr(self, key) is not None}
        if self.val is not None:
            row.update(val_acc=self.val["acc"], val_auc=self.val["auc"])
        if self.privacy is not None:
            row["epsilon"] = self.privacy["epsilon"]
        return row


@dataclass
class RankReport:
    """One participant rank's answer: a report per site it holds, and (CKKS) its
    encryption figures."""

    sites: list[SiteReport]
    #: encrypted aggregation: {"encrypt_s", "ciphertext_bytes"} of this rank's ciphertext
    he: dict[str, float] | None = None


@dataclass
class FinalSiteReport:
    """A site's end-of-job report: its privacy spent and (without DP) its validation."""

    site: int
    privacy: dict[str, Any] | None = None
    val: Metrics | None = None
    #: as :attr:`SiteReport.val_counts`, for the final model
    val_counts: dict[str, Any] | None = None
    #: as :attr:`SiteReport.val_hist`, for the final model
    val_hist: dict[str, Any] | None = None


@dataclass(frozen=True)
class RoundOutcome:
    """What every rank learns of the round after the reports reached the coordinator:
    site indexes only, never another site's figures."""

    round: int
    ranks: tuple[int, ...]
    #: the sites whose update is in the sum, sorted
    contributors: tuple[int, ...]
    #: the sites that add anything to the sum (masked aggregation masks exactly these)
    in_sum: tuple[int, ...]
    #: non-linear strategies: how many updates each participant rank sends
    rows_per_rank: Mapping[int, int]
    #: secure aggregation: fewer than aggregation.min_contributors contributed
    refused: bool


@dataclass
class Contribution:
    """What one rank hands the transport: its sum of weighted updates (on the coordinator,
    the buffer the sum lands in), or (non-linear strategies) its unweighted updates."""

    total: np.ndarray
    rows: np.ndarray | None = None
    #: this rank's sites (masked aggregation adds their masks)
    sites: tuple[int, ...] = ()


@dataclass
class Aggregate:
    """What the transport delivers at the coordinator."""

    #: the sum of every rank's contribution (None for non-linear strategies)
    total: np.ndarray | None
    #: non-linear strategies: every contributing update, in site order
    rows: np.ndarray | None = None
    #: the transport's figures for the metrics row (seconds spent, ...)
    info: dict[str, Any] = field(default_factory=dict)
