"""Tier reads as ``bytes``, for comparing with what was stored: a tier's ``get`` may return any buffer
(a numpy view of a pool or of a receive buffer), and a numpy array compares element by element."""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.storage_backends.base import StorageBackend


def fetched(backend: StorageBackend, keys: Sequence[str]) -> list[bytes | None]:
    """``backend.get(keys)`` with every blob as ``bytes``."""
    return [None if blob is None else bytes(blob) for blob in backend.get(keys)]
