"""Sample-level DP: accounting against Opacus's own accountants, σ search, configuration,
the model validator, and the clipping of the participant engine."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torchvision
from hypothesis import given, settings, strategies as st
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from torch import nn

from fedsilo.config import load_config
from fedsilo.errors import ConfigError, ModelError, PrivacyBudgetError
from fedsilo.models import build_model
from fedsilo.privacy import PrivacyAccountant, noise_multiplier_for, plan_steps
from fedsilo.privacy.validate import check_model, check_trainable

OPACUS = {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GaussianAccountant}


@pytest.mark.parametrize("mechanism, sigma, q, steps", [
    ("rdp", 1.1, 0.01, 300), ("rdp", 0.7, 0.1, 40), ("prv", 1.0, 0.05, 120),
    ("gdp", 1.2, 0.02, 200)])
def test_epsilon_equals_opacus_accountant_stepped_by_hand(mechanism, sigma, q, steps):
    """Same σ, q and steps: our ε is the one Opacus's accountant reports after its own
    ``step()`` calls (as DPOptimizer makes them), spread over rounds as fedsilo spends it."""
    ours = PrivacyAccountant(mechanism)
    for _ in range(3):  # three rounds
        ours.spend(noise_multiplier=sigma, sample_rate=q, num_steps=steps // 3)
    theirs = OPACUS[mechanism]()
    for _ in range(3 * (steps // 3)):
        theirs.step(noise_multiplier=sigma, sample_rate=q)
    assert ours.epsilon(delta=1e-5) == pytest.approx(theirs.get_epsilon(delta=1e-5), rel=1e-9)
    assert ours.num_steps == 3 * (steps // 3)


def test_mixed_history_matches_opacus():
    ours = PrivacyAccountant("rdp")
    ours.spend(noise_multiplier=1.0, sample_rate=0.05, num_steps=10)
    ours.spend(noise_multiplier=2.0, sample_rate=0.05, num_steps=10)
    theirs = RDPAccountant()
    for sigma in [1.0] * 10 + [2.0] * 10:
        theirs.step(noise_multiplier=sigma, sample_rate=0.05)
    assert ours.epsilon(delta=1e-6) == pytest.approx(theirs.get_epsilon(delta=1e-6), rel=1e-12)


def test_state_survives_a_weights_only_checkpoint():
    acc = PrivacyAccountant("rdp")
    acc.spend(noise_multiplier=0.9, sample_rate=0.03, num_steps=50)
    buffer = io.BytesIO()
    torch.save({"privacy": acc.state_dict()}, buffer)
    buffer.seek(0)
    restored = PrivacyAccountant("rdp")
    restored.load_state_dict(torch.load(buffer, weights_only=True)["privacy"])
    assert restored.history == acc.history
    assert restored.epsilon(delta=1e-5) == acc.epsilon(delta=1e-5)


def test_epsilon_after_does_not_spend():
    acc = PrivacyAccountant("rdp")
    acc.spend(noise_multiplier=1.0, sample_rate=0.05, num_steps=20)
    before = acc.epsilon(delta=1e-5)
    after = acc.epsilon_after(noise_multiplier=1.0, sample_rate=0.05, num_steps=20, delta=1e-5)
    assert after > before == acc.epsilon(delta=1e-5)
    assert PrivacyAccountant("rdp").epsilon(delta=1e-5) == 0.0


@settings(max_examples=15, deadline=None)
@given(steps=st.integers(1, 400), more=st.integers(1, 400),
       sigma=st.floats(0.5, 5.0), q=st.floats(0.001, 0.5))
def test_epsilon_grows_with_steps(steps, more, sigma, q):
    acc = PrivacyAccountant("rdp")
    acc.spend(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    assert acc.epsilon_after(noise_multiplier=sigma, sample_rate=q, num_steps=more,
                             delta=1e-5) > acc.epsilon(delta=1e-5)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_noise_multiplier_meets_the_target(mechanism, target):
    q, steps = 64 / 1500, 10 * 24
    sigma = noise_multiplier_for(target_epsilon=target, delta=1e-5, sample_rate=q,
                                 num_steps=steps, mechanism=mechanism)
    acc = PrivacyAccountant(mechanism)
    acc.spend(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    assert target - 0.011 <= acc.epsilon(delta=1e-5) <= target
    # a little less noise would overspend: σ is the smallest that fits
    assert acc.epsilon_after(noise_multiplier=sigma * 0.97, sample_rate=q, num_steps=0,
                             delta=1e-5) == acc.epsilon(delta=1e-5)
    low = PrivacyAccountant(mechanism)
    low.spend(noise_multiplier=sigma * 0.97, sample_rate=q, num_steps=steps)
    assert low.epsilon(delta=1e-5) > target


def test_impossible_budget_is_a_privacy_budget_error():
    with pytest.raises(PrivacyBudgetError, match="no noise multiplier reaches"):
        noise_multiplier_for(target_epsilon=1e-9, delta=1e-5, sample_rate=1.0, num_steps=10**6)


def test_plan_steps():
    assert plan_steps(num_samples=100, batch_size=32, epochs=2, max_steps=None, rounds=3) == \
        (0.32, 8, 24)
    assert plan_steps(num_samples=100, batch_size=32, epochs=2, max_steps=5, rounds=3) == \
        (0.32, 5, 15)
    assert plan_steps(num_samples=10, batch_size=64, epochs=1, max_steps=None, rounds=1)[0] == 1.0


# -- configuration ------------------------------------------------------------------------


def test_dp_config_and_site_overrides():
    cfg = load_config(None, overrides=["dp.enabled=true", "dp.target_epsilon=8",
                                       "dp.sites.2.target_epsilon=3", "dp.sites.0.delta=1e-6"])
    assert cfg.dp.for_site(2).target_epsilon == 3.0 and cfg.dp.for_site(2).delta == 1e-5
    assert cfg.dp.for_site(0).delta == 1e-6 and cfg.dp.for_site(0).target_epsilon == 8.0
    assert cfg.dp.for_site(1).target_epsilon == 8.0
    assert cfg.dp.sites == {0: {"delta": 1e-6}, 2: {"target_epsilon": 3.0}}


@pytest.mark.parametrize("override, message", [
    ("dp.sites.a.target_epsilon=3", "'dp.sites.a' must be a site index"),
    ("dp.sites.1.accountant=prv", "unknown config key 'dp.sites.1.accountant'"),
    ("dp.sites.1.delta=1.5", "'dp.sites.1.delta' must be in (0, 1)"),
    ("dp.sites.1.target_epsilon=big", "'dp.sites.1.target_epsilon' must be a number"),
    ("dp.target_epsilon=0", "'dp.target_epsilon' must be > 0"),
    ("dp.max_grad_norm=-1", "'dp.max_grad_norm' must be > 0"),
    ("dp.accountant=moments", "'dp.accountant' must be one of rdp, prv, gdp"),
    ("dp.budget_policy=warn", "'dp.budget_policy' must be one of stop, abort"),
    ("dp.epsilon=3", "unknown config key 'dp.epsilon'"),
])
def test_dp_config_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides=["dp.enabled=true", override])
    assert message in str(info.value)


def test_enabled_dp_needs_a_budget_or_a_noise_multiplier():
    with pytest.raises(ConfigError, match="needs target_epsilon or noise_multiplier"):
        load_config(None, overrides=["dp.enabled=true", "dp.target_epsilon=null"])
    assert load_config(None, overrides=["dp.enabled=true", "dp.target_epsilon=null",
                                        "dp.noise_multiplier=1.0"]).dp.target_epsilon is None


# -- the model validator ------------------------------------------------------------------


def test_validator_names_batchnorm_layers():
    model = torchvision.models.resnet18(num_classes=2)
    with pytest.raises(ModelError) as info:
        check_model(model, name="tv_resnet18")
    assert "layer 'bn1' (BatchNorm2d): BatchNorm" in str(info.value)
    assert "layer 'layer4.1.bn2' (BatchNorm2d)" in str(info.value)


def test_validator_names_inplace_layers():
    model = torchvision.models.resnet18(num_classes=2, norm_layer=lambda c: nn.GroupNorm(8, c))
    with pytest.raises(ModelError, match=r"layer 'relu' \(ReLU\): in-place operation"):
        check_model(model, name="tv_resnet18_gn")


class _InplaceAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        out = self.act(self.conv(x))
        out += 1.0  # invisible to a static check
        return self.head(out.flatten(1))


def test_trial_backward_catches_inplace_forward_code():
    from opacus import GradSampleModule

    model = _InplaceAdd()
    check_model(model, name="inplace_add")  # statically fine
    with pytest.raises(ModelError, match="first per-sample backward pass fails.*out \\+= identity"):
        check_trainable(GradSampleModule(model), torch.randn(2, 1, 8, 8), name="inplace_add")


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_model_zoo_is_dp_ready(name):
    from opacus import GradSampleModule

    model = build_model(name, in_channels=1, num_classes=2, image_size=(28, 28), norm_groups=8)
    check_model(model, name=name)
    module = GradSampleModule(model, loss_reduction="sum")
    check_trainable(module, torch.randn(2, 1, 28, 28), name=name)
    assert all(p.grad_sample is None and p.grad is None for p in model.parameters())


def test_resnet18_keeps_torchvision_parameter_names():
    ours = build_model("resnet18", in_channels=3, num_classes=5, image_size=(224, 224))
    stock = torchvision.models.resnet18(num_classes=5,
                                        norm_layer=lambda c: nn.GroupNorm(32, c))
    assert list(ours.state_dict()) == list(stock.state_dict())
    ours.load_state_dict(stock.state_dict())
    stock.eval(), ours.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(ours(x), stock(x), atol=1e-5)


# -- the engine's clipping ---------------------------------------------------------------


def test_clipped_sum_equals_explicit_per_sample_gradients():
    """Σ_i min(1, C/‖g_i‖) g_i from the engine equals the same sum over gradients computed
    one sample at a time."""
    from fedsilo.config import SiteDP, TrainConfig
    from fedsilo.privacy.engine import ParticipantPrivacy

    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, num_classes=3, image_size=(28, 28))
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 3, (6,))
    engine = ParticipantPrivacy(model, site=0, settings=SiteDP(None, 1.0, 1e-5, 0.5),
                                mechanism="rdp", num_samples=6, train=TrainConfig(batch_size=3),
                                rounds=1, model_name="small_cnn", sample=x)
    loss = engine.loss_fn(engine.module(x), y)
    loss.backward()
    engine.clip_and_sum()
    got = [p.grad.clone() for p in engine.params]

    expected = [torch.zeros_like(p) for p in engine.params]
    for i in range(6):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1],
                                                                reduction="sum"), engine.params)
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        assert norm > 0.5  # the clipping is exercised
        for e, g in zip(expected, grads):
            e += g * min(1.0, 0.5 / (norm + 1e-6))
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
