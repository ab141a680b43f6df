"""What a participant checks of the coordinator's word before its privacy depends on it.

Secure aggregation exists so that a hospital need not trust the coordinator (docs/privacy.md,
'A deviating coordinator').  Everything the coordinator broadcasts that a site's privacy
rests on is recomputed or checked by every participant, from public inputs it holds itself
(its own copy of the configuration and the manifest, its own sites' state):

- the configuration's privacy policy and the manifest (:func:`check_policy`);
- the round index, against the participant's own count (a replayed round would reuse masks
  and DP noise);
- the round's sample: the participation policy applied to the sites still in the
  federation, from the public participation seed (:func:`planned_sample`), so a coordinator
  cannot single a site out with a coalition; a site it calls out of budget must say so itself;
- every sampled site's weight, and the ranks of the round's team;
- the outcome: same round, same team, contributors and masked sites among the sampled ones;
- that every participant was told the same (:func:`round_fingerprint`, compared among the
  participants on a communicator the coordinator is not part of).

Pure: no torch, no MPI.

>>> from fedsilo.config import load_config
>>> config = load_config(None, overrides=["participation.fraction=0.5"])
>>> planned_sample(config, num_sites=6, round_index=3, stopped=())
[1, 2, 4]
>>> planned_sample(config, num_sites=6, round_index=3, stopped=(1,))
[2, 4, 5]
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

import numpy as np

from fedsilo.errors import PolicyError
from fedsilo.messages import RoundOutcome, RoundPlan
from fedsilo.participation import rank_of_sites, sample_sites


def planned_sample(config: Any, *, num_sites: int, round_index: int,
                   stopped: Sequence[int]) -> list[int]:
    """The sites round ``round_index`` samples: the participation policy over the sites not
    ``stopped`` (out of privacy budget), from the public participation seed."""
    share = config.participation
    available = [k for k in range(num_sites) if k not in set(stopped)]
    return sample_sites(available, fraction=share.fraction, minimum=share.min, seed=share.seed,
                        round_index=round_index)


def user_weights(strategy: Any, manifest: Any) -> dict[int, float]:
    """User-level DP's fixed weights: n_k / Σn over every site of the federation, whoever is
    sampled or contributes (renormalizing over a sample would let one site's absence change
    every other weight, doubling the sensitivity)."""
    return strategy.client_weights({k: int(site.num_samples["train"])
                                    for k, site in enumerate(manifest.sites)})


def plan_weights(config: Any, strategy: Any, manifest: Any,
                 participants: Sequence[int]) -> dict[int, float]:
    """The weight of each sampled site's update: the strategy's weights over the sample, or
    (user-level DP) the fixed federation-wide weights.  The coordinator plans with it and
    every participant checks its own sites' weights against it."""
    if config.dp.user.enabled:
        fixed = user_weights(strategy, manifest)
        return {k: fixed[k] for k in participants}
    return strategy.client_weights({k: int(manifest.sites[k].num_samples["train"])
                                    for k in participants})


def check_plan(plan: RoundPlan, *, expected_round: int, config: Any, strategy: Any,
               manifest: Any, num_ranks: int, out_of_budget: Mapping[int, bool]
               ) -> PolicyError | None:
    """A participant's check of a round's plan (see the module docstring); ``out_of_budget``
    says, for each of this rank's sites, whether it can no longer afford a round."""
    where = f"participant refuses round {plan.round}"
    if plan.round != expected_round:
        return PolicyError(f"{where}: the coordinator states round {plan.round}, but this "
                           f"participant is at round {expected_round} by its own count (a "
                           f"replayed or skipped round would reuse masks and DP noise)")
    for site, spent in sorted(out_of_budget.items()):
        if site in plan.stopped and not spent:
            return PolicyError(f"{where}: the coordinator lists site {site} as out of privacy "
                               f"budget, but the site itself can still afford the round")
    expected = planned_sample(config, num_sites=manifest.num_sites, round_index=plan.round,
                              stopped=plan.stopped)
    if list(plan.participants) != expected:
        return PolicyError(f"{where}: the coordinator samples sites {list(plan.participants)}, "
                           f"but the participation policy (participation.fraction="
                           f"{config.participation.fraction}, min={config.participation.min}, "
                           f"seed={config.participation.seed}) samples {expected}")
    weights = plan_weights(config, strategy, manifest, expected)
    if set(plan.weights) != set(weights) or not all(
            np.isclose(plan.weights[k], weights[k], rtol=1e-9, atol=0.0) for k in weights):
        return PolicyError(f"{where}: the coordinator asks for weights "
                           f"{dict(sorted(plan.weights.items()))}, but the manifest and "
                           f"strategy {config.strategy.name!r} give "
                           f"{dict(sorted(weights.items()))} for the sampled sites")
    ranks = rank_of_sites(num_sites=manifest.num_sites, num_ranks=num_ranks)
    team = tuple(sorted({ranks[k] for k in expected}))
    if tuple(plan.ranks) != team:
        return PolicyError(f"{where}: the coordinator names ranks {list(plan.ranks)} as the "
                           f"round's team, but the sampled sites run on ranks {list(team)}")
    return None


def check_outcome(outcome: RoundOutcome, plan: RoundPlan) -> PolicyError | None:
    """The outcome must be of the planned round and team, and name sampled sites only."""
    where = f"participant refuses round {plan.round}"
    if outcome.round != plan.round or tuple(outcome.ranks) != tuple(plan.ranks):
        return PolicyError(f"{where}: the coordinator's outcome is of round {outcome.round} "
                           f"with ranks {list(outcome.ranks)}, the plan of round {plan.round} "
                           f"with ranks {list(plan.ranks)}")
    stray = sorted((set(outcome.contributors) | set(outcome.in_sum)) - set(plan.participants))
    if stray:
        return PolicyError(f"{where}: the coordinator's outcome names site(s) {stray}, which "
                           f"were not sampled")
    return None


def round_fingerprint(plan: RoundPlan, outcome: RoundOutcome, session: str) -> str:
    """What every participant must have been told alike this round (the coordinator could
    send different plans or outcomes to different ranks), with the session's fingerprint."""
    told = {"round": plan.round, "participants": list(plan.participants),
            "weights": {str(k): float(v) for k, v in sorted(plan.weights.items())},
            "ranks": list(plan.ranks), "stopped": list(plan.stopped),
            "outcome": [outcome.round, list(outcome.ranks), list(outcome.contributors),
                        list(outcome.in_sum), outcome.refused], "session": session}
    return hashlib.sha256(json.dumps(told, sort_keys=True).encode()).hexdigest()


#: the configuration sections a site's privacy rests on: a participant checks the
#: coordinator's copy against its own
POLICY_SECTIONS = ("aggregation", "participation", "dp", "strategy", "he")


def privacy_policy(config: Any) -> dict[str, Any]:
    """The part of a configuration a participant's privacy rests on (paths and
    performance settings left out: each rank resolves those itself)."""
    plain = config.to_dict()
    policy = {name: plain[name] for name in POLICY_SECTIONS}
    policy["aggregation"] = {k: v for k, v in policy["aggregation"].items() if k != "keys"}
    policy["he"] = {"enabled": policy["he"]["enabled"]}
    policy["train"] = {k: plain["train"][k] for k in ("normalize_steps",)}
    # where each site keeps its secret: the site's own setting, not the coordinator's
    policy["checkpoint"] = {"site_dir": plain["checkpoint"]["site_dir"]}
    return policy


def secure_policy(config: Any) -> dict[str, Any]:
    """What a site agreed to when it joined, kept in its own checkpoint: a resume must not
    weaken it (the run directory's config.yaml is written by the coordinator)."""
    aggregation, share = config.aggregation, config.participation
    return {"secure": aggregation.secure, "min_contributors": aggregation.min_contributors,
            "mask_degree": aggregation.mask_degree, "fraction": share.fraction,
            "min": share.min, "seed": share.seed}


def weakened(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """How ``now`` weakens the :func:`secure_policy` a site ``saved`` (empty: it does not).
    Secure aggregation may be switched on or kept, its floor raised and a sparse mask graph
    made dense; the sampling must stay as it was (a new participation seed could be ground
    to pick a sample).

    >>> was = {"secure": "masks", "min_contributors": 2, "mask_degree": -1, "fraction": 1.0,
    ...        "min": 1, "seed": 0}
    >>> weakened(was, {**was, "secure": "ckks", "min_contributors": 3, "mask_degree": 0})
    []
    >>> weakened(was, {**was, "secure": "none", "seed": 7})
    ['secure: masks -> none', 'seed: 0 -> 7']
    """
    out = []
    if saved.get("secure", "none") != "none" and now["secure"] == "none":
        out.append(f"secure: {saved['secure']} -> none")
    if now["min_contributors"] < saved.get("min_contributors", 0):
        out.append(f"min_contributors: {saved['min_contributors']} -> {now['min_contributors']}")
    if saved.get("mask_degree") not in (None, now["mask_degree"]) and now["mask_degree"] != 0:
        out.append(f"mask_degree: {saved['mask_degree']} -> {now['mask_degree']}")
    out += [f"{key}: {saved[key]} -> {now[key]}" for key in ("fraction", "min", "seed")
            if key in saved and saved[key] != now[key]]
    return out


def check_policy(own: Any, given: Any, *, own_manifest: Any = None,
                 given_manifest: Any = None) -> PolicyError | None:
    """The coordinator's configuration (and manifest) against this participant's own."""
    mine, theirs = privacy_policy(own), privacy_policy(given)
    if mine != theirs:
        changed = sorted(_differences(mine, theirs))
        return PolicyError(f"participant refuses the job: the coordinator's configuration "
                           f"differs from this participant's own in what privacy rests on: "
                           f"{', '.join(changed[:8])}")
    if own_manifest is not None and given_manifest is not None \
            and own_manifest.record() != given_manifest.record():
        return PolicyError("participant refuses the job: the coordinator's manifest differs "
                           "from the one this participant reads from data.dir")
    return None


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            out += _differences(left, right, f"{prefix}{key}.")
        elif left != right:
            out.append(f"{prefix}{key} ({right!r} from the coordinator, {left!r} here)")
    return out
