"""Per-site identity keys for pairwise-masked secure aggregation (:mod:`fedsilo.crypto.masks`).

Each site ``s`` holds a static X25519 private key ``site-NNN.key`` (PEM, PKCS#8,
unencrypted, mode 0600: created with that mode, never readable by others even briefly);
``public.json`` (mode 0644) lists every site's raw public key and its SHA-256 fingerprint
and is given to every rank.  Two sites derive their pairwise mask key from their own
private key and the other's public key (X25519, RFC 7748), so no secret ever crosses MPI.
``fedsilo keys --identity --sites P --out DIR`` writes a set with
:func:`generate_identities`.

``public.json``::

    {"format": "fedsilo-identity", "version": 1,
     "sites": {"0": {"public_key": "<base64 of 32 raw bytes>", "fingerprint": "<sha256 hex>"},
               ...}}

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp:
...     paths = generate_identities(tmp, num_sites=3)
...     public = load_public_keys(tmp)
...     own = load_identity(tmp, 1, public_keys=public)
>>> [p.name for p in paths], fingerprint(own.public_key()) == fingerprint(public[1])
(['site-000.key', 'site-001.key', 'site-002.key', 'public.json'], True)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Mapping

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedsilo.errors import KeyFileError

FORMAT = "fedsilo-identity"
VERSION = 1
PUBLIC_FILE = "public.json"
CREATE_HINT = "'fedsilo keys --identity --sites P --out DIR' creates a set"


def key_file_name(site: int) -> str:
    """The private key file of ``site``.

    >>> key_file_name(7)
    'site-007.key'
    """
    return f"site-{site:03d}.key"


def fingerprint(public_key: X25519PublicKey) -> str:
    """SHA-256 (hex) of the raw 32-byte public key: what operators compare out of band.

    >>> len(fingerprint(X25519PrivateKey.generate().public_key()))
    64
    """
    return hashlib.sha256(_raw(public_key)).hexdigest()


#: the most sites ``fedsilo keys --identity`` issues keys for: far beyond any real
#: federation, and a bound on the files and memory a mistyped --sites costs
MAX_SITES = 100_000


def make_key_directory(out: Path) -> None:
    """``out`` as a directory for keys: each directory this call creates (``out`` and any
    missing parent) is made 0700 whatever the umask; an existing one is left as it is.  A
    KeyFileError names a file in the way or a directory that cannot be made."""
    missing = [d for d in [out, *out.parents] if not d.exists()][::-1]
    try:
        for directory in missing:
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError:  # there after all (made meanwhile): not ours to change
                continue
            os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask
    except OSError as exc:
        raise KeyFileError(f"cannot create the key directory {out}: "
                           f"{exc.strerror or exc}") from None
    if not out.is_dir():
        raise KeyFileError(f"--out {out} exists and is not a directory: give a directory for "
                           f"the keys (a new one is created)")


def generate_identities(out_dir: str | Path, *, num_sites: int) -> list[Path]:
    """Write ``site-000.key`` .. ``site-(P-1).key`` and ``public.json``; never overwrites.

    Returns the paths written, the key files first.
    """
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 2:
        raise KeyFileError(f"secure aggregation needs at least 2 sites; got --sites {num_sites!r}")
    if num_sites > MAX_SITES:
        raise KeyFileError(f"--sites {num_sites}: an identity set holds at most {MAX_SITES} "
                           f"sites (one key file each)")
    out = Path(out_dir)
    # directories this call creates are 0700 whatever the umask: a key directory others may
    # write to lets them swap public.json or a site's key; an existing one is left alone
    make_key_directory(out)
    key_paths = [out / key_file_name(s) for s in range(num_sites)]
    existing = [str(p) for p in [*key_paths, out / PUBLIC_FILE] if p.exists()]
    if existing:
        raise KeyFileError(f"{', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''} "
                           f"already exist(s); a new identity set would orphan the old one: "
                           f"choose another --out or remove them")
    written: list[Path] = []
    try:
        sites: dict[str, dict[str, str]] = {}
        for site, path in enumerate(key_paths):
            key = X25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            _create(path, pem, mode=0o600, written=written)
            sites[str(site)] = {"public_key": base64.b64encode(_raw(key.public_key())).decode(),
                                "fingerprint": fingerprint(key.public_key())}
        document = {"format": FORMAT, "version": VERSION, "sites": sites}
        _create(out / PUBLIC_FILE, (json.dumps(document, indent=2) + "\n").encode(), mode=0o644,
                written=written)
    except BaseException as exc:
        for path in written:  # no half-written set left behind to block the next attempt
            path.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk, a read-only directory
            raise KeyFileError(f"cannot write the identity set in {out}: "
                               f"{exc.strerror or exc}; nothing was written") from None
        raise
    return written


def load_public_keys(key_dir: str | Path) -> dict[int, X25519PublicKey]:
    """Every site's public key from ``key_dir/public.json``, checked."""
    path = Path(key_dir) / PUBLIC_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeyFileError(f"identity file {path} does not exist; {CREATE_HINT} in DIR") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read identity file {path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:  # also an int too long, nested too deep
        raise KeyFileError(f"{path} is not valid JSON ({exc or 'nested too deep'}); "
                           f"{CREATE_HINT}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT \
            or document.get("version") != VERSION:
        got = ({k: document.get(k) for k in ("format", "version")}
               if isinstance(document, dict) else type(document).__name__)
        raise KeyFileError(f"{path} is not a {FORMAT} version {VERSION} file; got {got}")
    entries = document.get("sites")
    if not isinstance(entries, dict) or len(entries) < 2:
        raise KeyFileError(f"{path}: 'sites' must map at least 2 site indexes to keys")
    keys = {_site_index(name, path=path): entry for name, entry in entries.items()}
    if sorted(keys) != list(range(len(keys))):
        raise KeyFileError(f"{path}: site indexes must be 0..{len(keys) - 1} without gaps; "
                           f"got {sorted(keys)}")
    return {site: _public_key(keys[site], site=site, path=path) for site in sorted(keys)}


def load_identity(key_dir: str | Path, site: int, *,
                  public_keys: Mapping[int, X25519PublicKey]) -> X25519PrivateKey:
    """The private key of ``site``, refused unless private (0600) and listed in public.json."""
    if site not in public_keys:
        raise KeyFileError(f"site {site} is not listed in {PUBLIC_FILE} (it lists sites "
                           f"{_span(public_keys)}): the identity set was made for fewer sites")
    path = Path(key_dir) / key_file_name(site)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyFileError(f"identity key file {path} for site {site} does not exist; "
                           f"{CREATE_HINT} and each site gets its own site-NNN.key") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read identity key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:  # mode checked on the file actually read
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise KeyFileError(f"identity key file {path} is readable by others (mode "
                               f"{mode:04o}); refusing to use it: run 'chmod 600 {path}'")
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, X25519PrivateKey):
        raise KeyFileError(f"{path} is not an unencrypted X25519 PEM private key: a foreign key "
                           f"file, not one written by 'fedsilo keys --identity'")
    if _raw(key.public_key()) != _raw(public_keys[site]):
        raise KeyFileError(f"{path.name} does not match the public key listed for site {site} "
                           f"in {PUBLIC_FILE}: a foreign or replaced key ({path})")
    return key


def _create(path: Path, data: bytes, *, mode: int, written: list[Path]) -> None:
    # created with its final mode (O_EXCL: never an existing file), so a private key is
    # never readable by others, even briefly; fchmod undoes a stricter umask
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:  # created by someone else since the check
        raise KeyFileError(f"{path} appeared while writing the identity set; refusing to "
                           f"overwrite it: choose another --out") from None
    written.append(path)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def _site_index(name: Any, *, path: Path) -> int:
    if not isinstance(name, str) or not name.isdigit() or name != str(int(name)):
        raise KeyFileError(f"{path}: site indexes must be decimal integers; got {name!r}")
    return int(name)


def _public_key(entry: Any, *, site: int, path: Path) -> X25519PublicKey:
    encoded = entry.get("public_key") if isinstance(entry, dict) else None
    if not isinstance(encoded, str):
        raise KeyFileError(f"{path}: site {site} has no 'public_key' string; got {entry!r}")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{path}: the public key of site {site} is not base64: "
                           f"{encoded!r}") from None
    if len(raw) != 32:
        raise KeyFileError(f"{path}: the public key of site {site} must be 32 raw bytes "
                           f"(X25519); got {len(raw)}")
    key = X25519PublicKey.from_public_bytes(raw)
    listed = entry.get("fingerprint")
    if listed is not None and listed != fingerprint(key):
        raise KeyFileError(f"{path}: the fingerprint of site {site} ({listed}) does not match "
                           f"its public key ({fingerprint(key)}): the file was edited")
    return key


def _raw(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _span(public_keys: Mapping[int, Any]) -> str:
    sites = sorted(public_keys)
    return f"{sites[0]}..{sites[-1]}" if sites else "none"
