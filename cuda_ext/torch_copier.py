"""The torch implementation of :class:`~.copier.KVCopier`: CPU, and GPU through torch.

Per layer plane, one ``index_select`` / ``index_copy_`` over token slots (or advanced indexing on
(block, offset) pairs when a layout's block and offset dims do not merge, e.g. vLLM HND). No
Python loop per token or block. Every tensor is viewed as the *widest* integer dtype its strides
allow (up to 8 bytes), so fp8/bf16 move as raw bytes and each element copied is a whole word:
about 10x faster on CPU than indexing 2-byte elements.
"""

from __future__ import annotations

import torch

from .copier import CopyDone, KVCopier
from .paged_kv import PagedKV

_WIDE = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


class TorchCopier(KVCopier):
    """Vectorised torch indexing; cross-device transfers are one blocking ``copy_`` per batch."""

    def _gather(self, paged: PagedKV, slots: torch.Tensor, out: torch.Tensor, planes: range) -> CopyDone:
        n, t = slots.shape
        same = out.device == paged.device
        staging = out if same else torch.empty(out.shape, dtype=out.dtype, device=paged.device)
        views = paged.planes()
        wide = widest_int_dtype([*views, staging])
        dst = staging.view(wide)
        index = _SlotIndex(paged, slots)
        for i in planes:
            layer, kv = divmod(i, paged.kv_planes)
            rows = index.take(views[i].view(wide))  # [n * t, heads, words]
            dst[:, layer, kv].copy_(rows.view(n, t, *rows.shape[1:]))
        if not same:
            layers = paged.layer_slice(planes)
            out.view(wide)[:, layers].copy_(dst[:, layers])
        return CopyDone()

    def _scatter(self, chunks: torch.Tensor, paged: PagedKV, slots: torch.Tensor, planes: range) -> CopyDone:
        n, t = slots.shape
        src = chunks.to(paged.device)  # one copy when the chunks live elsewhere
        views = paged.planes()
        wide = widest_int_dtype([*views, src])
        src = src.view(wide)
        index = _SlotIndex(paged, slots)
        for i in planes:
            layer, kv = divmod(i, paged.kv_planes)
            rows = src[:, layer, kv]
            index.put(views[i].view(wide), rows.reshape(n * t, *rows.shape[2:]))
        return CopyDone()


class _SlotIndex:
    """Flat slot ids plus their (block, offset) split, computed once per batch."""

    def __init__(self, paged: PagedKV, slots: torch.Tensor) -> None:
        self.flat = slots.reshape(-1)
        self.num_slots = paged.num_slots
        self.block = self.flat // paged.block_size
        self.offset = self.flat % paged.block_size

    def take(self, plane: torch.Tensor) -> torch.Tensor:
        merged = _slot_major(plane, self.num_slots)
        if merged is not None:
            return torch.index_select(merged, 0, self.flat)
        return plane[self.block, self.offset]

    def put(self, plane: torch.Tensor, rows: torch.Tensor) -> None:
        merged = _slot_major(plane, self.num_slots)
        if merged is not None:
            merged.index_copy_(0, self.flat, rows)
        else:
            plane[self.block, self.offset] = rows


def _slot_major(plane: torch.Tensor, num_slots: int) -> torch.Tensor | None:
    """``plane`` as ``[slots, heads, dim]`` when blocks and offsets merge into one strided dim."""
    blocks, size = plane.shape[:2]
    if blocks == 1 or size == 1 or plane.stride(0) == size * plane.stride(1):
        return plane.view(num_slots, *plane.shape[2:])
    return None


def widest_int_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """The widest integer dtype that every tensor (same dtype) can be *viewed* as, item size at
    least: the last dim must be unit-stride and all strides, offsets and pointers aligned."""
    item = tensors[0].element_size()
    for size, dtype in _WIDE:
        if size < item:
            break
        if size == item or all(_can_widen(t, size) for t in tensors):
            return dtype
    raise TypeError(f"unsupported KV item size {item}")


def _can_widen(t: torch.Tensor, size: int) -> bool:
    item = t.element_size()
    if t.dim() == 0 or t.stride(-1) != 1 or (t.shape[-1] * item) % size:
        return False
    if t.data_ptr() % size or (t.storage_offset() * item) % size:
        return False
    return all((s * item) % size == 0 for s in t.stride()[:-1])
