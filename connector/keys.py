"""Chunk keys: SGLang's page hash chain over the tokens, wrapped with a namespace digest.

A key names the KV of one chunk of tokens *given everything before it*, so equal keys mean equal
KV. It is built in two steps, so that vLLM (which sees token ids) and SGLang (which hands its
storage backend only its own page hashes) name a chunk identically:

- the token chain, exactly SGLang's ``get_hash_str`` chained page by page with chunk-sized pages:
  ``t_0 = sha256(tokens of chunk 0)``, ``t_i = sha256(t_{i-1} || tokens of chunk i)``, token ids
  as little-endian uint32, no seed;
- the storage key ``sha256(namespace digest || t_i)`` (hex): everything that changes the bytes of
  the KV (model, dtype, layout, sharding, chunk size, format version, salt) is in the namespace.

The SGLang backend receives ``t_i`` (hex) as the page key and applies only the second step, which
is why kvtier's ``chunk_size`` must equal SGLang's page size for the two engines to share chunks.
Nothing here depends on Python's ``hash()``, so keys agree across processes, hosts and engines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import msgpack
import numpy as np

FORMAT_VERSION = 2  # 2: storage key = sha256(namespace || SGLang-compatible token chain)
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


def make_namespace(*, model: str, kv_dtype: str, layout: str, num_layers: int, kv_heads: int, head_dim: int,
                   tp_size: int, tp_rank: int, chunk_size: int, salt: str = "") -> KeyNamespace:
    """The namespace both engine adapters build, so that equal KV gets equal keys in either engine.

    An MLA latent cache ("mla") is the same on every tensor-parallel rank, so it is named once
    (TP size 1, rank 0) whatever the sharding: any rank, and any TP size, finds the same chunks.
    """
    if layout == "mla":
        tp_size, tp_rank = 1, 0
    return KeyNamespace(model=model, kv_dtype=kv_dtype, layout=layout, num_layers=num_layers, kv_heads=kv_heads,
                        head_dim=head_dim, tp_size=tp_size, tp_rank=tp_rank, chunk_size=chunk_size, salt=salt)


def tokens_to_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32, the byte form that every key is hashed over."""
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in uint32")
    return arr.astype("<u4", copy=False).tobytes()


def chain_hash(prev: bytes, tokens: Sequence[int] | np.ndarray) -> bytes:
    """One link of the token chain: ``sha256(prev || tokens as uint32 LE)``; ``prev`` is ``b""``
    for the first chunk (SGLang's unseeded chain)."""
    h = hashlib.sha256(prev)
    h.update(tokens_to_bytes(tokens))
    return h.digest()


def token_chain(tokens: Sequence[int] | np.ndarray, chunk_size: int, include_partial: bool = False) -> list[bytes]:
    """The digests ``t_i`` of every full chunk (and of the trailing partial one if asked).

    For ``chunk_size`` equal to SGLang's page size these are SGLang's page keys (as raw bytes).
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    arr = np.asarray(tokens)
    end = len(arr) if include_partial else len(arr) // chunk_size * chunk_size
    chain: list[bytes] = []
    prev = b""
    for start in range(0, end, chunk_size):
        prev = chain_hash(prev, arr[start : min(start + chunk_size, end)])
        chain.append(prev)
    return chain


def storage_key(namespace_digest: bytes, chain_digest: bytes) -> str:
    """The key a chunk is stored under: ``sha256(namespace digest || t_i)`` as hex."""
    if len(namespace_digest) != KEY_BYTES or len(chain_digest) != KEY_BYTES:
        raise ValueError("namespace and chain digests must be 32 bytes")
    return hashlib.sha256(namespace_digest + chain_digest).hexdigest()


def page_key_digest(page_key: str) -> bytes:
    """An SGLang page key (64 hex digits) as the 32-byte ``t_i``; ValueError for anything else."""
    if not isinstance(page_key, str) or len(page_key) != 2 * KEY_BYTES:
        raise ValueError(f"not a sha256 page key: {page_key!r:.80}")
    return bytes.fromhex(page_key)


def chunk_keys(
    namespace_digest: bytes,
    tokens: Sequence[int] | np.ndarray,
    chunk_size: int,
    include_partial: bool = False,
) -> list[str]:
    """Hex keys for the chunks of ``tokens``: every full chunk, and the trailing partial one if asked.

    A partial chunk's link hashes fewer token bytes than a full one, so its key never equals a
    full chunk's key.
    """
    if len(namespace_digest) != KEY_BYTES:
        raise ValueError("namespace digest must be 32 bytes")
    return [storage_key(namespace_digest, t) for t in token_chain(tokens, chunk_size, include_partial)]
