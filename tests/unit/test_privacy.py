"""Sample-level DP: accounting against Opacus's own accountants, σ search, configuration,
the model validator, and the clipping of the participant engine."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from torch import nn

from fedsilo.config import load_config
from fedsilo.errors import ConfigError, ModelError, PrivacyBudgetError
from fedsilo.models import build_model
from fedsilo.privacy import PrivacyAccountant, noise_multiplier_for, plan_steps
from fedsilo.privacy.validate import check_model

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


def test_gdp_composes_every_segment_of_the_history():
    """Opacus's GDP accountant reads only the last history entry; a resumed run that changed
    σ must be charged for both segments: μ = sqrt(μ_1² + μ_2²) (Dong, Roth & Su 2019)."""
    from opacus.accountants.analysis.gdp import compute_mu_poisson, eps_from_mu

    ours = PrivacyAccountant("gdp")
    ours.spend(noise_multiplier=1.0, sample_rate=0.05, num_steps=100)
    ours.spend(noise_multiplier=2.0, sample_rate=0.05, num_steps=100)
    mus = [compute_mu_poisson(steps=100, noise_multiplier=s, sample_rate=0.05) for s in (1, 2)]
    expected = eps_from_mu(mu=math.sqrt(mus[0] ** 2 + mus[1] ** 2), delta=1e-5)
    assert ours.epsilon(delta=1e-5) == pytest.approx(expected, rel=1e-12)
    last_only = PrivacyAccountant("gdp")
    last_only.spend(noise_multiplier=2.0, sample_rate=0.05, num_steps=100)
    first_only = PrivacyAccountant("gdp")
    first_only.spend(noise_multiplier=1.0, sample_rate=0.05, num_steps=100)
    assert ours.epsilon(delta=1e-5) > first_only.epsilon(delta=1e-5) > last_only.epsilon(delta=1e-5)
    # the same steps in one segment or split in two cost the same
    split = PrivacyAccountant("gdp")
    split.history = [(1.0, 0.05, 60), (1.0, 0.05, 40)]
    assert split.epsilon(delta=1e-5) == pytest.approx(first_only.epsilon(delta=1e-5), rel=1e-12)


@pytest.mark.parametrize("sigma, q, steps", [(1.2, 0.02, 200), (0.8, 0.3, 7), (3.0, 1.0, 1000)])
def test_gdp_single_segment_is_bit_identical_to_opacus(sigma, q, steps):
    import warnings

    ours = PrivacyAccountant("gdp")
    ours.spend(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "GDP accounting is experimental"
        theirs = GaussianAccountant()
    theirs.history = [(sigma, q, steps)]
    assert ours.epsilon(delta=1e-5) == theirs.get_epsilon(delta=1e-5)


def test_gdp_tails_are_sound_numbers_not_errors():
    """Opacus's eps_from_mu brackets ε in [0, 500]: outside it, brentq raises."""
    tiny = PrivacyAccountant("gdp")
    tiny.spend(noise_multiplier=0.05, sample_rate=0.5, num_steps=100)
    assert tiny.epsilon(delta=1e-5) == math.inf
    huge = PrivacyAccountant("gdp")
    huge.spend(noise_multiplier=1e4, sample_rate=1e-6, num_steps=1)
    assert huge.epsilon(delta=1e-5) == 0.0


@pytest.mark.parametrize("mechanism", ["rdp", "prv", "gdp"])
def test_noise_multiplier_for_the_remaining_budget(mechanism):
    from fedsilo.privacy.accounting import noise_multiplier_for_remaining

    q, steps, target = 64 / 1500, 120, 4.0
    fresh = PrivacyAccountant(mechanism)
    sigma0 = noise_multiplier_for_remaining(accountant=fresh, target_epsilon=target, delta=1e-5,
                                            sample_rate=q, num_steps=steps)
    plain = noise_multiplier_for(target_epsilon=target, delta=1e-5, sample_rate=q,
                                 num_steps=steps, mechanism=mechanism)
    after = lambda s: fresh.epsilon_after(noise_multiplier=s, sample_rate=q,  # noqa: E731
                                          num_steps=steps, delta=1e-5)
    assert abs(after(sigma0) - after(plain)) <= 0.011 and after(sigma0) <= target
    # a quarter of the job was spent at a smaller σ (say before a resume): the rest needs more
    spent = PrivacyAccountant(mechanism)
    spent.spend(noise_multiplier=sigma0 * 0.9, sample_rate=q, num_steps=steps // 4)
    history, rest = list(spent.history), steps - steps // 4
    sigma = noise_multiplier_for_remaining(accountant=spent, target_epsilon=target, delta=1e-5,
                                           sample_rate=q, num_steps=rest)
    assert spent.history == history  # planning spends nothing
    assert sigma > sigma0
    final = spent.epsilon_after(noise_multiplier=sigma, sample_rate=q, num_steps=rest,
                                delta=1e-5)
    assert target - 0.011 <= final <= target
    assert spent.epsilon_after(noise_multiplier=sigma * 0.97, sample_rate=q, num_steps=rest,
                               delta=1e-5) > target


def test_remaining_budget_already_spent_is_a_privacy_budget_error():
    from fedsilo.privacy.accounting import noise_multiplier_for_remaining

    acc = PrivacyAccountant("rdp")
    acc.spend(noise_multiplier=0.5, sample_rate=0.1, num_steps=500)
    assert acc.epsilon(delta=1e-5) > 4
    with pytest.raises(PrivacyBudgetError, match="already spent"):
        noise_multiplier_for_remaining(accountant=acc, target_epsilon=4.0, delta=1e-5,
                                       sample_rate=0.1, num_steps=10)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("mechanism, target", [("rdp", 1e4), ("rdp", 1e15), ("rdp", 1e308),
                                               ("gdp", 1e4), ("prv", 1e4)])
def test_sigma_search_is_bounded_for_huge_targets(mechanism, target):
    """Opacus's get_noise_multiplier bisects towards σ = 0 forever when every σ >= 20 is
    already far within the target (and PRV's grid grows with ε until numpy gives up);
    fedsilo's search stays in its finite σ range and bounds PRV's cost."""
    from fedsilo.config import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER

    sigma = noise_multiplier_for(target_epsilon=target, delta=1e-5, sample_rate=64 / 1500,
                                 num_steps=72, mechanism=mechanism)
    assert MIN_NOISE_MULTIPLIER <= sigma <= MAX_NOISE_MULTIPLIER
    acc = PrivacyAccountant("rdp")  # an upper bound on the ε of every accountant here
    acc.spend(noise_multiplier=sigma, sample_rate=64 / 1500, num_steps=72)
    assert acc.epsilon(delta=1e-5) <= target


@pytest.mark.timeout(20)
def test_prv_falls_back_to_the_rdp_bound_where_its_grid_explodes():
    """PRV discretises on a grid that grows with ε·sqrt(steps): ε ≈ 1e4 over 240 steps
    would take Opacus minutes (and σ → 0 petabytes).  There ε is RDP's, also a sound bound."""
    prv, rdp = PrivacyAccountant("prv"), PrivacyAccountant("rdp")
    for acc in (prv, rdp):
        acc.spend(noise_multiplier=0.085, sample_rate=64 / 1500, num_steps=240)
    assert prv.epsilon(delta=1e-5) == rdp.epsilon(delta=1e-5) > 1000
    small = PrivacyAccountant("prv")  # an ordinary job still gets PRV's tighter ε
    small.spend(noise_multiplier=1.0, sample_rate=64 / 1500, num_steps=240)
    ordinary = PrivacyAccountant("rdp")
    ordinary.spend(noise_multiplier=1.0, sample_rate=64 / 1500, num_steps=240)
    assert small.epsilon(delta=1e-5) < ordinary.epsilon(delta=1e-5)


@pytest.mark.timeout(20)
def test_a_non_finite_noise_multiplier_is_never_spent():
    """Opacus's RDP series never converges for σ = inf: refuse it when it is spent."""
    acc = PrivacyAccountant("rdp")
    for sigma in (math.inf, math.nan, 0.0):
        with pytest.raises(ValueError, match="finite noise_multiplier > 0"):
            acc.spend(noise_multiplier=sigma, sample_rate=0.1, num_steps=1)
    assert acc.history == [] and acc.epsilon(delta=1e-5) == 0.0


@pytest.mark.timeout(20)
@pytest.mark.parametrize("target", [math.nan, math.inf, -1.0, 0.0])
def test_sigma_search_refuses_meaningless_targets(target):
    with pytest.raises(ValueError, match="target_epsilon"):
        noise_multiplier_for(target_epsilon=target, delta=1e-5, sample_rate=0.05, num_steps=10)


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
    ("dp.sites.1.delta=1.5", "'dp.sites.1.delta' must be a finite number in (0, 1), got 1.5"),
    ("dp.sites.1.target_epsilon=big", "'dp.sites.1.target_epsilon' must be a number"),
    ("dp.target_epsilon=0", "'dp.target_epsilon' must be a finite number in (0, 10000], got 0"),
    ("dp.max_grad_norm=-1", "'dp.max_grad_norm' must be a finite number > 0, got -1"),
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


EPS_RANGE, SIGMA_RANGE = "must be a finite number in (0, 10000]", \
    "must be a finite number in [0.01, 10000]"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("override, message", [
    ("dp.target_epsilon=1e15", f"'dp.target_epsilon' {EPS_RANGE}, got 1e+15"),
    ("dp.target_epsilon=.inf", f"'dp.target_epsilon' {EPS_RANGE}, got inf"),
    ("dp.target_epsilon=.nan", f"'dp.target_epsilon' {EPS_RANGE}, got nan"),
    ("dp.noise_multiplier=.inf", f"'dp.noise_multiplier' {SIGMA_RANGE}, got inf"),
    ("dp.noise_multiplier=1e-300", f"'dp.noise_multiplier' {SIGMA_RANGE}, got 1e-300"),
    ("dp.noise_multiplier=2e4", f"'dp.noise_multiplier' {SIGMA_RANGE}, got 20000"),
    ("dp.sites.1.noise_multiplier=.nan", f"'dp.sites.1.noise_multiplier' {SIGMA_RANGE}, got nan"),
    ("dp.delta=.nan", "'dp.delta' must be a finite number in (0, 1), got nan"),
    ("dp.max_grad_norm=.inf", "'dp.max_grad_norm' must be a finite number > 0, got inf"),
    ("dp.sites.0.max_grad_norm=.inf", "'dp.sites.0.max_grad_norm' must be a finite number > 0"),
    ("dp.user.clip_norm=.inf", "'dp.user.clip_norm' must be a finite number > 0, got inf"),
    ("dp.user.noise_multiplier=.inf", f"'dp.user.noise_multiplier' {SIGMA_RANGE}, got inf"),
    ("dp.user.noise_multiplier=.nan", f"'dp.user.noise_multiplier' {SIGMA_RANGE}, got nan"),
])
def test_dp_numbers_must_be_finite_and_bounded(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides=["dp.enabled=true", override])
    assert message in str(info.value)


def test_dp_bounds_explain_themselves():
    with pytest.raises(ConfigError, match="no privacy"):
        load_config(None, overrides=["dp.enabled=true", "dp.target_epsilon=1e5"])
    cfg = load_config(None, overrides=["dp.enabled=true", "dp.target_epsilon=1e4",
                                       "dp.noise_multiplier=0.01"])
    assert cfg.dp.target_epsilon == 1e4 and cfg.dp.noise_multiplier == 0.01


def test_gdp_cannot_enforce_a_budget():
    with pytest.raises(ConfigError, match="GDP .*CLT approximation.*under-report.*rdp or prv"):
        load_config(None, overrides=["dp.enabled=true", "dp.accountant=gdp"])
    reporting = ["dp.enabled=true", "dp.accountant=gdp", "dp.target_epsilon=null",
                 "dp.noise_multiplier=1.0"]
    assert load_config(None, overrides=reporting).dp.accountant == "gdp"
    with pytest.raises(ConfigError, match="'dp.sites.2.target_epsilon'.*GDP"):
        load_config(None, overrides=reporting + ["dp.sites.2.target_epsilon=3"])
    # without DP nothing is enforced: the (default) budget is not in force
    assert load_config(None, overrides=["dp.accountant=gdp"]).dp.accountant == "gdp"


def test_site_without_a_budget_or_a_noise_multiplier_is_refused():
    with pytest.raises(ConfigError, match="'dp.sites.1' needs target_epsilon or noise_multiplier"):
        load_config(None, overrides=["dp.enabled=true", "dp.sites.1.target_epsilon=null"])
    ok = load_config(None, overrides=["dp.enabled=true", "dp.sites.1.target_epsilon=null",
                                      "dp.sites.1.noise_multiplier=1.5"])
    assert ok.dp.for_site(1).target_epsilon is None and ok.dp.for_site(1).noise_multiplier == 1.5
    ok = load_config(None, overrides=["dp.enabled=true", "dp.noise_multiplier=1.0",
                                      "dp.sites.1.target_epsilon=null"])
    assert ok.dp.for_site(1).noise_multiplier == 1.0
    # DP off: nothing runs, so nothing is missing
    assert not load_config(None, overrides=["dp.sites.1.target_epsilon=null"]).dp.enabled


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
        self.head = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        out = self.conv(x)
        out += 1.0  # fine for plain autograd, invisible to a static check
        return self.head(out.flatten(1))


def make_engine(model, *, mode, sample, clip=1.0, batch=3):
    from fedsilo.config import SiteDP, TrainConfig
    from fedsilo.privacy.engine import ParticipantPrivacy

    return ParticipantPrivacy(model, site=0, settings=SiteDP(None, 1.0, 1e-5, clip),
                              mechanism="rdp", num_samples=len(sample),
                              train=TrainConfig(batch_size=batch), rounds=1,
                              model_name="m", sample=sample, mode=mode)


@pytest.mark.parametrize("mode, needle", [
    ("hooks", "out \\+= identity"),
    ("mixed", "the output of layer 'conv' \\(Conv2d\\) is modified in place")])
def test_trial_step_catches_inplace_forward_code(mode, needle):
    model = _InplaceAdd()
    check_model(model, name="inplace_add")  # statically fine
    F = nn.functional
    F.cross_entropy(model(torch.randn(2, 1, 8, 8)), torch.tensor([0, 1])).backward()  # plain: ok
    with pytest.raises(ModelError, match="first per-sample backward pass fails.*" + needle):
        make_engine(model, mode=mode, sample=torch.randn(4, 1, 8, 8))


@pytest.mark.parametrize("mode", ["hooks", "mixed"])
@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "dp_cnn"])
def test_model_zoo_is_dp_ready(name, mode):
    model = build_model(name, in_channels=1, num_classes=2, image_size=(28, 28), norm_groups=8)
    check_model(model, name=name)
    engine = make_engine(model, mode=mode, sample=torch.randn(4, 1, 28, 28))
    assert engine.mode == mode
    assert all(getattr(p, "grad_sample", None) is None and p.grad is None
               for p in model.parameters())


def test_auto_mode_falls_back_to_hooks_for_uncovered_layers():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, affine=True), nn.Flatten(),
                          nn.Linear(72, 2))
    assert make_engine(model, mode="auto", sample=torch.randn(4, 1, 8, 8)).mode == "hooks"
    with pytest.raises(ModelError, match="does not cover"):
        make_engine(model, mode="mixed", sample=torch.randn(4, 1, 8, 8))
    small = build_model("small_cnn", in_channels=1, num_classes=2, image_size=(28, 28))
    assert make_engine(small, mode="auto", sample=torch.randn(4, 1, 28, 28)).mode == "mixed"


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


def explicit_clipped_sum(model, x, y, clip):
    """Σ_i min(1, C/(‖g_i‖+1e-6)) g_i from Opacus's explicit per-sample gradients (hooks)."""
    from opacus import GradSampleModule

    module = GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(module(x), y, reduction="sum").backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norms = torch.stack([p.grad_sample.reshape(len(x), -1).norm(2, dim=1) for p in params], 1)
    norms = norms.norm(2, dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    out = [torch.einsum("i,i...->...", factor, p.grad_sample) for p in params]
    module._close()
    for p in params:
        p.grad, p.grad_sample = None, None
    return out, norms


@pytest.mark.parametrize("mode", ["hooks", "mixed"])
@pytest.mark.parametrize("name, groups", [("small_cnn", 32), ("resnet18", 8), ("dp_cnn", 32)])
def test_clipped_sum_equals_opacus_explicit_per_sample_gradients(name, groups, mode):
    """Both clipping methods give the clipped sum Opacus's explicit per-sample gradients give."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=3, image_size=(28, 28),
                        norm_groups=groups)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 3, (6,))
    expected, norms = explicit_clipped_sum(model, x, y, 0.5)
    assert (norms > 0.5).all()  # the clipping is exercised
    engine = make_engine(model, mode=mode, sample=x, clip=0.5)
    engine.module.train()
    engine.clipped_sum(x, y)
    for p, e in zip(engine.params, expected):
        assert torch.allclose(p.grad, e, atol=1e-6, rtol=1e-3), float((p.grad - e).abs().max())


def test_mixed_clipping_of_linear_layers_on_sequences():
    """The ghost norm of a Linear layer over a sequence (N × T × d input) is exact too."""
    from fedsilo.privacy.ghost import GhostClipper

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.head = nn.Linear(5, 7), nn.Linear(7 * 4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.proj(x)).flatten(1))

    torch.manual_seed(1)
    model, x, y = Seq(), torch.randn(5, 4, 5), torch.randint(0, 3, (5,))
    expected, _ = explicit_clipped_sum(model, x, y, 0.1)
    GhostClipper(model).clipped_sum(x, y, max_grad_norm=0.1)
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, e, atol=1e-6, rtol=1e-3)


# -- user-level DP ---------------------------------------------------------------------


def test_user_dp_config():
    cfg = load_config(None, overrides=["dp.user.enabled=true", "dp.user.noise=distributed",
                                       "dp.user.clip_norm=0.5"])
    assert cfg.dp.user.enabled and not cfg.dp.enabled and cfg.dp.user.noise == "distributed"
    with pytest.raises(ConfigError, match="'dp.user.noise' must be one of central, distributed"):
        load_config(None, overrides=["dp.user.noise=local"])
    with pytest.raises(ConfigError, match="'dp.user.clip_norm' must be a finite number > 0, got 0"):
        load_config(None, overrides=["dp.user.clip_norm=0"])

