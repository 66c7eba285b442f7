"""ChunkStore: tokens -> keys -> tiers through the copy layer, and every way a load must stop short."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kvtier.chunk_format.codec import encode_chunk
from kvtier.chunk_format.dtypes import dtype_name
from kvtier.chunk_format.keys import KeyNamespace
from kvtier.connector.chunk_store import ChunkStore, split_slots
from kvtier.connector.shards import PromptChain, ShardSet
from kvtier.cuda_ext import PagedKV, make_copier
from kvtier.storage_backends.cpu_backend import CpuBackend
from kvtier.storage_backends.disk_backend import DiskBackend
from kvtier.storage_backends.tiered import TieredStore

LAYERS, HEADS, DIM, BLOCK, BLOCKS, CHUNK = 3, 2, 8, 4, 40, 8


def _cache(layout: str, dtype: torch.dtype = torch.bfloat16, fill: bool = True) -> PagedKV:
    shape = (BLOCKS, BLOCK, HEADS, 2 * DIM) if layout == "NHD" else (BLOCKS, HEADS, BLOCK, 2 * DIM)
    layers = [(torch.randn(shape) if fill else torch.zeros(shape)).to(dtype) for _ in range(LAYERS)]
    return PagedKV.from_vllm(layers, layout, DIM)


def _slots(n_tokens: int, seed: int) -> torch.Tensor:
    blocks = torch.randperm(BLOCKS, generator=torch.Generator().manual_seed(seed))[: -(-n_tokens // BLOCK)]
    return (blocks[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)[:n_tokens]


def _namespace(paged: PagedKV, **changes: object) -> KeyNamespace:
    ns = KeyNamespace(model="tiny", kv_dtype=dtype_name(paged.dtype), layout=paged.format_id, num_layers=LAYERS,
                      kv_heads=HEADS, head_dim=DIM, tp_size=1, tp_rank=0, chunk_size=CHUNK)
    return dataclasses.replace(ns, **changes)


def _kv_at(paged: PagedKV, slots: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.stack([k.reshape(-1, HEADS, DIM)[slots], v.reshape(-1, HEADS, DIM)[slots]])
                        for k, v in zip(paged.keys, paged.values)])


@pytest.fixture
def store(tmp_path: Path) -> TieredStore:
    s = TieredStore([CpuBackend(1 << 20, 4096), DiskBackend(tmp_path / "disk", 1 << 22)])
    yield s
    s.close()


def test_save_then_load_into_another_layout_is_exact(store: TieredStore) -> None:
    src = _cache("NHD")
    dst = _cache("HND", fill=False)  # another engine with another layout and other blocks
    tokens = list(range(100, 130))  # 30 tokens: 3 full chunks, 6 tokens left over
    src_slots, dst_slots = _slots(30, 1), _slots(30, 2)
    saver = ChunkStore(store, _namespace(src), make_copier("cpu"))
    assert saver.lookup(tokens) == 0
    assert saver.save(tokens, src, split_slots(src_slots, CHUNK)[:3], wait=True) == 3
    loader = ChunkStore(store, _namespace(dst), make_copier("cpu"))
    assert loader.lookup(tokens) == 24
    assert loader.load(tokens, dst, split_slots(dst_slots, CHUNK)[:3]) == 3
    assert torch.equal(_kv_at(dst, dst_slots[:24]).view(torch.int16), _kv_at(src, src_slots[:24]).view(torch.int16))
    assert not _kv_at(dst, dst_slots[24:]).any()  # the partial chunk was not loaded


def test_prefix_sharing_and_divergence(store: TieredStore) -> None:
    paged = _cache("NHD")
    chunks = ChunkStore(store, _namespace(paged), make_copier("cpu"))
    chunks.save(list(range(32)), paged, split_slots(_slots(32, 1), CHUNK), wait=True)
    diverged = list(range(16)) + [999] + list(range(17, 32))  # differs inside chunk 2
    assert chunks.lookup(diverged) == 16
    assert chunks.lookup(list(range(40))) == 32


def test_save_can_start_at_a_later_chunk(store: TieredStore) -> None:
    paged = _cache("NHD")
    chunks = ChunkStore(store, _namespace(paged), make_copier("cpu"))
    assert chunks.save(list(range(32)), paged, split_slots(_slots(32, 1), CHUNK)[3:], first_chunk=3, wait=True) == 1
    assert chunks.lookup(list(range(32))) == 0  # chunks 0-2 were not written
    assert store.contains(chunks.keys(list(range(32)))[3:]) == 1


@pytest.mark.parametrize("change", [{"salt": "tenant-b"}, {"model": "other"}, {"tp_size": 2, "tp_rank": 1}])
def test_other_namespaces_never_hit(store: TieredStore, change: dict) -> None:
    paged = _cache("NHD")
    ChunkStore(store, _namespace(paged), make_copier("cpu")).save(
        list(range(16)), paged, split_slots(_slots(16, 1), CHUNK), wait=True)
    assert ChunkStore(store, _namespace(paged, **change), make_copier("cpu")).lookup(list(range(16))) == 0


def test_fp8_and_bf16_caches_do_not_collide(store: TieredStore) -> None:
    bf16, fp8 = _cache("NHD", torch.bfloat16), _cache("NHD", torch.float8_e4m3fn)
    ChunkStore(store, _namespace(bf16), make_copier("cpu")).save(
        list(range(16)), bf16, split_slots(_slots(16, 1), CHUNK), wait=True)
    fp8_chunks = ChunkStore(store, _namespace(fp8), make_copier("cpu"))
    assert fp8_chunks.lookup(list(range(16))) == 0
    with pytest.raises(ValueError, match="does not match the key namespace"):
        fp8_chunks.save(list(range(16)), bf16, split_slots(_slots(16, 1), CHUNK))


def test_a_corrupt_middle_chunk_ends_the_loaded_prefix(tmp_path: Path) -> None:
    disk = DiskBackend(tmp_path, 1 << 22)
    store = TieredStore([disk])
    src, dst = _cache("NHD"), _cache("NHD", fill=False)
    chunks = ChunkStore(store, _namespace(src), make_copier("cpu"))
    tokens = list(range(32))
    chunks.save(tokens, src, split_slots(_slots(32, 1), CHUNK), wait=True)
    victim = next(tmp_path.rglob(f"{chunks.keys(tokens)[1]}.kvc"))
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x40
    victim.write_bytes(data)
    dst_slots = _slots(32, 2)
    assert chunks.load(tokens, dst, split_slots(dst_slots, CHUNK)) == 1  # chunk 0 only; 1 is corrupt, 2-3 are useless without it
    assert disk.stats()["corrupt_chunks"] == 1
    assert not _kv_at(dst, dst_slots[8:]).any()
    store.close()


def test_a_chunk_of_another_shape_under_the_right_key_is_refused(store: TieredStore) -> None:
    paged = _cache("NHD")
    chunks = ChunkStore(store, _namespace(paged), make_copier("cpu"))
    tokens = list(range(8))
    # A writer with a wrong head count but (by a bug) the same namespace: the header tells.
    key = chunks.keys(tokens)[0]
    store.put([(key, encode_chunk(key, chunks.namespace.kv_dtype, (LAYERS, 2, CHUNK, 1, DIM), "kv", "tiny", CHUNK,
                                  bytes(LAYERS * 2 * CHUNK * DIM * 2), shard=chunks.namespace.shard_id))])
    assert chunks.lookup(tokens) == 8
    assert chunks.load(tokens, _cache("NHD", fill=False), split_slots(_slots(8, 3), CHUNK)) == 0


def test_partial_tail_is_found_only_by_the_same_tokens(store: TieredStore) -> None:
    src, dst = _cache("NHD"), _cache("NHD", fill=False)
    tokens = list(range(500, 521))  # 2 full chunks and 5 tokens
    chunks = ChunkStore(store, _namespace(src), make_copier("cpu"))
    assert chunks.save(tokens, src, split_slots(_slots(21, 1), CHUNK), wait=True) == 3
    assert chunks.lookup(tokens) == 21
    assert chunks.lookup(tokens[:20]) == 16 and chunks.lookup(tokens + [7]) == 16
    assert chunks.lookup(tokens, include_partial=False) == 16
    dst_slots = _slots(21, 2)
    assert chunks.load(tokens, dst, split_slots(dst_slots, CHUNK)) == 3
    assert torch.equal(_kv_at(dst, dst_slots).view(torch.int16), _kv_at(src, _slots(21, 1)).view(torch.int16))


def test_load_skips_the_units_the_engine_already_holds(store: TieredStore) -> None:
    src = _cache("NHD")
    tokens = list(range(16))
    chunks = ChunkStore(store, _namespace(src), make_copier("cpu"))
    chunks.save(tokens, src, split_slots(_slots(16, 1), CHUNK), wait=True)
    dst, dst_slots = _cache("NHD", fill=False), _slots(16, 2)
    assert chunks.load(tokens, dst, split_slots(dst_slots, CHUNK), skip_units=3) == 2
    assert not _kv_at(dst, dst_slots[:3]).any()
    assert torch.equal(_kv_at(dst, dst_slots[3:]).view(torch.int16), _kv_at(src, _slots(16, 1)[3:]).view(torch.int16))


def test_request_salts_separate_caches(store: TieredStore) -> None:
    paged = _cache("NHD")
    chunks = ChunkStore(store, _namespace(paged), make_copier("cpu"))
    chunks.save(list(range(8)), paged, split_slots(_slots(8, 1), CHUNK), salt="alice", wait=True)
    assert chunks.lookup(list(range(8)), salt="alice") == 8
    assert chunks.lookup(list(range(8)), salt="bob") == 0 and chunks.lookup(list(range(8))) == 0


def test_a_chunk_of_another_shard_under_the_right_key_is_refused(store: TieredStore) -> None:
    """The shard (rank, stage, layers) is in every header and checked on load: a second guard
    besides the key, against any bug that names two shards' chunks alike."""
    paged = _cache("NHD")
    stage0 = ChunkStore(store, _namespace(paged, pp_size=2, pp_rank=0), make_copier("cpu"))
    tokens = list(range(8))
    stage0.save(tokens, paged, split_slots(_slots(8, 1), CHUNK), wait=True)
    key = stage0.keys(tokens)[0]
    assert store.get([key])[0].header.shard == "tp0/1 pp0/2 layers0-2"
    stage1 = ChunkStore(store, _namespace(paged, pp_size=2, pp_rank=1, first_layer=3), make_copier("cpu"))
    forged = stage1.keys(tokens)[0]
    store.put([(forged, encode_chunk(forged, *_header_of(store, key), shard="tp0/1 pp0/2 layers0-2"))])
    assert stage1.lookup(tokens) == 8
    assert stage1.load(tokens, _cache("NHD", fill=False), split_slots(_slots(8, 3), CHUNK)) == 0


def _header_of(store: TieredStore, key: str) -> tuple:
    chunk = store.get([key])[0]
    h = chunk.header
    return h.dtype, h.shape, h.layout, h.model, h.num_tokens, bytes(chunk.payload)


def test_a_shard_set_counts_a_chunk_only_when_every_shard_holds_it(store: TieredStore) -> None:
    paged = _cache("NHD")
    ranks = [ChunkStore(store, _namespace(paged, tp_size=2, tp_rank=r), make_copier("cpu")) for r in range(2)]
    shards = ShardSet([r.namespace for r in ranks])
    tokens = list(range(100, 133))  # 4 full chunks and a 1-token tail
    chain = PromptChain.of(tokens, CHUNK)
    assert shards.held_tokens(store, chain) == 0
    ranks[0].save(tokens, paged, split_slots(_slots(33, 1), CHUNK), wait=True)  # rank 0: every chunk and the tail
    ranks[1].save(tokens[:16], paged, split_slots(_slots(16, 2), CHUNK), wait=True)  # rank 1: still writing
    assert ranks[0].lookup(tokens) == 33  # what a rank-0-only lookup would have promised
    assert shards.held_tokens(store, chain) == 16
    ranks[1].save(tokens, paged, split_slots(_slots(33, 2), CHUNK)[2:], first_chunk=2, wait=True)
    assert shards.held_tokens(store, chain) == 33
    assert shards.held_tokens(store, chain, salt="other") == 0
    assert len(ShardSet([ranks[0].namespace, ranks[0].namespace])) == 1  # MLA ranks share one namespace
