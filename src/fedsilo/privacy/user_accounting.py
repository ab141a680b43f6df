"""User-level (site-level) ε, per site and per party the guarantee holds against.

Each round of DP-FedAvg (``userlevel.py``) releases Σ_k w_k clip(Δ_k) + N(0, σ²S²), one
Gaussian mechanism of noise multiplier σ for every site that was planned in the round
(neighbouring relation: one site's whole contribution added or removed).  No amplification
by sampling is claimed: the sample is chosen by the coordinator and written to
``metrics.jsonl``, so it is known to the parties the guarantee is stated against.  A site's
ε therefore grows with the rounds it was planned in, at q = 1.

Two figures per site:

- **released**: against everyone who sees only the noised sum or what follows from it (the
  global models, ``model.pt``, a reader of the run directory's metrics).
- **coordinator**: against the coordinator.  With central noise it sees the un-noised sum,
  so there is no guarantee (``None``).  With distributed noise it sees, in a plain Reduce,
  a rank's contribution carrying that rank's shares only; per site that is noise
  multiplier σ/√m (m = sites planned in the round); under encrypted aggregation it sees only
  the sum, σ.
- **participant**: against one other participant, which sees the released sum and knows its
  own noise share.  With distributed noise, the noise left is σ·√((m−1)/m) (none when m = 1);
  against a coalition of c participants, σ·√((m−c)/m) (:func:`coalition_sigma`).  With
  central noise a participant knows none of it: σ.

>>> acc = UserAccounting(noise_multiplier=1.0, noise="distributed", secure=False)
>>> acc.spend_round(planned=[0, 1, 2, 3])
>>> eps = acc.epsilon(delta=1e-5)
>>> eps["released"][0] < eps["coordinator"][0]  # each share alone is σ/2
True
>>> eps["released"][0] < eps["participant"][0] < eps["coordinator"][0]
True
>>> coalition_sigma(1.0, num_planned=2, coalition=1, noise="distributed")
0.7071067811865476
>>> UserAccounting(noise_multiplier=1.0, noise="central", secure=False).epsilon(delta=1e-5)
{'released': {}, 'coordinator': {}, 'participant': {}}
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from fedsilo.errors import CheckpointError
from fedsilo.privacy.accounting import PrivacyAccountant


def coalition_sigma(noise_multiplier: float, *, num_planned: int, coalition: int,
                    noise: str) -> float | None:
    """The noise multiplier left on one site's contribution for a coalition of ``coalition``
    participants that pool their own noise shares (None: no noise left)."""
    if noise == "central":
        return noise_multiplier
    left = num_planned - coalition
    return None if left < 1 else noise_multiplier * math.sqrt(left / num_planned)


class UserAccounting:
    """Per-site user-level accountants (RDP) for the released sum and for the coordinator."""

    def __init__(self, *, noise_multiplier: float, noise: str, secure: bool) -> None:
        self.noise_multiplier, self.noise, self.secure = noise_multiplier, noise, secure
        self.released: dict[int, PrivacyAccountant] = {}
        self.coordinator: dict[int, PrivacyAccountant] = {}
        self.participant: dict[int, PrivacyAccountant] = {}
        #: sites that were planned in a round where another participant could strip all of
        #: the noise (distributed noise with one planned site): no guarantee against them
        self.exposed: set[int] = set()

    def coordinator_sigma(self, num_planned: int) -> float | None:
        """The noise multiplier one site's contribution carries in the coordinator's view."""
        if self.noise == "central":
            return None
        if self.secure:
            return self.noise_multiplier
        return self.noise_multiplier / math.sqrt(num_planned)

    def spend_round(self, *, planned: Sequence[int]) -> None:
        """Account one round for every site in ``planned`` (contributing or not: a planned
        site that sits out is the 'removed' neighbour, which the mechanism covers)."""
        sigma_c = self.coordinator_sigma(len(planned))
        for site in planned:
            self.released.setdefault(site, PrivacyAccountant("rdp")).spend(
                noise_multiplier=self.noise_multiplier, sample_rate=1.0, num_steps=1)
            if sigma_c is not None:
                self.coordinator.setdefault(site, PrivacyAccountant("rdp")).spend(
                    noise_multiplier=sigma_c, sample_rate=1.0, num_steps=1)
            sigma_p = coalition_sigma(self.noise_multiplier, num_planned=len(planned),
                                      coalition=1, noise=self.noise)
            if sigma_p is None:
                self.exposed.add(site)
            else:
                self.participant.setdefault(site, PrivacyAccountant("rdp")).spend(
                    noise_multiplier=sigma_p, sample_rate=1.0, num_steps=1)

    def epsilon(self, *, delta: float) -> dict[str, dict[int, float | None]]:
        """ε per site against each party (``None``: no guarantee against that party)."""
        released: dict[int, float | None] = {k: acc.epsilon(delta=delta)
                                             for k, acc in sorted(self.released.items())}
        if self.noise == "central":
            coordinator: dict[int, float | None] = {k: None for k in released}
        else:
            coordinator = {k: acc.epsilon(delta=delta)
                           for k, acc in sorted(self.coordinator.items())}
        participant: dict[int, float | None] = {
            k: None if k in self.exposed or k not in self.participant
            else self.participant[k].epsilon(delta=delta) for k in released}
        return {"released": released, "coordinator": coordinator, "participant": participant}

    def rounds(self) -> dict[int, int]:
        """Rounds each site was planned in."""
        return {k: acc.num_steps for k, acc in sorted(self.released.items())}

    def state_dict(self) -> dict[str, Any]:
        return {"released": {str(k): a.state_dict() for k, a in self.released.items()},
                "coordinator": {str(k): a.state_dict() for k, a in self.coordinator.items()},
                "participant": {str(k): a.state_dict() for k, a in self.participant.items()},
                "exposed": sorted(self.exposed)}

    def load_state_dict(self, state: Mapping[str, Any], *,
                        renumber: Mapping[int, int] | None = None) -> None:
        """Restore the accountants; ``renumber`` maps a saved site index to its index now
        (a site missing from it has left the federation and its accountant goes)."""
        if not isinstance(state, Mapping):
            raise CheckpointError("the checkpoint's user-level accountant is not an object")
        exposed = (_site(k) if renumber is None else renumber.get(_site(k))
                   for k in _listed(state, "exposed", []))
        self.exposed = {k for k in exposed if k is not None}
        for name in ("released", "coordinator", "participant"):
            table: dict[int, PrivacyAccountant] = {}
            for key, value in _listed(state, name, {}).items():
                site = _site(key) if renumber is None else renumber.get(_site(key))
                if site is None:
                    continue
                table[site] = PrivacyAccountant("rdp")
                table[site].load_state_dict(value)
            setattr(self, name, table)

    def restore_site(self, site: int, state: Mapping[str, Any]) -> None:
        """Give ``site`` the accountants it had when it left the federation (``state``: its
        ``released``, ``coordinator`` and ``participant`` entries, None if it had none)."""
        for name in ("released", "coordinator", "participant"):
            saved = state.get(name)
            if saved is not None:
                accountant = PrivacyAccountant("rdp")
                accountant.load_state_dict(saved)
                getattr(self, name)[site] = accountant


def _listed(state: Mapping[str, Any], name: str, empty: Any) -> Any:
    """``state[name]`` of the type of ``empty`` (a list or an object), else a CheckpointError."""
    value = state.get(name, empty)
    if not isinstance(value, type(empty)):
        raise CheckpointError(f"the checkpoint's user-level accountant: {name!r} must be "
                              f"{'a list' if isinstance(empty, list) else 'an object'}")
    return value


def _site(key: Any) -> int:
    """A site index as saved (an int, or its decimal text as a JSON key)."""
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < 10**9:
        return key
    if isinstance(key, str) and key.isdigit() and len(key) < 10:
        return int(key)
    raise CheckpointError(f"the checkpoint's user-level accountant names site {key!r}, which "
                          f"is not a site index")
