"""Save, look up and load a request's KV by token prefix: the engine-agnostic core of a connector.

An engine adapter hands over token ids, the engine's paged cache (as a ``PagedKV``) and, for each
chunk, the slots that hold it (token slots, or block ids for opaque layouts); this class names the
chunks with the prefix key chain, moves the KV through the copy layer and keeps it in the tiers.
Nothing here knows vLLM or SGLang.

The last chunk of a token list may be partial (fewer than ``chunk_size`` tokens): it gets its own
key (a chain link over fewer token bytes), so it is found only by a request with exactly the same
tokens — which is what lets a repeated prompt, or a decode instance, load all but its last token.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np
import torch

from kvtier.cuda_ext import KVCopier, PagedKV
from kvtier.storage_backends.tiered import TieredStore

from .codec import Chunk, encode_chunk
from .keys import KeyNamespace, chunk_keys

log = logging.getLogger(__name__)

Tokens = Sequence[int] | np.ndarray
_MAX_SALTS = 1024


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the name used in namespaces and chunk headers."""
    return str(dtype).removeprefix("torch.")


def split_slots(token_slots: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """Per-chunk slot tensors of a flat token-slot tensor (the last one may be shorter)."""
    return list(torch.split(token_slots, chunk_size))


class ChunkStore:
    """Prefix-keyed KV chunks of one model shard (one namespace) in a :class:`TieredStore`."""

    def __init__(self, store: TieredStore, namespace: KeyNamespace, copier: KVCopier) -> None:
        self.store = store
        self.namespace = namespace
        self.copier = copier
        self.chunk_size = namespace.chunk_size
        self._digests: dict[str, bytes] = {}
        self._digests_lock = threading.Lock()

    def digest(self, salt: str = "") -> bytes:
        """The namespace digest for a request salt (cache_salt, LoRA adapter...), cached."""
        with self._digests_lock:
            found = self._digests.get(salt)
            if found is None:
                if len(self._digests) >= _MAX_SALTS:
                    self._digests.clear()
                ns = dataclasses.replace(self.namespace, salt=f"{self.namespace.salt}\x00{salt}") if salt else self.namespace
                found = self._digests[salt] = ns.digest()
            return found

    def keys(self, tokens: Tokens, salt: str = "", include_partial: bool = False) -> list[str]:
        """Keys of the chunks of ``tokens`` (and of the trailing partial chunk if asked)."""
        return chunk_keys(self.digest(salt), tokens, self.chunk_size, include_partial)

    def lookup(self, tokens: Tokens, salt: str = "", include_partial: bool = True) -> int:
        """How many leading tokens the tiers hold (whole chunks; a stored partial tail counts too)."""
        keys = self.keys(tokens, salt, include_partial)
        return min(len(tokens), self.store.contains(keys) * self.chunk_size)

    def save(self, tokens: Tokens, paged: PagedKV, chunk_slots: Sequence[torch.Tensor], first_chunk: int = 0,
             salt: str = "", wait: bool = False) -> Future | int | None:
        """Gather chunks ``first_chunk, first_chunk + 1, ...`` (one slot tensor each) and store them.

        The gather happens now (the slots may be reused as soon as this returns); the tiers are
        written in the background unless ``wait`` (then: how many chunks the top tier stored).
        """
        if not chunk_slots:
            return 0 if wait else None
        self._check_paged(paged)
        keys = self._range_keys(tokens, salt, first_chunk, len(chunk_slots))
        items = []
        for start, group in _same_length_runs(chunk_slots):
            slots = torch.stack(list(group))
            out = torch.empty((len(group), *paged.chunk_shape(slots.shape[1])), dtype=paged.dtype, device="cpu")
            self.copier.gather(paged, slots, out=out)
            for j, chunk in enumerate(out):
                index = first_chunk + start + j
                key = keys[start + j]
                items.append((key, encode_chunk(key, self.namespace.kv_dtype, tuple(chunk.shape), paged.format_id,
                                                self.namespace.model, self._tokens_in(tokens, index), _as_bytes(chunk))))
        return self.store.put(items) if wait else self.store.put_async(items)

    def load(self, tokens: Tokens, paged: PagedKV, chunk_slots: Sequence[torch.Tensor], first_chunk: int = 0,
             salt: str = "", skip_units: int = 0) -> int:
        """Load chunks ``first_chunk, ...`` into their slots; the first ``skip_units`` slots of the
        first chunk are left alone (they already hold this KV, e.g. from the engine's own cache).

        Returns how many leading chunks were loaded; a missing, corrupt or mismatched chunk ends
        the prefix there (the engine recomputes from that point).
        """
        if not chunk_slots:
            return 0
        self._check_paged(paged)
        keys = self._range_keys(tokens, salt, first_chunk, len(chunk_slots))
        found = self.store.get(keys)
        usable = 0
        for j, (key, chunk) in enumerate(zip(keys, found)):
            expected = (paged.chunk_shape(len(chunk_slots[j])), self._tokens_in(tokens, first_chunk + j))
            if chunk is None or not self._matches(key, chunk, *expected, paged):
                break
            usable += 1
        for j in range(usable):  # straight from the tier's buffer (a zero-copy view for the cpu tier)
            skip = skip_units if j == 0 else 0
            chunk = _payload_tensor(found[j], paged.dtype)
            self.copier.scatter(chunk[None, :, :, skip:], paged, chunk_slots[j][None, skip:])
        return usable

    def _range_keys(self, tokens: Tokens, salt: str, first: int, count: int) -> list[str]:
        include_partial = first + count > len(tokens) // self.chunk_size
        keys = self.keys(tokens, salt, include_partial)[first : first + count]
        if len(keys) != count:
            raise ValueError(f"{count} chunks from chunk {first} asked, but {len(tokens)} tokens make {len(keys) + first}")
        return keys

    def _tokens_in(self, tokens: Tokens, index: int) -> int:
        return min(self.chunk_size, len(tokens) - index * self.chunk_size)

    def _check_paged(self, paged: PagedKV) -> None:
        """The namespace names the chunk format (``format_id``), not the engine's layout, so NHD,
        HND and SGLang pools holding the same KV share chunks."""
        if dtype_name(paged.dtype) != self.namespace.kv_dtype or paged.format_id != self.namespace.layout:
            raise ValueError(
                f"paged KV ({dtype_name(paged.dtype)}, {paged.format_id}) does not match the key namespace "
                f"({self.namespace.kv_dtype}, {self.namespace.layout})")

    def _matches(self, key: str, chunk: Chunk, shape: tuple[int, ...], num_tokens: int, paged: PagedKV) -> bool:
        h = chunk.header
        if (h.dtype, h.shape, h.layout, h.num_tokens) == (self.namespace.kv_dtype, shape, paged.format_id, num_tokens):
            return True
        log.warning("kvtier: chunk %s... has format (%s, %s, %s, %d tokens), expected (%s, %s, %s, %d); recomputing",
                    key[:16], h.dtype, h.shape, h.layout, h.num_tokens, self.namespace.kv_dtype, shape,
                    paged.format_id, num_tokens)
        return False


def _same_length_runs(chunk_slots: Sequence[torch.Tensor]) -> list[tuple[int, list[torch.Tensor]]]:
    """Consecutive chunks with equally many slots, so each run is one batched copy."""
    runs: list[tuple[int, list[torch.Tensor]]] = []
    for i, slots in enumerate(chunk_slots):
        if runs and len(runs[-1][1][0]) == len(slots):
            runs[-1][1].append(slots)
        else:
            runs.append((i, [slots]))
    return runs


def _payload_tensor(chunk: Chunk, dtype: torch.dtype) -> torch.Tensor:
    """The chunk's payload as a tensor of its shape, sharing the (read-only) bytes: it is only read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(chunk.payload, dtype=torch.uint8)
    return flat.view(dtype).view(chunk.header.shape)


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (any dtype, bf16 and fp8 included), without a copy."""
    return memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())
