"""Streaming a split from its shard: the same batches as holding it in memory (so the same
weights, bit for bit), bounded reads, a damaged shard raising DataError; mixed precision,
augmentation and DP-SGD's augmentation multiplicity."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.config import AugmentConfig, DataConfig, SiteDP, TrainConfig, load_config
from fedsilo.errors import ConfigError, DataError
from fedsilo.loading import StreamedSplit, TensorSplit, load_splits
from fedsilo.privacy.ghost import GhostClipper
from fedsilo.shards import SplitReader, read_shard, write_shard
from fedsilo.training import evaluate, train_local

CPU = torch.device("cpu")
MEAN, STD = [0.4], [0.25]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 1, 28, 28), dtype=np.uint8)  # chunks of 256
    labels = rng.integers(0, 3, 300)
    path = tmp_path_factory.mktemp("shard") / "site-000.h5"
    write_shard(path, kind="site", num_classes=3,
                splits={"train": (images, labels), "val": (images[:40], labels[:40])})
    return path


def splits(path, *, window_bytes=40 * 784, cache_bytes=0):
    memory = TensorSplit.from_arrays(*_arrays(path), mean=MEAN, std=STD, device=CPU)
    streamed = StreamedSplit(SplitReader(path, "train", cache_bytes=cache_bytes), mean=MEAN,
                             std=STD, device=CPU, window_bytes=window_bytes)
    return memory, streamed


def _arrays(path):
    split = read_shard(path).splits["train"]
    return split.images, split.labels


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))


def weights_after(data, config, augment=None):
    net = model()
    train_local(net, data, config=config, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                generator=torch.Generator().manual_seed(7), augment=augment)
    return [p.detach().clone() for p in net.parameters()]


def test_streamed_training_gives_the_same_weights_bit_for_bit(shard):
    memory, streamed = splits(shard)  # windows of at most 40 images: many windows
    config = TrainConfig(epochs=2, batch_size=32, max_steps=15)
    expected = weights_after(memory, config)
    got = weights_after(streamed, config)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert evaluate(model(), memory, batch_size=64) == evaluate(model(), streamed, batch_size=64)


def test_streamed_dp_sgd_gives_the_same_weights_bit_for_bit(shard):
    from fedsilo.privacy.engine import ParticipantPrivacy

    def dp_weights(data):
        net = model()
        engine = ParticipantPrivacy(net, site=0, settings=SiteDP(None, 1.0, 1e-5, 1.0),
                                    mechanism="rdp", num_samples=len(data),
                                    train=TrainConfig(batch_size=32, max_steps=4), rounds=1,
                                    model_name="toy", sample=data.sample(2))
        engine.train_round(data, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                           secret=bytes(range(32)), round_index=1)
        return [p.detach().clone() for p in net.parameters()]

    memory, streamed = splits(shard)
    assert all(torch.equal(a, b) for a, b in zip(dp_weights(memory), dp_weights(streamed)))


def test_reads_are_grouped_by_chunk_and_cached_within_the_budget(shard):
    reader = SplitReader(shard, "train", cache_bytes=256 * 784)  # room for the first chunk
    rows = np.array([3, 5, 200, 260, 299])
    assert np.array_equal(reader.read(rows), _arrays(shard)[0][rows])
    assert reader.chunks_read == 2  # two chunks, each decompressed once
    reader.read(rows)
    assert reader.chunks_read == 3  # the first chunk came from the cache, the second did not fit


def test_a_shard_damaged_mid_round_raises_data_error(shard, tmp_path):
    damaged = tmp_path / "site.h5"
    damaged.write_bytes(shard.read_bytes())
    streamed = StreamedSplit(SplitReader(damaged, "train", cache_bytes=0), mean=MEAN, std=STD,
                             device=CPU, window_bytes=64 * 784)
    with h5py.File(damaged, "r") as f:
        chunk = f["train/images"].id.get_chunk_info(1)  # images 256..299
    with open(damaged, "r+b") as f:
        f.seek(chunk.byte_offset)
        f.write(b"\xff" * chunk.size)
    with pytest.raises(DataError, match="unreadable"):
        weights_after(streamed, TrainConfig(epochs=1, batch_size=32))


def test_auto_holds_small_splits_in_memory_and_streams_big_ones(shard, caplog):
    def load(**data):  # six splits of 0.22 MiB: more than 1 MiB together
        return load_splits([(SplitReader(shard, "train", cache_bytes=0), MEAN, STD)
                            for _ in range(6)],
                           data=DataConfig(**data), device=CPU, who="rank 1")[0]

    with caplog.at_level("INFO", logger="fedsilo"):
        assert isinstance(load(), TensorSplit)
        assert isinstance(load(memory_limit_mb=1, in_memory="auto"), StreamedSplit)
        assert isinstance(load(in_memory="false"), StreamedSplit)
    assert "holds site-000.h5 in memory" in caplog.text and "streams site-000.h5" in caplog.text


def test_bf16_autocast_trains_on_cpu(shard):
    memory, _ = splits(shard)
    before = [p.detach().clone() for p in model().parameters()]
    after = weights_after(memory, TrainConfig(batch_size=32, max_steps=3, precision="bf16",
                                              channels_last=True))
    assert all(torch.isfinite(p).all() for p in after)
    assert not all(torch.equal(a, b) for a, b in zip(before, after))


def test_augmentation_is_reproducible_from_its_generator_and_leaves_global_rng(shard):
    from fedsilo.augment import Augmenter

    augmenter = Augmenter(AugmentConfig(crop_scale=0.5, flip=True, rotation=15),
                          image_shape=(1, 28, 28))
    pixels = torch.from_numpy(_arrays(shard)[0][:8])
    labels = torch.arange(8)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    first, _ = augmenter(pixels, labels, generator=torch.Generator().manual_seed(1))
    again, _ = augmenter(pixels, labels, generator=torch.Generator().manual_seed(1))
    other, _ = augmenter(pixels, labels, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), state)
    assert not all(torch.equal(first[0], first[i]) for i in range(8))  # not one draw a batch
    memory, streamed = splits(shard)
    config = TrainConfig(batch_size=16, max_steps=2)
    gen = torch.Generator().manual_seed(5)
    with_aug = weights_after(memory, config, augment=augmenter.bind(gen))
    streamed_aug = weights_after(streamed, config,
                                 augment=augmenter.bind(torch.Generator().manual_seed(5)))
    assert all(torch.equal(a, b) for a, b in zip(with_aug, streamed_aug))


def views_mean_clipped_sum(net, views, labels, clip, group):
    """Σ_i clip(mean over sample i's views of ∇ℓ), explicitly, one sample at a time."""
    total = [torch.zeros_like(p) for p in net.parameters()]
    for i in range(0, views.shape[0], group):
        net.zero_grad()
        (nn.functional.cross_entropy(net(views[i:i + group]), labels[i:i + group],
                                     reduction="sum") / group).backward()
        grads = [p.grad.detach().clone() for p in net.parameters()]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return total, norm


@pytest.mark.parametrize("mode", ["mixed", "hooks"])
def test_augmult_averages_views_before_clipping(mode):
    from fedsilo.privacy.engine import ParticipantPrivacy

    group, clip = 4, 0.05
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 3))
    views = torch.randn(3 * group, 1, 8, 8)
    labels = torch.arange(3).repeat_interleave(group)
    expected, _ = views_mean_clipped_sum(net, views, labels, clip, group)
    engine = ParticipantPrivacy(net, site=0, settings=SiteDP(None, 1.0, 1e-5, clip),
                                mechanism="rdp", num_samples=30, train=TrainConfig(batch_size=3),
                                rounds=1, model_name="toy", sample=views[:2], mode=mode,
                                augmult=group)
    net.zero_grad()
    engine.clipped_sum(views, labels, group=group)
    for p, e in zip(engine.params, expected):
        assert torch.allclose(p.grad, e, atol=1e-6), mode
    # one sample (its 4 views) moves the sum by at most C
    engine.clipped_sum(views[:group] * 50, labels[:group], group=group)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in engine.params))
    assert float(norm) <= clip * (1 + 1e-5)


def test_bf16_ghost_clipping_keeps_the_bound():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    clipper = GhostClipper(net)
    x = torch.randn(1, 1, 8, 8) * 100
    clipper.clipped_sum(x, torch.tensor([1]), max_grad_norm=0.01,
                        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in net.parameters()))
    assert float(norm) <= 0.01 * (1 + 1e-5)


def test_config_refuses_fp16_under_dp_and_augmult_without_views():
    with pytest.raises(ConfigError, match="fp16"):
        load_config(None, overrides=["dp.enabled=true", "train.precision=fp16"])
    with pytest.raises(ConfigError, match="identical"):
        load_config(None, overrides=["dp.enabled=true", "dp.augmult=4"])
    with pytest.raises(ConfigError, match="dp.enabled"):
        load_config(None, overrides=["dp.augmult=4", "data.augment.flip=true"])
    load_config(None, overrides=["dp.enabled=true", "dp.augmult=4", "data.augment.flip=true",
                                 "train.precision=bf16"])
