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

>>> acc = UserAccounting(noise_multiplier=1.0, noise="distributed", secure=False)
>>> acc.spend_round(planned=[0, 1, 2, 3])
>>> eps = acc.epsilon(delta=1e-5)
>>> eps["released"][0] < eps["coordinator"][0]  # each share alone is σ/2
True
>>> UserAccounting(noise_multiplier=1.0, noise="central", secure=False).epsilon(delta=1e-5)
{'released': {}, 'coordinator': {}}
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from fedsilo.privacy.accounting import PrivacyAccountant


class UserAccounting:
    """Per-site user-level accountants (RDP) for the released sum and for the coordinator."""

    def __init__(self, *, noise_multiplier: float, noise: str, secure: bool) -> None:
        self.noise_multiplier, self.noise, self.secure = noise_multiplier, noise, secure
        self.released: dict[int, PrivacyAccountant] = {}
        self.coordinator: dict[int, PrivacyAccountant] = {}

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

    def epsilon(self, *, delta: float) -> dict[str, dict[int, float | None]]:
        """ε per site against each party (``None``: no guarantee against that party)."""
        released: dict[int, float | None] = {k: acc.epsilon(delta=delta)
                                             for k, acc in sorted(self.released.items())}
        if self.noise == "central":
            coordinator: dict[int, float | None] = {k: None for k in released}
        else:
            coordinator = {k: acc.epsilon(delta=delta)
                           for k, acc in sorted(self.coordinator.items())}
        return {"released": released, "coordinator": coordinator}

    def rounds(self) -> dict[int, int]:
        """Rounds each site was planned in."""
        return {k: acc.num_steps for k, acc in sorted(self.released.items())}

    def state_dict(self) -> dict[str, Any]:
        return {"released": {str(k): a.state_dict() for k, a in self.released.items()},
                "coordinator": {str(k): a.state_dict() for k, a in self.coordinator.items()}}

    def load_state_dict(self, state: Mapping[str, Any], *,
                        renumber: Mapping[int, int] | None = None) -> None:
        """Restore the accountants; ``renumber`` maps a saved site index to its index now
        (a site missing from it has left the federation and its accountant goes)."""
        for name in ("released", "coordinator"):
            table: dict[int, PrivacyAccountant] = {}
            for key, value in state.get(name, {}).items():
                site = int(key) if renumber is None else renumber.get(int(key))
                if site is None:
                    continue
                table[site] = PrivacyAccountant("rdp")
                table[site].load_state_dict(value)
            setattr(self, name, table)

    def restore_site(self, site: int, state: Mapping[str, Any]) -> None:
        """Give ``site`` the accountants it had when it left the federation (``state``: its
        ``released`` and ``coordinator`` entries, either None if it had none)."""
        for name in ("released", "coordinator"):
            saved = state.get(name)
            if saved is not None:
                accountant = PrivacyAccountant("rdp")
                accountant.load_state_dict(saved)
                getattr(self, name)[site] = accountant
