"""Sample-level DP-SGD on one participant (Abadi et al., CCS 2016), made once per job.

Per-sample clipping is done by fedsilo's mixed ghost clipping (``ghost.py``: per-sample
gradient norms without materializing the per-sample gradients of big layers, then one
backward pass of the reweighted loss) where it covers the model, else by Opacus's
``GradSampleModule`` hooks.  Either is attached to the participant's model **once**:
re-wrapping every round would stack hooks.  The
sampling, clipping and noise are done here rather than by Opacus's ``DPDataLoader`` and
``DPOptimizer`` so that every draw the guarantee relies on comes from the site's **secret**
stream (``secret.py``: ChaCha20 keyed by a 256-bit secret from the OS CSPRNG, per round and
step), never from ``config.seed``: nobody else can regenerate the noise, a resumed run that
restores the secret is bit-identical, and the fresh optimizer of each round stays a plain
torch optimizer.

Each step: Poisson sampling (every sample independently with rate q), per-sample
gradients g_i, clipping to norm C (factor min(1, C / (‖g_i‖ + 1e-6)), as Opacus),
Σ clipped + N(0, σ²C²), divided by the expected batch size qN.

The steps' Poisson masks and Gaussian noise depend on the secret, the round and the step
only, so both are drawn ahead of the steps on worker threads (``lookahead.py``): the noise of
step s+1 while step s computes, into a bounded pool of (pinned, on a GPU) host buffers,
bit-identical to drawing it in place (``lookahead=0``); and a streamed split reads a
window of upcoming batches at once (``loading.py``).  With augmentation multiplicity
(``dp.augmult`` K, De et al. 2022) each sampled image comes as K augmented views and g_i
is the mean of their gradients, formed *before* clipping: one sample still moves the
clipped sum by at most C.  Under ``train.precision: bf16`` the forward pass runs under
autocast and the per-sample norms and clipped sums are computed in fp32 from the same bf16
activations (so the bound is exact); fp16 is refused (config/root.py).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from contextlib import ExitStack, closing
from typing import Any, Mapping

import numpy as np
import torch
from opacus import GradSampleModule
from torch import nn

from fedsilo.config import SiteDP, TrainConfig
from fedsilo.errors import CheckpointError, ModelError, PrivacyBudgetError
from fedsilo.privacy import ghost
from fedsilo.privacy.accounting import (
    PrivacyAccountant,
    noise_multiplier_for,
    noise_multiplier_for_remaining,
    plan_steps,
)
from fedsilo.privacy.lookahead import Ahead, BufferPool, fill_noise, noise_ahead
from fedsilo.privacy.secret import Purpose, SecretStream
from fedsilo.privacy.validate import check_model, check_trainable
from fedsilo.runtime import available_cores
from fedsilo.training import Precision

log = logging.getLogger("fedsilo")

#: torch warns on every backward through the first layer's hooks (images need no gradient)
_NO_INPUT_GRAD = "Full backward hook is firing when gradients are computed with respect to"


def lookahead_for(device: torch.device) -> int:
    """Noise buffers of the look-ahead by default: 2 (one in use, one being drawn) where a
    core is free for the worker thread: beside a GPU (the host waits for the device anyway),
    or on a CPU where this node's ranks leave a core to spare
    (``OMPI_COMM_WORLD_LOCAL_SIZE`` × torch's threads < the cores); else 0, in place: a
    worker on a core that torch's threads already fill only takes time from them
    (benchmarks/RESULTS.md, #27).  Either way the draws are the same, bit for bit."""
    if device.type != "cpu":
        return 2
    local_size = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1") or 1)
    return 2 if available_cores() > torch.get_num_threads() * local_size else 0


class ParticipantPrivacy:
    """One participant's DP-SGD engine and accountant for the whole job."""

    def __init__(self, model: nn.Module, *, site: int, settings: SiteDP, mechanism: str,
                 num_samples: int, train: TrainConfig, rounds: int, model_name: str,
                 sample: torch.Tensor, mode: str = "auto",
                 shared: "ParticipantPrivacy | None" = None, augmult: int = 1,
                 lookahead: int | None = None, sample_loss: Any = None,
                 dense: bool = False, validation_sigma: float | None = None,
                 validation_releases: int = 0) -> None:
        check_model(model, name=model_name)
        self.site, self.settings, self.train_config = site, settings, train
        #: views per sample (dp.augmult): the rows of one sample are consecutive
        self.augmult = augmult
        assert train.precision != "fp16", "config/root.py refuses fp16 under DP"
        self.precision = Precision(train.precision, sample.device)
        self.num_samples = num_samples
        self.sample_rate, self.steps_per_round, planned = plan_steps(
            num_samples=num_samples, batch_size=train.batch_size, epochs=train.epochs,
            max_steps=train.max_steps, rounds=rounds)
        self.accountant = PrivacyAccountant(mechanism)
        #: dp.validation: σ of each validation release, and the releases still planned (their
        #: ε is reserved: σ of DP-SGD is planned over what they leave of the budget)
        self.validation_sigma = validation_sigma
        self.validation_left = validation_releases if validation_sigma is not None else 0
        self.validation_released = 0
        if settings.noise_multiplier is not None:
            self.noise_multiplier = settings.noise_multiplier
        elif self.validation_left:
            assert settings.target_epsilon is not None, "config: a budget or a sigma"
            self.noise_multiplier = noise_multiplier_for_remaining(
                accountant=self._reserved(self.accountant), target_epsilon=settings.target_epsilon,
                delta=settings.delta, sample_rate=self.sample_rate, num_steps=planned)
        else:
            assert settings.target_epsilon is not None, "config: a budget or a sigma"
            self.noise_multiplier = noise_multiplier_for(
                target_epsilon=settings.target_epsilon, delta=settings.delta,
                sample_rate=self.sample_rate, num_steps=planned, mechanism=mechanism)
        self.stopped_round: int | None = None
        self.params = [p for p in model.parameters() if p.requires_grad]
        #: noise buffers of the look-ahead (0: the noise is drawn in place, step by step)
        self.lookahead = lookahead_for(sample.device) if lookahead is None else lookahead
        self._pool: BufferPool | None = None  # made on first use, kept for the whole job
        self.loss_fn = nn.CrossEntropyLoss(reduction="sum")
        #: each sample's loss, ``f(logits, labels, reduction="none")`` (None: cross-entropy);
        #: segmentation's Dice + CE of each image's label map.  ``dense``: labels are maps
        self.sample_loss, self.dense = sample_loss, dense
        self.mode: str
        self.clipper: Any
        self.module: Any
        if shared is not None:
            # another site on this rank trains the same model object: share its per-sample
            # machinery (hooks are attached once per model, never stacked)
            self.mode, self.clipper, self.module = shared.mode, shared.clipper, shared.module
            if self.lookahead == shared.lookahead:  # the sites train in turn: one pool
                self._pool = shared._buffers()
            return
        self.clipper, why = None, f"dp.grad_sample_mode={mode}"
        if mode == "auto" and not ghost.supports(model):
            mode, why = "hooks", f"{why}: the model has layers mixed ghost clipping does not cover"
        elif mode in ("auto", "mixed"):
            if not ghost.supports(model):
                raise ModelError(f"model {model_name!r} has layers that dp.grad_sample_mode=mixed "
                                 f"does not cover (it handles "
                                 f"{', '.join(t.__name__ for t in ghost.SUPPORTED)}); "
                                 f"use dp.grad_sample_mode=hooks or auto")
            try:  # weight sharing shows only when the model runs: one forward pass on 2 samples
                self.clipper = ghost.clipper_for(model, sample=sample[:2])
                why += ": mixed ghost clipping covers every layer" if mode == "auto" else ""
                mode = "mixed"
            except ghost.SharedLayerError as exc:
                if mode == "mixed":
                    raise ModelError(f"model {model_name!r} cannot use dp.grad_sample_mode=mixed: "
                                     f"{exc}") from None
                mode, why = "hooks", f"{why}: {exc.reason}, which mixed ghost clipping cannot clip"
        log.info("DP-SGD noise and Poisson masks drawn %s",
                 f"ahead on a worker thread ({self.lookahead} noise buffers)"
                 if self.lookahead else "in place (no core to spare for a worker thread)")
        log.info("model %r: per-sample clipping by %s (%s)", model_name,
                 "mixed ghost clipping" if mode == "mixed" else "Opacus's hooks", why)
        if self.clipper is not None:
            log.info("model %r: per layer at the expected batch of %d: %s", model_name,
                     round(self.sample_rate * num_samples),
                     self.clipper.describe(rows=round(self.sample_rate * num_samples) * augmult))
        self.mode = mode
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum") \
            if mode == "hooks" else model
        check_trainable(self._trial_step, sample[:2], name=model_name, params=self.params)

    # -- budget ---------------------------------------------------------------------------

    @property
    def epsilon(self) -> float:
        return self.accountant.epsilon(delta=self.settings.delta)

    def _reserved(self, accountant: PrivacyAccountant) -> PrivacyAccountant:
        """A copy of ``accountant`` that has also spent the validation releases still
        planned (dp.validation)."""
        trial = PrivacyAccountant(accountant.mechanism)
        trial.history = list(accountant.history)
        if self.validation_left and self.validation_sigma is not None:
            trial.spend(noise_multiplier=self.validation_sigma, sample_rate=1.0,
                        num_steps=self.validation_left)
        return trial

    def next_round_epsilon(self) -> float:
        """ε after one more round, with the validation releases still planned."""
        return self._reserved(self.accountant).epsilon_after(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
            num_steps=self.steps_per_round, delta=self.settings.delta)

    def release_validation(self, counts: np.ndarray, *, secret: bytes,
                           round_index: int) -> np.ndarray | None:
        """``counts`` (a validation histogram, flat) plus N(0, σ_v²) from the site's secret,
        accounted as one Gaussian mechanism of sensitivity 1 (q = 1) in this site's ε; None
        (nothing released, nothing spent) when it would take ε over the budget."""
        assert self.validation_sigma is not None, "dp.validation is on"
        sigma, target = self.validation_sigma, self.settings.target_epsilon
        if target is not None and self.accountant.epsilon_after(
                noise_multiplier=sigma, sample_rate=1.0, num_steps=1,
                delta=self.settings.delta) > target:
            log.warning("site %d releases no validation histogram of round %d: it would take "
                        "ε over the budget %s", self.site, round_index, target)
            return None
        noise = SecretStream(secret, purpose=Purpose.VALIDATION, round_index=round_index,
                             step=0).gaussian(int(counts.size)) * sigma
        self.accountant.spend(noise_multiplier=sigma, sample_rate=1.0, num_steps=1)
        self.validation_left = max(0, self.validation_left - 1)
        self.validation_released += 1
        return np.asarray(counts, dtype=np.float64) + noise

    def round_fits(self) -> bool:
        """Whether one more round stays within the budget (always, without a budget)."""
        target = self.settings.target_epsilon
        return target is None or self.next_round_epsilon() <= target

    def budget_error(self, round_index: int) -> PrivacyBudgetError:
        return PrivacyBudgetError(
            f"participant {self.site} (site-{self.site:03d}) would exceed its privacy budget "
            f"in round {round_index}: ε would reach {self.next_round_epsilon():.3f} > target "
            f"{self.settings.target_epsilon} (δ = {self.settings.delta}); spent so far "
            f"ε = {self.epsilon:.3f} (dp.budget_policy=abort)")

    def report(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.settings.delta,
                "target_epsilon": self.settings.target_epsilon,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "steps": self.accountant.num_steps - self.validation_released,
                "stopped_round": self.stopped_round, "grad_sample_mode": self.mode,
                **({"validation_releases": self.validation_released,
                    "validation_noise_multiplier": self.validation_sigma}
                   if self.validation_sigma is not None else {})}

    # -- training ---------------------------------------------------------------------

    def train_round(self, data: Any, *, optimizer: torch.optim.Optimizer, secret: bytes,
                    round_index: int, deadline: float | None = None, augment: Any = None
                    ) -> tuple[int, int, float, float]:
        """One round of DP-SGD on ``data``; returns (steps, samples, mean loss, seconds).

        Poisson masks and noise come from ``secret`` (the site's own, see ``secret.py``),
        one stream per (round, step).  Stops early at ``deadline`` (a ``time.perf_counter()``
        value).  Every step taken is accounted, also when the round ends early or fails
        part-way (its update may then be dropped, but the data was touched).  ``augment``:
        the batch transform (``dp.augmult`` views of each sample).
        """
        start = time.perf_counter()
        self.module.train()
        samples, loss_sum, steps = 0, 0.0, 0
        try:
            with warnings.catch_warnings(), ExitStack() as stack:
                masks, noise = self._draws(stack, secret, round_index)
                batches = stack.enter_context(closing(data.batches(masks, transform=augment)))
                warnings.filterwarnings("ignore", message=_NO_INPUT_GRAD)
                for step, (images, labels) in enumerate(batches):
                    if deadline is not None and time.perf_counter() >= deadline:
                        break
                    steps += 1  # counted before the step: a step that fails was still taken
                    values = noise.take() if noise is not None \
                        else self._noise_in_place(secret, round_index, step)
                    try:
                        samples, loss_sum = self._step(images, labels, optimizer, values,
                                                       samples, loss_sum)
                    except BaseException:
                        # whatever failed, the buffer goes back (twice is a no-op): a
                        # buffer lost here would stall the next site's first step forever
                        self._buffers().release(values)
                        raise
        finally:
            self.accountant.spend(noise_multiplier=self.noise_multiplier,
                                  sample_rate=self.sample_rate, num_steps=steps)
        return steps, samples, loss_sum / max(samples, 1), time.perf_counter() - start

    def _draws(self, stack: ExitStack, secret: bytes, round_index: int
               ) -> tuple[Any, "Ahead[torch.Tensor] | None"]:
        """The round's Poisson masks (indexes) and noise look-ahead (None: in place), both
        closed with ``stack``."""
        count = self.steps_per_round
        if not self.lookahead:
            return (self._poisson(secret, round_index, k) for k in range(count)), None
        masks = stack.enter_context(Ahead(
            lambda k: self._poisson(secret, round_index, k), count, depth=2,
            name="fedsilo-masks",
            describe=lambda k: f"the Poisson mask of site {self.site}, round {round_index}, "
                               f"step {k}"))
        noise = stack.enter_context(noise_ahead(
            self._buffers(), secret, round_index=round_index, steps=count,
            std=self.noise_multiplier * self.settings.max_grad_norm,
            depth=max(1, self.lookahead - 1), site=self.site))
        return masks, noise

    def _buffers(self) -> BufferPool:
        if self._pool is None:
            device = self.params[0].device
            self._pool = BufferPool(sum(p.numel() for p in self.params),
                                    capacity=max(1, self.lookahead),
                                    pin=device.type == "cuda")
        return self._pool

    def _noise_in_place(self, secret: bytes, round_index: int, step: int) -> torch.Tensor:
        buffer = self._buffers().acquire()
        try:
            return fill_noise(buffer, secret, round_index=round_index, step=step,
                              std=self.noise_multiplier * self.settings.max_grad_norm)
        except BaseException:
            self._buffers().release(buffer)
            raise

    def _poisson(self, secret: bytes, round_index: int, step: int) -> np.ndarray:
        """The indexes Poisson sampling draws for one step (from the site's secret)."""
        mask = SecretStream(secret, purpose=Purpose.POISSON, round_index=round_index,
                            step=step).bernoulli(self.num_samples, self.sample_rate)
        return np.flatnonzero(mask)

    def _step(self, images: torch.Tensor, labels: torch.Tensor,
              optimizer: torch.optim.Optimizer, noise: torch.Tensor, samples: int,
              loss_sum: float) -> tuple[int, float]:
        """One DP-SGD step on a Poisson batch (``augmult`` rows a sample) with ``noise`` (the
        step's flat host buffer, from the pool: handed back here); returns the running
        (samples, loss sum)."""
        device = labels.device
        optimizer.zero_grad(set_to_none=True)
        event = None
        try:  # the buffer goes back to the pool whatever happens (a leak would stall the next)
            if labels.numel():  # Poisson sampling may draw an empty batch: then noise only
                loss = self.clipped_sum(images, labels, group=self.augmult)
                samples += int(labels.shape[0]) // self.augmult
                loss_sum += float(loss.detach())
            values = noise
            if device.type == "cuda":  # one asynchronous copy out of pinned memory
                values = noise.to(device, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            elif device.type != "cpu":
                values = noise.to(device)
            expected_batch = self.sample_rate * self.num_samples
            offset = 0
            for p in self.params:  # one stream, read in parameter order
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                numel = p.numel()
                p.grad.add_(values[offset: offset + numel].view_as(p))
                p.grad.div_(expected_batch)
                offset += numel
        finally:
            self._buffers().release(noise, event)
        optimizer.step()
        return samples, loss_sum

    def clipped_sum(self, images: torch.Tensor, labels: torch.Tensor, *, group: int = 1
                    ) -> torch.Tensor:
        """Set each ``p.grad`` to Σ_i min(1, C/‖g_i‖) g_i over the batch; returns Σ_i ℓ_i.

        ``group`` > 1: sample i is the ``group`` consecutive rows i·group .. i·group+group-1
        (its augmented views), g_i and ℓ_i the means over them."""
        if self.clipper is not None:
            extra = {} if self.sample_loss is None else {"loss_fn": self.sample_loss}
            return self.clipper.clipped_sum(images, labels,
                                            max_grad_norm=self.settings.max_grad_norm,
                                            group=group, autocast=self.precision.autocast,
                                            **extra)
        with self.precision.autocast():
            logits = self.module(images)
            loss = (self.loss_fn(logits, labels) if self.sample_loss is None
                    else self.sample_loss(logits, labels, reduction="none").sum()) / group
        loss.backward()
        self.clip_and_sum(group=group)
        return loss

    def _trial_step(self, images: torch.Tensor) -> None:
        self.module.train()
        shape = (images.shape[0], *images.shape[2:]) if self.dense else (images.shape[0],)
        labels = torch.zeros(shape, dtype=torch.long, device=images.device)
        self.clipped_sum(images, labels)

    def clip_and_sum(self, *, group: int = 1) -> None:
        """Replace each ``p.grad`` by the sum of the clipped per-sample gradients (each the
        sum over its ``group`` rows; fp32 whatever precision the forward pass ran in)."""
        per_sample = [ghost.wide(p.grad_sample) for p in self.params]
        if group > 1:
            per_sample = [g.reshape(-1, group, *g.shape[1:]).sum(1) for g in per_sample]
        batch = per_sample[0].shape[0]
        norms = torch.stack([g.reshape(batch, -1).norm(2, dim=1) for g in per_sample], dim=1)
        factor = (self.settings.max_grad_norm / (norms.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
        for p, g in zip(self.params, per_sample):
            p.grad = torch.einsum("i,i...->...", factor, g)
            p.grad_sample = None

    # -- checkpoint -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "stopped_round": self.stopped_round,
                "noise_multiplier": self.noise_multiplier,
                "validation_left": self.validation_left,
                "validation_released": self.validation_released}

    def load_state_dict(self, state: Mapping[str, Any], *, remaining_rounds: int) -> None:
        """Continue from a checkpoint; ``remaining_rounds`` are the rounds the resumed job may
        still train.  With σ chosen from the budget, it is planned again over what the
        budget has left: the saved σ stays while the remaining rounds fit at it (so an
        unchanged resume is bit-identical), else the smallest σ that keeps the spent history
        plus the remaining rounds within the target (a resume that adds rounds)."""
        if not isinstance(state, Mapping) or not isinstance(state.get("accountant"), Mapping):
            raise CheckpointError(f"site {self.site}: the checkpoint's DP state has no "
                                  f"privacy accountant")
        self.accountant.load_state_dict(state["accountant"])
        stopped = state.get("stopped_round")
        if stopped is not None and (isinstance(stopped, bool) or not isinstance(stopped, int)
                                    or stopped < 0):
            raise CheckpointError(f"site {self.site}: the checkpoint's 'stopped_round' must be "
                                  f"a round number or null, got {stopped!r}")
        self.stopped_round = stopped
        left = state.get("validation_left", self.validation_left)
        if isinstance(left, bool) or not isinstance(left, int) or left < 0:
            raise CheckpointError(f"site {self.site}: the checkpoint's 'validation_left' must "
                                  f"be a count >= 0, got {left!r}")
        self.validation_left = min(left, self.validation_left) if self.validation_sigma \
            is not None else 0
        released = state.get("validation_released", 0)
        if isinstance(released, bool) or not isinstance(released, int) \
                or not 0 <= released <= self.accountant.num_steps:
            raise CheckpointError(f"site {self.site}: the checkpoint's 'validation_released' "
                                  f"must be a count of its accounted releases, got {released!r}")
        self.validation_released = released
        saved_sigma = state.get("noise_multiplier", self.noise_multiplier)
        if isinstance(saved_sigma, bool) or not isinstance(saved_sigma, (int, float)) \
                or not (math.isfinite(saved_sigma) and saved_sigma > 0):
            raise CheckpointError(f"site {self.site}: the checkpoint's noise multiplier must "
                                  f"be a finite number > 0, got {saved_sigma!r}")
        if self.settings.noise_multiplier is not None or self.settings.target_epsilon is None:
            return  # σ given explicitly: the budget is only enforced
        steps = remaining_rounds * self.steps_per_round
        saved = float(state.get("noise_multiplier", self.noise_multiplier))
        target, delta = self.settings.target_epsilon, self.settings.delta
        reserved = self._reserved(self.accountant)
        if steps <= 0 or reserved.epsilon_after(
                noise_multiplier=saved, sample_rate=self.sample_rate, num_steps=steps,
                delta=delta) <= target:
            self.noise_multiplier = saved
            return
        if reserved.epsilon(delta=delta) >= target:
            self.noise_multiplier = saved  # nothing left: round_fits() stops the site
            return
        self.noise_multiplier = noise_multiplier_for_remaining(
            accountant=reserved, target_epsilon=target, delta=delta,
            sample_rate=self.sample_rate, num_steps=steps)
        log.info("site %d: σ planned again over the remaining budget: %.4g for %d more "
                 "rounds (was %.4g)", self.site, self.noise_multiplier, remaining_rounds, saved)
