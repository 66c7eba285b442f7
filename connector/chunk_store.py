"""Save, look up and load a request's KV by token prefix: the engine-agnostic core of a connector.

An engine adapter hands over token ids, the engine's paged cache (as a ``PagedKV``) and the slot
of each token; this class cuts the tokens into chunks, names them with the prefix key chain,
moves the KV through the copy layer and keeps it in the tiers. Nothing here knows vLLM or SGLang.
"""

from __future__ import annotations

import logging
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


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the name used in namespaces and chunk headers."""
    return str(dtype).removeprefix("torch.")


class ChunkStore:
    """Prefix-keyed KV chunks of one model shard (one namespace) in a :class:`TieredStore`."""

    def __init__(self, store: TieredStore, namespace: KeyNamespace, copier: KVCopier) -> None:
        self.store = store
        self.namespace = namespace
        self.copier = copier
        self.chunk_size = namespace.chunk_size
        self._digest = namespace.digest()

    def keys(self, tokens: Tokens) -> list[str]:
        """Keys of the full chunks of ``tokens``."""
        return chunk_keys(self._digest, tokens, self.chunk_size)

    def lookup(self, tokens: Tokens) -> int:
        """How many leading tokens the tiers hold, in whole chunks."""
        return self.store.contains(self.keys(tokens)) * self.chunk_size

    def save(self, tokens: Tokens, paged: PagedKV, token_slots: torch.Tensor, skip_chunks: int = 0,
             wait: bool = False) -> Future | int | None:
        """Gather the full chunks from ``skip_chunks`` on and store them.

        ``wait=False`` returns at once (the tiers are written by background threads);
        ``wait=True`` returns how many chunks the top tier stored.
        """
        keys = self.keys(tokens)[skip_chunks:]
        if not keys:
            return 0 if wait else None
        self._check_paged(paged)
        first, count = skip_chunks * self.chunk_size, len(keys) * self.chunk_size
        slots = token_slots[first : first + count].view(len(keys), self.chunk_size)
        chunks = self.copier.gather(paged, slots, out=torch.empty(
            (len(keys), *paged.chunk_shape(self.chunk_size)), dtype=paged.dtype, device="cpu"))
        items = [
            (key, encode_chunk(key, self.namespace.kv_dtype, tuple(chunk.shape), paged.format_id,
                               self.namespace.model, self.chunk_size, _as_bytes(chunk)))
            for key, chunk in zip(keys, chunks)
        ]
        if wait:
            return self.store.put(items)
        return self.store.put_async(items)

    def load(self, tokens: Tokens, paged: PagedKV, token_slots: torch.Tensor, num_chunks: int) -> int:
        """Load the first ``num_chunks`` chunks into the slots of their tokens.

        Returns how many leading chunks were loaded; a missing, corrupt or mismatched chunk ends
        the prefix there (the engine recomputes from that point).
        """
        self._check_paged(paged)
        keys = self.keys(tokens)[:num_chunks]
        shape = paged.chunk_shape(self.chunk_size)
        found = self.store.get(keys)
        usable = 0
        for key, chunk in zip(keys, found):
            if chunk is None or not self._matches(key, chunk, shape, paged):
                break
            usable += 1
        if not usable:
            return 0
        staging = torch.empty((usable, *shape), dtype=paged.dtype)
        flat = staging.view(torch.uint8).view(usable, -1).numpy()
        for i, chunk in enumerate(found[:usable]):
            flat[i] = np.frombuffer(chunk.payload, dtype=np.uint8)
        slots = token_slots[: usable * self.chunk_size].view(usable, self.chunk_size)
        self.copier.scatter(staging, paged, slots)
        return usable

    def _check_paged(self, paged: PagedKV) -> None:
        """The namespace names the chunk format (``format_id``), not the engine's layout, so NHD,
        HND and SGLang pools holding the same KV share chunks."""
        if dtype_name(paged.dtype) != self.namespace.kv_dtype or paged.format_id != self.namespace.layout:
            raise ValueError(
                f"paged KV ({dtype_name(paged.dtype)}, {paged.format_id}) does not match the key namespace "
                f"({self.namespace.kv_dtype}, {self.namespace.layout})")

    def _matches(self, key: str, chunk: Chunk, shape: tuple[int, ...], paged: PagedKV) -> bool:
        h = chunk.header
        if (h.dtype, h.shape, h.layout, h.num_tokens) == (self.namespace.kv_dtype, shape, paged.format_id, self.chunk_size):
            return True
        log.warning("kvtier: chunk %s... has format (%s, %s, %s), expected (%s, %s, %s); recomputing",
                    key[:16], h.dtype, h.shape, h.layout, self.namespace.kv_dtype, shape, paged.format_id)
        return False


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (any dtype, bf16 and fp8 included), without a copy."""
    return memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())
