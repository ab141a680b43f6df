"""One site's DP-SGD run with gradient canaries, for ``fedsilo audit`` (the maths is in
``audit.py``; Steinke, Nasr & Jagielski, NeurIPS 2023, white-box Dirac canaries).

The run is fedsilo's own: :class:`ParticipantPrivacy` samples, clips, draws the Gaussian
noise from the site's secret and steps the optimizer, exactly as in ``fedsilo train``.  Two
hooks are added and nothing else changes:

- after the clipped sum of a step (``clipped_sum``), each canary that is in the data and
  that Poisson sampling (rate q, from the auditor's own generator) picks this step adds C
  at its coordinate, *before* the engine adds its noise; the other records' clipped sum at
  the canaries' coordinates is noted first;
- an optimizer pre-step hook reads the noisy gradient at those coordinates (the released
  step), takes away the other records' sum and keeps x_t = (canary + noise) / C.

Two deliberate faults exist to test the audit itself (``--debug-noise-scale``, which draws
noise of σ·scale while ε is still reported for σ, and ``--debug-public-seed``, which draws
the noise from a secret derived from ``config.seed``, regenerated and subtracted by the
auditor); neither is ever used by training.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedsilo.config import Config
from fedsilo.errors import ConfigError
from fedsilo.privacy.accounting import PrivacyAccountant
from fedsilo.privacy.audit import (
    CONFIDENCE,
    audit_bound,
    canary_scores,
    measured_noise,
)
from fedsilo.privacy.engine import ParticipantPrivacy
from fedsilo.privacy.secret import Purpose, SecretStream, new_secret

log = logging.getLogger("fedsilo")


class _Canaries:
    """The canaries of one audit: where they sit, which are in, what each step showed."""

    def __init__(self, params: list[torch.Tensor], *, num_canaries: int, sample_rate: float,
                 clip: float, expected_batch: float, rng: np.random.Generator) -> None:
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        if not 1 <= num_canaries <= total:
            raise ConfigError(f"--canaries {num_canaries}: the model has {total} trainable "
                              f"parameters, one canary a coordinate, so 1..{total}")
        self.coords = np.sort(rng.choice(total, size=num_canaries, replace=False))
        self.inclusion = rng.integers(0, 2, size=num_canaries).astype(np.int8) * 2 - 1
        self.sizes, self.rng = sizes, rng
        self.sample_rate, self.clip, self.expected_batch = sample_rate, clip, expected_batch
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        #: per parameter: (canary ids, their positions in the flattened parameter)
        self.where: list[tuple[np.ndarray, torch.Tensor]] = []
        for k, p in enumerate(params):
            ids = np.flatnonzero((self.coords >= offsets[k]) & (self.coords < offsets[k + 1]))
            local = torch.as_tensor(self.coords[ids] - offsets[k], device=p.device)
            self.where.append((ids, local))
        self.data_part = np.zeros(num_canaries)
        self.observations: list[np.ndarray] = []
        self.injected = False
        self.mask = self._draw()
        #: --debug-public-seed: (secret, σ·C) the auditor regenerates the noise with
        self.public_noise: tuple[bytes, float] | None = None
        self.round_index, self.step = 1, 0

    def _draw(self) -> np.ndarray:
        """This step's canaries: in the data and picked by Poisson sampling."""
        return (self.inclusion > 0) & (self.rng.random(self.inclusion.size) < self.sample_rate)

    def inject(self, params: list[torch.Tensor]) -> None:
        """Note the other records' clipped sum, then add the step's canaries (norm C each)."""
        for p, (ids, local) in zip(params, self.where):
            if not ids.size:
                continue
            grad = _flat_grad(p)
            self.data_part[ids] = grad[local].double().cpu().numpy()
            grad[local] += torch.as_tensor(self.clip * self.mask[ids], dtype=grad.dtype,
                                           device=grad.device)
        self.injected = True

    def observe(self, params: list[torch.Tensor]) -> None:
        """The released step at the canaries, less the other records' sum, in units of C."""
        x = np.empty(self.inclusion.size)
        for p, (ids, local) in zip(params, self.where):
            if not ids.size:
                continue
            grad = _flat_grad(p)
            if not self.injected:  # an empty Poisson batch: the engine skipped the clipped sum
                grad[local] += torch.as_tensor(self.clip * self.mask[ids] / self.expected_batch,
                                               dtype=grad.dtype, device=grad.device)
            x[ids] = grad[local].double().cpu().numpy() * self.expected_batch
        if not self.injected:
            self.data_part[:] = 0.0
        x -= self.data_part
        if self.public_noise is not None:
            x -= self._regenerate()
        self.observations.append((x / self.clip).astype(np.float32))
        self.injected, self.step = False, self.step + 1
        self.mask = self._draw()

    def _regenerate(self) -> np.ndarray:
        """The noise of this step at the canaries, drawn as the engine draws it (one
        stream per (round, step), read in parameter order), from the known secret."""
        assert self.public_noise is not None
        secret, std = self.public_noise
        stream = SecretStream(secret, purpose=Purpose.NOISE, round_index=self.round_index,
                              step=self.step)
        out = np.empty(self.inclusion.size)
        for size, (ids, local) in zip(self.sizes, self.where):
            values = np.empty(size, dtype=np.float32)
            stream.fill_gaussian(values, std=std)
            out[ids] = values[local.cpu().numpy()]
        return out


def _flat_grad(p: torch.Tensor) -> torch.Tensor:
    """``p.grad`` as a flat view (made contiguous first, so writes reach it)."""
    assert p.grad is not None
    if not p.grad.is_contiguous():
        p.grad = p.grad.contiguous()
    return p.grad.view(-1)


class CanaryPrivacy(ParticipantPrivacy):
    """fedsilo's DP-SGD engine, with canaries added to each step's clipped sum."""

    canaries: _Canaries | None = None  # None while the engine is built (its trial step)

    def clipped_sum(self, images: torch.Tensor, labels: torch.Tensor, *, group: int = 1
                    ) -> torch.Tensor:
        loss = super().clipped_sum(images, labels, group=group)
        if self.canaries is not None:
            self.canaries.inject(self.params)
        return loss


def public_secret(seed: int) -> bytes:
    """--debug-public-seed's "secret": anyone who reads config.seed can compute it."""
    return hashlib.sha256(f"fedsilo audit public seed {seed}".encode()).digest()


def run_canary_audit(config: Config, *, site: int, num_canaries: int, steps: int | None = None,
                     seed: int | None = None, score: str = "lr",
                     confidence: float = CONFIDENCE, noise_scale: float = 1.0,
                     public_seed: bool = False) -> dict[str, Any]:
    """Train site ``site`` of ``config`` with DP-SGD and ``num_canaries`` canaries; return
    the reported ε, the empirical lower bound and what it rests on (a JSON-ready dict).

    ``steps``: train that many steps, σ planned for them (default: the config's rounds ×
    steps per round).  ``seed``: of the canaries' places, inclusion bits and sampling
    (default: fresh from the OS).  ``noise_scale``, ``public_seed``: faults, for testing
    the audit only.
    """
    from fedsilo.loading import load_splits
    from fedsilo.models import build_for
    from fedsilo.runtime import configure_threads, select_device
    from fedsilo.shards import SplitReader, check_listed_shard, load_manifest
    from fedsilo.training import augment_seed, make_optimizer

    begin = time.perf_counter()
    manifest = load_manifest(config.data.dir)
    if not 0 <= site < manifest.num_sites:
        raise ConfigError(f"--site {site}: the shard set {config.data.dir} has sites "
                          f"0..{manifest.num_sites - 1}")
    entry = manifest.sites[site]
    check_listed_shard(manifest, config.data.dir, entry, kind="site",
                       verify_hash=config.data.verify_hashes)
    configure_threads(config.runtime.threads, local_size=1)
    device = select_device(config.runtime.device, local_rank=0, is_coordinator=False)
    torch.manual_seed(config.seed)
    channels, height, width = manifest.image_shape
    model = build_for(config, in_channels=channels, num_classes=manifest.num_classes,
                      image_size=(height, width)).to(device)
    reader = SplitReader(manifest.path_of(entry, config.data.dir), "train", cache_bytes=0)
    mean, std = _normalization(config, manifest, reader)
    (data,) = load_splits([(reader, mean, std)], data=config.data, device=device,
                          who="fedsilo audit")
    train, rounds = config.train, config.rounds
    if steps is not None:  # one round of exactly ``steps`` steps
        per_epoch = math.ceil(len(data) / train.batch_size)
        train = replace(train, max_steps=steps, epochs=math.ceil(steps / per_epoch))
        rounds = 1
    settings = config.dp.for_site(site)
    engine = CanaryPrivacy(
        model, site=site, settings=settings, mechanism=config.dp.accountant,
        num_samples=len(data), train=train, rounds=rounds, model_name=config.model.name,
        sample=data.sample(2), mode=config.dp.grad_sample_mode, augmult=config.dp.augmult)
    claimed_sigma = engine.noise_multiplier
    engine.noise_multiplier = claimed_sigma * noise_scale
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    canaries = _Canaries(engine.params, num_canaries=num_canaries,
                         sample_rate=engine.sample_rate, clip=settings.max_grad_norm,
                         expected_batch=engine.sample_rate * engine.num_samples, rng=rng)
    secret = public_secret(config.seed) if public_seed else new_secret()
    if public_seed:
        canaries.public_noise = (secret, claimed_sigma * settings.max_grad_norm)
    engine.canaries = canaries
    augmenter = None
    if config.data.augment.enabled:
        from fedsilo.augment import Augmenter

        augmenter = Augmenter(config.data.augment, image_shape=manifest.image_shape,
                              views=config.dp.augmult)
    setup_s = time.perf_counter() - begin
    taken = 0
    for round_index in range(1, rounds + 1):
        optimizer = make_optimizer(model, train, round_index=round_index)
        optimizer.register_step_pre_hook(lambda *_: canaries.observe(engine.params))
        canaries.round_index, canaries.step = round_index, 0
        augment = None if augmenter is None else augmenter.bind(torch.Generator().manual_seed(
            augment_seed(config.seed, round_index, site)))
        done, *_ = engine.train_round(data, optimizer=optimizer, secret=secret,
                                      round_index=round_index, augment=augment)
        taken += done
    train_s = time.perf_counter() - begin - setup_s
    close = getattr(data, "close", None)
    if close is not None:
        close()

    observations = np.stack(canaries.observations) if canaries.observations else \
        np.zeros((0, num_canaries))
    sigma_hat = measured_noise(observations)
    scores = canary_scores(observations, sample_rate=engine.sample_rate, sigma=sigma_hat,
                           method=score)
    bound = audit_bound(scores, canaries.inclusion, delta=settings.delta,
                        confidence=confidence)
    reported = PrivacyAccountant(config.dp.accountant)
    reported.spend(noise_multiplier=claimed_sigma, sample_rate=engine.sample_rate,
                   num_steps=taken)
    epsilon = reported.epsilon(delta=settings.delta)
    return {
        "site": site, "model": config.model.name, "num_samples": len(data),
        "num_canaries": num_canaries, "canaries_in": int((canaries.inclusion > 0).sum()),
        "steps": taken, "sample_rate": engine.sample_rate, "max_grad_norm":
        settings.max_grad_norm, "noise_multiplier": claimed_sigma,
        "measured_noise_multiplier": sigma_hat, "accountant": config.dp.accountant,
        "delta": settings.delta, "target_epsilon": settings.target_epsilon,
        "reported_epsilon": epsilon, **bound.to_dict(), "score": score,
        "violation": bound.epsilon_lb > epsilon,
        "debug_noise_scale": noise_scale, "debug_public_seed": public_seed,
        "train_seconds": train_s, "seconds": time.perf_counter() - begin,
    }


def _normalization(config: Config, manifest: Any, reader: Any) -> tuple[Any, Any]:
    """As a participant normalizes its images (``Role._normalization``)."""
    mode = config.data.normalize
    if mode == "none":
        return [0.0] * manifest.image_shape[0], [1.0] * manifest.image_shape[0]
    if mode == "site":
        return reader.mean, np.maximum(reader.std, 1e-6)
    return manifest.normalization_mean, np.maximum(manifest.normalization_std, 1e-6)

