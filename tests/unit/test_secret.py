"""The secret randomness of the privacy mechanisms (privacy/secret.py), the DP-SGD engine's
use of it, and user-level DP's noise calibration (privacy/userlevel.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedsilo.privacy.secret import SECRET_BYTES, Purpose, SecretStream, check_secret, new_secret
from fedsilo.privacy.userlevel import clip_in_place, noise_std


def stream(secret: bytes, *, purpose=Purpose.NOISE, round_index=1, step=0) -> SecretStream:
    return SecretStream(secret, purpose=purpose, round_index=round_index, step=step)


def test_secrets_are_fresh_and_full_length() -> None:
    secrets = {new_secret() for _ in range(64)}
    assert len(secrets) == 64 and all(len(s) == SECRET_BYTES == 32 for s in secrets)
    with pytest.raises(ValueError, match="32 bytes, got 16"):
        check_secret(bytes(16))
    with pytest.raises(ValueError, match="got int"):
        check_secret(7)


def test_a_stream_is_a_pure_function_of_secret_purpose_round_and_step() -> None:
    secret = new_secret()
    first = stream(secret).uint64(1000)
    assert np.array_equal(first, stream(secret).uint64(1000))
    others = [stream(new_secret()), stream(secret, purpose=Purpose.POISSON),
              stream(secret, purpose=Purpose.USER_NOISE), stream(secret, round_index=2),
              stream(secret, step=1)]
    for other in others:  # 64-bit values: any shared value would be a shared stream
        assert not np.intersect1d(first, other.uint64(1000)).size


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=5))
def test_reading_in_pieces_reads_the_same_stream(sizes) -> None:
    """The engine fills one parameter after another from one stream: the values must not
    depend on how the reads are split (nor on the chunking inside a read)."""
    secret = bytes(range(32))
    whole = stream(secret).gaussian(sum(sizes))
    one = stream(secret)
    pieces = []
    for size in sizes:
        out = np.empty(size, dtype=np.float32)
        one.fill_gaussian(out, std=1.0)
        pieces.append(out)
    assert np.array_equal(np.concatenate(pieces), whole.astype(np.float32))


def test_gaussian_values_are_standard_normal() -> None:
    values = stream(new_secret()).gaussian(200_000)
    assert stats.kstest(values, "norm").pvalue > 1e-4
    assert abs(values.mean()) < 0.01 and values.std() == pytest.approx(1.0, abs=0.01)
    assert stats.kurtosis(values) == pytest.approx(0.0, abs=0.1)
    scaled = np.empty(200_000, dtype=np.float32)
    stream(new_secret()).fill_gaussian(scaled, std=3.0)
    assert float(scaled.std()) == pytest.approx(3.0, rel=0.01)


def test_poisson_masks_have_the_sampling_rate() -> None:
    mask = stream(new_secret(), purpose=Purpose.POISSON).bernoulli(400_000, 0.05)
    assert mask.dtype == bool and mask.mean() == pytest.approx(0.05, abs=0.002)
    assert not stream(new_secret()).bernoulli(1000, 0.0).any()
    assert stream(new_secret()).bernoulli(1000, 1.0).all()


def engine_after_a_round(secret: bytes, *, torch_seed: int = 0) -> torch.Tensor:
    """Weights after one DP-SGD round of a small model from fixed initial weights."""
    from fedsilo.config import SiteDP, TrainConfig
    from fedsilo.privacy.engine import ParticipantPrivacy
    from fedsilo.training import TensorSplit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    images = torch.randn(40, 1, 4, 4)
    data = TensorSplit(images, torch.randint(0, 3, (40,)))
    engine = ParticipantPrivacy(model, site=0, settings=SiteDP(None, 1.0, 1e-5, 1.0),
                                mechanism="rdp", num_samples=40,
                                train=TrainConfig(batch_size=8, max_steps=3), rounds=1,
                                model_name="toy", sample=images[:2])
    torch.manual_seed(torch_seed)  # the public seed: must not matter to the DP draws
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps, *_ = engine.train_round(data, optimizer=optimizer, secret=secret, round_index=1)
    assert steps == 3
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_dp_sgd_draws_only_from_the_secret() -> None:
    secret = new_secret()
    reference = engine_after_a_round(secret)
    assert torch.equal(reference, engine_after_a_round(secret, torch_seed=12345))
    assert not torch.equal(reference, engine_after_a_round(new_secret()))


def test_user_level_noise_std_and_shares() -> None:
    weights = {0: 0.2, 1: 0.3, 2: 0.5}
    central = noise_std(noise_multiplier=1.5, clip_norm=2.0, weights=weights)
    share = noise_std(noise_multiplier=1.5, clip_norm=2.0, weights=weights, num_shares=3)
    assert (central == pytest.approx(1.5 * 2.0 * 0.5)
            and share * math.sqrt(3) == pytest.approx(central))
    total = np.zeros(200_000, dtype=np.float32)
    for site in weights:  # three sites' shares, each from its own secret
        part = np.empty_like(total)
        stream(new_secret(), purpose=Purpose.USER_NOISE).fill_gaussian(part, std=share)
        total += part
    assert float(total.std()) == pytest.approx(central, rel=0.01)
    with pytest.raises(ValueError, match="num_shares"):
        noise_std(noise_multiplier=1.0, clip_norm=1.0, weights=weights, num_shares=0)
    delta = np.full(100, 1.0, dtype=np.float32)
    assert clip_in_place(delta, clip_norm=2.0) == pytest.approx(10.0)
    assert float(np.linalg.norm(delta)) == pytest.approx(2.0, rel=1e-6)
