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
where it comes from (a path or a variable name), never the secret. Reading it from there is the
core's job (``kvtier.connector.integrity_key``); this module only computes and checks MACs.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

import msgpack

try:  # a dependency of kvtier; imported softly so that only configuring a key needs it
    import blake3
except ImportError:  # pragma: no cover - an install without it (e.g. a GPU machine's own environment)
    blake3 = None

MIN_SECRET_BYTES = 16
MAC_BYTES = 32  # the tag in a chunk header's ``mac`` field
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
            raise RuntimeError("an integrity key needs the blake3 package (pip install blake3)")
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


def blake3_available() -> bool:
    """Whether MACs can be computed here (the ``blake3`` package is importable)."""
    return blake3 is not None
