"""Per-token reference copies: slow and obviously correct, the oracle for every faster copier.

Used by the tests of the torch copier and later of the CUDA kernels; never in a serving path.
"""

from __future__ import annotations

import torch

from .paged_kv import PagedKV, as_int_view


def reference_gather(paged: PagedKV, slots: torch.Tensor) -> torch.Tensor:
    """Chunks ``[num_chunks, layers, kv_planes, tokens, heads, dim]`` on CPU, token by token."""
    n, t = slots.shape
    out = torch.zeros((n, *paged.chunk_shape(t)), dtype=paged.dtype)
    dst = as_int_view(out)
    planes = [as_int_view(p).cpu() for p in paged.planes()]
    for c in range(n):
        for j in range(t):
            block, offset = divmod(int(slots[c, j]), paged.block_size)
            for i, plane in enumerate(planes):
                layer, kv = divmod(i, paged.kv_planes)
                dst[c, layer, kv, j] = plane[block, offset]
    return out


def reference_scatter(chunks: torch.Tensor, paged: PagedKV, slots: torch.Tensor) -> None:
    """Write ``chunks`` into ``slots`` of every layer, one token at a time."""
    n, t = slots.shape
    src = as_int_view(chunks).cpu()
    for c in range(n):
        for j in range(t):
            block, offset = divmod(int(slots[c, j]), paged.block_size)
            for i, plane in enumerate(paged.planes()):
                layer, kv = divmod(i, paged.kv_planes)
                as_int_view(plane)[block, offset] = src[c, layer, kv, j].to(plane.device)
