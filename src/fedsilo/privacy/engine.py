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

The steps' Poisson masks are drawn ahead of the steps (they depend on the secret, the round
and the step only), so a streamed split reads a window of upcoming batches at once
(``loading.py``).  With augmentation multiplicity (``dp.augmult`` K, De et al. 2022) each
sampled image comes as K augmented views and g_i is the mean of their gradients, formed
*before* clipping: one sample still moves the clipped sum by at most C.  Under
``train.precision: bf16`` the forward pass runs under autocast and the per-sample norms and
clipped sums are computed in fp32 from the same bf16 activations (so the bound is exact);
fp16 is refused (config.py).
"""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import closing
from typing import Any, Mapping

import numpy as np
import torch
from opacus import GradSampleModule
from torch import nn

from fedsilo.config import SiteDP, TrainConfig
from fedsilo.errors import ModelError, PrivacyBudgetError
from fedsilo.privacy import ghost
from fedsilo.privacy.accounting import (
    PrivacyAccountant,
    noise_multiplier_for,
    noise_multiplier_for_remaining,
    plan_steps,
)
from fedsilo.privacy.secret import Purpose, SecretStream
from fedsilo.privacy.validate import check_model, check_trainable
from fedsilo.training import Precision

log = logging.getLogger("fedsilo")

#: torch warns on every backward through the first layer's hooks (images need no gradient)
_NO_INPUT_GRAD = "Full backward hook is firing when gradients are computed with respect to"


class ParticipantPrivacy:
    """One participant's DP-SGD engine and accountant for the whole job."""

    def __init__(self, model: nn.Module, *, site: int, settings: SiteDP, mechanism: str,
                 num_samples: int, train: TrainConfig, rounds: int, model_name: str,
                 sample: torch.Tensor, mode: str = "auto",
                 shared: "ParticipantPrivacy | None" = None, augmult: int = 1) -> None:
        check_model(model, name=model_name)
        self.site, self.settings, self.train_config = site, settings, train
        #: views per sample (dp.augmult): the rows of one sample are consecutive
        self.augmult = augmult
        assert train.precision != "fp16", "config.py refuses fp16 under DP"
        self.precision = Precision(train.precision, sample.device)
        self.num_samples = num_samples
        self.sample_rate, self.steps_per_round, planned = plan_steps(
            num_samples=num_samples, batch_size=train.batch_size, epochs=train.epochs,
            max_steps=train.max_steps, rounds=rounds)
        if settings.noise_multiplier is not None:
            self.noise_multiplier = settings.noise_multiplier
        else:
            assert settings.target_epsilon is not None, "config: a budget or a sigma"
            self.noise_multiplier = noise_multiplier_for(
                target_epsilon=settings.target_epsilon, delta=settings.delta,
                sample_rate=self.sample_rate, num_steps=planned, mechanism=mechanism)
        self.accountant = PrivacyAccountant(mechanism)
        self.stopped_round: int | None = None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._noise: np.ndarray | None = None  # host buffer for one parameter's noise
        self.loss_fn = nn.CrossEntropyLoss(reduction="sum")
        self.mode: str
        self.clipper: Any
        self.module: Any
        if shared is not None:
            # another site on this rank trains the same model object: share its per-sample
            # machinery (hooks are attached once per model, never stacked)
            self.mode, self.clipper, self.module = shared.mode, shared.clipper, shared.module
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
        log.info("model %r: per-sample clipping by %s (%s)", model_name,
                 "mixed ghost clipping" if mode == "mixed" else "Opacus's hooks", why)
        self.mode = mode
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum") \
            if mode == "hooks" else model
        check_trainable(self._trial_step, sample[:2], name=model_name, params=self.params)

    # -- budget ---------------------------------------------------------------------------

    @property
    def epsilon(self) -> float:
        return self.accountant.epsilon(delta=self.settings.delta)

    def next_round_epsilon(self) -> float:
        return self.accountant.epsilon_after(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
            num_steps=self.steps_per_round, delta=self.settings.delta)

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
                "steps": self.accountant.num_steps, "stopped_round": self.stopped_round,
                "grad_sample_mode": self.mode}

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
        masks = (self._poisson(secret, round_index, step) for step in range(self.steps_per_round))
        try:
            with warnings.catch_warnings(), \
                    closing(data.batches(masks, transform=augment)) as batches:
                warnings.filterwarnings("ignore", message=_NO_INPUT_GRAD)
                for step, (images, labels) in enumerate(batches):
                    if deadline is not None and time.perf_counter() >= deadline:
                        break
                    steps += 1  # counted before the step: a step that fails was still taken
                    samples, loss_sum = self._step(images, labels, optimizer, secret,
                                                   round_index, step, samples, loss_sum)
        finally:
            self.accountant.spend(noise_multiplier=self.noise_multiplier,
                                  sample_rate=self.sample_rate, num_steps=steps)
        return steps, samples, loss_sum / max(samples, 1), time.perf_counter() - start

    def _poisson(self, secret: bytes, round_index: int, step: int) -> np.ndarray:
        """The indexes Poisson sampling draws for one step (from the site's secret)."""
        mask = SecretStream(secret, purpose=Purpose.POISSON, round_index=round_index,
                            step=step).bernoulli(self.num_samples, self.sample_rate)
        return np.flatnonzero(mask)

    def _step(self, images: torch.Tensor, labels: torch.Tensor,
              optimizer: torch.optim.Optimizer, secret: bytes, round_index: int, step: int,
              samples: int, loss_sum: float) -> tuple[int, float]:
        """One DP-SGD step on a Poisson batch (``augmult`` rows a sample); returns the
        running (samples, loss sum)."""
        device = labels.device
        clip, sigma = self.settings.max_grad_norm, self.noise_multiplier
        optimizer.zero_grad(set_to_none=True)
        if labels.numel():  # Poisson sampling may draw an empty batch: then noise only
            loss = self.clipped_sum(images, labels, group=self.augmult)
            samples += int(labels.numel()) // self.augmult
            loss_sum += float(loss.detach())
        expected_batch = self.sample_rate * self.num_samples
        noise = SecretStream(secret, purpose=Purpose.NOISE, round_index=round_index, step=step)
        for p in self.params:  # one stream, read in parameter order
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            values = self._noise_buffer(p.numel())
            noise.fill_gaussian(values, std=sigma * clip)
            p.grad.add_(torch.from_numpy(values).view_as(p).to(device))
            p.grad.div_(expected_batch)
        optimizer.step()
        return samples, loss_sum

    def _noise_buffer(self, numel: int) -> np.ndarray:
        if self._noise is None or self._noise.size < numel:
            self._noise = np.empty(max(p.numel() for p in self.params), dtype=np.float32)
        return self._noise[:numel]

    def clipped_sum(self, images: torch.Tensor, labels: torch.Tensor, *, group: int = 1
                    ) -> torch.Tensor:
        """Set each ``p.grad`` to Σ_i min(1, C/‖g_i‖) g_i over the batch; returns Σ_i ℓ_i.

        ``group`` > 1: sample i is the ``group`` consecutive rows i·group .. i·group+group-1
        (its augmented views), g_i and ℓ_i the means over them."""
        if self.clipper is not None:
            return self.clipper.clipped_sum(images, labels,
                                            max_grad_norm=self.settings.max_grad_norm,
                                            group=group, autocast=self.precision.autocast)
        with self.precision.autocast():
            loss = self.loss_fn(self.module(images), labels) / group
        loss.backward()
        self.clip_and_sum(group=group)
        return loss

    def _trial_step(self, images: torch.Tensor) -> None:
        self.module.train()
        labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
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
                "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: Mapping[str, Any], *, remaining_rounds: int) -> None:
        """Continue from a checkpoint; ``remaining_rounds`` are the rounds the resumed job may
        still train.  With σ chosen from the budget, it is planned again over what the
        budget has left: the saved σ stays while the remaining rounds fit at it (so an
        unchanged resume is bit-identical), else the smallest σ that keeps the spent history
        plus the remaining rounds within the target (a resume that adds rounds)."""
        self.accountant.load_state_dict(state["accountant"])
        self.stopped_round = state["stopped_round"]
        if self.settings.noise_multiplier is not None or self.settings.target_epsilon is None:
            return  # σ given explicitly: the budget is only enforced
        steps = remaining_rounds * self.steps_per_round
        saved = float(state.get("noise_multiplier", self.noise_multiplier))
        target, delta = self.settings.target_epsilon, self.settings.delta
        if steps <= 0 or self.accountant.epsilon_after(
                noise_multiplier=saved, sample_rate=self.sample_rate, num_steps=steps,
                delta=delta) <= target:
            self.noise_multiplier = saved
            return
        if self.accountant.epsilon(delta=delta) >= target:
            self.noise_multiplier = saved  # nothing left: round_fits() stops the site
            return
        self.noise_multiplier = noise_multiplier_for_remaining(
            accountant=self.accountant, target_epsilon=target, delta=delta,
            sample_rate=self.sample_rate, num_steps=steps)
        log.info("site %d: σ planned again over the remaining budget: %.4g for %d more "
                 "rounds (was %.4g)", self.site, self.noise_multiplier, remaining_rounds, saved)
