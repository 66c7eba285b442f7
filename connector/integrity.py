"""Keyed chunk MACs: with a shared secret, whoever can write a store cannot inject KV into it.

A chunk's xxh3 checksums catch damage, not forgery: anyone who can write a shared disk folder or a
Redis that many clients reach can write a well-formed chunk, with checksums, under any key. With an
integrity key (config ``integrity_key_file`` or ``integrity_key_env``) every writer also puts a
keyed MAC into the header and every reader rejects a chunk whose MAC is missing or wrong, as a
counted corrupt chunk (a miss). The MAC covers the payload and every header field that decides how
the payload is used (see ``codec._mac_fields``), so neither the bytes nor their interpretation can
be changed. Readers without a key ignore MACs, and the process-local cpu tier is not re-checked.

The MAC is keyed BLAKE3 (the ``blake3`` package, single-threaded so it never competes with the
engine for cores): about 3 GB/s per core on 1-8 MiB chunks where keyed BLAKE2b (``hashlib``) does
0.6 GB/s (``benchmarks/integrity_bench.py``). Its 32-byte key is derived from the secret with
BLAKE3's key-derivation mode, so a secret of any length works and the secret itself is not kept.

The secret never appears in a log line, a metric, an exception or a ``repr``; the config holds only
where it comes from (a path or a variable name), never the secret.
"""

from __future__ import annotations

import hmac
import os
import stat
from collections.abc import Mapping, Sequence

import msgpack

try:  # a dependency of kvtier; imported softly so that only configuring a key needs it
    import blake3
except ImportError:  # pragma: no cover - an install without it (e.g. a GPU machine's own environment)
    blake3 = None

from kvtier.config import ConfigError, KVTierConfig

from .codec import MAC_BYTES

MIN_SECRET_BYTES = 16
MAX_KEY_FILE_BYTES = 64 * 1024
_KDF_CONTEXT = "kvtier chunk MAC key v1"
_DOMAIN = b"kvtier chunk mac v1\x00"  # separates this use of the key from any other


class IntegrityKey:
    """A shared secret, as the derived MAC key. Its ``repr`` names only where it came from; it is
    not picklable, so it never leaves the process that read it."""

    __slots__ = ("_key", "source")

    def __init__(self, secret: bytes, source: str = "") -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"an integrity key needs at least {MIN_SECRET_BYTES} bytes")
        if blake3 is None:
            raise ConfigError("invalid kvtier config: an integrity key needs the blake3 package (pip install blake3)")
        self._key = blake3.blake3(secret, derive_key_context=_KDF_CONTEXT).digest()
        self.source = source  # e.g. "integrity_key_file /etc/kvtier/key": for messages, never the secret

    def __repr__(self) -> str:
        return f"IntegrityKey(source={self.source!r})"

    __str__ = __repr__

    def __reduce_ex__(self, protocol: object) -> tuple:
        raise TypeError("an IntegrityKey holds a secret and cannot be pickled")

    def mac(self, fields: Sequence[object], payload: memoryview | bytes) -> bytes:
        """The MAC of ``fields`` (msgpack-able header values, in a fixed order) and ``payload``.
        The packed fields are length-prefixed, so no two (fields, payload) pairs share an input."""
        packed = msgpack.packb(list(fields), use_bin_type=True)
        h = blake3.blake3(_DOMAIN, key=self._key)
        h.update(len(packed).to_bytes(4, "little"))
        h.update(packed)
        h.update(payload)
        return h.digest(MAC_BYTES)

    def verify(self, fields: Sequence[object], payload: memoryview | bytes, tag: bytes) -> bool:
        """Whether ``tag`` is the MAC of ``fields`` and ``payload`` (constant-time compare)."""
        return hmac.compare_digest(self.mac(fields, payload), tag)


def load_integrity_key(config: KVTierConfig, environ: Mapping[str, str] | None = None) -> IntegrityKey | None:
    """The integrity key ``config`` names (None without one). Raises :class:`ConfigError` naming the
    config key and the path or variable name, never the secret."""
    if config.integrity_key_file is not None:
        return IntegrityKey(_read_key_file(config.integrity_key_file),
                            f"integrity_key_file {config.integrity_key_file}")
    if config.integrity_key_env is not None:
        name = config.integrity_key_env
        value = (os.environ if environ is None else environ).get(name)
        where = f"invalid kvtier config: integrity_key_env = {name!r}"
        if value is None:
            raise ConfigError(f"{where}: the environment variable {name} is not set (it must hold the shared "
                              f"secret, at least {MIN_SECRET_BYTES} bytes)")
        return IntegrityKey(_checked_secret(os.fsencode(value), where, f"the environment variable {name}"),
                            f"integrity_key_env {name}")
    return None


def _read_key_file(path: str) -> bytes:
    """The secret in ``path``: a regular file that only its owner may read or write."""
    where = f"invalid kvtier config: integrity_key_file = {path!r}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file (it must hold the shared secret, at least "
                          f"{MIN_SECRET_BYTES} bytes, mode 0600)") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot open it ({exc.strerror})") from None
    try:
        info = os.fstat(fd)  # of what was opened: no race with a rename in between
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{where}: not a regular file")
        if info.st_mode & 0o066:
            raise ConfigError(f"{where}: readable or writable by group or others (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}); allowed: only its owner (chmod 600)")
        data = b""
        while len(data) <= MAX_KEY_FILE_BYTES:
            part = os.read(fd, MAX_KEY_FILE_BYTES + 1 - len(data))
            if not part:
                break
            data += part
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_KEY_FILE_BYTES} bytes: not a key file")
    return _checked_secret(data, where, "the file")


def _checked_secret(secret: bytes, where: str, what: str) -> bytes:
    """``secret`` without a trailing newline (``echo KEY > file`` and ``KEY`` in the environment
    are one key), refused if empty or shorter than ``MIN_SECRET_BYTES``."""
    secret = secret.rstrip(b"\r\n")
    if not secret:
        raise ConfigError(f"{where}: {what} is empty (it must hold the shared secret, at least "
                          f"{MIN_SECRET_BYTES} bytes)")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"{where}: the secret in {what} is shorter than {MIN_SECRET_BYTES} bytes (make one "
                          "with: head -c 32 /dev/urandom | base64)")
    return secret
