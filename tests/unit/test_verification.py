"""What a participant checks of a deviating coordinator, the joint randomness, the masked
CKKS ring and user-level ε against a participant: the pure pieces, without MPI (the same
attacks as real jobs: tests/e2e/test_deviating_coordinator.py, tests/mpi/suite_secure.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.config import load_config
from fedsilo.crypto import session
from fedsilo.crypto.masks import add_masks, mask_graph, pair_key
from fedsilo.crypto.params import CKKSParams
from fedsilo.crypto.ring import ring_encoding, ring_to_float, ring_to_slots, slots_to_ring, to_ring
from fedsilo.errors import ConfigError, PolicyError
from fedsilo.messages import RoundOutcome, RoundPlan
from fedsilo.privacy.user_accounting import UserAccounting
from fedsilo.strategies import build_strategy
from fedsilo.verification import (
    check_outcome,
    check_plan,
    check_policy,
    plan_weights,
    planned_sample,
    round_fingerprint,
)


@dataclasses.dataclass
class FakeSite:
    num_samples: dict


@dataclasses.dataclass
class FakeManifest:
    sites: list

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    def record(self) -> dict:
        return {"sites": [s.num_samples["train"] for s in self.sites]}


MANIFEST = FakeManifest([FakeSite({"train": n}) for n in (100, 200, 300, 400)])


def honest_plan(config, round_index: int, stopped=()) -> RoundPlan:
    strategy = build_strategy(config.strategy.name, dict(config.strategy.options))
    participants = planned_sample(config, num_sites=4, round_index=round_index,
                                  stopped=stopped)
    return RoundPlan(round=round_index, participants=tuple(participants),
                     weights=plan_weights(config, strategy, MANIFEST, participants),
                     ranks=tuple(k + 1 for k in participants), stopped=tuple(stopped))


def verdict(plan: RoundPlan, config, *, expected_round: int, out_of_budget=None):
    strategy = build_strategy(config.strategy.name, dict(config.strategy.options))
    return check_plan(plan, expected_round=expected_round, config=config, strategy=strategy,
                      manifest=MANIFEST, num_ranks=4, out_of_budget=out_of_budget or {0: False})


@pytest.fixture
def config():
    return load_config(None, overrides=["aggregation.secure=masks"])


def test_an_honest_plan_passes_and_every_deviation_is_named(config):
    plan = honest_plan(config, 3)
    assert verdict(plan, config, expected_round=3) is None
    replay = dataclasses.replace(plan, round=1)
    assert "states round 1, but this participant is at round 3" in \
        str(verdict(replay, config, expected_round=3))
    chosen = dataclasses.replace(plan, participants=(0, 1), ranks=(1, 2),
                                 weights={0: 1 / 3, 1: 2 / 3})
    assert "the participation policy" in str(verdict(chosen, config, expected_round=3))
    inflated = dataclasses.replace(plan, weights={**plan.weights, 0: 0.5})
    assert "asks for weights" in str(verdict(inflated, config, expected_round=3))
    wrong_team = dataclasses.replace(plan, ranks=(1, 2, 3))
    assert "as the round's team" in str(verdict(wrong_team, config, expected_round=3))


def test_a_site_called_out_of_budget_must_say_so_itself(config):
    plan = honest_plan(config, 2, stopped=(0,))
    assert list(plan.participants) == [1, 2, 3]
    error = verdict(plan, config, expected_round=2, out_of_budget={0: False})
    assert isinstance(error, PolicyError) and "lists site 0 as out of privacy budget" in str(error)
    assert verdict(plan, config, expected_round=2, out_of_budget={0: True}) is None


def test_partial_participation_is_recomputed_from_the_public_seed():
    config = load_config(None, overrides=["participation.fraction=0.5",
                                          "participation.seed=11"])
    for round_index in range(1, 6):
        plan = honest_plan(config, round_index)
        assert len(plan.participants) == 2
        assert verdict(plan, config, expected_round=round_index) is None
    reseeded = load_config(None, overrides=["participation.fraction=0.5",
                                            "participation.seed=12"])
    differs = [r for r in range(1, 8)
               if honest_plan(config, r).participants != honest_plan(reseeded, r).participants]
    assert differs and all(verdict(honest_plan(reseeded, r), config, expected_round=r)
                           is not None for r in differs)


def test_the_outcome_must_follow_the_plan(config):
    plan = honest_plan(config, 4)
    good = RoundOutcome(round=4, ranks=plan.ranks, contributors=plan.participants,
                        in_sum=plan.participants, rows_per_rank={}, refused=False)
    assert check_outcome(good, plan) is None
    assert "round 3" in str(check_outcome(dataclasses.replace(good, round=3), plan))
    stray = dataclasses.replace(plan, participants=(0, 1))
    assert "were not sampled" in str(check_outcome(good, stray))


def test_the_fingerprint_changes_with_anything_a_participant_was_told(config):
    plan = honest_plan(config, 4)
    outcome = RoundOutcome(round=4, ranks=plan.ranks, contributors=plan.participants,
                           in_sum=plan.participants, rows_per_rank={}, refused=False)
    base = round_fingerprint(plan, outcome, "s")
    variants = [round_fingerprint(dataclasses.replace(plan, stopped=(9,)), outcome, "s"),
                round_fingerprint(plan, dataclasses.replace(outcome, in_sum=(0,)), "s"),
                round_fingerprint(plan, dataclasses.replace(outcome, refused=True), "s"),
                round_fingerprint(plan, outcome, "t")]
    assert base not in variants and len(set(variants)) == len(variants)


def test_a_weakened_configuration_is_named(config):
    plain = load_config(None)
    error = check_policy(config, plain)
    assert isinstance(error, PolicyError)
    assert "aggregation.secure ('none' from the coordinator, 'masks' here)" in str(error)
    assert check_policy(config, load_config(None, overrides=["aggregation.secure=masks",
                                                             "train.lr=0.5"])) is None


def test_ckks_with_central_user_noise_is_refused():
    with pytest.raises(ConfigError, match="decrypts would open the sum before"):
        load_config(None, overrides=["aggregation.secure=ckks", "dp.user.enabled=true"])
    load_config(None, overrides=["aggregation.secure=ckks", "dp.user.enabled=true",
                                 "dp.user.noise=distributed"])


# -- the joint randomness -----------------------------------------------------------------


def draw(contributions):
    commits = [session.commitment(r, index=k) for k, r in enumerate(contributions)]
    return session.joint_seed(commits, contributions, own_index=0, own=contributions[0])


def test_commit_reveal_refuses_a_changed_reveal_and_a_replaced_own_share():
    mine = [session.new_contribution() for _ in range(3)]
    commits = [session.commitment(r, index=k) for k, r in enumerate(mine)]
    late = list(mine)
    late[2] = session.new_contribution()  # chosen after seeing the others' reveals
    with pytest.raises(PolicyError, match=r"participant rank\(s\) \[3\] revealed"):
        session.joint_seed(commits, late, own_index=0, own=mine[0])
    with pytest.raises(PolicyError, match="own contribution was replaced"):
        session.joint_seed(commits, mine, own_index=0, own=session.new_contribution())
    assert draw(mine) != draw([session.new_contribution(), *mine[1:]])


def surrounded(seed: bytes, *, target: int, coalition: set[int], n: int, degree: int) -> bool:
    graph = mask_graph(range(n), degree=degree, seed=seed)
    return set(graph[target]) <= coalition


def test_the_sparse_graph_cannot_be_ground_any_more():
    """The attack: a coordinator that picks the graph's seed (before: its own nonce) tries
    seeds until the target's neighbours are all in its coalition, and then the coalition
    unmasks the target.  It takes a few thousand tries.  Now the seed hashes every
    participant's committed contribution: the coalition must fix its own before it sees an
    honest one, so what it ground for one guess of the honest contribution is worth nothing
    against the real one."""
    n, degree, target, coalition = 16, 4, 0, {1, 2, 3, 4}
    tries = next(k for k in range(100_000)
                 if surrounded(k.to_bytes(8, "little") + (1).to_bytes(4, "little"),
                               target=target, coalition=coalition, n=n, degree=degree))
    assert tries < 100_000  # before: the coordinator's own nonce, ground in `tries` draws
    guess = [session.new_contribution() for _ in range(n)]  # the honest parts, guessed
    coalition_share = next(c for c in (session.new_contribution() for _ in range(100_000))
                           if surrounded(session.graph_seed(draw([*guess[:-1], c]), 1),
                                         target=target, coalition=coalition, n=n,
                                         degree=degree))
    hits = sum(surrounded(session.graph_seed(draw([session.new_contribution(), *guess[1:-1],
                                                   coalition_share]), 1),
                          target=target, coalition=coalition, n=n, degree=degree)
               for _ in range(300))
    # the chance a random graph surrounds the target (about 1 in 1,400), not 1
    assert hits <= 2, hits


# -- masked CKKS ring ---------------------------------------------------------------------


def masked_terms(values: list[np.ndarray], enc, *, round_index: int = 1):
    sites = list(range(len(values)))
    own = {s: X25519PrivateKey.generate() for s in sites}
    graph = mask_graph(sites, degree=None, seed=b"g")
    terms = []
    for s, x in enumerate(values):
        ring = to_ring(x, enc, num_terms=len(values))
        keys = {j: pair_key(own[s], own[j].public_key(), own_site=s, peer_site=j)
                for j in graph[s]}
        add_masks(ring, site=s, pair_keys=keys, round_index=round_index, nonce=b"8bytes!!")
        terms.append(ring_to_slots(ring, enc))
    return terms


def test_only_the_whole_masked_sum_opens():
    """What the decrypting participant sees for each choice of the coordinator (CKKS's own
    error added as noise of the documented bound): the whole sum opens to the sum within
    the rounding bound; one term, or all but one, is uniform in the ring."""
    rng = np.random.default_rng(0)
    enc = ring_encoding(CKKSParams(), num_terms=3)
    values = [(rng.standard_normal(4096) * 1e-2) for _ in range(3)]
    terms = masked_terms(values, enc)
    error = CKKSParams().error_bound(3)
    opened = {}
    for name, chosen in {"all": [0, 1, 2], "one": [1], "two": [0, 1]}.items():
        total = np.sum([terms[k] for k in chosen], axis=0)
        total += rng.uniform(-error, error, total.size)
        opened[name] = ring_to_float(slots_to_ring(total, enc), enc, out=np.empty(total.size))
    exact = np.sum(values, axis=0)
    assert np.abs(opened["all"] - exact).max() <= enc.max_error(3)
    half = enc.value_bound  # uniform over [-half, half): nowhere near any update
    for name in ("one", "two"):
        assert abs(np.corrcoef(opened[name], values[1])[0, 1]) < 0.05
        assert np.abs(opened[name]).mean() > half / 4, name


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=1024))
def test_the_ring_always_fits_the_ckks_headroom_and_error(num_terms):
    params = CKKSParams()
    enc = ring_encoding(params, num_terms=num_terms)
    # a sum of num_terms values below M * 2^-slot_bits stays within max_abs ...
    assert num_terms * 2.0 ** (enc.ring_bits - enc.slot_bits) <= params.max_abs
    # ... and CKKS's error cannot move a rounded integer
    assert params.error_bound(num_terms) * 2.0 ** enc.slot_bits <= 0.25
    assert enc.value_bound >= 16 and enc.frac_bits >= 16


# -- user-level ε against a participant ---------------------------------------------------


def test_distributed_noise_is_reported_against_a_participant():
    accounting = UserAccounting(noise_multiplier=1.0, noise="distributed", secure=True)
    for _ in range(5):
        accounting.spend_round(planned=[0, 1])
    eps = accounting.epsilon(delta=1e-5)
    reference = UserAccounting(noise_multiplier=2 ** -0.5, noise="central", secure=False)
    for _ in range(5):
        reference.spend_round(planned=[0, 1])
    # against participant 1, site 0's noise is σ·√(1/2): exactly a mechanism at 0.707 σ
    assert eps["participant"][0] == pytest.approx(reference.epsilon(delta=1e-5)["released"][0])
    assert eps["released"][0] < eps["participant"][0]
    alone = UserAccounting(noise_multiplier=1.0, noise="distributed", secure=True)
    alone.spend_round(planned=[0])
    assert alone.epsilon(delta=1e-5)["participant"] == {0: None}
