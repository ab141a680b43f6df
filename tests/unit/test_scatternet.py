"""ScatterNet models (models/scatternet.py): fixed features, exact per-sample clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsilo.config import SiteDP, TrainConfig
from fedsilo.models import build_model
from fedsilo.privacy.engine import ParticipantPrivacy
from fedsilo.weights import WeightLayout


def _engine(model, *, mode, sample, clip):
    return ParticipantPrivacy(model, site=0, settings=SiteDP(None, 1.0, 1e-5, clip),
                              mechanism="rdp", num_samples=len(sample),
                              train=TrainConfig(batch_size=3), rounds=1, model_name="m",
                              sample=sample, mode=mode)


def _explicit_clipped_sum(model, x, y, clip):
    """Σ_i min(1, C/(‖g_i‖+1e-6)) g_i, each g_i from its own backward pass on sample i."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).float()
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g
        norms.append(float(norm))
    return total, norms


@pytest.mark.parametrize("mode", ["mixed", "hooks"])
@pytest.mark.parametrize("name", ["scatter_linear", "scatter_cnn"])
def test_scatternet_clipped_sum_equals_explicit_per_sample_gradients(name, mode):
    """DP-SGD's clipped sum of a ScatterNet model is the sum of the per-sample gradients,
    each computed alone and clipped to C, and only the model on top of the scattering has
    parameters."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=2, image_size=(28, 28))
    x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 1, 0, 1, 0])
    clip = 0.05
    expected, norms = _explicit_clipped_sum(model, x, y, clip)
    assert min(norms) > clip and max(norms) / min(norms) > 1.05  # clipping bites, unevenly
    engine = _engine(model, mode=mode, sample=x, clip=clip)
    assert engine.mode == mode
    engine.module.train()
    engine.clipped_sum(x, y)
    for p, e in zip(engine.params, expected):
        assert torch.allclose(p.grad, e, atol=1e-6, rtol=1e-4), float((p.grad - e).abs().max())


@pytest.mark.parametrize("name", ["scatter_linear", "scatter_cnn"])
def test_scattering_is_fixed_cached_and_not_in_the_state_dict(name):
    model = build_model(name, in_channels=1, num_classes=2, image_size=(28, 28))
    names = list(model.state_dict())
    assert names and not any(n.startswith("scattering") for n in names)
    assert WeightLayout.of(model).numel == sum(p.numel() for p in model.parameters())
    scattering = model.scattering
    x = torch.randn(5, 1, 28, 28)
    first = scattering(x)
    assert first.shape == (5, 81, 7, 7) and len(scattering._cache) == 5
    # a batch mixing cached and new images gives what the transform gives without the cache
    y = torch.cat([x[3:], torch.randn(2, 1, 28, 28)])
    assert torch.equal(scattering(y), scattering._scatter(y))
    assert len(scattering._cache) == 7
    scattering.cache_bytes = first[0].numel() * 4 * 3  # room for 3: old entries go first
    scattering(torch.randn(4, 1, 28, 28))
    assert scattering._cached <= scattering.cache_bytes


def test_scatternet_three_channels():
    model = build_model("scatter_cnn", in_channels=3, num_classes=5, image_size=(32, 32))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert model.scattering.out_channels == 243
