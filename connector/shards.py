"""A prompt's chain of chunk digests, and lookups that hold for every shard of an engine.

An engine split over processes (tensor-parallel ranks, pipeline stages) stores one chunk per shard
for each chunk of tokens, under per-shard keys, and each shard's chunks are written by its own
process at its own pace. A scheduler that promised a hit on rank 0's chunks alone would promise
tokens another rank cannot load yet (it then recomputes them all while the engine reports them
cached). So the scheduler asks for every shard's key of each chunk at once, chunk-major
(``k0/r0, k0/r1, ..., k1/r0, ...``), in one prefix lookup: ``leading keys // shards`` is then
exactly the number of leading chunks that *every* shard holds. Engine-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kvtier.chunk_format.keys import KeyNamespace, salted_digest, storage_key, token_chain
from kvtier.storage_backends.tiered import TieredStore


@dataclass(frozen=True)
class PromptChain:
    """The chain digests ``t_i`` of a prompt's chunks: every full chunk, then the partial tail if any."""

    num_tokens: int
    chunk_size: int
    digests: tuple[bytes, ...]

    @classmethod
    def of(cls, tokens: Sequence[int] | np.ndarray, chunk_size: int,
           extras: Mapping[int, bytes] | None = None) -> PromptChain:
        return cls(len(tokens), chunk_size, tuple(token_chain(tokens, chunk_size, True, extras)))


class ShardSet:
    """The namespaces of every shard of one engine (deduplicated: MLA ranks share one)."""

    def __init__(self, namespaces: Sequence[KeyNamespace]) -> None:
        if not namespaces:
            raise ValueError("ShardSet needs at least one namespace")
        self.namespaces = tuple(dict.fromkeys(namespaces))  # equal namespaces: one shard

    def __len__(self) -> int:
        return len(self.namespaces)

    def keys(self, chain: Sequence[bytes], salt: str = "") -> list[str]:
        """Every shard's key of every chunk, chunk-major."""
        digests = [salted_digest(ns, salt) for ns in self.namespaces]
        return [storage_key(ns, t) for t in chain for ns in digests]

    def held_tokens(self, store: TieredStore, chain: PromptChain, salt: str = "") -> int:
        """Leading tokens of the prompt whose chunks every shard holds (a stored tail counts too)."""
        return sum(tokens for _, tokens in self.held_runs(store, chain, salt))

    def held_runs(self, store: TieredStore, chain: PromptChain, salt: str = "",
                  observe: Callable[[str, float], None] | None = None) -> list[tuple[str, int]]:
        """:meth:`held_tokens` as runs of (tier, tokens) from token 0 (a chunk counts in the tier
        where its last shard was found); ``observe`` as :meth:`TieredStore.contains_by_tier`."""
        if not chain.digests:
            return []
        shards = len(self.namespaces)
        runs, keys_seen, tokens_seen = [], 0, 0
        for tier, count in store.contains_by_tier(self.keys(chain.digests, salt), observe):
            keys_seen += count
            tokens = min(chain.num_tokens, keys_seen // shards * chain.chunk_size) - tokens_seen
            if tokens > 0:
                runs.append((tier, tokens))
                tokens_seen += tokens
        return runs
