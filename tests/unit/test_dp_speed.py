"""DP-SGD's noise and masks drawn ahead (privacy/lookahead.py): bit-identical to drawing them
in place, across rounds, steps, sites and a resume; bounded in memory; a failing worker is
a clear FedsiloError, never a hang."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.config import SiteDP, TrainConfig
from fedsilo.errors import FedsiloError, UpdateError
from fedsilo.privacy import lookahead
from fedsilo.privacy.engine import ParticipantPrivacy
from fedsilo.privacy.lookahead import Ahead, BufferPool, NoiseWorkerError, noise_ahead
from fedsilo.privacy.secret import Purpose, SecretStream
from fedsilo.training import TensorSplit

SECRETS = [bytes(range(32)), bytes(range(1, 33))]


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def toy_data(site: int) -> TensorSplit:
    g = torch.Generator().manual_seed(100 + site)
    return TensorSplit(torch.randn(48, 1, 8, 8, generator=g),
                       torch.randint(0, 3, (48,), generator=g))


def make(model: nn.Module, data: TensorSplit, *, lookahead: int, site: int = 0
         ) -> ParticipantPrivacy:
    return ParticipantPrivacy(model, site=site, settings=SiteDP(None, 1.3, 1e-5, 0.7),
                              mechanism="rdp", num_samples=len(data),
                              train=TrainConfig(batch_size=8, max_steps=5), rounds=4,
                              model_name="toy", sample=data.images[:2], lookahead=lookahead)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(engine: ParticipantPrivacy, model: nn.Module, data: TensorSplit, *, secret: bytes,
          rounds: range) -> list[torch.Tensor]:
    after = []
    for r in rounds:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        steps, *_ = engine.train_round(data, optimizer=optimizer, secret=secret, round_index=r)
        assert steps == engine.steps_per_round
        after.append(flat(model))
    return after


def test_noise_drawn_ahead_is_the_stream_read_parameter_by_parameter() -> None:
    """The flat buffer of a step holds what the engine drew before the look-ahead: one
    stream per (round, step), read parameter by parameter in order."""
    sizes = [7, 1 << 20, 3, 50_001]  # one parameter spans the generator's chunk size
    pool = BufferPool(sum(sizes), capacity=2)
    for secret in SECRETS:
        with noise_ahead(pool, secret, round_index=3, steps=3, std=0.9, depth=1,
                         site=0) as ahead:
            for step in range(3):
                got = ahead.take()
                stream = SecretStream(secret, purpose=Purpose.NOISE, round_index=3, step=step)
                expected = []
                for size in sizes:
                    values = np.empty(size, dtype=np.float32)
                    stream.fill_gaussian(values, std=0.9)
                    expected.append(values)
                assert np.array_equal(got.numpy(), np.concatenate(expected))
                pool.release(got)


def test_training_ahead_equals_drawing_in_place_across_rounds_sites_and_a_resume() -> None:
    """Bit for bit: two sites with their own secrets, three rounds of five steps, and a
    resume from a checkpoint after round 1 (a fresh engine, the accountant restored)."""
    for site, secret in enumerate(SECRETS):
        data = toy_data(site)
        runs = {}
        for depth in (0, 2, 3):
            model = toy_model()
            engine = make(model, data, lookahead=depth, site=site)
            runs[depth] = train(engine, model, data, secret=secret, rounds=range(1, 4))
        for depth in (2, 3):
            for a, b in zip(runs[0], runs[depth]):
                assert torch.equal(a, b)
        assert not torch.equal(runs[0][0], runs[0][1])  # the rounds did train
        # resume: round 1, then a fresh engine from the checkpoint for rounds 2 and 3
        model = toy_model()
        first = make(model, data, lookahead=2, site=site)
        train(first, model, data, secret=secret, rounds=range(1, 2))
        state, weights = first.state_dict(), {k: v.clone() for k, v in
                                               model.state_dict().items()}
        model = toy_model()
        model.load_state_dict(weights)
        resumed = make(model, data, lookahead=2, site=site)
        resumed.load_state_dict(state, remaining_rounds=2)
        after = train(resumed, model, data, secret=secret, rounds=range(2, 4))
        assert all(torch.equal(a, b) for a, b in zip(after, runs[0][1:]))
        assert resumed.accountant.num_steps == 3 * resumed.steps_per_round
    # the two sites' secrets give different noise, so different models
    assert not torch.equal(runs[0][0], train(make(m := toy_model(), toy_data(1), lookahead=2),
                                             m, toy_data(1), secret=SECRETS[0],
                                             rounds=range(1, 2))[0])


def test_the_look_ahead_never_holds_more_than_its_bound() -> None:
    """A fast producer and a slow consumer: never more than ``capacity`` buffers exist,
    and never more than ``depth`` made items wait."""
    pool = BufferPool(1000, capacity=3)
    made, taken, most_waiting = [0], [0], [0]
    lock = threading.Lock()
    stop = threading.Event()

    def produce(k: int) -> torch.Tensor:
        buffer = pool.acquire(stop)
        buffer.fill_(k)
        with lock:
            made[0] += 1
            most_waiting[0] = max(most_waiting[0], made[0] - taken[0])
        return buffer

    with Ahead(produce, 40, depth=2, describe=str, discard=pool.release, stop=stop) as ahead:
        for k in range(40):
            time.sleep(0.002)
            item = ahead.take()
            with lock:
                taken[0] += 1
            assert float(item[0]) == k  # in order, never overwritten while held
            assert pool.allocated <= 3
            pool.release(item)
    assert pool.allocated == 3
    # waiting in the queue (2) + one made and blocked on the full queue
    assert most_waiting[0] <= 3
    # the engine's pool: two buffers of the model's size for the whole job, whatever the rounds
    model, data = toy_model(), toy_data(0)
    engine = make(model, data, lookahead=2)
    train(engine, model, data, secret=SECRETS[0], rounds=range(1, 4))
    assert engine._pool is not None and engine._pool.allocated <= 2
    assert engine._pool.numel == sum(p.numel() for p in model.parameters())


def test_closing_early_stops_the_worker_and_returns_its_buffers() -> None:
    pool = BufferPool(10, capacity=2)
    ahead = noise_ahead(pool, SECRETS[0], round_index=1, steps=1000, std=1.0, depth=1, site=0)
    pool.release(ahead.take())
    ahead.close()
    assert not ahead._thread.is_alive()
    assert pool.allocated <= 2 and pool._free.qsize() == pool.allocated
    # a deadline ends a round early: the worker ends with it, and the steps are counted
    model, data = toy_model(), toy_data(0)
    engine = make(model, data, lookahead=2)
    before = threading.active_count()
    steps, *_ = engine.train_round(data, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                   secret=SECRETS[0], round_index=1, deadline=0.0)
    assert steps == 0 and threading.active_count() == before


def test_a_failing_noise_worker_is_a_clear_fedsilo_error_not_a_hang(monkeypatch) -> None:
    """The error names the site, round and step; the participant's round loop agrees an
    UpdateError across ranks (participant.py), so the job ends on every rank."""
    real = lookahead.fill_noise

    def failing(out, secret, *, round_index, step, std):
        if step == 2:
            raise MemoryError("no room for the noise")
        return real(out, secret, round_index=round_index, step=step, std=std)

    monkeypatch.setattr(lookahead, "fill_noise", failing)
    model, data = toy_model(), toy_data(0)
    engine = make(model, data, lookahead=2)
    before = threading.active_count()
    begin = time.perf_counter()
    with pytest.raises(NoiseWorkerError, match="noise of site 0, round 1, step 2 failed.*"
                                               "MemoryError: no room") as info:
        engine.train_round(data, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           secret=SECRETS[0], round_index=1)
    assert time.perf_counter() - begin < 10
    assert isinstance(info.value, UpdateError) and isinstance(info.value, FedsiloError)
    assert engine.accountant.num_steps == 3  # steps 0, 1 and the failed 2 are accounted
    assert threading.active_count() == before  # no worker left behind
    # the pool still holds all its buffers: the next round runs
    monkeypatch.setattr(lookahead, "fill_noise", real)
    steps, *_ = engine.train_round(data, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                   secret=SECRETS[0], round_index=2)
    assert steps == engine.steps_per_round


def test_a_worker_that_dies_silently_is_reported_not_waited_for() -> None:
    ahead: Ahead[int] = Ahead(lambda k: k, 2, depth=1, describe=lambda k: f"item {k}")
    assert [ahead.take(), ahead.take()] == [0, 1]
    with pytest.raises(NoiseWorkerError, match="no item 2"):
        ahead.take()
    ahead.close()


# -- clipping: exact against explicit per-sample gradients, every supported layer type -------


class ConvNet(nn.Module):
    """Convolutions with stride, padding, dilation and no bias, GroupNorm, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 6, 3, dilation=2, padding=(2, 1), bias=False)
        self.head = nn.Linear(6 * 5 * 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(self.norm(self.conv1(x)))
        return self.head(torch.tanh(self.conv2(out)).flatten(1))


class SeqNet(nn.Module):
    """Embedding (with a padding index), LayerNorm, Linear over a sequence, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.proj = nn.Linear(6, 5)
        self.head = nn.Linear(5 * 7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(self.norm(self.embed(x)))).flatten(1))


def looped_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float,
                       group: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Σ_i clip(g_i) with g_i the mean gradient of sample i's ``group`` rows, one sample at a
    time: the explicit per-sample gradients, with nothing shared with ghost.py."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(0, x.shape[0], group):
        model.zero_grad()
        (nn.functional.cross_entropy(model(x[i:i + group]), y[i:i + group], reduction="sum")
         / group).backward()
        grads = [p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    model.zero_grad(set_to_none=True)
    return total, torch.stack(norms)


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("method", ["ghost", "per_sample"])
def test_conv_groupnorm_linear_clipping_is_exact_with_either_conv_method(method, group,
                                                                         monkeypatch):
    from fedsilo.privacy import ghost

    monkeypatch.setattr(ghost, "conv_method", lambda *a, **k: method)
    torch.manual_seed(3)
    model = ConvNet()
    x, y = torch.randn(4 * group, 2, 10, 6), torch.randint(0, 3, (4 * group,))
    _, norms = looped_clipped_sum(model, x, y, 1.0, group)
    clip = float(norms.median())  # clipped and unclipped samples
    expected, _ = looped_clipped_sum(model, x, y, clip, group)
    assert (norms > clip).any() and (norms < clip).any()
    ghost.clipper_for(model, sample=x[:2]).clipped_sum(x, y, max_grad_norm=clip, group=group)
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, e, atol=1e-6, rtol=1e-4), float((p.grad - e).abs().max())


@pytest.mark.parametrize("group", [1, 2])
def test_embedding_layernorm_clipping_is_exact(group):
    """Repeated tokens in a sample (the cross terms of the embedding's norm) and padding."""
    from fedsilo.privacy import ghost

    torch.manual_seed(4)
    model = SeqNet()
    x = torch.randint(0, 5, (5 * group, 7))  # few tokens: many repeats, some padding (0)
    y = torch.randint(0, 3, (5 * group,))
    assert (x == 0).any()
    expected, norms = looped_clipped_sum(model, x, y, 0.2, group)
    assert (norms > 0.2).all()
    assert ghost.supports(model)
    ghost.clipper_for(model, sample=x[:2]).clipped_sum(x, y, max_grad_norm=0.2, group=group)
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, e, atol=1e-6, rtol=1e-4), float((p.grad - e).abs().max())


def test_embeddings_that_change_their_weights_or_gradients_are_left_to_opacus():
    from fedsilo.privacy import ghost

    for kwargs in ({"max_norm": 1.0}, {"sparse": True}, {"scale_grad_by_freq": True}):
        assert not ghost.supports(nn.Sequential(nn.Embedding(5, 3, **kwargs)))


def test_the_conv_method_follows_the_operation_count_and_the_memory_cap():
    from fedsilo.privacy.ghost import PER_SAMPLE_BYTES, conv_method

    wide = nn.Conv2d(512, 512, 3)
    assert conv_method(wide, positions=16, rows=64) == "ghost"        # T(d+p) ≪ d·p
    assert conv_method(nn.Conv2d(64, 64, 3), positions=784, rows=64) == "per_sample"
    small = nn.Conv2d(32, 64, 3)                                       # 4·d·p bytes a row
    rows = PER_SAMPLE_BYTES // (4 * 32 * 9 * 64)
    assert conv_method(small, positions=196, rows=rows) == "per_sample"
    assert conv_method(small, positions=196, rows=rows + 1) == "ghost"


def test_the_clipping_choice_is_logged(caplog):
    import logging

    from fedsilo.models import build_model

    model = build_model("resnet18", in_channels=1, num_classes=2, image_size=(28, 28),
                        norm_groups=8)
    with caplog.at_level(logging.INFO, logger="fedsilo"):
        ParticipantPrivacy(model, site=0, settings=SiteDP(None, 1.0, 1e-5, 1.0),
                           mechanism="rdp", num_samples=640,
                           train=TrainConfig(batch_size=64), rounds=1, model_name="resnet18",
                           sample=torch.randn(2, 1, 28, 28))
    text = caplog.text
    assert "per layer at the expected batch of 64" in text
    assert "Conv2d: per-sample gradients" in text and "Conv2d: ghost norm" in text
