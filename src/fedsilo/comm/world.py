"""The job's communicator and the collectives fedsilo uses.

Every wait is bounded.  The long waits (a participant's training, the slowest rank) are
quiet barriers polled with sleeps; the data-moving collectives (weights, reductions, small
objects, the CKKS sends) stay Open MPI's blocking calls, each watched by a per-rank
deadline thread (:class:`fedsilo.comm.guard.Deadline`) with the same bound as the last
watched barrier.  A wire cut between nodes longer than that bound ends the job with
``hung.json`` naming the ranks the coordinator can no longer reach and their hosts; a
shorter cut is ridden out by TCP.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from mpi4py import MPI

from fedsilo.comm import guard
from fedsilo.comm.communicator import Communicator
from fedsilo.errors import AgreedError, CommunicationError, FedsiloError

COORDINATOR = 0
#: the participant that decrypts the encrypted total (CKKS) and returns the float sum
AGGREGATOR = 1
_TAG_TREE, _TAG_RELAY, _TAG_TOTAL, _TAG_ARRIVE = 17, 18, 19, 20
_TAG_PING, _TAG_PONG = 21, 22  # on the control communicator, between deadline threads
#: the bound on a collective before any watched barrier set one (first_round_timeout_s's
#: default: the configuration is not known yet)
DEFAULT_WAIT_S = 1800.0
#: the bound on the exchange of node identities at start (a node that cannot be reached
#: at all is refused within this)
START_WAIT_S = 60.0
#: how long a rank whose deadline passed waits for the others to answer its ping
PING_GRACE_S = 3.0
_IDENTITY_BYTES = 256


class World:
    """Rank 0 coordinates; ranks 1..P are participants (participant k is rank k)."""

    #: sub-communicators kept for reuse (partial participation repeats few rank sets)
    SUBSETS_KEPT = 8

    def __init__(self, comm: Communicator | None = None, *, poll_s: float = 0.001,
                 _dup: bool = True, _parent: "World | None" = None) -> None:
        base = comm if comm is not None else guard.world_comm()
        self.comm = base.Dup() if _dup else base
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.poll_s = poll_s
        self._zeros: np.ndarray | None = None  # the coordinator's contribution to reduce_sum
        self._ring_zeros: np.ndarray | None = None  # ... and to reduce_ring
        self._subsets: dict[tuple[int, ...], "World | None"] = {}
        #: watchdog: barriers passed, and (coordinator) each rank's last arrival:
        #: rank -> (barrier number, stage, monotonic time)
        self._barriers = 0
        self._stages: dict[int, str] = {}
        self._arrived: dict[int, tuple[int, str, float]] = {}
        self._notes: list[Any] = []
        #: called with the diagnosis before the job is aborted (the federation checks the
        #: last checkpoint and leaves a marker); its exceptions are logged, not raised
        self.on_hang: Callable[..., None] | None = None
        self._root: World = self if _parent is None else _parent._root
        if _parent is None:
            #: the bound on a watched collective: the last watched barrier's timeout
            self.wait_s: float | None = DEFAULT_WAIT_S
            self._last_stage = "the start of the job"
            self._ctl = self.comm.Dup() if self.size > 1 else self.comm  # pings only
            self._pongs: list[Any] = []
            #: each rank's hostname, and the machine it runs on (node identity)
            self.hostnames, self.machines = self._exchange_identities()
            _check_hostnames(self.hostnames, self.machines)
            self.world_ranks = list(range(self.size))
            self._deadline = None if self.size < 2 else guard.Deadline(
                tick=self._answer_pings, fire=self._fire)
        else:
            self.world_ranks = list(self.comm.Get_group().Translate_ranks(
                list(range(self.size)), self._root.comm.Get_group()))
        # node-local rank from the machines themselves, not MPI_COMM_TYPE_SHARED: Open MPI
        # groups by hostname, and ranks of two machines under one hostname hang there
        machines = [self._root.machines[r] for r in self.world_ranks]
        mine = machines[self.rank]
        self.local_rank = machines[: self.rank].count(mine)
        self.local_size = machines.count(mine)

    # -- node identity and the deadline --------------------------------------------------

    def _exchange_identities(self) -> tuple[list[str], list[str]]:
        """Every rank's (hostname, machine) through one allgather bounded by START_WAIT_S."""
        host, machine = socket.gethostname(), machine_key()
        mine = np.zeros(_IDENTITY_BYTES, dtype=np.uint8)
        packed = f"{host[:100]}\n{machine[:150]}".encode("utf-8", "replace")
        mine[: len(packed)] = np.frombuffer(packed, dtype=np.uint8)
        out = np.empty(self.size * _IDENTITY_BYTES, dtype=np.uint8)
        request = self.comm.Iallgather([mine, MPI.BYTE], [out, MPI.BYTE])
        begin, delay = time.monotonic(), 1e-5
        while not request.Test():
            waited = time.monotonic() - begin
            if waited > START_WAIT_S:
                from fedsilo.comm.guard import abort_hung

                abort_hung(self.comm, f"watchdog: rank {self.rank} on {host} waited "
                           f"{waited:.0f} s to exchange node identities at start: some node "
                           f"cannot be reached over the network Open MPI uses "
                           f"(btl_tcp_if_include, docs/hpc.md); ending the job",
                           stage="the start of the job", silent=[], handler=None)
            time.sleep(delay)
            delay = min(self.poll_s, 2 * delay)
        hosts, machines = [], []
        for k in range(self.size):
            text = out[k * _IDENTITY_BYTES:(k + 1) * _IDENTITY_BYTES].tobytes()
            host_k, _, machine_k = text.rstrip(b"\0").decode("utf-8", "replace").partition("\n")
            hosts.append(host_k)
            machines.append(machine_k)
        return hosts, machines

    @contextlib.contextmanager
    def watched(self, what: str) -> Iterator[None]:
        """Bound the blocking MPI calls inside by the rank's deadline (the last watched
        barrier's timeout): past it, the job ends with EXIT_HUNG instead of waiting forever.

        For example ``with world.watched("the participants' comparison"):
        peers.allgather(told)`` (participant.py).
        """
        root = self._root
        deadline = root._deadline
        if deadline is None:
            yield
            return
        token = deadline.arm(f"{what}, after {root._last_stage}", root.wait_s)
        try:
            yield
        finally:
            deadline.disarm(token)

    def _answer_pings(self) -> None:
        """The deadline thread's tick: answer every rank that asks whether this one is alive."""
        self._pongs = [request for request in self._pongs if not request.Test()]
        status = MPI.Status()
        while self._ctl.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_PING, status=status):
            source = status.Get_source()
            nonce = self._ctl.recv(source=source, tag=_TAG_PING)
            self._pongs.append(self._ctl.isend(nonce, dest=source, tag=_TAG_PONG))

    def unreachable(self, ranks: Sequence[int], *, grace: float = PING_GRACE_S) -> list[int]:
        """The ``ranks`` whose deadline thread does not answer a ping within ``grace``
        seconds: their process is stopped, gone, or cut off from this one."""
        nonce = time.monotonic_ns()
        sent = [self._ctl.isend(nonce, dest=rank, tag=_TAG_PING) for rank in ranks]
        waiting = set(ranks)
        status = MPI.Status()
        begin = time.monotonic()
        while waiting and time.monotonic() - begin < grace:
            self._answer_pings()  # ranks pinging this one meanwhile get their answer
            while self._ctl.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_PONG, status=status):
                source = status.Get_source()
                if self._ctl.recv(source=source, tag=_TAG_PONG) == nonce:
                    waiting.discard(source)
            time.sleep(0.02)
        del sent  # never waited for: an unreachable rank never takes its ping
        return sorted(waiting)

    def where(self, ranks: Sequence[int]) -> dict[int, str]:
        """Each of ``ranks`` (in this World) and the host it runs on."""
        return {rank: self._root.hostnames[self.world_ranks[rank]] for rank in ranks}

    def _fire(self, stage: str, waited: float) -> None:
        """The deadline passed inside a blocking call (on the deadline thread)."""
        host = self.hostnames[self.rank]
        if self.is_coordinator:
            silent = self.unreachable(range(1, self.size), grace=min(PING_GRACE_S,
                                                                     self.wait_s or PING_GRACE_S))
            hosts = self.where(silent)
            who = ", ".join(f"rank {rank} on {hosts[rank]}" for rank in silent)
            message = (f"watchdog: the coordinator (on {host}) waited {waited:.0f} s in {stage}; "
                       + (f"unreachable: {who} (a cut network, or a stopped or dead process)"
                          if silent else "every rank still answers (a rank is stuck in "
                          "another collective)") + "; ending the job")
        else:
            silent = self.unreachable([COORDINATOR], grace=PING_GRACE_S)
            hosts = self.where(silent)
            message = (f"watchdog: rank {self.rank} (on {host}) waited {waited:.0f} s in "
                       f"{stage}; " + ("the coordinator on "
                                       f"{hosts[COORDINATOR]} does not answer"
                                       if silent else "another rank is silent")
                       + "; ending the job")
        guard.abort_hung(self.comm, message, stage=stage, silent=silent,
                         handler=self.on_hang, hosts=hosts)

    def subset(self, ranks: Sequence[int]) -> "World | None":
        """The coordinator and participant ``ranks`` as a World of their own (ranks keep
        their order; the coordinator is rank 0 there), or None on a rank outside it.

        Collective over this World the first time a set is asked for (every rank must ask
        for the same sets in the same order, which the broadcast round plan guarantees);
        a set seen before is reused without communication.  The whole job is ``self``.
        """
        key = tuple(sorted(set(ranks) - {COORDINATOR}))
        if len(key) == self.size - 1:
            return self
        if key not in self._subsets:
            if len(self._subsets) >= self.SUBSETS_KEPT:  # every rank evicts the same one
                oldest = next(iter(self._subsets))
                old = self._subsets.pop(oldest)
                if old is not None:
                    old.comm.Free()
            member = self.rank == COORDINATOR or self.rank in key
            with self.watched("forming the round's team"):
                comm = self.comm.Split(0 if member else MPI.UNDEFINED, key=self.rank)
            self._subsets[key] = World(comm, poll_s=self.poll_s, _dup=False,
                                       _parent=self) if member else None
        return self._subsets[key]

    def split_participants(self) -> "MPI.Comm | None":
        """The participants' own communicator, without the coordinator (collective over this
        World): what goes over it never passes through rank 0, so the coordinator can
        neither read nor alter it.  None on the coordinator."""
        comm = self.comm.Split(MPI.UNDEFINED if self.is_coordinator else 0, key=self.rank)
        return None if comm == MPI.COMM_NULL else comm

    @property
    def is_coordinator(self) -> bool:
        return self.rank == COORDINATOR

    @property
    def num_participants(self) -> int:
        return self.size - 1

    # -- metadata (small, pickled) --------------------------------------------------

    def bcast_obj(self, obj: Any) -> Any:
        with self.watched("a broadcast from the coordinator"):
            return self.comm.bcast(obj, root=COORDINATOR)

    def allgather_obj(self, obj: Any) -> list[Any]:
        with self.watched("an allgather"):
            return self.comm.allgather(obj)

    # -- weights (flat float32 buffers) ------------------------------------------------

    def bcast_weights(self, buffer: np.ndarray) -> None:
        """Broadcast the coordinator's ``buffer`` into every rank's ``buffer`` in place."""
        _check_f32(buffer)
        with self.watched("the broadcast of the weights"):
            self.comm.Bcast([buffer, MPI.FLOAT], root=COORDINATOR)

    def reduce_sum(self, buffer: np.ndarray) -> None:
        """Sum the participants' ``buffer`` (float32, or float64) into the coordinator's.

        One plain ``MPI_Reduce`` over the whole job (O(model) memory at rank 0, log P depth);
        the coordinator's own contribution is zero and its ``buffer`` is overwritten.  The
        coordinator sends from a zero buffer kept between calls rather than ``MPI_IN_PLACE``:
        for large vectors Open MPI's in-place path allocates and page-faults a model-sized
        temporary on every call, measured at 1.65x the bare Reduce for ResNet-18
        (benchmarks/RESULTS.md).
        """
        if buffer.dtype not in (np.float32, np.float64) or not buffer.flags.c_contiguous:
            raise TypeError("updates must travel as one contiguous float32 or float64 buffer")
        kind = MPI.FLOAT if buffer.dtype == np.float32 else MPI.DOUBLE
        if self.is_coordinator:
            if self._zeros is None or self._zeros.size != buffer.size \
                    or self._zeros.dtype != buffer.dtype:
                self._zeros = np.zeros(buffer.size, dtype=buffer.dtype)
            with self.watched("the reduction of the updates"):
                self.comm.Reduce([self._zeros, kind], [buffer, kind], op=MPI.SUM,
                                 root=COORDINATOR)
        else:
            with self.watched("the reduction of the updates"):
                self.comm.Reduce([buffer, kind], None, op=MPI.SUM, root=COORDINATOR)

    def gather_rows(self, rows: np.ndarray | None, counts: Sequence[int],
                    width: int) -> np.ndarray | None:
        """Gather each participant's ``rows`` (a float32 ``counts[rank] x width`` array) at
        the coordinator, in rank order: returns the ``sum(counts) x width`` array there,
        None elsewhere.  For aggregators that need every update (median, trimmed mean).

        A row travels as one derived datatype, so counts stay small whatever the width (a
        ResNet-18 update alone is 11M floats; 200 of them overflow a 32-bit count).
        """
        counts = [int(c) for c in counts]
        if len(counts) != self.size or counts[COORDINATOR] != 0:
            raise ValueError(f"counts must give every rank's rows (the coordinator's 0), "
                             f"got {counts}")
        row = MPI.FLOAT.Create_contiguous(int(width)).Commit()
        try:
            if self.is_coordinator:
                out = np.empty((sum(counts), width), dtype=np.float32)
                displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
                empty = np.empty((0, width), dtype=np.float32)
                with self.watched("the gathering of the updates"):
                    self.comm.Gatherv([empty, 0, row], [out, (counts, displs), row],
                                      root=COORDINATOR)
                return out
            if rows is None and counts[self.rank] == 0:  # nothing to add this round
                rows = np.empty((0, width), dtype=np.float32)
            if rows is None or rows.dtype != np.float32 or not rows.flags.c_contiguous \
                    or rows.shape != (counts[self.rank], width):
                raise TypeError(f"rank {self.rank} must send a contiguous float32 array of "
                                f"shape ({counts[self.rank]}, {width})")
            with self.watched("the gathering of the updates"):
                self.comm.Gatherv([rows, counts[self.rank], row], None, root=COORDINATOR)
            return None
        finally:
            row.Free()

    def reduce_ring(self, buffer: np.ndarray, *,
                    what: str = "the reduction of the masked updates") -> None:
        """Sum the participants' uint64 ``buffer`` modulo 2^64 into the coordinator's: one
        ``MPI_Reduce`` whose unsigned wrap-around is exactly the ring of masked aggregation
        (``crypto/masks.py``), or of the fixed-point plain sum.  The coordinator's
        contribution is zero, as in reduce_sum; ``what`` names the wait for the watchdog."""
        if buffer.dtype != np.uint64 or not buffer.flags.c_contiguous:
            raise TypeError("masked updates must travel as one contiguous uint64 buffer")
        if self.is_coordinator:
            if self._ring_zeros is None or self._ring_zeros.size != buffer.size:
                self._ring_zeros = np.zeros(buffer.size, dtype=np.uint64)
            with self.watched(what):
                self.comm.Reduce([self._ring_zeros, MPI.UINT64_T], [buffer, MPI.UINT64_T],
                                 op=MPI.SUM, root=COORDINATOR)
        else:
            with self.watched(what):
                self.comm.Reduce([buffer, MPI.UINT64_T], None, op=MPI.SUM, root=COORDINATOR)


    # -- encrypted aggregation (CKKS) -------------------------------------------------

    def add_at_coordinator(self, payload: bytes | None, *, codec: Any) -> Any:
        """Every participant sends its serialized ciphertext to the coordinator, which adds
        them as they arrive (``codec.from_bytes``/``add_into``: it needs no key), holding the
        running total and one incoming ciphertext at a time.  Returns the total (a codec
        object) on the coordinator, None elsewhere.  No participant receives anything here,
        so none ever holds another participant's ciphertext."""
        if not self.is_coordinator:
            if payload is None:
                raise ValueError(f"rank {self.rank} has no ciphertext to send")
            with self.watched("sending the encrypted update"):
                self.comm.Send([np.frombuffer(payload, dtype=np.uint8), MPI.BYTE],
                               dest=COORDINATOR, tag=_TAG_TREE)
            return None
        total = None
        status = MPI.Status()
        for _ in range(self.size - 1):
            with self.watched("receiving the encrypted updates"):
                while not self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_TREE,
                                           status=status):
                    time.sleep(self.poll_s)
                buffer = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
                self.comm.Recv([buffer, MPI.BYTE], source=status.Get_source(), tag=_TAG_TREE)
            incoming = codec.from_bytes(buffer.data)
            del buffer
            total = incoming if total is None else codec.add_into(total, incoming)
        return total

    def send_to_aggregator(self, data: bytes) -> None:
        """Coordinator: hand the encrypted total to :data:`AGGREGATOR` to decrypt."""
        with self.watched("sending the encrypted total"):
            self.comm.Send([np.frombuffer(data, dtype=np.uint8), MPI.BYTE], dest=AGGREGATOR,
                           tag=_TAG_TOTAL)

    def receive_total(self) -> bytes | None:
        """On :data:`AGGREGATOR`: the encrypted total from the coordinator (waiting without
        spinning); None on the other participants."""
        if self.rank != AGGREGATOR:
            return None
        status = MPI.Status()
        with self.watched("receiving the encrypted total"):
            while not self.comm.Iprobe(source=COORDINATOR, tag=_TAG_TOTAL, status=status):
                time.sleep(self.poll_s)
            buffer = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
            self.comm.Recv([buffer, MPI.BYTE], source=COORDINATOR, tag=_TAG_TOTAL)
        return buffer.tobytes()

    def relay_to_coordinator(self, buffer: np.ndarray, info: Any = None) -> Any:
        """Send :data:`AGGREGATOR`'s float32 ``buffer`` (and small ``info``) into the
        coordinator's ``buffer``; returns ``info`` on the coordinator, None elsewhere."""
        buffer = _check_f32(buffer)
        if self.rank == AGGREGATOR:
            with self.watched("relaying the decrypted sum"):
                self.comm.Send([buffer, MPI.FLOAT], dest=COORDINATOR, tag=_TAG_RELAY)
                self.comm.send(info, dest=COORDINATOR, tag=_TAG_RELAY)
        elif self.is_coordinator:
            with self.watched("receiving the decrypted sum"):
                request = self.comm.Irecv([buffer, MPI.FLOAT], source=AGGREGATOR,
                                          tag=_TAG_RELAY)
                while not request.Test():
                    time.sleep(self.poll_s)
                return self.comm.recv(source=AGGREGATOR, tag=_TAG_RELAY)
        return None

    # -- synchronisation ---------------------------------------------------------------

    def quiet_barrier(self, *, stage: str = "", timeout: float | None = None) -> None:
        """A barrier that sleeps instead of spinning, with a watchdog.

        Open MPI busy-polls inside blocking collectives; a rank waiting there for minutes
        of someone else's training would burn a core the trainers need when ranks share a
        node.  Polling a non-blocking barrier with short sleeps costs about ``poll_s`` of
        latency and no CPU.

        With a ``timeout`` (seconds), a rank that waits longer ends the whole job
        (``MPI_Abort`` with :data:`fedsilo.stopping.EXIT_HUNG`) instead of waiting forever.
        Participants tell the coordinator when they arrive (a small message), so the
        coordinator names the ranks that did not arrive at ``stage`` and where each was last
        seen; give participants a longer timeout than the coordinator so it speaks first.
        """
        self._barriers += 1
        number = self._barriers
        self._stages[number] = stage
        if timeout is not None:  # the collectives after it are bounded alike
            self._root.wait_s = timeout
        if stage:
            self._root._last_stage = stage
        if not self.is_coordinator and timeout is not None:
            self._notes = [note for note in self._notes if not note.Test()]
            self._notes.append(self.comm.isend(number, dest=COORDINATOR, tag=_TAG_ARRIVE))
        request = self.comm.Ibarrier()
        begin = time.monotonic()
        while not request.Test():
            if self.is_coordinator:
                self._collect_arrivals()
            waited = time.monotonic() - begin
            if timeout is not None and waited > timeout:
                self._hang(stage, number, waited)
            time.sleep(self.poll_s)
        if self.is_coordinator:
            self._collect_arrivals()

    def _collect_arrivals(self) -> None:
        status = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_ARRIVE, status=status):
            source = status.Get_source()
            number = self.comm.recv(source=source, tag=_TAG_ARRIVE)
            self._arrived[source] = (number, self._stages.get(number, ""), time.monotonic())

    def silent_ranks(self, number: int) -> list[int]:
        """Coordinator: the participant ranks that have not arrived at barrier ``number``."""
        return [rank for rank in range(1, self.size)
                if self._arrived.get(rank, (0, "", 0.0))[0] < number]

    def _hang(self, stage: str, number: int, waited: float) -> None:
        from fedsilo.comm.guard import abort_hung

        hosts = None
        if self.is_coordinator:
            silent = self.silent_ranks(number)
            hosts = self.where(silent)
            now = time.monotonic()
            where = "; ".join(
                f"rank {rank} (participant {rank}) " + (
                    f"last arrived at '{self._arrived[rank][1]}' "
                    f"{now - self._arrived[rank][2]:.0f} s ago" if rank in self._arrived
                    else "has not arrived at any watched point of this launch")
                + f" on {hosts[rank]}" for rank in silent)
            message = (f"watchdog: waited {waited:.0f} s for {stage}; silent: {where or 'none'} "
                       f"(a stopped, swapped-out or deadlocked process); ending the job")
        else:
            silent = []
            message = (f"watchdog: rank {self.rank} waited {waited:.0f} s for {stage}; the "
                       f"coordinator or another rank is silent; ending the job")
        abort_hung(self.comm, message, stage=stage, silent=silent,
                   handler=self._root.on_hang, hosts=hosts)

    def agree(self, error: FedsiloError | None, *, stage: str) -> None:
        """Every rank reports its foreseeable error (or None); if any rank failed, every
        rank raises the same :class:`AgreedError` naming each failing rank and its cause."""
        report = None if error is None else (type(error).__name__, str(error), error.exit_code)
        with self.watched(f"agreeing on {stage}"):
            reports = self.comm.allgather(report)
        failures = [(rank, r) for rank, r in enumerate(reports) if r is not None]
        if failures:
            raise AgreedError(_describe_failures(stage, failures, self.size),
                              exit_code=failures[0][1][2],
                              failures=_ranks(failures))

    def agree_gather(self, payload: Any, error: FedsiloError | None, *, stage: str) -> list[Any]:
        """Allgather every rank's small ``payload``; if any rank reports an error, every
        rank raises the same :class:`AgreedError` instead (one collective for both)."""
        report = None if error is None else (type(error).__name__, str(error), error.exit_code)
        with self.watched(f"agreeing on {stage}"):
            gathered = self.comm.allgather((payload, report))
        failures = [(rank, r) for rank, (_, r) in enumerate(gathered) if r is not None]
        if failures:
            raise AgreedError(_describe_failures(stage, failures, self.size),
                              exit_code=failures[0][1][2],
                              failures=_ranks(failures))
        return [p for p, _ in gathered]

    def agree_report(self, payload: Any, error: FedsiloError | None, *, stage: str,
                     summarize: Callable[[list[Any]], Any] | None = None) -> tuple[Any, Any]:
        """Gather every rank's small ``payload`` at the coordinator only (a participant's
        report is for the coordinator, never for the other participants); if any rank
        reports an error, every rank raises the same :class:`AgreedError` instead.

        Returns ``(payloads, summary)``: the payloads in rank order on the coordinator (None
        elsewhere), and on every rank what ``summarize(payloads)`` made of them on the
        coordinator (None without ``summarize``).  Two collectives: a gather, then a
        broadcast of the failures and the summary.
        """
        report = None if error is None else (type(error).__name__, str(error), error.exit_code)
        with self.watched(f"gathering the reports of {stage}"):
            gathered = self.comm.gather((payload, report), root=COORDINATOR)
        message = None
        if gathered is not None:  # the coordinator
            failures = [(rank, r) for rank, (_, r) in enumerate(gathered) if r is not None]
            summary = None if failures or summarize is None \
                else summarize([p for p, _ in gathered])
            message = (failures, summary)
        with self.watched(f"the outcome of {stage}"):
            failures, summary = self.comm.bcast(message, root=COORDINATOR)
        if failures:
            raise AgreedError(_describe_failures(stage, failures, self.size),
                              exit_code=failures[0][1][2],
                              failures=_ranks(failures))
        return ([p for p, _ in gathered] if gathered is not None else None), summary

    def agree_from_coordinator(self, payload: Any, error: FedsiloError | None, *,
                               stage: str) -> Any:
        """Broadcast the coordinator's ``payload``, or its error to be raised on every rank."""
        report = None if error is None else (type(error).__name__, str(error), error.exit_code)
        with self.watched(f"the coordinator's {stage}"):
            payload, report = self.comm.bcast(
                (payload, report) if self.is_coordinator else None, root=COORDINATOR)
        if report is not None:
            raise AgreedError(_describe_failures(stage, [(COORDINATOR, report)], self.size),
                              exit_code=report[2], failures=((COORDINATOR, report[0]),))
        return payload


def _ranks(failures: Sequence[tuple[int, tuple]]) -> tuple[tuple[int, str], ...]:
    return tuple((rank, str(report[0])) for rank, report in failures)


def _describe_failures(stage: str, failures: Sequence[tuple[int, tuple]], size: int) -> str:
    parts = [f"rank {rank}/{size} ({_role(rank)}): {name}: {message}"
             for rank, (name, message, _) in failures]
    return f"{stage} failed on {len(failures)} of {size} ranks: " + "; ".join(parts) \
        if len(failures) > 1 else f"{stage} failed on " + parts[0]


def _role(rank: int) -> str:
    return "coordinator" if rank == COORDINATOR else f"participant {rank}"


def _check_f32(buffer: np.ndarray) -> np.ndarray:
    if buffer.dtype != np.float32 or not buffer.flags.c_contiguous:
        raise TypeError("weights must travel as one contiguous float32 buffer")
    return buffer


def machine_key() -> str:
    """What tells this process's machine from another's, whatever its hostname: the kernel's
    boot id and the network namespace (a simulated node, docs/hpc.md)."""
    parts = []
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            parts.append(handle.read().strip())
        parts.append(str(os.stat("/proc/self/ns/net").st_ino))
    except OSError:  # not Linux: the hostname is all there is
        parts.append(socket.gethostname())
    return "/".join(parts)


def _check_hostnames(hosts: Sequence[str], machines: Sequence[str]) -> None:
    """Refuse ranks of different machines under one hostname (every rank raises the same
    error): Open MPI takes a hostname for a node, and its shared-memory set-up between
    "local" ranks that are not hangs forever (in MPI_COMM_TYPE_SHARED, issue #29)."""
    seen: dict[str, dict[str, list[int]]] = {}
    for rank, (host, machine) in enumerate(zip(hosts, machines)):
        seen.setdefault(host, {}).setdefault(machine, []).append(rank)
    clashes = {host: groups for host, groups in seen.items() if len(groups) > 1}
    if clashes:
        parts = [f"'{host}' is the hostname of ranks " + " and ".join(
                 str(ranks) for ranks in groups.values()) + f" on {len(groups)} different machines"
                 for host, groups in clashes.items()]
        raise CommunicationError(
            "; ".join(parts) + ": Open MPI takes ranks under one hostname for one node and "
            "hangs when they are not; give every node its own hostname (docs/hpc.md, "
            "'Several nodes')")
