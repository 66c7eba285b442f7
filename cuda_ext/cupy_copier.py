"""The CUDA implementation of :class:`~.copier.KVCopier`: kvtier's copy kernels run through CuPy.

The kernels (``kernels/kv_copy.cu``) are compiled at run time by NVRTC through ``cupy.RawModule``
(CuPy caches the binary on disk, ``~/.cupy/kernel_cache``), so ``pip install kvtier[cuda]`` needs
no compiler. One launch moves a whole batch: every layer (or a layer range), every chunk.

Host-side chunks are reached in one of two ways (``host_access``):

* ``"direct"``: the kernel reads or writes *pinned* host memory through its device-mapped address
  (zero-copy, as SGLang's and LMCache's kernels do): no device staging buffer, one pass over
  PCIe. Chunks that are not pinned fall back to staging.
* ``"staged"``: the kernel works on a device staging buffer, and one ``cudaMemcpyAsync`` moves the
  whole batch between it and host memory.

``benchmarks/copy_bench.py`` measures both. Everything is enqueued on the caller's current CUDA
stream, so a caller that wants stores off the forward pass's stream runs them under
``torch.cuda.stream(side_stream)``; the ``*_async`` methods return a :class:`CudaCopyDone`.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import weakref

import numpy as np
import torch

from .copier import CopyDone, CudaCopyDone, KVCopier, ScatterBatch
from .kernel_plan import (
    BLOCKS_PER_SM,
    CopyLaunch,
    batch_rows,
    kernel_source,
    list_rows,
    plan_copy,
    plane_table,
)
from .paged_kv import PagedKV

log = logging.getLogger(__name__)

HOST_ACCESS = ("direct", "staged")
NVRTC_OPTIONS = ("--std=c++14",)


def cupy_available() -> bool:
    """CuPy is importable (the ``kvtier[cuda]`` extra)."""
    return importlib.util.find_spec("cupy") is not None


class CupyCopier(KVCopier):
    """Batched gather/scatter kernels on one CUDA device.

    ``max_sms`` caps the SMs the copy kernels occupy (the grid is ``max_sms * BLOCKS_PER_SM`` blocks
    at most), so copies running beside the forward pass leave it the rest of the GPU.
    """

    def __init__(self, device: torch.device | str, *, max_sms: int | None = None,
                 host_access: str = "direct") -> None:
        import cupy  # noqa: F401  (fails here, with CuPy's own message, if the extra is missing)

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CupyCopier needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if host_access not in HOST_ACCESS:
            raise ValueError(f"host_access must be one of {HOST_ACCESS}, got {host_access!r}")
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        if max_sms is not None and max_sms <= 0:
            raise ValueError(f"max_sms must be positive, got {max_sms}")
        self.max_sms = min(sms, max_sms or sms)
        if host_access == "direct" and not _host_pointers_usable(self.device.index):
            log.warning("kvtier: %s cannot use host pointers of registered memory; copying through device "
                        "staging buffers instead (gpu.host_access: staged)", self.device)
            host_access = "staged"
        self.host_access = host_access
        self._module = None
        self._lock = threading.Lock()
        self._tables: weakref.WeakKeyDictionary[PagedKV, tuple[torch.Tensor, torch.Tensor]] = weakref.WeakKeyDictionary()

    # -- KVCopier ------------------------------------------------------------------------------
    def _gather(self, paged: PagedKV, slots: torch.Tensor, out: torch.Tensor, planes: range) -> CopyDone:
        self._check_device(paged)
        if out.device == paged.device or self._direct(out):
            self._launch_batch("gather", paged, slots, out, planes)
            return self._done(slots, out)
        staging = torch.empty(out.shape, dtype=out.dtype, device=paged.device)
        self._launch_batch("gather", paged, slots, staging, planes)
        layers = paged.layer_slice(planes)
        out[:, layers].copy_(staging[:, layers], non_blocking=out.is_pinned())  # one DMA
        return self._done(slots, out, staging)

    def _scatter(self, chunks: torch.Tensor, paged: PagedKV, slots: torch.Tensor, planes: range) -> CopyDone:
        self._check_device(paged)
        if not _chunks_contiguous(chunks):
            chunks = chunks.contiguous()  # on its own device: a pageable copy of pinned chunks is staged
        if chunks.device != paged.device and not self._direct(chunks):
            staging = torch.empty(chunks.shape, dtype=chunks.dtype, device=paged.device)
            layers = paged.layer_slice(planes)
            staging[:, layers].copy_(chunks[:, layers], non_blocking=chunks.is_pinned())  # one DMA, these layers only
            self._launch_batch("scatter", paged, slots, staging, planes)
            return self._done(slots, chunks, staging)
        self._launch_batch("scatter", paged, slots, chunks, planes)
        return self._done(slots, chunks)

    def _scatter_batch(self, batch: ScatterBatch, planes: range) -> CopyDone:
        """One launch for every chunk of the batch, wherever each lies: on first use the chunks
        are made reachable by the kernel (pinned, or on the device for ``staged``) and the slot and
        token-row tables are moved to the device once, for all the layer-by-layer calls."""
        if batch.prepared is None:
            batch.prepared = self._prepare(batch)
        slots, rows, ptrs, keep = batch.prepared
        self._launch("scatter", batch.paged, slots, rows, ptrs, planes)
        return self._done(slots, rows, *keep)

    def _prepare(self, batch: ScatterBatch) -> tuple[torch.Tensor, torch.Tensor, list[int], list[torch.Tensor]]:
        paged = batch.paged
        self._check_device(paged)
        chunks = []
        for chunk in batch.chunks:
            chunk = chunk if chunk.is_contiguous() else chunk.contiguous()
            if chunk.device != paged.device and not self._direct(chunk):
                pinned = chunk if chunk.is_pinned() else chunk.pin_memory()
                chunk = pinned.to(paged.device, non_blocking=True) if self.host_access == "staged" else pinned
            chunks.append(chunk)
        ptrs, rows = list_rows(paged, chunks)
        slots = torch.cat(batch.slots)  # on the device already (prepare_scatter checked them)
        return slots, _to_device(rows, self.device), ptrs, chunks

    def _launch_batch(self, op: str, paged: PagedKV, slots: torch.Tensor, chunks: torch.Tensor, planes: range) -> None:
        """A ``[n, L, P, T, H, D]`` batch (each chunk contiguous) against ``[n, T]`` slots."""
        ptrs, rows = batch_rows(paged, chunks)
        self._launch(op, paged, slots.reshape(-1), _to_device(rows, self.device), ptrs, planes)

    # -- internals -----------------------------------------------------------------------------
    def _direct(self, host: torch.Tensor) -> bool:
        return self.host_access == "direct" and host.device.type == "cpu" and host.is_pinned()

    def _check_device(self, paged: PagedKV) -> None:
        if paged.device != self.device:
            raise ValueError(f"cache on {paged.device}, but this copier runs on {self.device}")

    def _launch(self, op: str, paged: PagedKV, slots: torch.Tensor, rows: torch.Tensor, ptrs: list[int],
                planes: range) -> None:
        import cupy

        host_table, table = self._tables_of(paged)
        launch = plan_copy(op, paged, table, slots, rows, ptrs, planes, self.max_sms * BLOCKS_PER_SM, host_table)
        kernel = self._function(launch.kernel)
        # CuPy launches on its current stream: make it the caller's current torch stream.
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream, self.device.index)
        with cupy.cuda.Device(self.device.index), stream:
            kernel((launch.grid,), (launch.block,), _kernel_args(launch))

    def _tables_of(self, paged: PagedKV) -> tuple[torch.Tensor, torch.Tensor]:
        """The plane table on the host (for planning, no device sync) and on the device (for the
        kernel), built once per cache (the cache never moves)."""
        with self._lock:
            tables = self._tables.get(paged)
            if tables is None:
                host = plane_table(paged)
                tables = self._tables[paged] = (host, host.to(self.device))
            return tables

    def _function(self, name: str):  # -> cupy.RawKernel
        import cupy

        with self._lock:
            if self._module is None:
                with cupy.cuda.Device(self.device.index):
                    self._module = cupy.RawModule(code=kernel_source(), options=NVRTC_OPTIONS)
            return self._module.get_function(name)

    def _done(self, *keep: torch.Tensor) -> CudaCopyDone:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return CudaCopyDone(event, keep)


def _host_pointers_usable(device_index: int) -> bool:
    """Whether the kernels may dereference pinned host pointers as they are (unified addressing with
    registered memory at the CPU's addresses: the cpu tier's pool is registered, not allocated)."""
    import cupy

    attr = cupy.cuda.runtime.cudaDevAttrCanUseHostPointerForRegisteredMem
    return bool(cupy.cuda.runtime.deviceGetAttribute(attr, device_index))


def _chunks_contiguous(chunks: torch.Tensor) -> bool:
    n = chunks.shape[0]
    return n == 0 or (chunks[0].is_contiguous() and (n == 1 or chunks.stride(0) >= chunks[0].numel()))


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host table to the device without making the host wait for the stream (pinned copy)."""
    return host.pin_memory().to(device, non_blocking=True)


def _kernel_args(launch: CopyLaunch) -> tuple:
    """The kernel's C argument types: three pointers, one 64-bit and five 32-bit integers."""
    a = launch.args()
    return (*(np.uint64(p) for p in a[:3]), np.int64(a[3]), *(np.int32(v) for v in a[4:]))
