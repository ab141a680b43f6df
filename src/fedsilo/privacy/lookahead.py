"""DP-SGD's data-independent draws made ahead of the steps, on a worker thread.

The Gaussian noise of step s and its Poisson mask depend only on the site's secret and the
public counters (round, s) (``secret.py``), never on the data or the weights.  So they can be
drawn while earlier steps compute, off the critical path: a worker thread draws step s+1's
noise while step s runs its forward and backward passes (the ChaCha20 keystream and numpy's
ufuncs release the GIL on large buffers, so the thread really runs beside torch).  The values
are those drawing them in place would give, bit for bit: the same stream, read in the same
order, into float32 buffers of the same layout.

Memory is bounded: the noise lives in a :class:`BufferPool` of at most ``depth`` flat host
buffers (one being filled, the rest ready or in use), reused from step to step and round to
round.  On a GPU they are pinned and copied to the device asynchronously; a buffer goes back
to the pool with the CUDA event of its copy, and the worker waits for that event before it
writes into the buffer again.

A failure in the worker (out of memory, say) is handed to the consumer, which raises
:class:`NoiseWorkerError`, an :class:`~fedsilo.errors.UpdateError`: the participant's round
loop agrees it across ranks like any failed update, so the job ends on every rank with one
message.  Every wait is bounded and checks that the other side is alive: no hang.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Any, Callable, Generic, Iterator, TypeVar

import numpy as np
import torch

from fedsilo.errors import UpdateError
from fedsilo.privacy.secret import Purpose, SecretStream

T = TypeVar("T")

#: seconds between checks of the other side's liveness while waiting
_POLL_S = 0.05


class NoiseWorkerError(UpdateError):
    """A look-ahead worker failed drawing a privacy mechanism's randomness."""


class _Stopped(Exception):
    """The consumer closed the look-ahead: the worker ends quietly."""


class _Failure:
    """What the worker hands over instead of item ``index`` when making it raised."""

    def __init__(self, index: int, exc: BaseException) -> None:
        self.index, self.exc = index, exc


class BufferPool:
    """At most ``capacity`` flat float32 host buffers of ``numel`` values, reused.

    :meth:`acquire` blocks until a buffer is free (allocating one while fewer than
    ``capacity`` exist); :meth:`release` hands one back, optionally with a CUDA event that
    must complete (the asynchronous copy out of it) before the buffer is written again.
    """

    def __init__(self, numel: int, *, capacity: int, pin: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"a buffer pool holds at least one buffer, got {capacity}")
        self.numel, self.capacity, self.pin = numel, capacity, pin
        #: buffers allocated so far (never more than ``capacity``)
        self.allocated = 0
        self._free: queue.Queue[tuple[torch.Tensor, Any]] = queue.Queue()
        self._lock = threading.Lock()
        #: buffers handed out and not yet back (by id): a release is taken once
        self._out: set[int] = set()

    def acquire(self, stop: threading.Event | None = None) -> torch.Tensor:
        while True:
            try:
                buffer, event = self._free.get_nowait()
                break
            except queue.Empty:
                pass
            with self._lock:
                if self.allocated < self.capacity:
                    self.allocated += 1
                    fresh = torch.empty(self.numel, dtype=torch.float32, pin_memory=self.pin)
                    self._out.add(id(fresh))
                    return fresh
            try:
                buffer, event = self._free.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if stop is not None and stop.is_set():
                    raise _Stopped from None
        if event is not None:
            event.synchronize()
        with self._lock:
            self._out.add(id(buffer))
        return buffer

    def release(self, buffer: torch.Tensor, event: Any = None) -> None:
        """Hand ``buffer`` back; a second release of the same buffer is a no-op (a step
        that failed before or after its own release must not stall the next site)."""
        with self._lock:
            if id(buffer) not in self._out:
                return
            self._out.discard(id(buffer))
        self._free.put((buffer, event))


class Ahead(Generic[T]):
    """``produce(k)`` for k = 0 .. count-1, made in order on a worker thread and taken in
    order by :meth:`take`; at most ``depth`` made items wait for the consumer.

    ``describe(k)`` names item k in the error raised when producing it fails.  Use as a
    context manager (or call :meth:`close`): closing stops the worker at its next item and
    hands every item not taken to ``discard``.  ``stop`` (optional) is the event closing
    sets, for ``produce`` to end its own waits with (raising :class:`_Stopped`).
    """

    _END = object()

    def __init__(self, produce: Callable[[int], T], count: int, *, depth: int,
                 describe: Callable[[int], str], discard: Callable[[T], None] | None = None,
                 name: str = "fedsilo-lookahead", stop: threading.Event | None = None
                 ) -> None:
        if depth < 1:
            raise ValueError(f"a look-ahead holds at least one item, got depth {depth}")
        self._produce, self._count, self._describe = produce, count, describe
        self._discard = discard
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = stop if stop is not None else threading.Event()
        self._next = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for k in range(self._count):
            try:
                item: Any = self._produce(k)
            except _Stopped:
                return
            except BaseException as exc:  # handed to the consumer, raised there
                self._put(_Failure(k, exc))
                return
            if not self._put(item):
                if self._discard is not None:
                    self._discard(item)
                return
        self._put(self._END)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def take(self) -> T:
        """The next item (in order); raises :class:`NoiseWorkerError` if making it failed."""
        k = self._next
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise NoiseWorkerError(f"the look-ahead worker ended without "
                                           f"{self._describe(k)}") from None
        if item is self._END:
            raise NoiseWorkerError(f"the look-ahead has no {self._describe(k)} (it makes "
                                   f"{self._count})")
        if isinstance(item, _Failure):
            raise NoiseWorkerError(f"drawing {self._describe(item.index)} failed on the "
                                   f"look-ahead worker: {type(item.exc).__name__}: "
                                   f"{item.exc}") from item.exc
        self._next += 1
        return item

    def __iter__(self) -> Iterator[T]:
        for _ in range(self._next, self._count):
            yield self.take()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            self._drain()
            self._thread.join(timeout=_POLL_S)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not self._END and not isinstance(item, _Failure) \
                    and self._discard is not None:
                self._discard(item)

    def __enter__(self) -> "Ahead[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: values per piece of :func:`fill_noise`: under torch's grain size (32768), so that its
#: element-wise kernels run on the calling thread alone, whichever thread that is
_PIECE = 1 << 15
_TWO_PI = 2.0 * math.pi


def fill_noise(out: torch.Tensor, secret: bytes, *, round_index: int, step: int,
               std: float) -> torch.Tensor:
    """Overwrite the flat float32 host tensor ``out`` with step ``step``'s noise: one
    ``SecretStream(NOISE, round, step)`` read front to back, N(0, std²) per value.  Reading
    it into one flat buffer gives the values reading it parameter by parameter gives (value
    i always takes the stream's words 2i and 2i+1).

    The sampler is :meth:`SecretStream.fill_gaussian`'s (Box–Muller of 53-bit uniforms in
    float64, released in float32), with the logarithm and cosine taken by torch's
    vectorized kernels rather than numpy's scalar ones: about half the time.  Both are
    faithful to an ulp in float64; in float32 no value of 16.7 million compared differed
    (tests/unit/test_dp_speed.py checks millions, bit for bit).
    """
    stream = SecretStream(secret, purpose=Purpose.NOISE, round_index=round_index, step=step)
    flat = out.view(-1)
    first = torch.empty(_PIECE, dtype=torch.float64)
    second = torch.empty(_PIECE, dtype=torch.float64)
    for begin in range(0, flat.numel(), _PIECE):
        n = min(_PIECE, flat.numel() - begin)
        bits = stream.uint64(2 * n).reshape(n, 2) >> np.uint64(11)
        u1, u2 = first[:n], second[:n]
        np.multiply((bits[:, 0] + np.uint64(1)).astype(np.float64), 2.0**-53, out=u1.numpy())
        np.multiply(bits[:, 1].astype(np.float64), 2.0**-53, out=u2.numpy())
        u1.log_().mul_(-2.0).sqrt_()  # (0, 1]: log-safe
        u2.mul_(_TWO_PI).cos_()
        flat[begin: begin + n] = u1.mul_(u2).mul_(std)
    return out


def noise_ahead(pool: BufferPool, secret: bytes, *, round_index: int, steps: int, std: float,
                depth: int, site: int) -> Ahead[torch.Tensor]:
    """The noise of steps 0 .. ``steps``-1 of a round, drawn ahead into ``pool``'s buffers
    (at most ``pool.capacity`` exist; ``depth`` of them may wait ready)."""
    stop = threading.Event()

    def produce(step: int) -> torch.Tensor:
        buffer = pool.acquire(stop)
        try:
            return fill_noise(buffer, secret, round_index=round_index, step=step, std=std)
        except BaseException:
            pool.release(buffer)
            raise

    return Ahead(produce, steps, depth=depth, discard=pool.release, name="fedsilo-noise",
                 describe=lambda k: f"the noise of site {site}, round {round_index}, step {k}",
                 stop=stop)
