"""Host side of the CUDA copy kernels: the launch arguments for one batch, worked out once.

Shared by the CuPy copier (:mod:`.cupy_copier`) and the CPU emulation the tests compile from the same
kernel source, so the argument arithmetic that feeds the kernels is tested on every CI run.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class CopyLaunch:
    """One kernel launch: its name, grid and the scalar arguments in kernel order."""

    kernel: str
    grid: int
    block: int
    table_ptr: int
    slots_ptr: int
    chunks_ptr: int
    chunk_stride: int  # bytes
    num_tokens: int
    tokens_per_chunk: int
    plane_begin: int
    plane_end: int
    heads: int
    words_per_row: int
    block_size: int

    def args(self) -> tuple[int, ...]:
        return (self.table_ptr, self.slots_ptr, self.chunks_ptr, self.chunk_stride, self.num_tokens,
                self.tokens_per_chunk, self.plane_begin, self.plane_end, self.heads, self.words_per_row,
                self.block_size)


def plan_copy(op: str, paged: PagedKV, table: torch.Tensor, slots: torch.Tensor, chunks: torch.Tensor,
              planes: range, max_blocks: int, host_table: torch.Tensor | None = None) -> CopyLaunch:
    """Arguments for ``op`` ("gather" or "scatter") of ``chunks`` ``[n, L, P, T, H, D]`` over ``planes``.

    ``table`` is :func:`plane_table` of ``paged`` on the kernel's device (``host_table``: the same
    on the host, read for the alignment so that planning never waits for the device), ``slots`` a
    contiguous int64 ``[n, T]`` on that device; each ``chunks[i]`` must be contiguous.
    ``max_blocks`` caps the grid (the SM cap); the kernel's grid-stride loop covers every token.
    """
    if op not in ("gather", "scatter"):
        raise ValueError(f"op must be 'gather' or 'scatter', got {op!r}")
    n, t = slots.shape
    item = chunks.element_size()
    row_bytes = paged.dim * item
    chunk_stride = chunks.stride(0) * item if n > 1 else chunks[0].numel() * item
    if not planes or planes.step != 1 or planes.start < 0 or planes.stop > paged.num_layers * paged.kv_planes:
        raise ValueError(f"plane range {planes} not within [0, {paged.num_layers * paged.kv_planes})")
    rows = (table if host_table is None else host_table)[planes.start : planes.stop]
    word = _word_size([row_bytes, chunk_stride, chunks.data_ptr(), *rows.reshape(-1).tolist()])
    return CopyLaunch(
        kernel=f"kvt_{op}_{word}", grid=max(1, min(n * t, max_blocks)), block=THREADS_PER_BLOCK,
        table_ptr=table.data_ptr(), slots_ptr=slots.data_ptr(), chunks_ptr=chunks.data_ptr(),
        chunk_stride=chunk_stride, num_tokens=n * t, tokens_per_chunk=t, plane_begin=planes.start,
        plane_end=planes.stop, heads=paged.heads, words_per_row=row_bytes // word, block_size=paged.block_size)


def _word_size(values: list[int]) -> int:
    """The widest access size dividing every address, stride and row length (all in bytes)."""
    for word in WORD_SIZES:
        if all(v % word == 0 for v in values):
            return word
    return 1
