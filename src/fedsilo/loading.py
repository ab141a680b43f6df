"""A split of a shard as batches: held in memory, or streamed from its HDF5 file.

Both kinds keep the **raw pixels** (uint8, as stored) and normalize each batch on the fly
with the same operations (:func:`normalize`), so a batch is bit for bit the same whichever
kind serves it: which one a rank uses changes its memory and speed, never its results.

- :class:`TensorSplit` holds the split's pixels on the device (a quarter of the float32
  images).
- :class:`StreamedSplit` holds only the labels (8 bytes a sample).  A reader thread takes
  the batch indexes ahead of training, reads a *window* of upcoming batches at a time
  (their rows sorted, each chunk decompressed once: ``shards/reader.py``), and the
  training thread gathers each batch from its window into pinned host memory and copies
  it to the device without blocking.  Windows start at one batch (training starts at
  once) and double up to their share of ``data.memory_limit_mb``.

``data.in_memory: auto`` holds a rank's splits in memory when their raw pixels fit in
``data.memory_limit_mb``, and streams them otherwise; the choice is logged.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from fedsilo.config import DataConfig
from fedsilo.errors import DataError, ShardError
from fedsilo.shards import SplitReader

log = logging.getLogger("fedsilo")

#: a batch's (raw pixels, labels) -> (pixels, labels): augmentation, before normalization
Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

#: what ``batches`` gives: (normalized images, labels) on the device, batch by batch
Batches = Generator[tuple[torch.Tensor, torch.Tensor], None, None]

_MIB = 1 << 20


def normalize(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """float32 ``(x - mean) / std``, with uint8 pixels first scaled to [0, 1]."""
    x = pixels.to(torch.float32)
    if pixels.dtype == torch.uint8:
        x = x / 255.0
    return (x - mean) / std


def channel_stat(values: Any, device: torch.device) -> torch.Tensor:
    """Per-channel mean or std as a float32 ``1 x C x 1 x 1`` tensor on ``device``."""
    return torch.as_tensor(np.asarray(values, dtype=np.float32)).view(1, -1, 1, 1).to(device)


class Split(Protocol):
    """What training and evaluation read: labels in memory, images by batch."""

    @property
    def labels(self) -> torch.Tensor: ...

    def __len__(self) -> int: ...

    def sample(self, count: int) -> torch.Tensor: ...

    def batches(self, indexes: Iterable[Any], *, transform: Transform | None = None
                ) -> Batches: ...


def in_order(num_samples: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Index batches over a split in order (evaluation)."""
    for begin in range(0, num_samples, batch_size):
        yield torch.arange(begin, min(begin + batch_size, num_samples))


@dataclass(frozen=True)
class TensorSplit:
    """A split held in memory on a device: raw pixels (uint8 NCHW) and int64 labels.

    Without ``mean``/``std`` the images are taken as already normalized (tests build such
    splits from random floats).
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray, *, mean: Any, std: Any,
                    device: torch.device) -> "TensorSplit":
        return cls(torch.from_numpy(np.ascontiguousarray(images)).to(device),
                   torch.from_numpy(labels.astype(np.int64)).to(device),
                   channel_stat(mean, device), channel_stat(std, device))

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels if self.mean is None else normalize(pixels, self.mean, self.std)

    def sample(self, count: int) -> torch.Tensor:
        """The first ``count`` images, normalized (model checks)."""
        return self.prepare(self.images[:count])

    def batches(self, indexes: Iterable[Any], *, transform: Transform | None = None
                ) -> Batches:
        """For each index batch, its (normalized images, labels) on the device."""
        device = self.labels.device
        for index in indexes:
            index = torch.as_tensor(index, dtype=torch.long).to(device)
            pixels, labels = self.images[index], self.labels[index]
            if transform is not None:
                pixels, labels = transform(pixels, labels)
            yield self.prepare(pixels), labels


class StreamedSplit:
    """A split read from its shard file batch by batch (see the module docstring)."""

    def __init__(self, reader: SplitReader, *, mean: Any, std: Any, device: torch.device,
                 window_bytes: int) -> None:
        self.reader, self.device = reader, device
        self.labels = torch.from_numpy(reader.labels()).to(device)
        self.mean, self.std = channel_stat(mean, device), channel_stat(std, device)
        self.window_rows = max(1, int(window_bytes) // reader.row_bytes)
        self.pinned = device.type == "cuda"

    def __len__(self) -> int:
        return self.reader.num_samples

    def sample(self, count: int) -> torch.Tensor:
        rows = self._read(np.arange(min(count, len(self))))
        return normalize(torch.from_numpy(rows).to(self.device), self.mean, self.std)

    def batches(self, indexes: Iterable[Any], *, transform: Transform | None = None
                ) -> Batches:
        windows = WindowReader(self.reader.read, indexes, max_rows=self.window_rows)
        try:
            for batch_indexes, unique, rows in windows:
                for index in batch_indexes:
                    pixels = self._gather(index, unique, rows)
                    labels = self.labels[torch.from_numpy(index).to(self.device)]
                    if transform is not None:
                        pixels, labels = transform(pixels, labels)
                    yield normalize(pixels, self.mean, self.std), labels
        except ShardError as exc:
            raise DataError(f"the shard became unreadable while in use: {exc}") from exc
        finally:
            windows.close()

    def _gather(self, index: np.ndarray, unique: np.ndarray, rows: np.ndarray
                ) -> torch.Tensor:
        """The rows of ``index`` from a window, through pinned memory on CUDA (torch's
        caching host allocator keeps the block until the asynchronous copy is done)."""
        host = torch.empty((index.size, *rows.shape[1:]), dtype=torch.from_numpy(rows[:0]).dtype,
                           pin_memory=self.pinned)
        np.take(rows, np.searchsorted(unique, index), axis=0, out=host.numpy())
        return host.to(self.device, non_blocking=True)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        try:
            return self.reader.read(rows)
        except ShardError as exc:
            raise DataError(f"the shard became unreadable while in use: {exc}") from exc

    def close(self) -> None:
        self.reader.close()


class WindowReader:
    """A thread that reads windows of upcoming batches ahead of the one consuming them:
    ``read`` (ascending rows -> what they hold) is given each window's distinct rows.

    At most three windows exist at once: the one being consumed, one ready in the queue and
    one being read.  An error in the thread is handed over and raised by the consumer;
    :meth:`close` (a consumer that stops early: a deadline, ``max_steps``, an error) stops
    the thread at its next batch.
    """

    _END = object()

    def __init__(self, read: Callable[[np.ndarray], Any], indexes: Iterable[Any], *,
                 max_rows: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(read, iter(indexes), max_rows),
                                        name="fedsilo-reader", daemon=True)
        self._thread.start()

    def _run(self, read: Callable[[np.ndarray], Any], indexes: Iterator[Any],
             max_rows: int) -> None:
        try:
            pending: list[np.ndarray] = []
            count, target = 0, 1
            for index in indexes:
                index = np.asarray(index, dtype=np.int64)
                if pending and count + index.size > max(target, 1):
                    if not self._emit(read, pending):
                        return
                    target = min(max_rows, 2 * count)
                    pending, count = [], 0
                pending.append(index)
                count += index.size
                if self._stop.is_set():
                    return
            if pending and not self._emit(read, pending):
                return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)
        else:
            self._put(self._END)

    def _emit(self, read: Callable[[np.ndarray], Any], pending: list[np.ndarray]) -> bool:
        unique = np.unique(np.concatenate(pending))
        return self._put((pending, unique, read(unique)))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[list[np.ndarray], np.ndarray, Any]]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class LoadPlan:
    """How a rank's splits are served: held in memory, or streamed with a chunk cache per
    split and windows of read-ahead batches of up to ``window_bytes``."""

    hold: bool
    cache_bytes: int
    window_bytes: int


def plan_loading(sources: Sequence[tuple[Any, Any, Any]], *, data: DataConfig, who: str,
                 row_bytes: Callable[[Any], int] | None = None) -> LoadPlan:
    """Hold or stream ``sources`` (``data.in_memory``; ``auto``: in memory when their raw
    rows, ``row_bytes`` each (default: the reader's image bytes), fit in
    ``data.memory_limit_mb``), and log the choice naming ``who``."""
    limit = data.memory_limit_mb * _MIB
    size = row_bytes or (lambda reader: int(reader.row_bytes))
    raw = sum(reader.num_samples * size(reader) for reader, _, _ in sources)
    hold = data.in_memory == "true" or (data.in_memory == "auto" and raw <= limit)
    files = sorted({reader.path.name for reader, _, _ in sources})
    what = "raw pixels" if row_bytes is None else "raw pixels and label maps"
    why = f"data.in_memory={data.in_memory}" if data.in_memory != "auto" else \
        f"{raw / _MIB:.1f} MiB of {what} {'<=' if hold else '>'} " \
        f"data.memory_limit_mb={data.memory_limit_mb}"
    if hold:
        log.info("%s holds %s in memory (%s)", who, ", ".join(files), why)
        return LoadPlan(True, 0, 0)
    # half the budget caches chunks (shared by the splits); windows take an eighth each,
    # and at most three are alive (consumed, ready, being read) during one pass
    cache = limit // (2 * len(sources))
    window = limit // 8
    log.info("%s streams %s from disk (%s): chunk cache %.1f MiB per split, windows of up "
             "to %.1f MiB", who, ", ".join(files), why, cache / _MIB, window / _MIB)
    return LoadPlan(False, cache, window)


def load_splits(sources: Sequence[tuple[SplitReader, Any, Any]], *, data: DataConfig,
                device: torch.device, who: str) -> list[TensorSplit | StreamedSplit]:
    """One split per ``(reader, mean, std)``: all held in memory or all streamed
    (:func:`plan_loading`).  ``who`` names the rank in the log line."""
    plan = plan_loading(sources, data=data, who=who)
    splits: list[TensorSplit | StreamedSplit] = []
    if plan.hold:
        for reader, mean, std in sources:
            try:
                images = reader.read(np.arange(reader.num_samples))
                labels = reader.labels()
            finally:
                reader.close()
            splits.append(TensorSplit.from_arrays(images, labels, mean=mean, std=std,
                                                  device=device))
        return splits
    for reader, mean, std in sources:
        reader.cache_bytes = plan.cache_bytes
        splits.append(StreamedSplit(reader, mean=mean, std=std, device=device,
                                    window_bytes=plan.window_bytes))
    return splits
