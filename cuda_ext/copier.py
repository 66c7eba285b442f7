"""Batched copies between a paged KV cache and canonical chunk buffers.

``gather`` (store direction) reads the token slots of all layers into chunks shaped
``[num_chunks, layers, kv_planes, tokens, heads, dim]``; ``scatter`` (load direction) writes them
back. :class:`KVCopier` validates once, in one place, so that every implementation (the torch one
in :mod:`.torch_copier`, CUDA kernels later) gets checked inputs and only has to move bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .paged_kv import PagedKV


class KVCopier(ABC):
    """Moves whole batches of chunks; one call is one kernel launch for a GPU implementation.

    ``slots`` is an integer ``[num_chunks, tokens_per_chunk]`` tensor of token slot ids
    (``block_id * block_size + offset``). A scatter with duplicate slots is undefined: which
    chunk's bytes land in the slot is unspecified (as with any parallel write).
    """

    def gather(
        self, paged: PagedKV, slots: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Copy ``slots`` of every layer into ``out`` (allocated on ``paged.device`` if None).

        ``out`` may live on another device (e.g. pinned host memory); each ``out[i]`` must be
        contiguous because it *is* the canonical chunk bytes.
        """
        slots = check_slots(paged, slots)
        shape = (slots.shape[0], *paged.chunk_shape(slots.shape[1]))
        if out is None:
            out = torch.empty(shape, dtype=paged.dtype, device=paged.device)
        else:
            _check_batch(out, shape, paged, "out")
            _check_chunks_contiguous(out)
        if slots.numel():
            self._gather(paged, slots, out)
        return out

    def scatter(self, chunks: torch.Tensor, paged: PagedKV, slots: torch.Tensor) -> None:
        """Write ``chunks`` (any device, any strides) into ``slots`` of every layer."""
        slots = check_slots(paged, slots)
        _check_batch(chunks, (slots.shape[0], *paged.chunk_shape(slots.shape[1])), paged, "chunks")
        if slots.numel():
            self._scatter(chunks, paged, slots)

    @abstractmethod
    def _gather(self, paged: PagedKV, slots: torch.Tensor, out: torch.Tensor) -> None:
        """Fill ``out``; inputs are validated, ``slots`` is int64 on ``paged.device``, non-empty."""

    @abstractmethod
    def _scatter(self, chunks: torch.Tensor, paged: PagedKV, slots: torch.Tensor) -> None:
        """Write ``chunks``; inputs are validated, ``slots`` is int64 on ``paged.device``."""


def make_copier(device: torch.device | str | None = None) -> KVCopier:
    """The copier for ``device``; CUDA kernels (CuPy) will be chosen here when available."""
    from .torch_copier import TorchCopier  # lazily, as the CuPy copier will have to be

    if device is not None:
        torch.device(device)  # rejects a malformed device string early
    return TorchCopier()


def check_slots(paged: PagedKV, slots: torch.Tensor) -> torch.Tensor:
    """Validate a slot mapping and return it as int64 on ``paged.device``.

    Out-of-range slots raise here, before any copy, so a bad mapping can never touch memory
    outside the cache (on GPU this costs one synchronising min/max).
    """
    if not isinstance(slots, torch.Tensor):
        raise TypeError(f"slots must be a tensor, got {type(slots).__name__}")
    if slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
        raise TypeError(f"slots must be an integer tensor, got {slots.dtype}")
    if slots.dim() != 2:
        raise ValueError(
            f"slots must be [num_chunks, tokens_per_chunk], got shape {tuple(slots.shape)}"
        )
    slots = slots.to(device=paged.device, dtype=torch.int64)
    if slots.numel():
        lo, hi = (int(v) for v in torch.aminmax(slots))
        if lo < 0 or hi >= paged.num_slots:
            bad = lo if lo < 0 else hi
            raise IndexError(
                f"slot {bad} out of range [0, {paged.num_slots}) "
                f"({paged.num_blocks} blocks x {paged.block_size} slots)"
            )
    return slots


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
