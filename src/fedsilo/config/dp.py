"""The ``dp`` section (docs/privacy.md), and the bounds of every DP number: declared once
here, checked by the schema for config keys and by ``fedsilo budget`` for its flags."""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Literal, Mapping

from pydantic import AfterValidator, ConfigDict
from pydantic.dataclasses import dataclass
from typing_extensions import TypedDict

from fedsilo.config.schema import SECTION_CONFIG, Bool, Float, Int, cause, check, setting
from fedsilo.errors import ConfigError

#: σ range of every noise multiplier, configured or searched for (``noise_multiplier_for``).
#: Below 0.01 one step already spends ε in the thousands whatever the sampling rate, and
#: Opacus's accountants stop computing (GDP's exp(1/σ²) overflows below σ ≈ 0.04, PRV cannot
#: discretise); above 1e4 the noise swamps any gradient (RDP's ε sits at its floor long before).
MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER = 0.01, 1e4
#: the largest budget ε one may ask for: past it a "budget" promises no privacy at all
#: (e^ε, the bound on the likelihood ratio, overflows a double from ε ≈ 709 on)
MAX_TARGET_EPSILON = 1e4


@dataclasses.dataclass(frozen=True)
class Bound:
    """The range of a DP number: finite, and between ``low`` and ``high`` (open or closed).

    >>> DELTA.error(2.0), DELTA.error(1e-5)
    ('must be a finite number in (0, 1), got 2', None)
    """

    low: float
    high: float | None = None
    low_open: bool = True
    high_open: bool = False
    #: why the range is what it is, said when a value is out of it (not for a NaN)
    why: str = ""

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open
                                      else value <= self.high)
        return math.isfinite(value) and above and below

    def range(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")

    def error(self, value: float, *, why: str | None = None) -> str | None:
        """None for a good ``value``, else what is wrong with it (after the key's name)."""
        if self.contains(value):
            return None
        why = self.why if why is None else why
        return (f"must be a finite number {self.range()}, got {value:.6g}"
                + (f" ({why})" if why and not math.isnan(value) else ""))


EPSILON = Bound(0, MAX_TARGET_EPSILON)
#: said of an ε above MAX_TARGET_EPSILON (below, the range says it all)
EPSILON_WHY = "a larger ε promises no privacy: e^ε overflows a double from ε ≈ 709"
NOISE_MULTIPLIER = Bound(MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER, low_open=False,
                         why="below, one step spends ε in the thousands and the accountants "
                             "cannot compute it; above, the noise swamps any update")
DELTA = Bound(0, 1, high_open=True)
POSITIVE = Bound(0)


def _within(bound: Bound, why_above: str | None = None) -> AfterValidator:
    def check_value(value: float) -> float:
        why = None  # the bound's own
        if why_above is not None:  # said only of a value above the range
            why = why_above if bound.high is not None and value > bound.high else ""
        error = bound.error(value, why=why)
        if error:
            raise cause(error)
        return value

    return AfterValidator(check_value)


Epsilon = Annotated[Float, _within(EPSILON, f"{EPSILON_WHY}; use target_epsilon: null "
                                            f"for no budget")]
NoiseMultiplier = Annotated[Float, _within(NOISE_MULTIPLIER)]
Delta = Annotated[Float, _within(DELTA)]
Positive = Annotated[Float, _within(POSITIVE)]


@dataclasses.dataclass(frozen=True)
class SiteDP:
    """The sample-level DP settings that apply to one participant (after its overrides)."""

    target_epsilon: float | None
    noise_multiplier: float | None
    delta: float
    max_grad_norm: float


class SiteOverride(TypedDict, total=False):
    """What a ``dp.sites.K`` override may set (the rest is job-wide)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    target_epsilon: Epsilon | None
    noise_multiplier: NoiseMultiplier | None
    delta: Delta
    max_grad_norm: Positive


#: keys a ``dp.sites.K`` override may set (the rest is job-wide)
SITE_DP_KEYS = tuple(SiteOverride.__annotations__)


def _site_index(key: Any) -> int:
    try:
        site = int(key)
    except (TypeError, ValueError):
        site = -1
    if site < 0 or str(site) != str(key).strip():
        raise cause("must be a site index 0..P-1")
    return site


Sites = Annotated[dict[Annotated[Any, AfterValidator(_site_index)], SiteOverride],
                  AfterValidator(lambda sites: dict(sorted(sites.items())))]


@dataclass(frozen=True, config=SECTION_CONFIG)
class UserDPConfig:
    """User-level (site-level) DP-FedAvg (McMahan et al. 2018): clip each participant's
    model delta to ``clip_norm``, add Gaussian noise of σ·C·max_k w_k to the sum."""

    enabled: Bool = False
    clip_norm: Positive = 1.0
    noise_multiplier: NoiseMultiplier = 1.0
    #: central: the coordinator adds the noise; distributed: each of the P participants
    #: adds an independent share N(0, σ²C²max_w²/P) before sending (composes with encryption)
    noise: Literal["central", "distributed"] = "central"


@dataclass(frozen=True, config=SECTION_CONFIG)
class DPValidationConfig:
    """Model and threshold selection under DP (binary tasks; docs/privacy.md, "Validation
    under DP"): each site releases its validation scores as a histogram per class with
    Gaussian noise of std ``noise_multiplier`` on every count (drawn from its secret), and
    accounts each release in its own ε; the coordinator chooses best.pt and the decision
    threshold on the noised sums."""

    enabled: Bool = False
    #: σ of each released count (a validation example moves one count by 1)
    noise_multiplier: NoiseMultiplier = 10.0
    #: equal-width bins of the positive-class probability (the thresholds are their edges)
    bins: Int = setting(10, ge=2, le=100)
    #: the sites validate the global model every N rounds, and the final model
    every: Int = setting(5, ge=1)

    def releases(self, rounds: int) -> int:
        """Validation releases a site makes over a job of ``rounds`` rounds (at most)."""
        return (rounds - 1) // self.every + 1


@dataclass(frozen=True, config=SECTION_CONFIG)
class DPConfig:
    """Sample-level DP-SGD on every participant (see docs/privacy.md).

    ``sites`` overrides the settings of single participants; its keys are **site indexes
    0..P-1** (the ``site-00K.h5`` shard, run by MPI rank K+1), e.g.
    ``sites: {2: {target_epsilon: 3}}`` or ``--set dp.sites.2.target_epsilon=3``.
    """

    enabled: Bool = False
    #: the per-site budget ε; with noise_multiplier unset, σ is chosen to spend exactly
    #: this over the planned job (rounds × local steps).  None: no budget (ε only reported)
    target_epsilon: Epsilon | None = 8.0
    delta: Delta = 1e-5
    #: σ, given explicitly (then target_epsilon is only the enforced budget)
    noise_multiplier: NoiseMultiplier | None = None
    #: per-sample gradient clipping norm C
    max_grad_norm: Positive = 1.0
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    #: a participant whose next round would exceed its budget: stop contributing (the
    #: federation continues without it), or abort the whole job
    budget_policy: Literal["stop", "abort"] = "stop"
    #: per-sample clipping method: mixed (fedsilo's mixed ghost clipping: Linear, Conv2d,
    #: GroupNorm), hooks (Opacus's explicit per-sample gradients, any Opacus-supported
    #: layer), auto (mixed where it covers the model, else hooks)
    grad_sample_mode: Literal["auto", "mixed", "hooks"] = "auto"
    sites: Sites = setting(default_factory=dict)
    #: augmentation multiplicity (De et al. 2022): K augmented views of each sampled image,
    #: their gradients averaged before clipping (the sensitivity stays C); needs data.augment
    augmult: Int = setting(1, ge=1)
    #: user-level DP-FedAvg, independent of (and combinable with) sample-level DP-SGD;
    #: accounted over rounds at dp.delta and reported as ``user_epsilon``
    user: UserDPConfig = setting(default_factory=UserDPConfig)
    #: noised federated validation, so best.pt and a threshold exist under DP
    validation: DPValidationConfig = setting(default_factory=DPValidationConfig)

    def __post_init__(self) -> None:
        self._check_site("dp", self.for_site(0, _sites={}))  # the job-wide settings
        for site in self.sites:
            self._check_site(f"dp.sites.{site}", self.for_site(site))

    def _check_site(self, key: str, site: SiteDP) -> None:
        """The rules of one participant's resolved settings, its numbers being in range.
        The job-wide ones (``key`` "dp") are checked first, so a site's error can only come
        from its own override ``key``."""
        if not self.enabled:
            return
        check(site.target_epsilon is not None or site.noise_multiplier is not None, key,
              "needs target_epsilon or noise_multiplier when enabled (got null for both)")
        if self.accountant == "gdp" and site.target_epsilon is not None:
            raise ConfigError(
                f"config key '{key}.target_epsilon' sets a budget of ε = "
                f"{site.target_epsilon:.6g}, but dp.accountant=gdp cannot enforce one: GDP "
                f"(Gaussian DP) is a CLT approximation that can under-report ε; use rdp or "
                f"prv for a budget, or keep gdp for reporting only with target_epsilon: null "
                f"and an explicit noise_multiplier")

    def for_site(self, site: int, *, _sites: Mapping[int, Any] | None = None) -> SiteDP:
        """The settings of participant ``site`` (0-based): job-wide ones plus its overrides."""
        base = SiteDP(target_epsilon=self.target_epsilon, noise_multiplier=self.noise_multiplier,
                      delta=self.delta, max_grad_norm=self.max_grad_norm)
        overrides = (self.sites if _sites is None else _sites).get(site, {})
        return dataclasses.replace(base, **overrides)
