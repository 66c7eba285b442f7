"""Copy layer: every engine layout and KV dtype against the per-token oracle, bit for bit."""

from __future__ import annotations

import pytest
import torch

from kvtier.cuda_ext import (
    KVCopier,
    PagedKV,
    TorchCopier,
    as_int_view,
    make_copier,
    reference_gather,
    reference_scatter,
)

L, NB, BS, H, D, DM, T = 2, 100, 4, 2, 4, 6, 6  # layers, blocks, block size, heads, dims, tokens
SLOTS = NB * BS
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]

# layout name -> (buffer shape, builder from a buffer of that shape, expected layout id)
LAYOUTS = {
    "vllm-nhd": ((L, NB, BS, H, 2 * D), lambda x: PagedKV.from_vllm(list(x), "NHD", D), "vllm-nhd"),
    "vllm-hnd": ((L, NB, H, BS, 2 * D), lambda x: PagedKV.from_vllm(list(x), "HND", D), "vllm-hnd"),
    "vllm-blnhc": (  # blocks outermost: every layer view is non-contiguous
        (NB, L, BS, H, 2 * D),
        lambda x: PagedKV.from_vllm([x[:, i] for i in range(L)], "BLNHC", D),
        "vllm-nhd",
    ),
    "vllm-mla": (
        (L, NB, BS, 1, DM),
        lambda x: PagedKV.from_vllm(list(x), "NHD", DM, mla=True),
        "vllm-mla",
    ),
    "sglang-lf": (
        (2, L, SLOTS, H, D),
        lambda x: PagedKV.from_sglang_layer_first(list(x[0]), list(x[1]), BS),
        "sglang-layer-first",
    ),
    "sglang-lf-mla": (
        (L, SLOTS, 1, DM),
        lambda x: PagedKV.from_sglang_layer_first(list(x), None, BS),
        "sglang-layer-first-mla",
    ),
    "sglang-pf": (
        (2, SLOTS, L, H, D),
        lambda x: PagedKV.from_sglang_page_first(x, BS),
        "sglang-page-first",
    ),
    "sglang-pf-mla": (
        (SLOTS, L, 1, DM),
        lambda x: PagedKV.from_sglang_page_first(x, BS),
        "sglang-page-first-mla",
    ),
    "opaque": (  # CPU_ATTN-like [blocks, heads, block_size, 2*D]; slots are block ids
        (L, SLOTS, H, BS, 2 * D),
        lambda x: PagedKV.from_opaque_blocks(list(x), "CPU_ATTN"),
        "opaque-blocks:CPU_ATTN",
    ),
}


def _random_bytes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def _cache(layout: str, dtype: torch.dtype, seed: int | None) -> tuple[PagedKV, torch.Tensor]:
    """A cache in ``layout`` over one byte buffer: random bytes, or zeros when ``seed`` is None."""
    shape, build, _ = LAYOUTS[layout]
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    raw = torch.zeros(n, dtype=torch.uint8) if seed is None else _random_bytes(n, seed)
    return build(raw.view(dtype).view(shape)), raw


def _slots(paged: PagedKV, n: int, seed: int) -> torch.Tensor:
    """Distinct random slots (a permutation prefix): not block aligned, partial blocks."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(paged.num_slots, generator=g)[: n * T].view(n, T)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))


def _random_chunks(paged: PagedKV, n: int, seed: int) -> torch.Tensor:
    shape = (n, *paged.chunk_shape(T))
    size = torch.Size(shape).numel() * paged.keys[0].element_size()
    return _random_bytes(size, seed).view(paged.dtype).view(shape)


layout_dtype = pytest.mark.parametrize(
    "dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch.")
)
all_layouts = pytest.mark.parametrize("layout", list(LAYOUTS))


@all_layouts
@layout_dtype
def test_gather_scatter_against_oracle(layout: str, dtype: torch.dtype) -> None:
    copier = TorchCopier()
    paged, _ = _cache(layout, dtype, seed=1)
    zeroed, zero_raw = _cache(layout, dtype, seed=None)
    oracle, oracle_raw = _cache(layout, dtype, seed=None)
    for n in (1, 3, 64):
        slots = _slots(paged, n, seed=n)
        out = copier.gather(paged, slots)
        assert out.shape == (n, *paged.chunk_shape(T)) and out.dtype == paged.dtype
        assert out[0].is_contiguous()
        assert _same_bytes(out, reference_gather(paged, slots))
        # scatter into a zeroed cache writes exactly those slots, every other byte stays zero
        chunks = _random_chunks(paged, n, seed=100 + n)
        copier.scatter(chunks, zeroed, slots)
        reference_scatter(chunks, oracle, slots)
        assert torch.equal(zero_raw, oracle_raw)
        assert _same_bytes(reference_gather(zeroed, slots), chunks)
        reference_scatter(torch.zeros_like(chunks), zeroed, slots)
        assert not zero_raw.any()
        oracle_raw.zero_()


@all_layouts
@layout_dtype
def test_round_trip(layout: str, dtype: torch.dtype) -> None:
    copier = TorchCopier()
    src, src_raw = _cache(layout, dtype, seed=2)
    dst, _ = _cache(layout, dtype, seed=None)
    before = src_raw.clone()
    s1, s2 = _slots(src, 64, seed=3), _slots(src, 64, seed=4)
    chunks = copier.gather(src, s1)
    copier.scatter(chunks, dst, s2)
    assert _same_bytes(copier.gather(dst, s2), chunks)
    copier.scatter(chunks, src, s1)  # writing back what was read changes nothing
    assert torch.equal(src_raw, before)


@all_layouts
def test_views_not_copies_and_metadata(layout: str) -> None:
    paged, raw = _cache(layout, torch.float16, seed=5)
    base = raw.untyped_storage().data_ptr()
    lo, hi = raw.data_ptr(), raw.data_ptr() + raw.numel()
    for plane in paged.planes():
        assert plane.untyped_storage().data_ptr() == base
        assert lo <= plane.data_ptr() < hi
    before, last = raw.clone(), as_int_view(paged.planes()[-1])
    last[-1, -1, -1, -1] ^= 1  # a write through the view lands in the engine's buffer
    assert int((raw != before).sum()) == 1
    opaque = layout == "opaque"
    mla = layout.endswith("mla")
    assert paged.layout_id == LAYOUTS[layout][2]
    assert paged.format_id == ("opaque-blocks:CPU_ATTN" if opaque else "mla" if mla else "kv")
    assert paged.num_layers == L and paged.kv_planes == (1 if opaque or mla else 2)
    assert paged.num_slots == (SLOTS if opaque else NB * BS)
    assert paged.chunk_shape(T) == (L, paged.kv_planes, T, paged.heads, paged.dim)
    if opaque:
        assert (paged.block_size, paged.heads, paged.dim) == (1, 1, H * BS * 2 * D * 2)
        assert paged.dtype == torch.uint8
    else:
        assert (paged.block_size, paged.heads, paged.dim) == ((BS, 1, DM) if mla else (BS, H, D))
    table = paged.pointer_table()
    assert table.shape == (L * paged.kv_planes, 5)
    assert table.tolist() == [[p.data_ptr(), *p.stride()] for p in paged.planes()]


def test_canonical_byte_order() -> None:
    """vLLM NHD cache whose every element encodes (layer, block, offset, head, packed dim)."""
    nb, bs, h, d = 3, 4, 2, 4
    idx = torch.meshgrid(*(torch.arange(s) for s in (2, nb, bs, h, 2 * d)), indexing="ij")
    cache = sum(i * 10**p for i, p in zip(idx, (4, 3, 2, 1, 0))).to(torch.float32)
    paged = PagedKV.from_vllm(list(cache), "NHD", d)
    slots = torch.tensor([[5, 2, 11]])  # (block 1, off 1), (block 0, off 2), (block 2, off 3)
    flat = TorchCopier().gather(paged, slots)[0].reshape(-1)
    # layer 1, V plane, token 2 (slot 11 = block 2, offset 3), head 0, dim 3 -> packed dim 4+3
    assert flat[(((1 * 2 + 1) * 3 + 2) * h + 0) * d + 3] == 12307
    # layer 0, K plane, token 0 (slot 5 = block 1, offset 1), head 1, dim 2
    assert flat[(((0 * 2 + 0) * 3 + 0) * h + 1) * d + 2] == 1112
    for pos, value in enumerate(flat.tolist()):
        rest, dim = divmod(pos, d)
        rest, head = divmod(rest, h)
        rest, tok = divmod(rest, 3)
        layer, kv = divmod(rest, 2)
        block, off = divmod(int(slots[0, tok]), bs)
        assert value == layer * 10**4 + block * 10**3 + off * 100 + head * 10 + kv * d + dim


def test_engine_layouts_gather_identical_chunks() -> None:
    """Same logical KV in vLLM NHD, HND and SGLang pools -> byte-identical chunks."""
    x = _random_bytes(L * NB * BS * H * 2 * D * 2, seed=7).view(torch.bfloat16)
    x = x.view(L, NB, BS, H, 2 * D)
    k, v = x[..., :D].reshape(L, SLOTS, H, D), x[..., D:].reshape(L, SLOTS, H, D)
    caches = [
        PagedKV.from_vllm(list(x), "NHD", D),
        PagedKV.from_vllm(list(x.permute(0, 1, 3, 2, 4).contiguous()), "HND", D),
        PagedKV.from_sglang_layer_first(list(k), list(v), BS),
        PagedKV.from_sglang_page_first(torch.stack([k, v]).transpose(1, 2).contiguous(), BS),
    ]
    slots = _slots(caches[0], 5, seed=8)
    chunks = [TorchCopier().gather(c, slots) for c in caches]
    assert len({c.format_id for c in caches}) == 1
    for other in chunks[1:]:
        assert _same_bytes(chunks[0], other)


def test_opaque_chunk_holds_whole_raw_blocks() -> None:
    layers = _random_bytes(L * 7 * H * BS * 2 * D * 4, seed=9).view(torch.float32)
    layers = layers.view(L, 7, H, BS, 2 * D)
    paged = PagedKV.from_opaque_blocks(list(layers), "CPU_ATTN")
    out = TorchCopier().gather(paged, torch.tensor([[6, 0], [3, 3]]))  # gather may repeat slots
    for c, blocks in enumerate(([6, 0], [3, 3])):
        for t, b in enumerate(blocks):
            for layer in range(L):
                raw_block = layers[layer, b].reshape(-1).view(torch.uint8)
                assert torch.equal(out[c, layer, 0, t, 0], raw_block)


def test_out_buffer_and_edge_batches() -> None:
    paged, _ = _cache("vllm-hnd", torch.float16, seed=10)
    slots = _slots(paged, 3, seed=11).to(torch.int32)  # int32 slot tensors are accepted
    numel = torch.Size(paged.chunk_shape(T)).numel()
    pool = torch.full((3, numel + 3), 7.0, dtype=torch.float16)  # chunks spaced in a bigger pool
    out = pool[:, :numel].view(3, *paged.chunk_shape(T))  # odd chunk stride: no word widening
    assert TorchCopier().gather(paged, slots, out=out) is out
    assert _same_bytes(out, reference_gather(paged, slots))
    assert bool((pool[:, numel:] == 7).all())
    # scatter from chunks of any strides (here: dim not unit-stride) into a zeroed cache
    zeroed, _ = _cache("vllm-hnd", torch.float16, seed=None)
    strided = out.transpose(-1, -2).contiguous().transpose(-1, -2)
    TorchCopier().scatter(strided, zeroed, slots)
    assert _same_bytes(reference_gather(zeroed, slots), out)
    assert TorchCopier().gather(paged, torch.empty(0, T, dtype=torch.int64)).shape[0] == 0
    assert TorchCopier().gather(paged, torch.empty(2, 0, dtype=torch.int64)).shape[3] == 0
    no_chunks = torch.empty(0, *paged.chunk_shape(T), dtype=paged.dtype)
    TorchCopier().scatter(no_chunks, paged, torch.empty(0, T, dtype=torch.long))
    assert isinstance(make_copier("cpu"), TorchCopier) and isinstance(make_copier(), KVCopier)
    with pytest.raises(TypeError):
        KVCopier()  # type: ignore[abstract]


def test_copy_errors() -> None:
    copier = TorchCopier()
    paged, raw = _cache("vllm-nhd", torch.float32, seed=12)
    before = raw.clone()
    good = torch.tensor([[0, 1]])
    chunks = copier.gather(paged, good)
    for bad in ([[0, SLOTS]], [[-1, 0]]):
        with pytest.raises(IndexError, match="out of range"):
            copier.gather(paged, torch.tensor(bad))
        with pytest.raises(IndexError, match="out of range"):
            copier.scatter(chunks, paged, torch.tensor(bad))
    assert torch.equal(raw, before)  # a rejected scatter wrote nothing
    with pytest.raises(ValueError, match="num_chunks"):
        copier.gather(paged, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        copier.gather(paged, good.float())
    with pytest.raises(ValueError, match="shape"):
        copier.gather(paged, good, out=torch.empty(1, L, 2, 3, H, D))
    with pytest.raises(TypeError, match="dtype"):
        copier.gather(paged, good, out=torch.empty(1, L, 2, 2, H, D, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        copier.gather(paged, good, out=torch.empty(1, L, 2, 2, D, H).transpose(-1, -2))
    with pytest.raises(ValueError, match="overlap"):
        aliased = torch.empty(1, L, 2, 2, H, D).expand(2, -1, -1, -1, -1, -1)
        copier.gather(paged, good.repeat(2, 1), out=aliased)
    with pytest.raises(ValueError, match="shape"):
        copier.scatter(chunks[:, :1], paged, good)
    with pytest.raises(TypeError, match="dtype"):
        copier.scatter(chunks.half(), paged, good)


def test_layout_errors() -> None:
    x = torch.zeros(L, NB, BS, H, 2 * D)
    with pytest.raises(ValueError, match="head_size_v = 5 != head_size_k = 3"):
        PagedKV.from_vllm(list(x), "NHD", 3)
    with pytest.raises(ValueError, match="unknown vLLM KV cache layout"):
        PagedKV.from_vllm(list(x), "XYZ", D)
    with pytest.raises(ValueError, match="1 KV head"):
        PagedKV.from_vllm(list(x), "NHD", 2 * D, mla=True)
    with pytest.raises(ValueError, match="layer 1 keys: shape"):
        PagedKV.from_vllm([x[0], x[1, :5]], "NHD", D)
    with pytest.raises(ValueError, match="layer 1 keys: dtype"):
        PagedKV.from_vllm([x[0], x[1].half()], "NHD", D)
    with pytest.raises(ValueError, match="empty"):
        PagedKV.from_vllm([], "NHD", D)
    with pytest.raises(ValueError, match="2 key layers but 1 value layers"):
        PagedKV(tuple(x[..., :D]), (x[0, ..., D:],), "custom")
    buf = torch.zeros(L, SLOTS, H, D)
    with pytest.raises(ValueError, match="not a multiple of page_size"):
        PagedKV.from_sglang_layer_first(list(buf), list(buf), 3)
    with pytest.raises(ValueError, match="2 k_buffers but 1 v_buffers"):
        PagedKV.from_sglang_layer_first(list(buf), list(buf[:1]), BS)
    with pytest.raises(ValueError, match="MLA latent cache must have 1 head"):
        PagedKV.from_sglang_layer_first(list(buf), None, BS)
    with pytest.raises(ValueError, match="page_first"):
        PagedKV.from_sglang_page_first(torch.zeros(3, SLOTS, L, H, D), BS)
    with pytest.raises(ValueError, match="block must be contiguous"):
        PagedKV.from_opaque_blocks(list(x.transpose(2, 3)), "CPU_ATTN")
    with pytest.raises(ValueError, match="backend"):
        PagedKV.from_opaque_blocks(list(x), "")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@layout_dtype
def test_torch_copier_on_gpu_with_host_chunks(dtype: torch.dtype) -> None:
    """Cache on the GPU, chunks in pinned host memory: gather and scatter across devices."""
    copier = make_copier("cuda")
    for layout in LAYOUTS:
        cpu_paged, raw = _cache(layout, dtype, seed=13)
        shape, build, _ = LAYOUTS[layout]
        gpu_raw = raw.cuda()
        paged = build(gpu_raw.view(dtype).view(shape))
        slots = _slots(paged, 64, seed=14)
        out = torch.empty((64, *paged.chunk_shape(T)), dtype=paged.dtype).pin_memory()
        copier.gather(paged, slots.cuda(), out=out)
        assert _same_bytes(out, reference_gather(cpu_paged, slots))
        chunks = _random_chunks(paged, 64, seed=15).pin_memory()
        copier.scatter(chunks, paged, slots)
        reference_scatter(chunks, cpu_paged, slots)
        assert torch.equal(gpu_raw.cpu(), raw)
