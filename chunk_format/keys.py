"""Chunk keys: SGLang's page hash chain over the tokens, wrapped with a namespace digest.

A key names the KV of one chunk of tokens *given everything before it*, so equal keys mean equal
KV. It is built in two steps, so that vLLM (which sees token ids) and SGLang (which hands its
storage backend only its own page hashes) name a chunk identically:

- the token chain, exactly SGLang's ``get_hash_str`` chained page by page with chunk-sized pages:
  ``t_0 = sha256(tokens of chunk 0)``, ``t_i = sha256(t_{i-1} || tokens of chunk i)``, token ids
  as little-endian uint32, no seed;
- the storage key ``sha256(namespace digest || t_i)`` (hex): everything that changes the bytes of
  the KV (model and its settings, dtype, layout, sharding, chunk size, format version, salt) is in
  the namespace.

Token ids alone do not always name the input: an engine gives every image of a prompt the same
placeholder tokens, and a prompt given as embeddings has no real tokens at all. Such a chunk's
link also hashes an *extra* (the identity and position of each multimodal item it overlaps, a
digest of its embeddings: :func:`chunk_extras`) in a domain-separated form; because the chain
carries it on, every later chunk differs too. Plain text links are unchanged, so text chunks stay
shared with SGLang.

The SGLang backend receives ``t_i`` (hex) as the page key and applies only the second step, which
is why kvtier's ``chunk_size`` must equal SGLang's page size for the two engines to share chunks.
Nothing here depends on Python's ``hash()``, so keys agree across processes, hosts and engines.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import msgpack
import numpy as np

FORMAT_VERSION = 2  # 2: storage key = sha256(namespace || SGLang-compatible token chain)
KEY_BYTES = 32
_EXTRA_TAG = b"kvtier-extra\x00"  # starts a link that hashes an extra; a plain link starts with t_{i-1} or a token


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
    pp_size: int = 1  # pipeline stages: each holds the KV of its own layers only
    pp_rank: int = 0
    first_layer: int = 0  # model index of the first layer whose KV this shard holds
    settings: str = ""  # digest of the model settings that change the KV (:func:`model_settings_digest`)

    def __post_init__(self) -> None:
        for name in ("num_layers", "kv_heads", "head_dim", "tp_size", "chunk_size", "pp_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KeyNamespace.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KeyNamespace.tp_rank {self.tp_rank} not in [0, {self.tp_size})")
        if not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"KeyNamespace.pp_rank {self.pp_rank} not in [0, {self.pp_size})")
        if self.first_layer < 0:
            raise ValueError(f"KeyNamespace.first_layer must be >= 0, got {self.first_layer}")

    @property
    def shard_id(self) -> str:
        """Which part of the model's KV a chunk of this namespace holds, e.g. ``tp1/2 pp0/2 layers0-15``;
        written into every chunk header and checked on load (a second guard besides the key)."""
        last = self.first_layer + self.num_layers - 1
        return f"tp{self.tp_rank}/{self.tp_size} pp{self.pp_rank}/{self.pp_size} layers{self.first_layer}-{last}"

    def digest(self) -> bytes:
        """A stable 32-byte digest: msgpack of the fields in declaration order."""
        fields = asdict(self)
        packed = msgpack.packb(["kvtier-namespace", list(fields.items())], use_bin_type=True)
        return hashlib.sha256(packed).digest()


def make_namespace(*, model: str, kv_dtype: str, layout: str, num_layers: int, kv_heads: int, head_dim: int,
                   tp_size: int, tp_rank: int, chunk_size: int, salt: str = "", pp_size: int = 1, pp_rank: int = 0,
                   first_layer: int = 0, settings: str = "") -> KeyNamespace:
    """The namespace both engine adapters build, so that equal KV gets equal keys in either engine.

    An MLA latent cache ("mla") is the same on every tensor-parallel rank, so it is named once
    (TP size 1, rank 0) whatever the sharding: any rank, and any TP size, finds the same chunks.
    Pipeline stages hold different layers, so the stage and its layer range always count.
    """
    if layout == "mla":
        tp_size, tp_rank = 1, 0
    return KeyNamespace(model=model, kv_dtype=kv_dtype, layout=layout, num_layers=num_layers, kv_heads=kv_heads,
                        head_dim=head_dim, tp_size=tp_size, tp_rank=tp_rank, chunk_size=chunk_size, salt=salt,
                        pp_size=pp_size, pp_rank=pp_rank, first_layer=first_layer, settings=settings)


@functools.lru_cache(maxsize=4096)
def salted_digest(namespace: KeyNamespace, salt: str = "") -> bytes:
    """The namespace digest under a request salt (cache_salt, LoRA adapter...): the config's own
    salt, then the request's, NUL-separated. Cached, as every lookup and transfer asks and salts repeat."""
    if salt:
        namespace = dataclasses.replace(namespace, salt=f"{namespace.salt}\x00{salt}")
    return namespace.digest()


@dataclass(frozen=True)
class ModelSettings:
    """The engine settings besides the weights' name that change the KV a model computes.

    Both engine adapters fill it from their own options with the same meanings, so that engines run
    alike share chunks and engines run differently never do: a persistent store (disk, Redis) must
    never serve KV computed under another revision, quantization, KV-cache dtype or scale source,
    or with overridden model config (rope scaling and the like).
    """

    revision: str | None = None  # the weights' revision (hub commit, branch or tag)
    code_revision: str | None = None  # the revision of the model's code, when it comes with the weights
    quantization: str | None = None  # weight/activation quantization method
    kv_cache_dtype: str = "auto"  # the engine's KV-cache dtype option ("auto" = the model's dtype)
    model_dtype: str | None = None  # counted with a quantized KV cache, where it no longer shows in kv_dtype
    kv_scales: str = "checkpoint"  # where quantized-KV scales come from
    overrides: Mapping[str, object] = field(default_factory=dict)  # model-config overrides (hf_overrides...)

    def digest(self) -> str:
        """A stable hex digest; the empty string for an engine run with every default (so plain
        deployments keep one namespace whatever the engine)."""
        fields = asdict(self)
        if fields == asdict(ModelSettings()):
            return ""
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=repr)
        return hashlib.sha256(text.encode()).hexdigest()


def tokens_to_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32, the byte form that every key is hashed over."""
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in uint32")
    return arr.astype("<u4", copy=False).tobytes()


def chain_hash(prev: bytes, tokens: Sequence[int] | np.ndarray, extra: bytes = b"") -> bytes:
    """One link of the token chain: ``sha256(prev || tokens as uint32 LE)``; ``prev`` is ``b""``
    for the first chunk (SGLang's unseeded chain).

    With an ``extra`` (what besides the token ids makes this chunk's input, see
    :func:`chunk_extras`) the link is ``sha256(tag || msgpack([prev, token count, extra]) || tokens)``:
    msgpack delimits every part, and the tag cannot start a plain link (that starts with a digest,
    or with a token id far above any vocabulary), so no extra can pass for token bytes.
    """
    if extra:
        h = hashlib.sha256(_EXTRA_TAG)
        h.update(msgpack.packb([prev, len(tokens), extra], use_bin_type=True))
    else:
        h = hashlib.sha256(prev)
    h.update(tokens_to_bytes(tokens))
    return h.digest()


def token_chain(tokens: Sequence[int] | np.ndarray, chunk_size: int, include_partial: bool = False,
                extras: Mapping[int, bytes] | None = None) -> list[bytes]:
    """The digests ``t_i`` of every full chunk (and of the trailing partial one if asked).

    ``extras`` maps a chunk index to that chunk's extra (:func:`chain_hash`). Without extras, and
    for ``chunk_size`` equal to SGLang's page size, these are SGLang's page keys (as raw bytes).
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    arr = np.asarray(tokens)
    end = len(arr) if include_partial else len(arr) // chunk_size * chunk_size
    chain: list[bytes] = []
    prev = b""
    for index, start in enumerate(range(0, end, chunk_size)):
        prev = chain_hash(prev, arr[start : min(start + chunk_size, end)], (extras or {}).get(index, b""))
        chain.append(prev)
    return chain


@dataclass(frozen=True)
class PlacedItem:
    """A non-text input of a prompt (an image, an audio clip...): its identity (a content hash the
    engine computed) and the placeholder tokens it occupies."""

    identity: str
    offset: int
    length: int


def chunk_extras(num_tokens: int, chunk_size: int, items: Sequence[PlacedItem] = (),
                 embeds_digests: Mapping[int, bytes] | None = None) -> dict[int, bytes]:
    """Each chunk's extra: every item that overlaps the chunk, with its offset relative to the
    chunk's start (as vLLM's own block hashes do), and the chunk's embeddings digest if any.
    Chunks with neither have none (their links are plain)."""
    parts: dict[int, list] = {}
    for item in items:
        if item.length <= 0 or item.offset >= num_tokens:
            continue
        first, last = item.offset // chunk_size, (min(item.offset + item.length, num_tokens) - 1) // chunk_size
        for index in range(first, last + 1):
            parts.setdefault(index, []).append(["item", item.identity, item.offset - index * chunk_size, item.length])
    for index, digest in (embeds_digests or {}).items():
        parts.setdefault(index, []).append(["embeds", digest])
    return {index: msgpack.packb(sorted(p, key=repr), use_bin_type=True) for index, p in parts.items()}


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
