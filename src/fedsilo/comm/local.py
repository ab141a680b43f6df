"""Ranks forked on one machine, talking over pipes: a communicator for the in-process tier.

:func:`launch` forks ``size`` ranks from the calling process; each runs ``body(rank)`` with
:func:`fedsilo.comm.guard.world_comm` returning a :class:`LocalComm`, so the
:class:`~fedsilo.comm.World` that ``fedsilo train`` builds runs on it unchanged.  A rank is a
process of its own (its own torch RNG, signal handlers, working directory and module state,
as under ``mpirun``); what it saves is the cost of starting Python and importing torch, which
the forking process already paid (about 4.5 s a rank on the test machine).

Semantics follow MPI where fedsilo relies on them: messages between two ranks on one
communicator and tag arrive in order; collectives match in call order; ``Dup`` and ``Split``
make communicators whose messages never mix with their parent's; ``Abort`` ends every rank
with its code.  ``Reduce`` adds in Open MPI's linear order (``x[0] + (x[1] + (... + x[n-1]))``),
the order Open MPI 5's tuned Reduce takes for model-sized float buffers on up to 4 ranks
(``tests/unit/test_local_world.py`` checks weights against a real ``mpirun``); with the
coordinator's zero contribution every order agrees on 3 ranks.

Not a transport for production: every byte is pickled through a pipe, and there is no
network, no watchdog ping across machines and no launcher to signal.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

import numpy as np
from mpi4py import MPI

from fedsilo.comm import guard
from fedsilo.comm.communicator import Communicator

_COLLECTIVE = -1_000_001  # the tag of collective traffic (never a user tag)


class _Hub:
    """One rank's pipes to every other rank, and the messages that arrived, by key."""

    def __init__(self, rank: int, size: int, readers: dict[int, Connection],
                 writers: dict[int, Connection], abort_fd: int) -> None:
        self.rank, self.size = rank, size
        self._writers = writers
        self._locks = {dest: threading.Lock() for dest in writers}
        self._abort_fd = abort_fd
        #: (context, tag) -> deque of (source, payload) in arrival order
        self._boxes: dict[tuple[Any, int], deque[tuple[int, Any]]] = {}
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(list(readers.values()),),
                                        name="fedsilo-local-comm", daemon=True)
        self._thread.start()

    def _read(self, readers: list[Connection]) -> None:
        while readers:
            for conn in wait(readers):
                assert isinstance(conn, Connection)
                try:
                    context, source, tag, payload = conn.recv()
                except (EOFError, OSError):
                    readers.remove(conn)
                    continue
                with self._cond:
                    self._boxes.setdefault((context, tag), deque()).append((source, payload))
                    self._cond.notify_all()

    def put(self, dest: int, context: Any, tag: int, payload: Any) -> None:
        if dest == self.rank:
            with self._cond:
                self._boxes.setdefault((context, tag), deque()).append((dest, payload))
                self._cond.notify_all()
            return
        with self._locks[dest]:
            self._writers[dest].send((context, self.rank, tag, payload))

    def _find(self, context: Any, source: int, tag: int, take: bool) -> tuple[int, Any] | None:
        box = self._boxes.get((context, tag))
        if not box:
            return None
        for index, (src, payload) in enumerate(box):
            if source == MPI.ANY_SOURCE or src == source:
                if take:
                    del box[index]
                return src, payload
        return None

    def poll(self, context: Any, source: int, tag: int, *, take: bool) -> tuple[int, Any] | None:
        with self._cond:
            return self._find(context, source, tag, take)

    def take(self, context: Any, source: int, tag: int) -> tuple[int, Any]:
        with self._cond:
            while True:
                found = self._find(context, source, tag, True)
                if found is not None:
                    return found
                self._cond.wait(1.0)

    def abort(self, code: int) -> None:
        os.write(self._abort_fd, struct.pack("<ii", self.rank, code))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _Done:
    def Test(self) -> bool:
        return True

    def Wait(self) -> None:
        return None

    def Free(self) -> None:
        return None


class _Pending:
    """A non-blocking receive (or collective) completed by ``Test``."""

    def __init__(self, step: Callable[[], bool]) -> None:
        self._step, self._done = step, False

    def Test(self) -> bool:
        if not self._done:
            self._done = self._step()
        return self._done

    def Wait(self) -> None:
        while not self.Test():
            time.sleep(0.0005)


class LocalGroup:
    def __init__(self, members: Sequence[int]) -> None:
        self.members = list(members)  # process indexes, in rank order

    def Translate_ranks(self, ranks: Sequence[int], group: "LocalGroup") -> list[int]:
        return [group.members.index(self.members[r]) for r in ranks]


def _array(buf: Any) -> np.ndarray:
    """The numpy array of an mpi4py buffer argument (``[array, ...]`` or the array)."""
    array = buf[0] if isinstance(buf, (list, tuple)) else buf
    return np.asarray(array)


def _nbytes(payload: Any) -> int:
    if isinstance(payload, np.ndarray):
        return int(payload.nbytes)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return len(payload)
    return 0


class LocalComm:
    """A communicator among forked ranks (see the module's docstring)."""

    def __init__(self, hub: _Hub, context: Any, members: Sequence[int]) -> None:
        self._hub = hub
        self._context = context
        self._members = list(members)  # rank in this communicator -> process index
        self._rank = self._members.index(hub.rank)
        self._derived = 0

    # -- identity and derived communicators ---------------------------------------------

    def Get_rank(self) -> int:
        return self._rank

    def Get_size(self) -> int:
        return len(self._members)

    def Get_group(self) -> LocalGroup:
        return LocalGroup(self._members)

    def _next_context(self, *extra: Any) -> Any:
        self._derived += 1
        return (self._context, self._derived, *extra)

    def Dup(self) -> "LocalComm":
        return LocalComm(self._hub, self._next_context(), self._members)

    def Split(self, color: int = 0, key: int = 0) -> Any:
        chosen = self._collect((color, key))  # every rank's (color, key)
        context = self._next_context(color)
        if color == MPI.UNDEFINED:
            return MPI.COMM_NULL
        ranks = sorted((k, r) for r, (c, k) in enumerate(chosen) if c == color)
        return LocalComm(self._hub, context, [self._members[r] for _, r in ranks])

    def Free(self) -> None:
        return None

    def Abort(self, errorcode: int = 0) -> None:
        self._hub.abort(errorcode)

    # -- point to point -------------------------------------------------------------------

    def _put(self, dest: int, tag: int, payload: Any) -> None:
        self._hub.put(self._members[dest], self._context, tag, payload)

    def _source(self, source: int) -> int:
        return source if source == MPI.ANY_SOURCE else self._members[source]

    def _rank_of(self, process: int) -> int:
        return self._members.index(process)

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        self._put(dest, tag, obj)

    def isend(self, obj: Any, dest: int, tag: int = 0) -> _Done:
        self._put(dest, tag, obj)
        return _Done()

    def recv(self, buf: Any = None, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
             status: Any = None) -> Any:
        process, payload = self._hub.take(self._context, self._source(source), tag)
        self._fill(status, process, tag, payload)
        return payload

    def Iprobe(self, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
               status: Any = None) -> bool:
        found = self._hub.poll(self._context, self._source(source), tag, take=False)
        if found is not None:
            self._fill(status, found[0], tag, found[1])
        return found is not None

    def Probe(self, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
              status: Any = None) -> None:
        while not self.Iprobe(source, tag, status):
            time.sleep(0.0005)

    def _fill(self, status: Any, process: int, tag: int, payload: Any) -> None:
        if status is not None:
            status.Set_source(self._rank_of(process))
            status.Set_tag(tag)
            status.Set_elements(MPI.BYTE, _nbytes(payload))

    def Send(self, buf: Any, dest: int, tag: int = 0) -> None:
        self._put(dest, tag, _array(buf).copy())

    def Recv(self, buf: Any, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
             status: Any = None) -> None:
        process, payload = self._hub.take(self._context, self._source(source), tag)
        _into(buf, payload)
        self._fill(status, process, tag, payload)

    def Irecv(self, buf: Any, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG) -> _Pending:
        def step() -> bool:
            found = self._hub.poll(self._context, self._source(source), tag, take=True)
            if found is None:
                return False
            _into(buf, found[1])
            return True
        return _Pending(step)

    # -- collectives (in call order, on their own tag) -------------------------------------

    def _to_all(self, payload: Any) -> None:
        for rank in range(self.Get_size()):
            self._put(rank, _COLLECTIVE, payload)

    def _from(self, rank: int) -> Any:
        return self._hub.take(self._context, self._members[rank], _COLLECTIVE)[1]

    def _collect(self, payload: Any) -> list[Any]:
        self._to_all(payload)
        return [self._from(rank) for rank in range(self.Get_size())]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        if self._rank == root:
            for rank in range(self.Get_size()):
                if rank != root:
                    self._put(rank, _COLLECTIVE, obj)
            return obj
        return self._from(root)

    def allgather(self, sendobj: Any) -> list[Any]:
        return self._collect(sendobj)

    def gather(self, sendobj: Any, root: int = 0) -> list[Any] | None:
        if self._rank != root:
            self._put(root, _COLLECTIVE, sendobj)
            return None
        return [sendobj if rank == root else self._from(rank) for rank in range(self.Get_size())]

    def Bcast(self, buf: Any, root: int = 0) -> None:
        array = _array(buf)
        if self._rank == root:
            copy = array.copy()
            for rank in range(self.Get_size()):
                if rank != root:
                    self._put(rank, _COLLECTIVE, copy)
        else:
            _into(buf, self._from(root))

    def Reduce(self, sendbuf: Any, recvbuf: Any, op: Any = MPI.SUM, root: int = 0) -> None:
        if op != MPI.SUM:
            raise NotImplementedError("LocalComm.Reduce adds (MPI.SUM) only")
        if self._rank != root:
            self._put(root, _COLLECTIVE, _array(sendbuf).copy())
            return
        parts = [_array(sendbuf) if rank == root else self._from(rank)
                 for rank in range(self.Get_size())]
        total = parts[-1].copy()
        for part in reversed(parts[:-1]):  # Open MPI's linear order
            total = part + total
        _into(recvbuf, total)

    def Gatherv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:
        if self._rank != root:
            self._put(root, _COLLECTIVE, _array(sendbuf).copy())
            return
        out = _array(recvbuf)
        counts, displs = recvbuf[1]
        for rank in range(self.Get_size()):
            rows = _array(sendbuf) if rank == root else self._from(rank)
            if counts[rank]:
                out[displs[rank]:displs[rank] + counts[rank]] = rows

    def Ibarrier(self) -> _Pending:
        return self._nonblocking(None, None)

    def Iallgather(self, sendbuf: Any, recvbuf: Any) -> _Pending:
        return self._nonblocking(_array(sendbuf).copy(), _array(recvbuf))

    def _nonblocking(self, payload: Any, out: np.ndarray | None) -> _Pending:
        self._to_all(payload)
        got: dict[int, Any] = {}

        def step() -> bool:
            for rank in range(self.Get_size()):
                if rank not in got:
                    found = self._hub.poll(self._context, self._members[rank], _COLLECTIVE,
                                           take=True)
                    if found is not None:
                        got[rank] = found[1]
            if len(got) < self.Get_size():
                return False
            if out is not None:
                out[...] = np.concatenate([np.asarray(got[r]).ravel()
                                           for r in range(self.Get_size())]).view(out.dtype)
            return True
        return _Pending(step)


def _conforms(comm: LocalComm) -> Communicator:
    return comm  # mypy checks LocalComm against the protocol World is written to


def _into(buf: Any, payload: Any) -> None:
    target = _array(buf)
    source = np.asarray(payload)
    if source.size * source.itemsize != target.size * target.itemsize:
        raise ValueError(f"a message of {source.nbytes} bytes for a buffer of "
                         f"{target.nbytes} bytes")
    target.reshape(-1).view(np.uint8)[...] = source.reshape(-1).view(np.uint8)


# -- the launcher ---------------------------------------------------------------------------

#: seconds the other ranks get to end by themselves after one ended with a non-zero status
#: (every rank reports an agreed error with the same status at about the same time)
EXIT_GRACE_S = 10.0


def launch(size: int, body: Callable[[int], int], *,
           environment: Callable[[int], dict[str, str]] | None = None) -> int:
    """Fork ``size`` ranks, run ``body(rank)`` on each over one :class:`LocalComm`, and
    return the job's status as ``mpirun`` gives it: 0, else the status of the first rank to
    abort or to end non-zero (the other ranks are then killed, at once after an abort,
    after :data:`EXIT_GRACE_S` otherwise).

    ``environment(rank)`` is added to each rank's ``os.environ``.  Call from a process that
    has imported what the ranks need (torch, fedsilo) and started no threads of its own: a
    forked process keeps only the thread that forked it.
    """
    pipes = {(src, dst): os.pipe() for src in range(size) for dst in range(size) if src != dst}
    abort_read, abort_write = os.pipe()
    pids: dict[int, int] = {}
    for rank in range(size):
        pid = os.fork()
        if pid == 0:  # the rank
            code = 1
            try:
                os.close(abort_read)
                readers, writers = {}, {}
                for (src, dst), (r, w) in pipes.items():
                    if dst == rank:
                        os.close(w)
                        readers[src] = Connection(r, writable=False)
                    elif src == rank:
                        os.close(r)
                        writers[dst] = Connection(w, readable=False)
                    else:
                        os.close(r)
                        os.close(w)
                if environment is not None:
                    os.environ.update(environment(rank))
                hub = _Hub(rank, size, readers, writers, abort_write)
                guard.use_world_comm(LocalComm(hub, ("world",), range(size)))
                code = _run_rank(body, rank)
            finally:
                os._exit(code)
        pids[pid] = rank
    for r, w in pipes.values():
        os.close(r)
        os.close(w)
    os.close(abort_write)
    try:
        return _wait(pids, abort_read)
    finally:
        os.close(abort_read)


def _run_rank(body: Callable[[int], int], rank: int) -> int:
    import atexit
    import traceback

    try:
        code = body(rank)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - as an uncaught exception ends a Python process
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # logging's flush, the deadline thread's stop
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return int(code)


def _wait(pids: dict[int, int], abort_read: int) -> int:
    status = 0
    first_failure: float | None = None
    running = dict(pids)
    while running:
        ready, _, _ = select.select([abort_read], [], [], 0.05)
        if ready:
            data = os.read(abort_read, 8)
            if len(data) == 8:
                _, code = struct.unpack("<ii", data)
                status = status or code
                _kill(running)
        for pid in list(running):
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
            del running[pid]
            code = os.waitstatus_to_exitcode(raw)
            code = code if code >= 0 else 128 - code  # a signal, as a shell shows it
            if code != 0 and status == 0:
                status, first_failure = code, time.monotonic()
        if running and first_failure is not None \
                and time.monotonic() - first_failure > EXIT_GRACE_S:
            _kill(running)
    return status


def _kill(running: dict[int, int]) -> None:
    for pid in running:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
