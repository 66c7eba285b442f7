"""Where a save gathers its chunks: each payload just after room for its header, in one host buffer.

A stored chunk is one contiguous blob, header then payload. Gathering into a tensor and encoding
the blob copied every payload a second time (after zero-filling the blob), into memory just
allocated, which the kernel then faults in page by page. Here a run of equally long chunks is
gathered straight into their blobs' places: chunk ``j`` of the run at ``j * slot_bytes + HEADROOM``
of one buffer, so its header is written into the room before it (``codec.write_header_before``) and
the payload is never copied again. On CPU the buffer comes from a :class:`BufferPool`, so a save
reuses memory an earlier one touched, and goes back to the pool once every blob of it has reached
its tiers; for a CUDA cache it is pinned (torch's host allocator reuses pinned blocks), so the copy
kernels write it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
import torch

from kvtier.chunk_format.codec import PAYLOAD_ALIGN
from kvtier.storage_backends.buffer_pool import DEFAULT_KEPT_BYTES, BufferPool

HEADROOM = 4096  # room for a chunk's header before its payload (a header that does not fit is copied)


@dataclass
class GatherRun:
    """``count`` chunks of one shape in one buffer: ``out`` is the copy layer's view of their payloads."""

    buffer: np.ndarray  # uint8, writable until :meth:`GatherBuffers.blobs`
    slot_bytes: int
    payload_bytes: int
    out: torch.Tensor  # [count, *chunk_shape]; out[j] is contiguous, chunks ``slot_bytes`` apart
    owner: np.ndarray | None  # the pool's buffer that ``buffer`` views (None: pinned, not pooled)

    def slot(self, j: int) -> memoryview:
        """Chunk ``j``'s room and payload (writable): the payload starts at ``HEADROOM``."""
        start = j * self.slot_bytes
        return memoryview(self.buffer)[start : start + HEADROOM + self.payload_bytes]


class GatherBuffers:
    """Buffers for saves (one per store). Thread-safe."""

    def __init__(self, kept_bytes: int = DEFAULT_KEPT_BYTES) -> None:
        self._pool = BufferPool(kept_bytes)

    def take(self, count: int, chunk_shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> GatherRun:
        """Room for ``count`` chunks of ``chunk_shape``; ``pinned`` for a CUDA cache's copy kernels."""
        itemsize = dtype.itemsize
        payload = prod(chunk_shape) * itemsize
        slot = HEADROOM + -(-payload // PAYLOAD_ALIGN) * PAYLOAD_ALIGN  # every payload starts aligned
        owner = None if pinned else self._pool.take(count * slot)
        if owner is None:  # the copy layer writes the pinned tensor itself; blobs read it through numpy
            raw = torch.empty(count * slot, dtype=torch.uint8, pin_memory=True)
            buffer = raw.numpy()
        else:
            buffer = owner[: count * slot]
            raw = torch.from_numpy(buffer)
        chunk_strides = torch.empty(chunk_shape, device="meta").stride()  # contiguous, nothing allocated
        out = raw.view(dtype).as_strided((count, *chunk_shape), (slot // itemsize, *chunk_strides),
                                         HEADROOM // itemsize)
        return GatherRun(buffer, slot, payload, out, owner)

    def blobs(self, run: GatherRun, starts: list[int]) -> list[memoryview]:
        """The run's blobs, read-only, once every header is written: blob ``j`` from ``starts[j]`` of
        its slot. A pooled buffer goes back to the pool when the last of them is gone."""
        whole = run.buffer if run.owner is None else self._pool.hand_out(run.owner, run.buffer.size)
        view = memoryview(whole).toreadonly()
        end = HEADROOM + run.payload_bytes
        return [view[j * run.slot_bytes + start : j * run.slot_bytes + end] for j, start in enumerate(starts)]
