"""SGLang's HiCache host-pool layouts as :class:`~.paged_kv.PagedKV` views (no copy).

A host pool is one ``kv_buffer`` tensor in one of four layouts; a token slot of the view is a host
index. MHA pools have a leading K/V dimension of 2; MLA pools drop it and have one latent head:

================== =========================== ========================
layout             MHA                         MLA
================== =========================== ========================
layer_first        ``(2, L, T, H, D)``         ``(L, T, 1, D)``
page_first         ``(2, T, L, H, D)``         ``(T, L, 1, D)``
page_first_direct  ``(2, P, L, page, H, D)``   ``(P, L, page, 1, D)``
page_head          ``(2, P, H, page, L, D)``   (none)
================== =========================== ========================

SGLang's generic (non-v1) interface hands over one page at a time, flat: :func:`sglang_page_view`
reads such a page in its pool's layout.
"""

from __future__ import annotations

import torch

from .paged_kv import PagedKV

SGLANG_HOST_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")

_DIMS = {"layer_first": 5, "page_first": 5, "page_first_direct": 6, "page_head": 6}  # MHA; MLA has one less
_TOKEN_DIMS = {"layer_first": 1, "page_first": 0}  # token-major layouts: the token dim after K/V


def sglang_host_view(buffer: torch.Tensor, layout: str, page_size: int, mla: bool) -> PagedKV:
    """A host pool's ``kv_buffer`` in ``layout`` as per-layer ``[pages, page_size, heads, dim]`` views."""
    if layout not in _DIMS:
        raise ValueError(f"unknown SGLang host layout {layout!r}; known: {list(SGLANG_HOST_LAYOUTS)}")
    want = _DIMS[layout] - (1 if mla else 0)
    if buffer.dim() != want or (not mla and buffer.shape[0] != 2):
        kind = "MLA" if mla else "MHA"
        raise ValueError(f"kvtier: SGLang {kind} host buffer of layout {layout} has shape {tuple(buffer.shape)}")
    if layout == "layer_first":
        if mla:
            return PagedKV.from_sglang_layer_first(list(buffer), None, page_size)
        return PagedKV.from_sglang_layer_first(list(buffer[0]), list(buffer[1]), page_size)
    if layout == "page_first":
        return PagedKV.from_sglang_page_first(buffer, page_size)
    if layout == "page_first_direct":
        return _page_first_direct(buffer, mla)
    if mla:
        raise ValueError("kvtier: SGLang MLA host pools have no page_head layout")
    layers = range(buffer.shape[4])
    keys = [buffer[0, :, :, :, i].transpose(1, 2) for i in layers]
    values = [buffer[1, :, :, :, i].transpose(1, 2) for i in layers]
    return PagedKV(keys, values, "sglang-page-head")


def _page_first_direct(buffer: torch.Tensor, mla: bool) -> PagedKV:
    """``(2, P, L, page, H, D)`` / MLA ``(P, L, page, 1, D)``: each layer's pages are indexed out."""
    if mla:
        return PagedKV([buffer[:, i] for i in range(buffer.shape[1])], None, "sglang-page-first-direct-mla")
    layers = range(buffer.shape[2])
    keys = [buffer[0, :, i] for i in layers]
    values = [buffer[1, :, i] for i in layers]
    return PagedKV(keys, values, "sglang-page-first-direct")


def sglang_one_page_shape(shape: tuple[int, ...], layout: str, page_size: int, mla: bool) -> tuple[int, ...]:
    """A pool buffer's shape with its token (or page) dimension cut to one page."""
    token_dim = _TOKEN_DIMS.get(layout)
    if token_dim is not None:
        dim = token_dim + (0 if mla else 1)
        return (*shape[:dim], page_size, *shape[dim + 1:])
    dim = 0 if mla else 1  # page_first_direct / page_head: a page dimension
    return (*shape[:dim], 1, *shape[dim + 1:])


def sglang_page_view(flat: torch.Tensor, pool_shape: tuple[int, ...], layout: str, page_size: int,
                     mla: bool) -> PagedKV:
    """One flat page (``get_data_page(..., flat=True)``) in the layout of a pool of ``pool_shape``,
    viewed as that pool is: its one page's slots are ``0 .. page_size - 1``."""
    page = flat.reshape(sglang_one_page_shape(pool_shape, layout, page_size, mla))
    return sglang_host_view(page, layout, page_size, mla)
