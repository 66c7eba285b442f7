"""Batched copies between a paged KV cache and canonical chunk buffers.

``gather`` (store direction) reads the token slots of all layers into chunks shaped
``[num_chunks, layers, kv_planes, tokens, heads, dim]``; ``scatter`` (load direction) writes them
back. :class:`KVCopier` validates once, in one place, so that every implementation (the torch one
in :mod:`.torch_copier`, CUDA kernels later) gets checked inputs and only has to move bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .paged_kv import PagedKV


class CopyDone:
    """Completion of a copy. This base one is already complete (CPU copies finish before returning);
    :class:`CudaCopyDone` waits on a CUDA event."""

    def query(self) -> bool:
        """True once the copy has finished (never blocks)."""
        return True

    def synchronize(self) -> None:
        """Block the calling thread until the copy has finished."""

    def wait_on_current_stream(self) -> None:
        """Order the current CUDA stream after the copy, without blocking the host."""


class CudaCopyDone(CopyDone):
    """An event recorded on the copy's stream after its last operation."""

    def __init__(self, event: torch.cuda.Event, keep: tuple[torch.Tensor, ...] = ()) -> None:
        self._event = event
        self._keep = keep  # tensors the copy reads or writes: alive until it is waited for

    def query(self) -> bool:
        return self._event.query()

    def synchronize(self) -> None:
        self._event.synchronize()
        self._keep = ()

    def wait_on_current_stream(self) -> None:
        torch.cuda.current_stream().wait_event(self._event)


@dataclass(eq=False)
class ScatterBatch:
    """Chunks and their slots, checked once for several scatters (see :meth:`KVCopier.prepare_scatter`).

    ``prepared`` is an implementation's own form of the batch (device tables), built on first use.
    """

    paged: PagedKV
    chunks: list[torch.Tensor]
    slots: list[torch.Tensor]
    prepared: object = None


class KVCopier(ABC):
    """Moves whole batches of chunks; one call is one kernel launch for a GPU implementation.

    ``slots`` is an integer ``[num_chunks, tokens_per_chunk]`` tensor of token slot ids
    (``block_id * block_size + offset``). A scatter with duplicate slots is undefined: which
    chunk's bytes land in the slot is unspecified (as with any parallel write). ``layers`` limits a
    copy to a range of layers (layer-by-layer loads and saves); the other layers of ``out`` are
    left untouched.
    """

    def gather(self, paged: PagedKV, slots: torch.Tensor, out: torch.Tensor | None = None, *,
               layers: range | None = None) -> torch.Tensor:
        """Copy ``slots`` of every layer into ``out`` (allocated on ``paged.device`` if None) and wait.

        ``out`` may live on another device (e.g. pinned host memory); each ``out[i]`` must be
        contiguous because it *is* the canonical chunk bytes.
        """
        out, done = self.gather_async(paged, slots, out, layers=layers)
        done.synchronize()
        return out

    def gather_async(self, paged: PagedKV, slots: torch.Tensor, out: torch.Tensor | None = None, *,
                     layers: range | None = None) -> tuple[torch.Tensor, CopyDone]:
        """:meth:`gather` enqueued on the current CUDA stream; ``out`` is valid once done."""
        slots = check_slots(paged, slots)
        shape = (slots.shape[0], *paged.chunk_shape(slots.shape[1]))
        if out is None:
            out = torch.empty(shape, dtype=paged.dtype, device=paged.device)
        else:
            _check_batch(out, shape, paged, "out")
            _check_chunks_contiguous(out)
        planes = _plane_range(paged, layers)
        if not slots.numel() or not planes:
            return out, CopyDone()
        return out, self._gather(paged, slots, out, planes)

    def scatter(self, chunks: torch.Tensor, paged: PagedKV, slots: torch.Tensor, *,
                layers: range | None = None) -> None:
        """Write ``chunks`` (any device, any strides) into ``slots`` of every layer and wait."""
        self.scatter_async(chunks, paged, slots, layers=layers).synchronize()

    def scatter_async(self, chunks: torch.Tensor, paged: PagedKV, slots: torch.Tensor, *,
                      layers: range | None = None) -> CopyDone:
        """:meth:`scatter` enqueued on the current CUDA stream; ``chunks`` must stay unchanged
        until it is done."""
        slots = check_slots(paged, slots)
        _check_batch(chunks, (slots.shape[0], *paged.chunk_shape(slots.shape[1])), paged, "chunks")
        planes = _plane_range(paged, layers)
        if not slots.numel() or not planes:
            return CopyDone()
        return self._scatter(chunks, paged, slots, planes)

    def prepare_scatter(self, chunks: Sequence[torch.Tensor], paged: PagedKV,
                        slots: Sequence[torch.Tensor]) -> ScatterBatch:
        """Check once a list of chunks ``[layers, planes, tokens_i, heads, dim]`` (anywhere in
        memory, any token counts) and their slot lists, for :meth:`scatter_batch_async` calls
        (one per layer for a layer-by-layer load). The chunks must stay unchanged until then."""
        if len(chunks) != len(slots):
            raise ValueError(f"{len(chunks)} chunks but {len(slots)} slot lists")
        checked = []
        for i, (chunk, chunk_slots) in enumerate(zip(chunks, slots)):
            if not isinstance(chunk_slots, torch.Tensor) or chunk_slots.dim() != 1:
                raise ValueError(f"slots[{i}] must be a 1-D tensor of token slots")
            checked.append(check_slots(paged, chunk_slots[None])[0])
            _check_batch(chunk[None], (1, *paged.chunk_shape(len(chunk_slots))), paged, f"chunks[{i}]")
        return ScatterBatch(paged, list(chunks), checked)

    def scatter_batch_async(self, batch: ScatterBatch, *, layers: range | None = None) -> CopyDone:
        """Scatter a prepared batch (``layers`` of it), one launch for all its chunks on GPU."""
        planes = _plane_range(batch.paged, layers)
        if not batch.chunks or not planes:
            return CopyDone()
        return self._scatter_batch(batch, planes)

    def _scatter_batch(self, batch: ScatterBatch, planes: range) -> CopyDone:
        """One copy per chunk; implementations that can do one launch for the batch override this."""
        done = CopyDone()
        for chunk, chunk_slots in zip(batch.chunks, batch.slots):
            if chunk_slots.numel():
                done = self._scatter(chunk[None], batch.paged, chunk_slots[None], planes)
        return done  # one stream: the last copy completing means all are complete

    @abstractmethod
    def _gather(self, paged: PagedKV, slots: torch.Tensor, out: torch.Tensor, planes: range) -> CopyDone:
        """Fill ``planes`` of ``out``; inputs are validated, ``slots`` is int64 on ``paged.device``,
        non-empty; ``planes`` indexes :meth:`PagedKV.planes` (layer-major, K before V)."""

    @abstractmethod
    def _scatter(self, chunks: torch.Tensor, paged: PagedKV, slots: torch.Tensor, planes: range) -> CopyDone:
        """Write ``planes`` of ``chunks``; inputs are validated, ``slots`` is int64 on ``paged.device``."""


def _plane_range(paged: PagedKV, layers: range | None) -> range:
    if layers is None:
        return range(paged.num_layers * paged.kv_planes)
    if not isinstance(layers, range) or layers.step != 1:
        raise TypeError(f"layers must be a range with step 1, got {layers!r}")
    if layers.start < 0 or layers.stop > paged.num_layers:
        raise ValueError(f"layers {layers} not within the cache's {paged.num_layers} layers")
    return range(layers.start * paged.kv_planes, max(layers.start, layers.stop) * paged.kv_planes)


def check_slots(paged: PagedKV, slots: torch.Tensor) -> torch.Tensor:
    """Validate a slot mapping and return it as int64 on ``paged.device``.

    Out-of-range slots raise here, before any copy, so a bad mapping can never touch memory
    outside the cache (slots already on a GPU cost one synchronising min/max; pass host slots).
    """
    if not isinstance(slots, torch.Tensor):
        raise TypeError(f"slots must be a tensor, got {type(slots).__name__}")
    if slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
        raise TypeError(f"slots must be an integer tensor, got {slots.dtype}")
    if slots.dim() != 2:
        raise ValueError(
            f"slots must be [num_chunks, tokens_per_chunk], got shape {tuple(slots.shape)}"
        )
    if slots.numel():  # checked where the slots are (host slots: no device sync)
        lo, hi = (int(v) for v in torch.aminmax(slots))
        if lo < 0 or hi >= paged.num_slots:
            bad = lo if lo < 0 else hi
            raise IndexError(
                f"slot {bad} out of range [0, {paged.num_slots}) "
                f"({paged.num_blocks} blocks x {paged.block_size} slots)"
            )
    slots = slots.to(dtype=torch.int64).contiguous()
    if paged.device.type == "cuda" and slots.device.type == "cpu":
        # through pinned memory: a pageable copy would make the host wait for the whole stream
        return slots.pin_memory().to(paged.device, non_blocking=True)
    return slots.to(paged.device)


def _check_batch(t: torch.Tensor, shape: tuple[int, ...], paged: PagedKV, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(
            f"{name} shape {tuple(t.shape)} != expected {shape} "
            "[num_chunks, layers, kv_planes, tokens, heads, dim]"
        )
    if t.dtype != paged.dtype:
        raise TypeError(f"{name} dtype {t.dtype} != cache dtype {paged.dtype}")


def _check_chunks_contiguous(out: torch.Tensor) -> None:
    if out.shape[0] and not out[0].is_contiguous():
        raise ValueError(
            f"each out[i] must be contiguous (it is the canonical chunk); strides {out.stride()}"
        )
    if out.shape[0] > 1 and out.stride(0) < out[0].numel():
        raise ValueError(f"chunks of out overlap in memory: chunk stride {out.stride(0)}")
