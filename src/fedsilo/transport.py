"""How a round's updates are added up: one interface, one transport per way of doing it.

A transport runs on every rank of the round's team (the coordinator and the participant
ranks with a sampled site), at the same point of the round, after the reports have reached
the coordinator and the round's outcome (who contributed) has reached every rank.  On the
coordinator it leaves the sum of the participants' contributions in ``role.reduce_buffer``
(or, for robust strategies, every contribution in ``role.rows``) and returns what the
metrics row should say about it; elsewhere it returns None.

- ``plain``: one ``MPI_Reduce`` of the float buffers (Horovod's ``Compression.none``).
- ``gather``: every contributing update gathered at the coordinator (median, trimmed mean).
- ``masks``: pairwise-masked secure aggregation (Bonawitz et al. 2017; Bell et al. 2020):
  fixed point in Z_2^64, masks that cancel in the sum, one ``MPI_Reduce`` of uint64.
- ``ckks``: CKKS ciphertexts sent to the key-less coordinator, which adds them as they
  arrive and hands the encrypted total to one participant to decrypt; no participant ever
  receives another participant's ciphertext.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from fedsilo.registry import Registry

#: the transports by name: ``TRANSPORTS.get(name)()``
TRANSPORTS: Registry[Any] = Registry("transport")


def transport_for(config: Any, strategy: Any) -> Any:
    """The transport a run uses: its secure mode, else gather (non-linear) or plain."""
    secure = config.aggregation.secure
    if secure != "none":
        return TRANSPORTS.get(secure)()
    return TRANSPORTS.get("plain" if strategy.linear else "gather")()


@TRANSPORTS.register("plain")
class PlainReduce:
    """One ``MPI_Reduce`` of the ranks' float sums."""

    name = "plain"

    def aggregate(self, team: Any, role: Any, *, outcome: Mapping[str, Any]) -> None:
        team.reduce_sum(role.reduce_buffer)
        return None


@TRANSPORTS.register("gather")
class GatherRows:
    """Every contributing update, in site order (ranks hold contiguous sites)."""

    name = "gather"

    def aggregate(self, team: Any, role: Any, *, outcome: Mapping[str, Any]) -> None:
        counts = [0] * team.size
        if team.is_coordinator:
            counts[1:] = [outcome["rows_per_rank"].get(rank, 0) for rank in outcome["ranks"]]
        else:
            counts[team.rank] = 0 if role.rows is None else len(role.rows)
        rows = team.gather_rows(role.rows, counts, role.layout.numel)
        if team.is_coordinator:
            role.rows = rows
        return None


@TRANSPORTS.register("masks")
class MaskedReduce:
    """Quantize, mask with every neighbour in the round's mask graph, sum in the ring by one
    ``MPI_Reduce`` of uint64, dequantize at the coordinator (``crypto/masks.py``)."""

    name = "masks"

    def aggregate(self, team: Any, role: Any, *, outcome: Mapping[str, Any]) -> dict | None:
        begin = time.perf_counter()
        if team.is_coordinator:
            team.reduce_ring(role.ring_buffer)
            reduce_s = time.perf_counter() - begin
            role.unmask()
            return {"mask_s": None, "reduce_s": reduce_s}
        role.mask_contribution(outcome)
        mask_s = time.perf_counter() - begin
        team.reduce_ring(role.ring_buffer)
        return {"mask_s": mask_s}


@TRANSPORTS.register("ckks")
class CKKSThroughCoordinator:
    """Each team participant sends its ciphertext to the coordinator (which holds no key and
    adds them as they arrive, two at a time); the coordinator sends the encrypted total to
    the team's first participant, which decrypts it and returns the float sum."""

    name = "ckks"

    def aggregate(self, team: Any, role: Any, *, outcome: Mapping[str, Any]) -> dict | None:
        begin = time.perf_counter()
        total = team.add_at_coordinator(role.payload, codec=role.codec)
        info = None
        if team.is_coordinator:
            add_s = time.perf_counter() - begin
            team.send_to_aggregator(role.codec.to_bytes(total))
            del total
            info = team.relay_to_coordinator(role.reduce_buffer, None)
            return {**(info or {}), "add_s": add_s, "reduce_s": time.perf_counter() - begin}
        role.payload = None
        data = team.receive_total()
        if data is not None:  # the aggregator: the only participant that decrypts
            info = role.decrypt_aggregate(role.codec.from_bytes(data))
        team.relay_to_coordinator(role.reduce_buffer, info)
        return None
