"""Engine layouts -> per-layer views ``[blocks, block_size, heads, dim]``, views only, never copies.

Each function returns the pieces of a :class:`~.paged_kv.PagedKV`; the class checks that all
layers agree. Layout ids name the *source* layout; "-mla" marks the one-plane latent variants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

OPAQUE_PREFIX = "opaque-blocks:"

# vLLM KVCacheLayout names -> the per-layer physical order once the layer dimension is indexed.
_VLLM_ORDERS = {
    "NHD": "nhd", "LBNHC": "nhd", "BLNHC": "nhd",
    "HND": "hnd", "LBHNC": "hnd", "BLHNC": "hnd",
}  # fmt: skip

Views = tuple[torch.Tensor, ...]


def vllm(
    layers: Sequence[torch.Tensor], layout: object, head_size_k: int, mla: bool
) -> tuple[Views, Views | None, str]:
    """Per layer ``[B, N, H, C]`` (NHD) or ``[B, H, N, C]`` (HND); K|V packed in C."""
    name = str(getattr(layout, "name", layout)).upper()
    order = _VLLM_ORDERS.get(name)
    if order is None:
        raise ValueError(f"unknown vLLM KV cache layout {layout!r}; known: {sorted(_VLLM_ORDERS)}")
    if head_size_k <= 0:
        raise ValueError(f"head_size_k must be positive, got {head_size_k}")
    views = []
    for i, t in enumerate(_tensors(layers, "layers")):
        _need_dims(t, 4, f"vLLM layer {i}")
        views.append(t if order == "nhd" else t.permute(0, 2, 1, 3))
    heads, packed = views[0].shape[2], views[0].shape[3]
    if mla:
        if heads != 1:
            raise ValueError(f"vLLM MLA cache must have 1 KV head, got {heads}")
        if packed != head_size_k:
            raise ValueError(f"vLLM MLA cache last dim {packed} != head_size_k {head_size_k}")
        return tuple(views), None, "vllm-mla"
    if packed != 2 * head_size_k:
        raise ValueError(
            f"vLLM cache packs K|V in a last dim of {packed}: head_size_v = {packed - head_size_k}"
            f" != head_size_k = {head_size_k}; only equal K and V head sizes are supported"
        )
    keys = tuple(v[..., :head_size_k] for v in views)
    values = tuple(v[..., head_size_k:] for v in views)
    return keys, values, f"vllm-{order}"


def sglang_layer_first(
    k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor] | None, page_size: int
) -> tuple[Views, Views | None, str]:
    """Per layer token-major ``[T, H, D]`` -> ``[T // page_size, page_size, H, D]``."""
    keys = tuple(
        _paged(t, page_size, f"SGLang layer {i} k_buffer")
        for i, t in enumerate(_tensors(k_buffers, "k_buffers"))
    )
    if v_buffers is None:
        _need_one_head(keys[0], "SGLang MLA k_buffer")
        return keys, None, "sglang-layer-first-mla"
    vals = _tensors(v_buffers, "v_buffers")
    if len(vals) != len(keys):
        raise ValueError(f"{len(keys)} k_buffers but {len(vals)} v_buffers")
    values = tuple(_paged(t, page_size, f"SGLang layer {i} v_buffer") for i, t in enumerate(vals))
    return keys, values, "sglang-layer-first"


def sglang_page_first(buffer: torch.Tensor, page_size: int) -> tuple[Views, Views | None, str]:
    """Host pool ``(2, T, L, H, D)`` or MLA ``(T, L, 1, D)``: index out each layer's view."""
    if not isinstance(buffer, torch.Tensor):
        raise ValueError(f"page_first buffer must be a tensor, got {type(buffer).__name__}")
    if buffer.dim() == 5:
        if buffer.shape[0] != 2:
            raise ValueError(f"page_first MHA buffer must be (2, T, L, H, D), got {buffer.shape}")
        layers = range(buffer.shape[2])
        keys = tuple(_paged(buffer[0, :, i], page_size, f"page_first K {i}") for i in layers)
        values = tuple(_paged(buffer[1, :, i], page_size, f"page_first V {i}") for i in layers)
        return keys, values, "sglang-page-first"
    if buffer.dim() == 4:
        layers = range(buffer.shape[1])
        keys = tuple(_paged(buffer[:, i], page_size, f"page_first layer {i}") for i in layers)
        _need_one_head(keys[0], "page_first MLA buffer")
        return keys, None, "sglang-page-first-mla"
    raise ValueError(
        f"page_first buffer must be (2, T, L, H, D) or MLA (T, L, 1, D), got {tuple(buffer.shape)}"
    )


def opaque_blocks(layers: Sequence[torch.Tensor], backend: str) -> tuple[Views, str]:
    """Per layer ``[B, ...]`` with each block contiguous -> uint8 ``[B, 1, 1, bytes_per_block]``."""
    if not isinstance(backend, str) or not backend:
        raise ValueError("opaque blocks need a non-empty backend name for the layout id")
    views = []
    for i, t in enumerate(_tensors(layers, "layers")):
        if t.dim() < 1 or t.shape[0] == 0:
            raise ValueError(f"opaque layer {i}: need [blocks, ...], blocks > 0; got {t.shape}")
        if not t[0].is_contiguous():
            raise ValueError(f"opaque layer {i}: each block must be contiguous: {t.stride()}")
        flat = t.view(t.shape[0], -1)  # cannot fail: the dims of a contiguous block merge
        views.append(flat.view(torch.uint8)[:, None, None, :])
    return tuple(views), OPAQUE_PREFIX + backend


def _tensors(seq: Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    items = list(seq)
    if not items:
        raise ValueError(f"{name} is empty: need at least one layer")
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}[{i}] is a {type(t).__name__}, not a tensor")
    return items


def _need_dims(t: torch.Tensor, ndim: int, name: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def _need_one_head(t: torch.Tensor, name: str) -> None:
    if t.shape[2] != 1:
        raise ValueError(f"{name}: MLA latent cache must have 1 head, got {t.shape[2]}")


def _paged(t: torch.Tensor, page_size: int, name: str) -> torch.Tensor:
    """Split the token dim of ``[T, H, D]`` into pages: always a view, whatever the strides."""
    _need_dims(t, 3, name)
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    slots = t.shape[0]
    if slots % page_size:
        raise ValueError(f"{name}: {slots} token slots is not a multiple of page_size {page_size}")
    return t.view(slots // page_size, page_size, t.shape[1], t.shape[2])
