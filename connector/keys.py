"""Chunk keys: a sha256 prefix chain seeded by a namespace digest.

A key names the KV of one chunk of tokens *given everything before it*, so equal keys mean equal
KV. Everything that changes the bytes of the KV (model, dtype, layout, sharding, chunk size,
format version, salt) goes into the namespace. Nothing here depends on Python's ``hash()``, so keys
agree across processes, hosts and engines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import msgpack
import numpy as np

FORMAT_VERSION = 1
KEY_BYTES = 32


@dataclass(frozen=True)
class KeyNamespace:
    """Everything that determines the bytes of a chunk besides its tokens."""

    model: str
    kv_dtype: str
    layout: str
    num_layers: int
    kv_heads: int  # per tensor-parallel rank
    head_dim: int
    tp_size: int
    tp_rank: int
    chunk_size: int
    format_version: int = FORMAT_VERSION
    salt: str = ""

    def __post_init__(self) -> None:
        for name in ("num_layers", "kv_heads", "head_dim", "tp_size", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KeyNamespace.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KeyNamespace.tp_rank {self.tp_rank} not in [0, {self.tp_size})")

    def digest(self) -> bytes:
        """A stable 32-byte digest: msgpack of the fields in declaration order."""
        fields = asdict(self)
        packed = msgpack.packb(["kvtier-namespace", list(fields.items())], use_bin_type=True)
        return hashlib.sha256(packed).digest()


def tokens_to_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32, the byte form that every key is hashed over."""
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in uint32")
    return arr.astype("<u4", copy=False).tobytes()


def chain_hash(prev: bytes, tokens: Sequence[int] | np.ndarray) -> bytes:
    """One link of the chain: ``sha256(prev || tokens as uint32 LE)``."""
    h = hashlib.sha256(prev)
    h.update(tokens_to_bytes(tokens))
    return h.digest()


def chunk_keys(
    namespace_digest: bytes,
    tokens: Sequence[int] | np.ndarray,
    chunk_size: int,
    include_partial: bool = False,
) -> list[str]:
    """Hex keys for the chunks of ``tokens``: every full chunk, and the trailing partial one if asked.

    A partial chunk hashes fewer token bytes than a full one, so its key never equals a full
    chunk's key.
    """
    if len(namespace_digest) != KEY_BYTES:
        raise ValueError("namespace digest must be 32 bytes")
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    arr = np.asarray(tokens)
    n_full = len(arr) // chunk_size
    end = len(arr) if include_partial else n_full * chunk_size
    keys: list[str] = []
    prev = namespace_digest
    for start in range(0, end, chunk_size):
        prev = chain_hash(prev, arr[start : min(start + chunk_size, end)])
        keys.append(prev.hex())
    return keys
