"""Streaming a listed dataset into shards: decode in bounded chunks, optionally in parallel.

A :class:`RecordSource` is a :class:`~fedsilo.prep.records.RecordSet` (paths, labels,
columns) plus a decoder (path -> uint8 C x H x W array, or a :class:`BadInput`).  The
pipeline decides which records go into which file from the labels alone, then asks a
:class:`RecordTable` for the pixels of one file's records.  The table decodes them a
chunk at a time (``CHUNK_BYTES`` of pixels) while the previous chunk is being written:
memory holds at most two chunks, whatever the size of the dataset.  With ``workers``
> 1 the chunks are decoded by a pool of worker processes, and ``map`` keeps the
records' order, so the files are the same for any number of workers.  The workers are
started with ``spawn`` (nothing inherited from the parent, the same on every platform),
so a script that calls the pipeline with ``workers`` > 1 needs the usual
``if __name__ == "__main__":`` guard; a worker that cannot start or dies ends the
preparation with an error rather than a hang (``ProcessPoolExecutor``).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from fedsilo.errors import ConfigError, DataError
from fedsilo.prep.records import BadInput, RecordSet

log = logging.getLogger(__name__)

#: decoded pixels per chunk; one chunk is decoded while the one before is written
CHUNK_BYTES = 16 << 20
#: records per chunk at most, however small the images
MAX_CHUNK_RECORDS = 1024


class Decoder(Protocol):
    """Path -> uint8 C x H x W array or BadInput; picklable, for worker processes."""

    channels: int | None
    size: tuple[int, int] | None

    def __call__(self, path: str) -> np.ndarray | BadInput: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RecordSource:
    """A listed dataset with the decoder of its files (``kind``: folder, csv, dicom)."""

    name: str
    kind: str
    records: RecordSet
    decoder: Decoder
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Batch:
    """Decoded images with their labels, and the inputs of the chunk that were skipped."""

    images: np.ndarray
    labels: np.ndarray
    skipped: tuple[BadInput, ...] = ()


class Decoding:
    """Runs a decoder here (``workers`` = 1) or on a process pool created on first use."""

    def __init__(self, decoder: Decoder, *, workers: int = 1) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be a positive integer, got {workers!r}")
        self.decoder = decoder
        self.workers = workers
        self._pool: Any = None

    def submit(self, paths: Sequence[str]) -> Callable[[], list[np.ndarray | BadInput]]:
        """Start decoding ``paths``; the returned call waits for the results, in order."""
        if self.workers == 1:
            return lambda: [self.decoder(p) for p in paths]  # decoded when asked: lazily
        try:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn")
                )
            per_task = max(1, len(paths) // (4 * self.workers))
            pending = self._pool.map(self.decoder, paths, chunksize=per_task)
        except BrokenProcessPool as exc:
            raise self._broken(exc) from exc

        def results() -> list[np.ndarray | BadInput]:
            try:
                return list(pending)
            except BrokenProcessPool as exc:
                raise self._broken(exc) from exc

        return results

    def close(self, *, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None

    def __enter__(self) -> "Decoding":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(cancel=exc[0] is not None)

    def _broken(self, exc: BaseException) -> DataError:
        return DataError(f"a decoding worker process died or could not start ({exc}); "
                         f"rerun with --workers 1 to see the cause")


class RecordTable:
    """The pixels of a :class:`RecordSource`, fetched by record index, chunk by chunk."""

    def __init__(self, source: RecordSource, decoding: Decoding, *,
                 image_shape: tuple[int, int, int], first_path: str | None,
                 skip_bad: bool) -> None:
        self.source = source
        self.decoding = decoding
        self.image_shape = image_shape
        self.first_path = first_path
        self.skip_bad = skip_bad
        image_bytes = int(np.prod(image_shape))
        self.chunk_records = max(1, min(MAX_CHUNK_RECORDS, CHUNK_BYTES // image_bytes))

    def batches(self, indices: np.ndarray) -> Iterator[Batch]:
        """Decoded images of ``indices`` in that order, bad ones dropped or raised."""
        paths = self.source.records.paths
        labels = self.source.records.labels
        chunks = [indices[i : i + self.chunk_records]
                  for i in range(0, len(indices), self.chunk_records)]
        pending = self.decoding.submit([paths[i] for i in chunks[0]]) if chunks else None
        for n, chunk in enumerate(chunks):
            results = pending()
            if n + 1 < len(chunks):  # the next chunk decodes while this one is written
                pending = self.decoding.submit([paths[i] for i in chunks[n + 1]])
            yield self._assemble(chunk, results, labels)
            del results

    def fingerprint(self, indices: np.ndarray) -> str:
        digest = hashlib.sha256()
        paths = self.source.records.paths
        for i in indices:
            digest.update(f"{paths[i]}\0{int(self.source.records.labels[i])}\n".encode())
        return digest.hexdigest()

    def _assemble(self, chunk: np.ndarray, results: list, labels: np.ndarray) -> Batch:
        images = np.empty((len(chunk), *self.image_shape), dtype=np.uint8)
        keep = np.zeros(len(chunk), dtype=bool)
        skipped: list[BadInput] = []
        for j, (index, result) in enumerate(zip(chunk, results)):
            path = self.source.records.paths[index]
            if not isinstance(result, BadInput) and result.shape != self.image_shape:
                result = BadInput(path, self._shape_problem(result.shape))
            if isinstance(result, BadInput):
                if not self.skip_bad:
                    raise DataError(f"{result.message()}; --skip-bad leaves bad inputs out and "
                                    f"lists them in the manifest")
                skipped.append(result)
                continue
            images[j] = result
            keep[j] = True
        return Batch(images=images[keep] if not keep.all() else images,
                     labels=labels[chunk][keep], skipped=tuple(skipped))

    def _shape_problem(self, shape: tuple[int, ...]) -> str:
        have, want = shape, self.image_shape
        fixes = []
        if have[0] != want[0]:
            fixes.append("--channels 1|3")
        if have[1:] != want[1:]:
            fixes.append("--size H W")
        return (f"image is {_fmt(have)} (channels x height x width) but the first image "
                f"({self.first_path}) is {_fmt(want)}; pass {' and '.join(fixes)} to convert "
                f"every image to one shape")


def probe_shape(source: RecordSource, *, skip_bad: bool) -> tuple[tuple[int, int, int], str | None]:
    """The image shape of the set, and the path that fixed it.

    ``--channels`` and ``--size`` when both are given; otherwise the first record that
    decodes (in listing order, so every SLURM array task finds the same one) supplies
    what they leave open.
    """
    decoder = source.decoder
    if decoder.channels is not None and decoder.size is not None:
        return (decoder.channels, *decoder.size), None
    for path in source.records.paths:
        result = decoder(path)
        if isinstance(result, BadInput):
            if not skip_bad:
                raise DataError(f"{result.message()}; --skip-bad leaves bad inputs out and lists "
                                f"them in the manifest")
            continue
        c, h, w = (int(v) for v in result.shape)
        return (c, h, w), path
    raise DataError(f"source {source.name!r}: none of its {len(source.records)} images "
                    f"can be decoded")


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)
