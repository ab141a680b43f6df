"""How a round's updates are added up: one interface, one transport per way of doing it.

A transport is a value each rank builds once (:func:`transport_for`) and the round loop
calls at two fixed points:

- ``prepare(contribution, plan=, rank=)`` on a participant rank of the round's team, after
  its local work and before its report leaves: the checks and the work the report must
  account for (the fixed-point headroom of masks, the CKKS encryption and its figures).
- ``aggregate(team, contribution, outcome)`` on every rank of the team (the coordinator
  and the participant ranks with a sampled site), once the reports have reached the
  coordinator and the round's outcome (who contributed) has reached every rank.  It
  returns the :class:`~fedsilo.messages.Aggregate` on the coordinator, None elsewhere.

Nothing is written back into a role: what a rank sends is its
:class:`~fedsilo.messages.Contribution`, what the coordinator receives is the return value.

- ``plain``: one ``MPI_Reduce`` of the float buffers, through the identity codec
  (Horovod's ``Compression.none``).
- ``fixed``: the same ``MPI_Reduce`` in 64-bit fixed point (``runtime.reduce_dtype:
  fixed``): an integer sum, the same bits in any order.
- ``gather``: every contributing update gathered at the coordinator (median, trimmed mean).
- ``masks``: pairwise-masked secure aggregation (Bonawitz et al. 2017; Bell et al. 2020):
  fixed point in Z_2^64, masks that cancel in the sum, one ``MPI_Reduce`` of uint64.
- ``ckks``: CKKS ciphertexts of pairwise-masked fixed point (``crypto/ring.py``) sent to
  the key-less coordinator, which adds them as they arrive and hands the encrypted total to
  one participant to decrypt; no participant ever receives another participant's
  ciphertext, and the one that decrypts can open nothing but the whole sum.

>>> sorted(TRANSPORTS.names())
['ckks', 'fixed', 'gather', 'masks', 'plain']
"""

from __future__ import annotations

import time
from typing import Any, Protocol, Sequence

import numpy as np

from fedsilo.crypto.codec import IdentityCodec
from fedsilo.errors import FedsiloError, UpdateError
from fedsilo.messages import Aggregate, Contribution, RoundOutcome, RoundPlan
from fedsilo.registry import Registry


class Transport(Protocol):
    """The interface every transport implements (see the module docstring)."""

    name: str

    def prepare(self, contribution: Contribution, *, plan: RoundPlan,
                rank: int) -> tuple[dict[str, Any] | None, FedsiloError | None]:
        """Participant, before its report: (figures for the report, error that ends the job)."""

    def aggregate(self, team: Any, contribution: Contribution,
                  outcome: RoundOutcome) -> Aggregate | None:
        """Every team rank: the sum (or the rows) at the coordinator, None elsewhere."""


class SecureTransport(Transport, Protocol):
    """A secure transport (masks, CKKS) also takes the launch's joint session seed, drawn by
    the participants alone (``crypto/session.py``), from which its mask nonce and every
    round's mask graph follow."""

    def start_session(self, seed: bytes) -> None:
        """Participant, once per launch, before the first round."""


#: the transports by name: ``TRANSPORTS.get(name)(**kwargs)``
TRANSPORTS: Registry[Any] = Registry("transport")


def transport_for(config: Any, strategy: Any, *, codec: Any = None,
                  identities: Any = None) -> Transport:
    """The transport a run uses: its secure mode (with this rank's keys: the CKKS ``codec``,
    the masks' site ``identities``; None on the coordinator), else gather (non-linear
    strategies) or plain."""
    secure = config.aggregation.secure
    if secure == "masks":
        aggregation = config.aggregation
        return TRANSPORTS.get("masks")(frac_bits=aggregation.frac_bits,
                                       mask_degree=aggregation.mask_degree,
                                       identities=identities)
    if secure == "ckks":
        return TRANSPORTS.get("ckks")(codec=codec, identities=identities,
                                      mask_degree=config.aggregation.mask_degree)
    if not strategy.linear:
        return TRANSPORTS.get("gather")()
    if config.runtime.reduce_dtype == "fixed":
        return TRANSPORTS.get("fixed")(frac_bits=config.aggregation.frac_bits)
    return TRANSPORTS.get("plain")()


def ring_buffer(current: np.ndarray | None, size: int) -> np.ndarray:
    """``current`` if it is a uint64 buffer of ``size`` values, else a new one (a rank keeps
    its ring buffer between rounds)."""
    if current is None or current.size != size:
        return np.empty(size, dtype=np.uint64)
    return current


def headroom_error(contribution: Contribution, *, plan: RoundPlan, rank: int,
                   frac_bits: int) -> UpdateError | None:
    """The error, if any, of a rank whose fixed-point sum would not fit the int64 range with
    room for every rank's (each rank checks its own, so no partial sum of the Reduce wraps)."""
    from fedsilo.crypto.masks import check_headroom

    total = contribution.total
    peak = float(np.abs(total).max()) if total.size else 0.0
    try:
        check_headroom(peak, frac_bits=frac_bits, num_terms=len(plan.ranks))
    except UpdateError as exc:
        return UpdateError(f"rank {rank} (sites {list(contribution.sites)}), round "
                           f"{plan.round}: {exc}")
    return None


class _NoPreparation:
    def prepare(self, contribution: Contribution, *, plan: RoundPlan,
                rank: int) -> tuple[dict[str, Any] | None, FedsiloError | None]:
        return None, None


@TRANSPORTS.register("plain")
class PlainReduce(_NoPreparation):
    """One ``MPI_Reduce`` of the ranks' float sums, through a codec (the identity codec by
    default: the buffer itself goes on the wire, no copy)."""

    name = "plain"

    def __init__(self, codec: Any = None) -> None:
        self.codec = codec or IdentityCodec()

    def aggregate(self, team: Any, contribution: Contribution,
                  outcome: RoundOutcome) -> Aggregate | None:
        wire = self.codec.compress(contribution.total)
        team.reduce_sum(wire)
        if not team.is_coordinator:
            return None
        return Aggregate(total=self.codec.decompress(wire, out=contribution.total))


@TRANSPORTS.register("fixed")
class FixedPointReduce:
    """The plain sum in 64-bit fixed point (``runtime.reduce_dtype: fixed``): each rank
    encodes its float64 sum as ``round(x * 2^frac_bits)`` and one ``MPI_Reduce`` adds the
    integers.  Integer addition is associative, so the total is the same bits whatever
    order MPI's algorithm adds in -- on one node or across several, where Open MPI's
    hierarchical collectives regroup a float sum (docs/strategies.md).  The masked path
    without the masks: both give the same aggregate."""

    name = "fixed"

    def __init__(self, *, frac_bits: int) -> None:
        self.frac_bits = frac_bits
        self.ring: np.ndarray | None = None

    def prepare(self, contribution: Contribution, *, plan: RoundPlan,
                rank: int) -> tuple[dict[str, Any] | None, FedsiloError | None]:
        """As for masks: this rank's sum must fit the int64 range with room for every
        rank's, so no partial sum of the Reduce can wrap around."""
        return None, headroom_error(contribution, plan=plan, rank=rank,
                                    frac_bits=self.frac_bits)

    def aggregate(self, team: Any, contribution: Contribution,
                  outcome: RoundOutcome) -> Aggregate | None:
        from fedsilo.crypto.masks import dequantize, quantize

        total = contribution.total
        self.ring = ring_buffer(self.ring, total.size)
        if team.is_coordinator:
            team.reduce_ring(self.ring, what="the reduction of the updates")
            return Aggregate(total=dequantize(self.ring, frac_bits=self.frac_bits, out=total))
        quantize(total, frac_bits=self.frac_bits, out=self.ring)
        team.reduce_ring(self.ring, what="the reduction of the updates")
        return None


@TRANSPORTS.register("gather")
class GatherRows(_NoPreparation):
    """Every contributing update, in site order (ranks hold contiguous sites)."""

    name = "gather"

    def aggregate(self, team: Any, contribution: Contribution,
                  outcome: RoundOutcome) -> Aggregate | None:
        counts = [0] * team.size
        rows = contribution.rows
        if team.is_coordinator:
            counts[1:] = [outcome.rows_per_rank.get(rank, 0) for rank in outcome.ranks]
        else:
            counts[team.rank] = 0 if rows is None else len(rows)
        numel = contribution.total.size if rows is None else rows.shape[1]
        gathered = team.gather_rows(rows, counts, numel)
        return Aggregate(total=None, rows=gathered) if team.is_coordinator else None


@TRANSPORTS.register("masks")
class MaskedReduce:
    """Quantize, mask with every neighbour in the round's mask graph, sum in the ring by one
    ``MPI_Reduce`` of uint64, dequantize at the coordinator (``crypto/masks.py``).

    ``identities`` (participants) gives the pairwise keys of this rank's sites
    (:class:`fedsilo.crypto.identity.SiteIdentities`); the coordinator holds none.
    """

    name = "masks"

    def __init__(self, *, frac_bits: int, mask_degree: int, identities: Any = None) -> None:
        self.frac_bits, self.mask_degree, self.identities = frac_bits, mask_degree, identities
        self.ring: np.ndarray | None = None
        #: the participants' joint seed of this launch (start_session); None on the coordinator
        self.session: bytes | None = None

    def _ring(self, size: int) -> np.ndarray:
        self.ring = ring_buffer(self.ring, size)
        return self.ring

    def prepare(self, contribution: Contribution, *, plan: RoundPlan,
                rank: int) -> tuple[dict[str, Any] | None, FedsiloError | None]:
        """This rank's sum must fit the ring with room for every rank's (each rank checks
        its own, so every partial sum of the Reduce fits)."""
        return None, headroom_error(contribution, plan=plan, rank=rank,
                                    frac_bits=self.frac_bits)

    def aggregate(self, team: Any, contribution: Contribution,
                  outcome: RoundOutcome) -> Aggregate | None:
        from fedsilo.crypto.masks import dequantize

        begin = time.perf_counter()
        ring = self._ring(contribution.total.size)
        if team.is_coordinator:
            team.reduce_ring(ring)
            reduce_s = time.perf_counter() - begin
            dequantize(ring, frac_bits=self.frac_bits, out=contribution.total)
            return Aggregate(total=contribution.total,
                             info={"mask_s": None, "reduce_s": reduce_s})
        self._mask(contribution, outcome, ring)
        team.reduce_ring(ring)
        return None

    def start_session(self, seed: bytes) -> None:
        """The launch's joint seed (``crypto/session.py``): the mask nonce and every round's
        mask graph follow from it, never from the coordinator."""
        self.session = seed

    def _mask(self, contribution: Contribution, outcome: RoundOutcome, ring: np.ndarray) -> None:
        """Quantize this rank's sum into ``ring`` and add each of its sites' pairwise masks
        with its neighbours in the round's mask graph."""
        from fedsilo.crypto.masks import quantize

        quantize(contribution.total, frac_bits=self.frac_bits, out=ring)
        add_site_masks(ring, sites=contribution.sites, members=outcome.in_sum,
                       mask_degree=self.mask_degree, identities=self.identities,
                       session=self.session, round_index=outcome.round)


def add_site_masks(ring: np.ndarray, *, sites: Sequence[int], members: Sequence[int],
                   mask_degree: int, identities: Any, session: bytes | None,
                   round_index: int) -> None:
    """Add, for each of this rank's ``sites`` among ``members``, its pairwise masks with its
    neighbours in the round's mask graph over ``members`` (dense, or sparse of
    ``mask_degree``); the nonce and the graph follow from the participants' joint
    ``session`` seed and the round."""
    from fedsilo.crypto.masks import add_masks, mask_graph, sparse_degree
    from fedsilo.crypto.session import graph_seed, mask_nonce

    if session is None:
        raise UpdateError("masked aggregation without the session's joint seed: the "
                          "participants have not drawn it (a bug)")
    members = sorted(members)
    degree = None if mask_degree == 0 \
        else sparse_degree(len(members)) if mask_degree < 0 else mask_degree
    graph = mask_graph(members, degree=degree, seed=graph_seed(session, round_index))
    nonce = mask_nonce(session)
    for site in sites:
        if site not in graph:
            continue
        keys = {peer: identities.pair_key(site, peer) for peer in graph[site]}
        add_masks(ring, site=site, pair_keys=keys, round_index=round_index, nonce=nonce)


@TRANSPORTS.register("ckks")
class CKKSThroughCoordinator:
    """Each team participant sends its ciphertext to the coordinator (which holds no key and
    adds them as they arrive, two at a time); the coordinator sends the encrypted total to
    the team's first participant, which decrypts it and returns the float sum.

    What is encrypted is masked first (``crypto/ring.py``): each planned site adds its
    pairwise masks in a ring Z_M, so the participant that decrypts can open nothing but the
    sum over every planned site, whatever ciphertext the coordinator hands it.
    """

    name = "ckks"

    def __init__(self, *, codec: Any, identities: Any = None, mask_degree: int = 0) -> None:
        self.codec, self.identities, self.mask_degree = codec, identities, mask_degree
        #: this round's serialized ciphertext (participants, between prepare and aggregate)
        self.payload: bytes | None = None
        #: the participants' joint seed of this launch (start_session)
        self.session: bytes | None = None
        self.ring: np.ndarray | None = None

    def start_session(self, seed: bytes) -> None:
        self.session = seed

    def encoding(self, num_terms: int) -> Any:
        from fedsilo.crypto.ring import ring_encoding

        return ring_encoding(self.codec.keys.params, num_terms=num_terms)

    def prepare(self, contribution: Contribution, *, plan: RoundPlan,
                rank: int) -> tuple[dict[str, Any] | None, FedsiloError | None]:
        """Mask and encrypt this rank's sum (one ciphertext per rank; a rank with nothing to
        add encrypts its masks alone, as the coordinator sums one ciphertext per team
        participant).  The masks are over the round's planned sites, known before anyone
        reports, so encryption needs no further word from the coordinator."""
        from fedsilo.crypto.ring import ring_to_slots, to_ring

        begin = time.perf_counter()
        terms = len(plan.ranks)
        encoding = self.encoding(terms)
        self.ring = ring_buffer(self.ring, contribution.total.size)
        try:
            to_ring(contribution.total, encoding, num_terms=terms, out=self.ring)
        except UpdateError as exc:
            return None, UpdateError(f"rank {rank} (sites {list(contribution.sites)}), round "
                                     f"{plan.round}: {exc}")
        add_site_masks(self.ring, sites=contribution.sites, members=plan.participants,
                       mask_degree=self.mask_degree, identities=self.identities,
                       session=self.session, round_index=plan.round)
        ciphertext = self.codec.encrypt(ring_to_slots(self.ring, encoding))
        self.payload = self.codec.to_bytes(ciphertext)
        del ciphertext
        return {"encrypt_s": time.perf_counter() - begin,
                "ciphertext_bytes": len(self.payload)}, None

    def aggregate(self, team: Any, contribution: Contribution,
                  outcome: RoundOutcome) -> Aggregate | None:
        begin = time.perf_counter()
        total = team.add_at_coordinator(self.payload, codec=self.codec)
        if team.is_coordinator:
            add_s = time.perf_counter() - begin
            data = self.codec.to_bytes(total)
            del total
            team.send_to_aggregator(data)
            # a sum is larger than a fresh ciphertext (two polynomials, not one and a seed)
            total_bytes = len(data)
            del data
            info = team.relay_to_coordinator(contribution.total, None)
            return Aggregate(total=contribution.total, info={
                **(info or {}), "add_s": add_s, "reduce_s": time.perf_counter() - begin,
                "total_bytes": total_bytes})
        self.payload = None
        data = team.receive_total()
        info = None
        if data is not None:  # the aggregator: the only participant that decrypts
            decrypt = time.perf_counter()
            self.open_sum(data, len(outcome.ranks), out=contribution.total)
            info = {"decrypt_s": time.perf_counter() - decrypt}
        team.relay_to_coordinator(contribution.total, info)
        return None

    def open_sum(self, data: bytes, num_terms: int, *, out: np.ndarray) -> np.ndarray:
        """Decrypt an encrypted sum of ``num_terms`` masked ciphertexts into ``out``: the
        masks cancel only if it is the sum over every planned site; anything else opens to
        values uniform in the ring."""
        from fedsilo.crypto.ring import ring_to_float, slots_to_ring

        encoding = self.encoding(num_terms)
        values = self.codec.decrypt_into(self.codec.from_bytes(data),
                                         np.empty(out.size, dtype=np.float64))
        return ring_to_float(slots_to_ring(values, encoding), encoding, out=out)
