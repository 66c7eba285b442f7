"""``type: memo``: chunks in a dict, at most ``max_chunks`` of them, oldest dropped first.

The smallest complete kvtier tier plug-in (tests/test_tier_plugins.py installs it): settings with
one key of its own, a backend with the batched prefix interface, and the :class:`TierType` that the
``kvtier.tiers`` entry point names. Only memory, so it is process-local.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from kvtier.storage_backends import StorageBackend, TierContext, TierSettings, TierType
from kvtier.storage_backends.base import Buffer
from kvtier.storage_backends.metrics import TierMetrics


class MemoTier(TierSettings):
    """The YAML keys of a memo tier: ``type``, ``name`` and ``max_chunks``."""

    type: Literal["memo"] = "memo"
    name: str = "memo"
    max_chunks: int = Field(default=1024, ge=1)


class MemoBackend(StorageBackend):
    """A dict of blobs, LRU within ``max_chunks``; a memory tier has no medium that can fail."""

    process_local = True

    def __init__(self, max_chunks: int, *, name: str, metrics: TierMetrics) -> None:
        super().__init__(name, metrics)
        self.max_chunks = max_chunks
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def contains(self, keys: Sequence[str]) -> int:
        start = time.perf_counter()
        with self._lock:
            hits = next((i for i, key in enumerate(keys) if key not in self._blobs), len(keys))
        self.metrics.lookup(len(keys), hits, time.perf_counter() - start)
        return hits

    def get(self, keys: Sequence[str]) -> list[Buffer | None]:
        start = time.perf_counter()
        with self._lock:
            out: list[Buffer | None] = [self._blobs.get(key) for key in keys]
            for key in keys:
                if key in self._blobs:
                    self._blobs.move_to_end(key)
        hits = [b for b in out if b is not None]
        self.metrics.got(len(hits), len(keys) - len(hits), sum(len(b) for b in hits), time.perf_counter() - start)
        return out

    def put(self, items: Sequence[tuple[str, Buffer]]) -> int:
        start = time.perf_counter()
        with self._lock:
            for key, blob in items:
                self._blobs[key] = bytes(blob)  # a copy: the caller may reuse its buffer
                self._blobs.move_to_end(key)
            while len(self._blobs) > self.max_chunks:
                _, dropped = self._blobs.popitem(last=False)
                self.metrics.evicted(1, len(dropped))
            self.metrics.usage(sum(len(b) for b in self._blobs.values()), len(self._blobs))
        self.metrics.put(len(items), 0, sum(len(memoryview(b).cast("B")) for _, b in items), time.perf_counter() - start)
        return len(items)

    def delete(self, keys: Sequence[str]) -> int:
        with self._lock:
            return sum(self._blobs.pop(key, None) is not None for key in keys)

    def close(self) -> None:
        with self._lock:
            self._blobs.clear()


def _build(cfg: MemoTier, ctx: TierContext) -> MemoBackend:
    return MemoBackend(cfg.max_chunks, name=cfg.name, metrics=ctx.metrics)


TIER = TierType("memo", MemoTier, _build, process_local=True,
                describe=lambda cfg: ("process memory", f"{cfg.max_chunks} chunks"))
