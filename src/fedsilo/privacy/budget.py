"""``fedsilo budget``: the planning question, offline (like Opacus's ``compute_dp_sgd_privacy``).

Given one participant's data size and its training plan, either the noise multiplier σ that
spends a target ε over the whole job, or the ε a given σ spends, plus ε after each round.

>>> plan = plan_budget(num_samples=1500, batch_size=64, epochs=1, rounds=3, delta=1e-5,
...                    noise_multiplier=1.0)
>>> plan["sample_rate"], plan["steps_per_round"], plan["total_steps"]
(0.042666666666666665, 24, 72)
>>> plan["epsilon_per_round"][-1] == plan["epsilon"] > plan["epsilon_per_round"][0]
True
"""

from __future__ import annotations

from typing import Any

from fedsilo.config.dp import DELTA, EPSILON, EPSILON_WHY, MAX_TARGET_EPSILON, NOISE_MULTIPLIER
from fedsilo.errors import ConfigError
from fedsilo.privacy.accounting import (
    PrivacyAccountant,
    noise_multiplier_for,
    noise_multiplier_for_remaining,
    plan_steps,
)


def plan_budget(*, num_samples: int, batch_size: int, epochs: int, rounds: int, delta: float,
                target_epsilon: float | None = None, noise_multiplier: float | None = None,
                max_steps: int | None = None, accountant: str = "rdp",
                validation_sigma: float | None = None,
                validation_releases: int = 0) -> dict[str, Any]:
    """σ for ``target_epsilon``, or ε for ``noise_multiplier`` (exactly one of the two).
    ``validation_sigma``: dp.validation's noise, ``validation_releases`` of it accounted as
    training does (σ of DP-SGD planned over what they leave; ε per round with them all)."""
    _check_arguments(num_samples=num_samples, batch_size=batch_size, epochs=epochs,
                     rounds=rounds, delta=delta, target_epsilon=target_epsilon,
                     noise_multiplier=noise_multiplier, max_steps=max_steps,
                     accountant=accountant)
    q, per_round, total = plan_steps(num_samples=num_samples, batch_size=batch_size,
                                     epochs=epochs, max_steps=max_steps, rounds=rounds)
    reserve = PrivacyAccountant(accountant)
    if validation_sigma is not None and validation_releases > 0:
        reserve.spend(noise_multiplier=validation_sigma, sample_rate=1.0,
                      num_steps=validation_releases)
    reserved = bool(reserve.history)
    if noise_multiplier is None:
        assert target_epsilon is not None, "_check_arguments asks for one of the two"
        noise_multiplier = noise_multiplier_for(
            target_epsilon=target_epsilon, delta=delta, sample_rate=q, num_steps=total,
            mechanism=accountant) if not reserved else noise_multiplier_for_remaining(
            accountant=reserve, target_epsilon=target_epsilon, delta=delta, sample_rate=q,
            num_steps=total)
    acc = reserve  # the validation releases first: the order does not change the composition
    per_round_eps = []
    for _ in range(rounds):
        acc.spend(noise_multiplier=noise_multiplier, sample_rate=q, num_steps=per_round)
        per_round_eps.append(acc.epsilon(delta=delta))
    return {"accountant": accountant, "sample_rate": q, "steps_per_round": per_round,
            "total_steps": total, "noise_multiplier": noise_multiplier, "delta": delta,
            "epsilon": per_round_eps[-1], "epsilon_per_round": per_round_eps,
            "target_epsilon": target_epsilon,
            "validation": None if not reserved else {
                "noise_multiplier": validation_sigma, "releases": validation_releases}}


def _check_arguments(*, num_samples: int, batch_size: int, epochs: int, rounds: int,
                     delta: float, target_epsilon: float | None,
                     noise_multiplier: float | None, max_steps: int | None,
                     accountant: str) -> None:
    """The flags' ranges are those of the configuration keys, declared once in
    :mod:`fedsilo.config.dp`."""
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ConfigError("give exactly one of --target-epsilon and --noise-multiplier")
    for name, value in (("--samples", num_samples), ("--batch-size", batch_size),
                        ("--epochs", epochs), ("--rounds", rounds),
                        ("--max-steps", 1 if max_steps is None else max_steps)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    _refuse("--delta", DELTA.error(delta))
    if target_epsilon is not None:
        _refuse("--target-epsilon", EPSILON.error(
            target_epsilon, why=EPSILON_WHY if target_epsilon > MAX_TARGET_EPSILON else ""))
        if accountant == "gdp":
            raise ConfigError(
                "--accountant gdp cannot plan for --target-epsilon: GDP is a CLT approximation "
                "that can under-report ε, so it cannot enforce a budget; use --accountant rdp "
                "or prv for a target, or give --noise-multiplier to report GDP's ε")
    if noise_multiplier is not None:
        _refuse("--noise-multiplier", NOISE_MULTIPLIER.error(
            noise_multiplier, why="the range dp.noise_multiplier accepts"))


def _refuse(flag: str, error: str | None) -> None:
    if error:
        raise ConfigError(f"{flag} {error}")


def format_budget(plan: dict[str, Any]) -> str:
    lines = [f"accountant        {plan['accountant']}",
             f"sample rate q     {plan['sample_rate']:.6g}  (Poisson sampling, B/N)",
             f"steps             {plan['steps_per_round']} per round, {plan['total_steps']} in all",
             f"noise multiplier  {plan['noise_multiplier']:.6g}"
             + ("  (chosen for the target)" if plan["target_epsilon"] is not None else ""),
             f"epsilon           {plan['epsilon']:.4f} at delta {plan['delta']:g}",
             *([f"validation        {plan['validation']['releases']} noised releases at "
                f"sigma {plan['validation']['noise_multiplier']:g} (dp.validation), in epsilon"]
               if plan.get("validation") else []),
             "round  epsilon"]
    lines += [f"{r:5d}  {e:.4f}" for r, e in enumerate(plan["epsilon_per_round"], start=1)]
    return "\n".join(lines)
