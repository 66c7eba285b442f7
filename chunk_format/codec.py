"""The stored form of a chunk: magic, header length, header checksum, msgpack header, zero padding
to a 64-byte boundary, raw bytes (aligned, so copy kernels and vectorised copies read whole words).

Decoding trusts nothing: every field is type- and range-checked and every size is bounded before
anything is allocated, so a corrupt, truncated or hostile blob becomes a :class:`ChunkCorrupt`
(which the stores count and turn into a miss). No pickle, no ``torch.load``.

With an integrity key (``integrity.py`` here) the header also carries ``mac``, a keyed MAC of
the payload and of the fields ``_mac_fields`` lists; a reader with a key rejects a chunk whose MAC
is missing or wrong, a reader without one ignores it. A new header field that decides how the
payload is used must be added to ``_mac_fields``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING

import msgpack
import xxhash

from .dtypes import DTYPE_SIZES
from .integrity import MAC_BYTES
from .keys import FORMAT_VERSION

if TYPE_CHECKING:
    from .integrity import IntegrityKey

MAGIC = b"KVT\x01"
_PREFIX = struct.Struct("<4sIQ")  # magic, header length, xxh3-64 of the header bytes
PREFIX_BYTES = _PREFIX.size
MAX_HEADER_BYTES = 64 * 1024
MAX_HEAD_BYTES = PREFIX_BYTES + MAX_HEADER_BYTES  # read this much of a blob to see any header
MAX_PAYLOAD_BYTES = 4 * 1024**3
MAX_DIMS = 8
PAYLOAD_ALIGN = 64
_HEX = frozenset("0123456789abcdef")


class ChunkCorrupt(ValueError):
    """A stored blob that is not a valid chunk (truncated, tampered, wrong key, unknown format)."""


@dataclass(frozen=True)
class ChunkHeader:
    """What a chunk says about itself; ``key`` ties the bytes to the name they are stored under."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    layout: str
    model: str
    num_tokens: int
    checksum: int
    version: int = FORMAT_VERSION
    shard: str = ""  # which part of the model's KV: tensor/pipeline rank and layers (KeyNamespace.shard_id)
    mac: bytes = b""  # keyed MAC (see integrity.py); empty when written without an integrity key

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class Chunk:
    """A decoded chunk: its header and a read-only view of its payload bytes."""

    header: ChunkHeader
    payload: memoryview


def payload_checksum(payload: memoryview | bytes) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def _mac_fields(version: int, key: str, dtype: str, shape: tuple[int, ...], layout: str, model: str,
                num_tokens: int, shard: str, nbytes: int) -> list:
    """What the MAC covers besides the payload: every field that decides how the payload is used."""
    return [version, key, dtype, list(shape), layout, model, num_tokens, shard, nbytes]


def encode_header(
    key: str, dtype: str, shape: tuple[int, ...], layout: str, model: str, num_tokens: int,
    payload: memoryview | bytes, *, shard: str = "", mac_key: IntegrityKey | None = None,
) -> bytes:
    """The prefix + msgpack header for ``payload``; the stored blob is this followed by the payload.
    With ``mac_key`` the header carries the chunk's keyed MAC."""
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"unsupported dtype {dtype!r}; allowed: {sorted(DTYPE_SIZES)}")
    nbytes = memoryview(payload).nbytes
    expected = prod(shape) * DTYPE_SIZES[dtype]
    if nbytes != expected:
        raise ValueError(f"payload has {nbytes} bytes but shape {shape} of {dtype} needs {expected}")
    values = {
        "v": FORMAT_VERSION,
        "key": key,
        "dtype": dtype,
        "shape": list(shape),
        "layout": layout,
        "model": model,
        "tokens": num_tokens,
        "shard": shard,
        "nbytes": nbytes,
        "xxh3": payload_checksum(payload),
    }
    if mac_key is not None:  # hex: readers that predate the MAC accept strings, not bin fields
        fields = _mac_fields(FORMAT_VERSION, key, dtype, shape, layout, model, num_tokens, shard, nbytes)
        values["mac"] = mac_key.mac(fields, payload).hex()
    header = msgpack.packb(values, use_bin_type=True)
    prefix = _PREFIX.pack(MAGIC, len(header), xxhash.xxh3_64_intdigest(header))
    return prefix + header + bytes(payload_offset(len(header)) - PREFIX_BYTES - len(header))


def header_end(head: memoryview | bytes) -> int:
    """Bytes up to the end of the header that a blob starting with ``head`` declares (0: not a chunk).

    For stores that read a header with a range read (Redis ``GETRANGE``) before the whole blob; the
    header itself is validated by :func:`decode_header`, which this does not replace."""
    view = memoryview(head).cast("B")
    if view.nbytes < PREFIX_BYTES or bytes(view[:4]) != MAGIC:
        return 0
    _magic, header_len, _sum = _PREFIX.unpack_from(view, 0)
    return PREFIX_BYTES + min(header_len, MAX_HEADER_BYTES)


def payload_offset(header_len: int) -> int:
    """Where the payload starts: after prefix and header, rounded up to ``PAYLOAD_ALIGN``."""
    return -(-(PREFIX_BYTES + header_len) // PAYLOAD_ALIGN) * PAYLOAD_ALIGN


def encode_chunk(
    key: str, dtype: str, shape: tuple[int, ...], layout: str, model: str, num_tokens: int,
    payload: memoryview | bytes, *, shard: str = "", mac_key: IntegrityKey | None = None,
) -> bytearray:
    """One contiguous blob (header and payload together, so no reader ever sees half a chunk)."""
    head = encode_header(key, dtype, shape, layout, model, num_tokens, payload, shard=shard, mac_key=mac_key)
    out = bytearray(len(head) + memoryview(payload).nbytes)
    out[: len(head)] = head
    out[len(head) :] = memoryview(payload).cast("B")
    return out  # a bytearray: converting to bytes would copy the payload once more


def write_header_before(
    buffer: memoryview, payload_start: int, key: str, dtype: str, shape: tuple[int, ...], layout: str, model: str,
    num_tokens: int, *, shard: str = "", mac_key: IntegrityKey | None = None,
) -> int | None:
    """Make a chunk around a payload already in place: ``buffer[payload_start:]`` holds it (exactly its
    bytes), and the header is written just before it, so the payload is never copied. Returns where
    the blob starts in ``buffer`` (``buffer[start:]`` is then the chunk, byte for byte what
    :func:`encode_chunk` makes), or None if the header does not fit before ``payload_start``."""
    payload = buffer[payload_start:]
    head = encode_header(key, dtype, shape, layout, model, num_tokens, payload, shard=shard, mac_key=mac_key)
    start = payload_start - len(head)
    if start < 0:
        return None
    buffer[start:payload_start] = head
    return start


def _field(header: dict, name: str, kind: type | tuple[type, ...]):
    value = header.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ChunkCorrupt(f"header field {name!r} missing or of wrong type")
    return value


def decode_header(blob: memoryview | bytes) -> tuple[ChunkHeader, int]:
    """Parse and validate the header; returns it and the offset where the payload starts."""
    view = memoryview(blob).cast("B")
    if view.nbytes < PREFIX_BYTES:
        raise ChunkCorrupt("blob shorter than the chunk prefix")
    magic, header_len, header_sum = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise ChunkCorrupt("bad magic: not a kvtier chunk")
    if header_len > MAX_HEADER_BYTES or PREFIX_BYTES + header_len > view.nbytes:
        raise ChunkCorrupt(f"header length {header_len} out of bounds")
    if xxhash.xxh3_64_intdigest(view[PREFIX_BYTES : PREFIX_BYTES + header_len]) != header_sum:
        raise ChunkCorrupt("header checksum mismatch")
    try:
        raw = msgpack.unpackb(
            view[PREFIX_BYTES : PREFIX_BYTES + header_len],
            raw=False, strict_map_key=True,
            max_array_len=MAX_DIMS, max_map_len=32, max_str_len=4096, max_bin_len=0, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ChunkCorrupt(f"header is not valid msgpack: {exc}") from None
    if not isinstance(raw, dict):
        raise ChunkCorrupt("header is not a map")
    version = _field(raw, "v", int)
    if version != FORMAT_VERSION:
        raise ChunkCorrupt(f"unsupported chunk format version {version}")
    dtype = _field(raw, "dtype", str)
    if dtype not in DTYPE_SIZES:
        raise ChunkCorrupt(f"unknown dtype {dtype!r}")
    shape_list = _field(raw, "shape", list)
    if not 1 <= len(shape_list) <= MAX_DIMS or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_PAYLOAD_BYTES for d in shape_list
    ):
        raise ChunkCorrupt("shape must be 1-8 positive ints")
    shape = tuple(shape_list)
    nbytes = _field(raw, "nbytes", int)
    if not 0 < nbytes <= MAX_PAYLOAD_BYTES or nbytes != prod(shape) * DTYPE_SIZES[dtype]:
        raise ChunkCorrupt("payload size disagrees with shape and dtype")
    checksum = _field(raw, "xxh3", int)
    if not 0 <= checksum < 2**64:
        raise ChunkCorrupt("checksum out of range")
    num_tokens = _field(raw, "tokens", int)
    if num_tokens < 0:
        raise ChunkCorrupt("negative token count")
    shard = raw.get("shard", "")
    if not isinstance(shard, str):
        raise ChunkCorrupt("header field 'shard' of wrong type")
    mac = raw.get("mac", "")
    if not isinstance(mac, str) or len(mac) not in (0, 2 * MAC_BYTES) or not all(c in _HEX for c in mac):
        raise ChunkCorrupt("header field 'mac' is not a hex MAC")
    header = ChunkHeader(
        key=_field(raw, "key", str), dtype=dtype, shape=shape, layout=_field(raw, "layout", str),
        model=_field(raw, "model", str), num_tokens=num_tokens, checksum=checksum, version=version, shard=shard,
        mac=bytes.fromhex(mac),
    )
    return header, payload_offset(header_len)


def decode_chunk(blob: memoryview | bytes, expected_key: str, verify_checksum: bool = True,
                 mac_key: IntegrityKey | None = None) -> Chunk:
    """Validate a stored blob fully and return its header and payload view.

    ``verify_checksum=False`` is for host-memory tiers whose reads return exactly what was written
    (the cpu and node tiers; then the MAC is not checked either). With ``mac_key`` a chunk without a valid MAC is corrupt: it was
    written without the key, with another key, or changed since (xxh3 alone an attacker recomputes).
    """
    header, offset = decode_header(blob)
    if header.key != expected_key:
        raise ChunkCorrupt(f"chunk stored under {expected_key[:16]}... names key {header.key[:16]}...")
    view = memoryview(blob).cast("B")
    if view.nbytes - offset != header.nbytes:
        raise ChunkCorrupt(f"payload is {view.nbytes - offset} bytes, header says {header.nbytes}")
    header_end = PREFIX_BYTES + _PREFIX.unpack_from(view, 0)[1]
    if any(view[header_end:offset]):
        raise ChunkCorrupt("padding after the header is not zero")
    payload = view[offset:]
    if verify_checksum and payload_checksum(payload) != header.checksum:
        raise ChunkCorrupt("payload checksum mismatch")
    if verify_checksum and mac_key is not None:
        if not header.mac:
            raise ChunkCorrupt("chunk has no integrity MAC (written without the integrity key)")
        fields = _mac_fields(header.version, header.key, header.dtype, header.shape, header.layout, header.model,
                             header.num_tokens, header.shard, header.nbytes)
        if not mac_key.verify(fields, payload, header.mac):
            raise ChunkCorrupt("integrity MAC mismatch (written with another key, or changed since)")
    return Chunk(header=header, payload=payload.toreadonly())
