"""CKKS with TenSEAL: key files, and the codec that encrypts, adds and decrypts updates.

The only module of fedsilo that imports TenSEAL (its contexts for the key files, its
``sealapi``, i.e. Microsoft SEAL's own API, for the codec).  The design follows NVIDIA FLARE's
(one key set shared by the participants, a coordinator context without the secret key,
pre-weighted updates so that the encrypted sum is the weighted average) with parameters
chosen for additions only (see :mod:`fedsilo.crypto.params`).

Key files (written by ``fedsilo keys``) are one header line ``FEDSILO-CKKS 1 {json}`` (kind,
parameters, key id) followed by TenSEAL's serialized context:

- ``participant.key`` (mode 0600): the context *with* the secret key, for participants only;
- ``coordinator.ctx``: the same parameters without any key: it can add ciphertexts, it
  cannot decrypt.  The coordinator opens only this file and refuses one holding a secret key;
- ``params.json``: the parameters and key id, for people.

Participants encrypt with the secret key (SEAL's symmetric encryption: they all hold it
anyway, it is faster, and no public key needs to exist).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts

from fedsilo.crypto.identity import make_key_directory
from fedsilo.crypto.params import CKKSParams, validate
from fedsilo.errors import KeyFileError

PARTICIPANT_FILE = "participant.key"
COORDINATOR_FILE = "coordinator.ctx"
PARAMS_FILE = "params.json"
_MAGIC = b"FEDSILO-CKKS 1 "


@dataclass(frozen=True)
class KeySet:
    """A loaded key file: TenSEAL context, its parameters and identity."""

    context: Any  # tenseal.Context
    params: CKKSParams
    key_id: str
    kind: str  # "participant" or "coordinator"
    #: sha256 of the participant key material (participants compare theirs); None otherwise
    fingerprint: str | None

    @property
    def is_private(self) -> bool:
        return bool(self.context.is_private())

    def summary(self) -> dict[str, Any]:
        """What a rank tells the others about its keys (never key material)."""
        return {"kind": self.kind, "key_id": self.key_id, "params": self.params.to_dict(),
                "fingerprint": self.fingerprint}


def make_context(params: CKKSParams, *, num_threads: int = 1) -> Any:
    context = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                         coeff_mod_bit_sizes=params.coeff_mod_bit_sizes,
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC, n_threads=num_threads)
    context.global_scale = 2.0 ** params.scale_bits
    return context


def generate_keys(out_dir: str | Path, params: CKKSParams, *,
                  num_participants: int) -> dict[str, Path]:
    """Write a new key set into ``out_dir``; refuses to overwrite an existing one.

    A directory this call creates is made 0700 whatever the umask (a key directory others
    may write to lets them swap the keys); an existing one is left as it is."""
    validate(params, num_participants=num_participants)
    out = Path(out_dir)
    make_key_directory(out)
    paths = {"participant": out / PARTICIPANT_FILE, "coordinator": out / COORDINATOR_FILE,
             "params": out / PARAMS_FILE}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing:
        raise KeyFileError(f"{', '.join(existing)} already exist; a new key set would orphan "
                           f"the old one: choose another --out or remove them")
    context = make_context(params)
    key_id = secrets.token_hex(16)
    secret = context.serialize(save_public_key=False, save_secret_key=True,
                               save_galois_keys=False, save_relin_keys=False)
    public = context.serialize(save_public_key=False, save_secret_key=False,
                               save_galois_keys=False, save_relin_keys=False)
    header = {"params": params.to_dict(), "key_id": key_id}
    info = {**header, "max_participants": params.max_participants(),
            "error_bound_per_value": {str(p): params.error_bound(p) for p in (2, 4, 16)},
            "max_abs": params.max_abs, "bytes_per_parameter_uplink": params.data_bits / 8,
            "bytes_per_parameter_sum": 2 * params.data_bits / 8,
            "security": "128-bit classical, HE standard 2018",
            "files": {"participant": PARTICIPANT_FILE, "coordinator": COORDINATOR_FILE}}
    written: list[Path] = []
    try:
        _write(paths["participant"], _MAGIC + _header(header, "participant") + secret,
               mode=0o600, written=written)
        _write(paths["coordinator"], _MAGIC + _header(header, "coordinator") + public,
               mode=0o644, written=written)
        _write(paths["params"], (json.dumps(info, indent=2) + "\n").encode(), mode=0o644,
               written=written)
    except BaseException:
        for path in written:  # no half-written set left behind to block the next attempt
            path.unlink(missing_ok=True)
        raise
    return paths


def _header(header: dict[str, Any], kind: str) -> bytes:
    return json.dumps({**header, "kind": kind}, sort_keys=True).encode() + b"\n"


def _write(path: Path, data: bytes, *, mode: int, written: list[Path]) -> None:
    # created with its final mode (O_EXCL: never an existing file): the secret key is never
    # readable by others, even briefly; fchmod undoes a umask stricter or looser than mode
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise KeyFileError(f"{path} appeared while writing the key set; refusing to overwrite "
                           f"it: choose another --out") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror or exc}") from None
    written.append(path)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def _read(path: Path, *, secret: bool = False) -> tuple[dict[str, Any], bytes]:
    """The header and body of a key file; with ``secret``, refused unless only its owner can
    read it (as identity keys are: :func:`fedsilo.crypto.identity.load_identity`)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyFileError(f"encryption key file {path} does not exist; create a key set with "
                           f"'fedsilo keys --out DIR' and set he.keys=DIR") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read encryption key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:  # mode checked on the file actually read
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        try:
            data = f.read()
        except OSError as exc:
            raise KeyFileError(f"cannot read encryption key file {path}: "
                               f"{exc.strerror}") from None
    line, _, body = data.partition(b"\n")
    if not line.startswith(_MAGIC):
        raise KeyFileError(f"{path} is not a fedsilo key file (written by 'fedsilo keys')")
    if secret and mode & 0o077:
        raise KeyFileError(f"encryption key file {path} holds the secret key and is readable "
                           f"by others (mode {mode:04o}); refusing to use it: run "
                           f"'chmod 600 {path}'")
    try:
        header = json.loads(line[len(_MAGIC):])
    except (ValueError, RecursionError):
        raise KeyFileError(f"{path}: corrupt key file header") from None
    if not isinstance(header, dict):
        raise KeyFileError(f"{path}: corrupt key file header (not a JSON object)")
    return header, body


def load_keys(path: str | Path, *, expect: str, num_threads: int = 1) -> KeySet:
    """Load a key file of kind ``expect`` ("participant" or "coordinator") and check it."""
    path = Path(path)
    # a participant key file is the secret key whatever its header says
    header, body = _read(path, secret=expect == "participant")
    if header.get("kind") != expect:
        raise KeyFileError(f"{path} is a {header.get('kind')} key file, expected a {expect} one")
    params = CKKSParams.from_dict(header.get("params", {}))
    try:
        context = ts.context_from(body, n_threads=max(1, num_threads))
        # a damaged context may parse and still lack its scale or SEAL data
        actual = _context_params(context, scale=context.global_scale)
    except Exception as exc:  # noqa: BLE001 - TenSEAL raises bare exceptions on bad protobufs
        raise KeyFileError(f"{path}: corrupt TenSEAL context ({exc})") from None
    if actual != params:
        raise KeyFileError(f"{path}: the context's parameters {actual.to_dict()} do not match "
                           f"those recorded in its header {params.to_dict()}")
    private = context.is_private()
    if expect == "coordinator" and private:
        raise KeyFileError(f"{path} holds the secret key: the coordinator must be given the "
                           f"public context ({COORDINATOR_FILE}) only, never the participant key")
    if expect == "participant" and not private:
        raise KeyFileError(f"{path} holds no secret key; participants need {PARTICIPANT_FILE}")
    fingerprint = hashlib.sha256(body).hexdigest() if expect == "participant" else None
    return KeySet(context=context, params=params, key_id=str(header.get("key_id")), kind=expect,
                  fingerprint=fingerprint)


def _context_params(context: Any, *, scale: float) -> CKKSParams:
    seal = context.seal_context().data
    key_bits = int(seal.key_context_data().total_coeff_modulus_bit_count())
    data_bits = int(seal.first_context_data().total_coeff_modulus_bit_count())
    if key_bits != 2 * data_bits:  # not the [q, q] chain fedsilo writes
        data_bits = -data_bits
    return CKKSParams(
        poly_modulus_degree=int(seal.key_context_data().parms().poly_modulus_degree()),
        data_bits=data_bits, scale_bits=int(round(np.log2(scale))))


class CKKSCodec:
    """Encrypts float32 vectors into packed CKKS ciphertexts, adds and decrypts them.

    Through SEAL's own API (``tenseal.sealapi``; the key files stay TenSEAL contexts), for
    two things TenSEAL's ``CKKSVector`` cannot do, which make encryption ~2.7× faster and
    the uplink ~4× smaller (benchmarks/RESULTS.md):

    - **two values per slot**: a CKKS slot holds a complex number and addition works on
      real and imaginary parts alike, so ciphertext ``k`` carries values ``[kN, kN + N/2)``
      as real parts and ``[kN + N/2, (k+1)N)`` as imaginary parts: N values per
      ciphertext instead of N/2.  Each part's error is within the real-only bound
      :meth:`CKKSParams.error_bound` (each gets half of a slot's noise variance) and its
      headroom ``max_abs`` holds with the factor-2 margin that bound leaves (a slot's
      modulus is at most √2 × the larger part);
    - **seeded fresh ciphertexts**: SEAL's symmetric encryption draws the second
      polynomial from a seed, and a fresh ciphertext is serialized as one polynomial and
      that seed (~data_bits/8 bytes per value); a sum is two polynomials (~2·data_bits/8).

    A vector is cut into ``⌈size/N⌉`` ciphertexts; with ``workers`` > 1 a participant
    encrypts pieces of :data:`PIECE_SLOTS` ciphertexts in that many worker processes
    (started once, with the spawn method, each holding a copy of the participant context:
    the key never leaves the participant's own processes).  On the wire a ciphertext is
    its SEAL-serialized parts, framed by :func:`_frame`, whatever made it; participants
    with different ``workers`` aggregate together.
    """

    name = "ckks"

    def __init__(self, keys: KeySet, *, workers: int = 1) -> None:
        self.keys, self.context = keys, keys.context
        self.seal = _Seal(keys)
        #: values per ciphertext: two per slot
        self.per_ciphertext = keys.params.poly_modulus_degree
        self.workers = max(1, int(workers)) if keys.is_private else 1
        self._pool: Any = None
        if self.workers > 1:
            self._start_pool()

    def _start_pool(self) -> None:
        import atexit
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        secret = self.context.serialize(save_public_key=False, save_secret_key=True,
                                        save_galois_keys=False, save_relin_keys=False)
        self._pool = ProcessPoolExecutor(max_workers=self.workers,
                                         mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_worker_init, initargs=(secret,))
        # start the workers now, while the job sets up, not in the first round
        for future in [self._pool.submit(_worker_ready) for _ in range(self.workers)]:
            future.add_done_callback(lambda f: f.exception())
        atexit.register(self.close)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def count(self, size: int) -> int:
        """The number of ciphertexts a vector of ``size`` values takes (at least one)."""
        return max(1, -(-size // self.per_ciphertext))

    def pieces(self, size: int) -> list[tuple[int, int]]:
        """Where a vector of ``size`` values is cut into units of work for the worker
        processes: :data:`PIECE_SLOTS` ciphertexts each (the last one shorter).

        >>> codec = CKKSCodec.__new__(CKKSCodec); codec.per_ciphertext = 8192
        >>> codec.pieces(10)
        [(0, 10)]
        >>> len(codec.pieces(PIECE_SLOTS * 8192 * 2 + 1)), codec.count(8193)
        (3, 2)
        """
        step = PIECE_SLOTS * self.per_ciphertext
        return [(begin, min(begin + step, size)) for begin in range(0, max(size, 1), step)]

    def encrypt(self, vector: np.ndarray) -> list[Any]:
        """One entry per ciphertext: SEAL objects, or their bytes when workers made them."""
        if not self.keys.is_private:
            raise KeyFileError("encryption needs the participant key")
        cuts = self.pieces(vector.size)
        if self._pool is not None and len(cuts) > 1:
            futures = [self._pool.submit(_worker_encrypt, vector[a:b]) for a, b in cuts]
            return [blob for f in futures for blob in f.result()]
        return self.seal.encrypt(vector)

    def to_bytes(self, ciphertext: list[Any]) -> bytes:
        return _frame([c if isinstance(c, bytes) else self.seal.save(c) for c in ciphertext])

    def from_bytes(self, data: bytes | memoryview) -> list[Any]:
        parts = _unframe(data)
        try:
            return [self.seal.load(part) for part in parts]
        except Exception as exc:  # noqa: BLE001 - SEAL raises ValueError/RuntimeError
            raise KeyFileError(f"a ciphertext does not load under this key set: {exc}") from None

    def add_into(self, total: list[Any], other: list[Any]) -> list[Any]:
        if len(total) != len(other):
            raise KeyFileError(f"ciphertexts of {len(total)} and {len(other)} parts cannot "
                               f"be added: the vectors differ in length")
        try:
            for k, theirs in enumerate(other):
                total[k] = self.seal.ciphertext(total[k])
                self.seal.evaluator.add_inplace(total[k], self.seal.ciphertext(theirs))
        except Exception as exc:  # noqa: BLE001 - SEAL raises ValueError on a mismatch
            raise KeyFileError(f"ciphertexts that cannot be added: {exc}") from None
        return total

    def decrypt_into(self, ciphertext: list[Any], out: np.ndarray) -> np.ndarray:
        """Decrypt into the float buffer ``out`` (raises without the secret key)."""
        if not self.keys.is_private:
            raise KeyFileError("decryption needs the participant key")
        if len(ciphertext) != self.count(out.size):
            raise KeyFileError(f"a ciphertext of {len(ciphertext)} parts, expected "
                               f"{self.count(out.size)} for {out.size} values")
        half = self.per_ciphertext // 2
        for k, part in enumerate(ciphertext):
            begin = k * self.per_ciphertext
            values = self.seal.decrypt(self.seal.ciphertext(part))
            real = min(half, out.size - begin)
            out[begin: begin + real] = values.real[:real]
            if out.size - begin > half:
                imag = min(half, out.size - begin - half)
                out[begin + half: begin + half + imag] = values.imag[:imag]
        return out


class _Seal:
    """One key set's SEAL objects: encoder, evaluator, and (participants) encryptor and
    decryptor; and ciphertext bytes in and out.

    ``tenseal.sealapi`` saves and loads SEAL objects through a file path only; the path is
    an anonymous in-memory file (``memfd_create``, ``/proc/self/fd/N``), so no ciphertext
    touches a file system.  Without memfd (not Linux) it is a file in a private temporary
    directory.
    """

    def __init__(self, keys: KeySet) -> None:
        import threading

        import tenseal.sealapi as sealapi

        self.api = sealapi
        self.context = keys.context.seal_context().data
        self.encoder = sealapi.CKKSEncoder(self.context)
        self.evaluator = sealapi.Evaluator(self.context)
        self.scale = 2.0 ** keys.params.scale_bits
        self.slots = keys.params.poly_modulus_degree // 2
        self.encryptor: Any = None
        self.decryptor: Any = None
        if keys.is_private:
            secret = keys.context.secret_key().data
            self.encryptor = sealapi.Encryptor(self.context, secret)
            self.decryptor = sealapi.Decryptor(self.context, secret)
        self._lock = threading.Lock()
        self._fd, self._path = _memory_file()

    def encrypt(self, values: np.ndarray) -> list[Any]:
        """Seeded ciphertexts (``Serializable``) of N values each, two per slot."""
        per = 2 * self.slots
        plain = self.api.Plaintext()
        out = []
        for begin in range(0, max(values.size, 1), per):
            chunk = np.zeros(per, dtype=np.float64)
            part = values[begin: begin + per]
            chunk[: part.size] = part
            packed = chunk[: self.slots] + 1j * chunk[self.slots:]
            self.encoder.encode(packed.tolist(), self.scale, plain)
            out.append(self.encryptor.encrypt_symmetric(plain))
        return out

    def decrypt(self, ciphertext: Any) -> np.ndarray:
        plain = self.api.Plaintext()
        self.decryptor.decrypt(ciphertext, plain)
        return np.asarray(self.encoder.decode_complex(plain), dtype=np.complex128)

    def ciphertext(self, entry: Any) -> Any:
        """A SEAL ``Ciphertext`` for what :meth:`CKKSCodec.encrypt` returned (a seeded
        ``Serializable`` or its bytes: the form that is sent) or a loaded one (itself)."""
        if isinstance(entry, self.api.Ciphertext):
            return entry
        return self.load(entry if isinstance(entry, bytes) else self.save(entry))

    def save(self, obj: Any) -> bytes:
        with self._lock:
            obj.save(self._path)
            return os.pread(self._fd, os.fstat(self._fd).st_size, 0)

    def load(self, data: bytes) -> Any:
        ciphertext = self.api.Ciphertext()
        with self._lock:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            ciphertext.load(self.context, self._path)
        return ciphertext


def _memory_file() -> tuple[int, str]:
    """A file descriptor and a path that opens it: in memory where the OS allows."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("fedsilo-ckks", os.MFD_CLOEXEC)
        return fd, f"/proc/self/fd/{fd}"
    import tempfile

    directory = tempfile.mkdtemp(prefix="fedsilo-ckks-")  # mode 0700
    path = os.path.join(directory, "ciphertext")
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600), path


#: ciphertexts per piece of a vector (a piece is one unit of work for a worker process):
#: 64 ciphertexts of N = 8192 values are 524,288 values, about 0.08 s of encryption
PIECE_SLOTS = 64
_FRAME_MAGIC = b"FSC2"


def _frame(pieces: list[bytes]) -> bytes:
    header = _FRAME_MAGIC + len(pieces).to_bytes(4, "little") + b"".join(
        len(p).to_bytes(8, "little") for p in pieces)
    return header + b"".join(pieces)


def _unframe(data: bytes | memoryview) -> list[bytes]:
    """The pieces of a framed ciphertext; a clear error if it is not one."""
    view = memoryview(data)
    if len(view) < 8 or bytes(view[:4]) != _FRAME_MAGIC:
        raise KeyFileError("received bytes that are not a fedsilo CKKS ciphertext")
    count = int.from_bytes(view[4:8], "little")
    offset = 8 + 8 * count
    if count > len(view) // 8 or offset > len(view):
        raise KeyFileError("a CKKS ciphertext's frame is cut short")
    pieces = []
    for i in range(count):
        size = int.from_bytes(view[8 + 8 * i: 16 + 8 * i], "little")
        if offset + size > len(view):
            raise KeyFileError("a CKKS ciphertext's frame is cut short")
        pieces.append(bytes(view[offset: offset + size]))
        offset += size
    if offset != len(view):
        raise KeyFileError("a CKKS ciphertext has trailing bytes")
    return pieces


# -- worker processes (participants only) --------------------------------------------------

_WORKER: Any = None


def _worker_init(secret: bytes) -> None:
    global _WORKER
    context = ts.context_from(secret, n_threads=1)
    _WORKER = _Seal(KeySet(context=context, params=_context_params(
        context, scale=context.global_scale), key_id="", kind="participant", fingerprint=None))


def _worker_ready() -> bool:
    return _WORKER is not None


def _worker_encrypt(piece: np.ndarray) -> list[bytes]:
    return [_WORKER.save(c) for c in _WORKER.encrypt(piece)]
