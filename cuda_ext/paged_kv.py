"""An engine's paged KV cache seen as per-layer strided views ``[blocks, block_size, heads, dim]``.

Every engine layout (vLLM NHD/HND/MLA, SGLang layer-first/page-first pools, opaque blocks) is
reduced to the same logical 4-D view per layer and plane, *without copying*, so one copy routine
(torch indexing now, a CUDA kernel over a table of base pointers and strides later) serves all of
them. The engine-specific constructors live in :mod:`.layouts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import layouts

# Integer dtype of each item size: copies index these views so that every KV dtype (fp8 included,
# whose indexing CPU torch lacks) moves as raw bytes, NaN payloads and all.
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_int_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed (never copied) as the integer dtype of the same item size."""
    try:
        int_dtype = _INT_OF_SIZE[t.element_size()]
    except KeyError:
        raise TypeError(f"unsupported KV dtype {t.dtype} (item size {t.element_size()})") from None
    return t if t.dtype == int_dtype else t.view(int_dtype)


@dataclass(frozen=True, eq=False)
class PagedKV:
    """Per-layer views of logical shape ``[num_blocks, block_size, heads, dim]``.

    ``values is None`` for MLA (latent only) and opaque blocks: one plane. A token slot is
    ``block_id * block_size + offset_in_block``. ``layout_id`` names the source layout (for
    headers, logs, and the key namespace of opaque layouts; see :attr:`format_id`).
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...] | None
    layout_id: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        if self.values is not None:
            object.__setattr__(self, "values", tuple(self.values))
        if not self.keys:
            raise ValueError("PagedKV needs at least one layer")
        if not isinstance(self.layout_id, str) or not self.layout_id:
            raise ValueError("PagedKV.layout_id must be a non-empty string")
        if self.values is not None and len(self.values) != len(self.keys):
            raise ValueError(f"{len(self.keys)} key layers but {len(self.values)} value layers")
        ref = self.keys[0]
        if not isinstance(ref, torch.Tensor) or ref.dim() != 4:
            raise ValueError(f"layer 0 keys: expected a 4-D tensor, got {_describe(ref)}")
        for plane, tensors in (("keys", self.keys), ("values", self.values or ())):
            for i, t in enumerate(tensors):
                _check_like(ref, t, f"layer {i} {plane}")
        as_int_view(ref)  # rejects dtypes the byte copy cannot move

    # -- shape -----------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_blocks(self) -> int:
        return self.keys[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.keys[0].shape[1]

    @property
    def heads(self) -> int:
        return self.keys[0].shape[2]

    @property
    def dim(self) -> int:
        return self.keys[0].shape[3]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def kv_planes(self) -> int:
        return 1 if self.values is None else 2

    @property
    def format_id(self) -> str:
        """What the chunk bytes mean, independent of the engine: "kv", "mla" or the opaque id.

        Canonical chunks from any known layout are interchangeable (vLLM NHD == HND == SGLang), so
        this, not :attr:`layout_id`, is what a key namespace needs for cross-engine sharing.
        """
        if self.layout_id.startswith(layouts.OPAQUE_PREFIX):
            return self.layout_id
        return "kv" if self.kv_planes == 2 else "mla"

    @property
    def row_bytes(self) -> int:
        """Bytes of one (token, head) row: ``dim`` elements, contiguous in every layout."""
        return self.dim * self.keys[0].element_size()

    def layer_slice(self, planes: range) -> slice:
        """The layers that a range of :meth:`planes` indices covers."""
        return slice(planes.start // self.kv_planes, -(-planes.stop // self.kv_planes))

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Canonical chunk shape ``(layers, kv_planes, tokens, heads, dim)``."""
        return (self.num_layers, self.kv_planes, num_tokens, self.heads, self.dim)

    def planes(self) -> tuple[torch.Tensor, ...]:
        """All views in canonical order: layer-major, then K before V."""
        if self.values is None:
            return self.keys
        return tuple(t for kv in zip(self.keys, self.values) for t in kv)

    def pointer_table(self) -> torch.Tensor:
        """int64 ``[layers * kv_planes, 5]``: base address and element strides (block, token,
        head, dim) of each plane in :meth:`planes` order — what a copy kernel needs on device."""
        rows = [[t.data_ptr(), *t.stride()] for t in self.planes()]
        return torch.tensor(rows, dtype=torch.int64)

    # -- constructors (views only) ---------------------------------------------------------------
    @classmethod
    def from_vllm(
        cls, layers: Sequence[torch.Tensor], layout: str, head_size_k: int, *, mla: bool = False
    ) -> PagedKV:
        """vLLM >= 0.30 per-layer views in physical order ``[B,N,H,C]`` (NHD), ``[B,H,N,C]`` (HND).

        ``layout`` may also be a ``KVCacheLayout`` name (LBNHC, LBHNC, BLNHC, BLHNC) or enum.
        """
        keys, values, layout_id = layouts.vllm(layers, layout, head_size_k, mla)
        return cls(keys, values, layout_id)

    @classmethod
    def from_sglang_layer_first(
        cls,
        k_buffers: Sequence[torch.Tensor],
        v_buffers: Sequence[torch.Tensor] | None,
        page_size: int,
    ) -> PagedKV:
        """SGLang per-layer token-major ``[T, H, D]`` buffers (``v_buffers=None`` for MLA).

        A host pool in ``layer_first`` layout ``(2, L, T, H, D)`` passes as ``(buf[0], buf[1])``.
        """
        keys, values, layout_id = layouts.sglang_layer_first(k_buffers, v_buffers, page_size)
        return cls(keys, values, layout_id)

    @classmethod
    def from_sglang_page_first(cls, buffer: torch.Tensor, page_size: int) -> PagedKV:
        """SGLang host pool ``page_first``: ``(2, T, L, H, D)``, MLA ``(T, L, 1, D)``."""
        keys, values, layout_id = layouts.sglang_page_first(buffer, page_size)
        return cls(keys, values, layout_id)

    @classmethod
    def from_opaque_blocks(cls, layers: Sequence[torch.Tensor], backend: str) -> PagedKV:
        """Blocks whose inner layout is private, as bytes ``[B, 1, 1, bytes_per_block]``.

        Slots are then block ids (block_size 1), and whole blocks go through the same copy code.
        """
        keys, layout_id = layouts.opaque_blocks(layers, backend)
        return cls(keys, None, layout_id)


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _check_like(ref: torch.Tensor, t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {_describe(t)}")
    if t.shape != ref.shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)} differs from layer 0 {tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name}: dtype {t.dtype} differs from layer 0 {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: device {t.device} differs from layer 0 {ref.device}")
