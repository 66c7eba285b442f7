"""The one interface every storage tier implements.

Backends store opaque blobs (encoded chunks, see ``kvtier.chunk_format.codec``) under hex keys. They
are batched because every caller works on a request's run of chunks, and prefix-shaped because a
chunk is useless without the chunks before it: ``contains`` answers how many *leading* keys are
present. A backend must never raise because its medium failed (Redis down, disk full, file
vanished): it returns misses or skips the store and counts the error in its metrics. Bad arguments
may raise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Union

from .metrics import TierMetrics

# Anything exposing the buffer protocol: bytes, bytearray, memoryview, numpy arrays.
Buffer = Union[bytes, bytearray, memoryview]  # noqa: UP007 (a runtime alias)


class StorageBackend(ABC):
    """A batched key -> blob store with prefix lookups. Thread-safe."""

    #: Bytes never leave this process (a host-memory pool): no other process sees them, and no
    #: medium can stall a call.
    process_local: bool = False
    #: ``get`` returns what ``put`` stored, bit for bit, unless this host's memory or kvtier itself is
    #: broken: host memory that only the tier's own code writes (the cpu tier; the node tier, whose
    #: server never frees slots under a reader or writer). Reads then skip the payload checksum and
    #: MAC. False for anything with a medium in between: files, a network, a store other users reach.
    intact_reads: bool = False

    def __init__(self, name: str, metrics: TierMetrics) -> None:
        self.name = name
        self.metrics = metrics

    @abstractmethod
    def contains(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, counted from the first, are present (stop at the first miss)."""

    @abstractmethod
    def get(self, keys: Sequence[str]) -> list[Buffer | None]:
        """The blob stored under each key, or None for a miss."""

    @abstractmethod
    def put(self, items: Sequence[tuple[str, Buffer]]) -> int:
        """Store each (key, blob); returns how many were stored (the rest were skipped)."""

    @abstractmethod
    def delete(self, keys: Sequence[str]) -> int:
        """Remove the keys; returns how many were present."""

    def close(self) -> None:
        """Release connections, files and memory. Idempotent."""

    def stats(self) -> dict[str, float]:
        """Counters of this tier (the same numbers its Prometheus metrics export)."""
        return self.metrics.snapshot()
