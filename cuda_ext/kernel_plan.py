"""Host side of the CUDA copy kernels: the launch arguments for one batch, worked out once.

Shared by the CuPy copier (:mod:`.cupy_copier`) and the CPU emulation the tests compile from the same
kernel source, so the argument arithmetic that feeds the kernels is tested on every CI run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import torch

from .paged_kv import PagedKV

WORD_SIZES = (16, 8, 4, 2, 1)  # bytes a thread moves per access; the kernel file has one per size
THREADS_PER_BLOCK = 256
BLOCKS_PER_SM = 4  # resident blocks per SM a capped grid assumes (256 threads each)


def kernel_source() -> str:
    """The CUDA C text of ``kernels/kv_copy.cu`` (package data, compiled at run time by NVRTC)."""
    return resources.files("kvtier.cuda_ext").joinpath("kernels/kv_copy.cu").read_text()


def kernel_names() -> list[str]:
    """Every kernel the source defines, in the order the emulation's launch table expects."""
    return [f"kvt_{op}_{w}" for w in WORD_SIZES for op in ("gather", "scatter")]


def plane_table(paged: PagedKV) -> torch.Tensor:
    """int64 ``[planes, 4]``: base address and byte strides of (block, token, head) per plane.

    The dim of every plane must be unit-stride (a row of ``dim`` elements is contiguous), which
    every layout :class:`PagedKV` builds satisfies.
    """
    item = paged.keys[0].element_size()
    rows = []
    for i, plane in enumerate(paged.planes()):
        if plane.shape[3] > 1 and plane.stride(3) != 1:
            raise ValueError(f"plane {i}: the head dim must be unit-stride for the CUDA kernels, strides {plane.stride()}")
        rows.append([plane.data_ptr(), *(s * item for s in plane.stride()[:3])])
    return torch.tensor(rows, dtype=torch.int64)


def token_rows(chunk_ptrs: Sequence[int], token_counts: Sequence[int], heads: int, row_bytes: int) -> torch.Tensor:
    """int64 ``[tokens, 2]`` (host): for every token of the batch, the address of its (plane 0,
    head 0) row in its canonical chunk and the bytes between that chunk's planes. Chunks may lie
    anywhere and have different token counts: one launch still moves them all."""
    counts = torch.tensor(list(token_counts), dtype=torch.int64)
    ptrs = torch.tensor(list(chunk_ptrs), dtype=torch.int64)
    token_bytes = heads * row_bytes
    starts = torch.cumsum(counts, 0) - counts
    t = torch.arange(int(counts.sum()), dtype=torch.int64) - torch.repeat_interleave(starts, counts)
    base = torch.repeat_interleave(ptrs, counts) + t * token_bytes
    return torch.stack([base, torch.repeat_interleave(counts * token_bytes, counts)], dim=1)


def batch_chunk_ptrs(chunks: torch.Tensor) -> list[int]:
    """Addresses of the chunks of a ``[n, L, P, T, H, D]`` batch (each chunk contiguous)."""
    step = chunks.stride(0) * chunks.element_size()
    return [chunks.data_ptr() + i * step for i in range(chunks.shape[0])]


def batch_rows(paged: PagedKV, chunks: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Chunk addresses and :func:`token_rows` (host) of a ``[n, L, P, T, H, D]`` batch."""
    ptrs = batch_chunk_ptrs(chunks)
    return ptrs, token_rows(ptrs, [chunks.shape[3]] * chunks.shape[0], paged.heads, paged.row_bytes)


def list_rows(paged: PagedKV, chunks: Sequence[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """Chunk addresses and :func:`token_rows` (host) of separate contiguous ``[L, P, T_i, H, D]`` chunks."""
    ptrs = [c.data_ptr() for c in chunks]
    return ptrs, token_rows(ptrs, [c.shape[2] for c in chunks], paged.heads, paged.row_bytes)


@dataclass(frozen=True)
class CopyLaunch:
    """One kernel launch: its name, grid and the scalar arguments in kernel order."""

    kernel: str
    grid: int
    block: int
    table_ptr: int
    slots_ptr: int
    rows_ptr: int
    num_tokens: int
    plane_begin: int
    plane_end: int
    heads: int
    words_per_row: int
    block_size: int

    def args(self) -> tuple[int, ...]:
        return (self.table_ptr, self.slots_ptr, self.rows_ptr, self.num_tokens, self.plane_begin, self.plane_end,
                self.heads, self.words_per_row, self.block_size)


def plan_copy(op: str, paged: PagedKV, table: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor,
              chunk_ptrs: Sequence[int], planes: range, max_blocks: int,
              host_table: torch.Tensor | None = None) -> CopyLaunch:
    """Arguments for ``op`` ("gather" or "scatter") of one batch over ``planes``.

    ``table`` is :func:`plane_table` of ``paged`` on the kernel's device (``host_table``: the same
    on the host, read for the alignment so that planning never waits for the device); ``slots``
    (int64 ``[tokens]``) and ``rows`` (:func:`token_rows` of ``chunk_ptrs``) are on that device.
    ``max_blocks`` caps the grid (the SM cap); the kernel's grid-stride loop covers every token.
    """
    if op not in ("gather", "scatter"):
        raise ValueError(f"op must be 'gather' or 'scatter', got {op!r}")
    if not planes or planes.step != 1 or planes.start < 0 or planes.stop > paged.num_layers * paged.kv_planes:
        raise ValueError(f"plane range {planes} not within [0, {paged.num_layers * paged.kv_planes})")
    num_tokens = slots.numel()
    if tuple(rows.shape) != (num_tokens, 2):
        raise ValueError(f"token rows of shape {tuple(rows.shape)} for {num_tokens} tokens")
    row_bytes = paged.row_bytes
    host_rows = (table if host_table is None else host_table)[planes.start : planes.stop]
    word = _word_size([row_bytes, *chunk_ptrs, *host_rows.reshape(-1).tolist()])
    return CopyLaunch(
        kernel=f"kvt_{op}_{word}", grid=max(1, min(num_tokens, max_blocks)), block=THREADS_PER_BLOCK,
        table_ptr=table.data_ptr(), slots_ptr=slots.data_ptr(), rows_ptr=rows.data_ptr(), num_tokens=num_tokens,
        plane_begin=planes.start, plane_end=planes.stop, heads=paged.heads, words_per_row=row_bytes // word,
        block_size=paged.block_size)


def _word_size(values: list[int]) -> int:
    """The widest access size dividing every address, stride and row length (all in bytes)."""
    for word in WORD_SIZES:
        if all(v % word == 0 for v in values):
            return word
    return 1
