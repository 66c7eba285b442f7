"""kvtier as an SGLang HiCache storage backend, built through SGLang's own factory (sglang 0.5.23).

Host pools need a GPU in SGLang, so a CPU tensor in SGLang's host layouts stands in for one
(:class:`HostPool` has the attributes of ``MHATokenToKVPoolHost`` / ``MLATokenToKVPoolHost`` the
backend reads). Page keys come from SGLang's own ``get_hash_str``. The cross-engine tests save
through the vLLM connector's code path (its namespace construction, planner slots and
``PagedKV.from_vllm`` over a GPU-layout tensor) and load through the SGLang backend, and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
from sglang.srt.mem_cache.utils import get_hash_str

from kvtier.connector.chunk_store import ChunkStore
from kvtier.connector.config import ConfigError, load_config
from kvtier.connector.engine_setup import EngineSetup
from kvtier.connector.planner import TransferSpec, chunk_slots
from kvtier.connector.sglang import KVTierHiCacheStorage
from kvtier.connector.store_registry import STORES
from kvtier.connector.vllm_layout import CacheShape, EngineLayout, model_settings, namespace
from kvtier.cuda_ext import PagedKV, make_copier

L, H, D, DM, PAGE, SLOTS = 2, 2, 8, 12, 4, 64  # layers, KV heads, head dim, MLA latent dim, page, host slots
MODEL = "org/tiny-model"
BACKEND = {"backend_name": "kvtier", "module_path": "kvtier.connector.sglang",
           "class_name": "KVTierHiCacheStorage", "interface_v1": 1}
SHAPES = {  # SGLang host pool buffer shapes (memory_pool_host: MHATokenToKVPoolHost / MLATokenToKVPoolHost)
    ("mha", "layer_first"): (2, L, SLOTS, H, D),
    ("mha", "page_first"): (2, SLOTS, L, H, D),
    ("mha", "page_first_direct"): (2, SLOTS // PAGE, L, PAGE, H, D),
    ("mha", "page_head"): (2, SLOTS // PAGE, H, PAGE, L, D),
    ("mla", "layer_first"): (L, SLOTS, 1, DM),
    ("mla", "page_first"): (SLOTS, L, 1, DM),
    ("mla", "page_first_direct"): (SLOTS // PAGE, L, PAGE, 1, DM),
}


@dataclass
class HostPool:
    """The attributes of SGLang's host pools that a storage backend uses, over a CPU tensor."""

    kv_buffer: torch.Tensor
    layout: str
    mla: bool  # MLATokenToKVPoolHost (no K/V planes, one latent "head")
    page_size: int = PAGE
    storage_format_tag: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.kv_buffer.dtype

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        """As ``MHATokenToKVPoolHost.get_data_page`` for the token-major layouts."""
        assert self.layout in ("layer_first", "page_first")
        token_dim = (0 if self.mla else 1) + (1 if self.layout == "layer_first" else 0)
        page = self.kv_buffer.narrow(token_dim, index, self.page_size)
        return page.flatten() if flat else page


def make_pool(kind: str, layout: str, seed: int | None, dtype: torch.dtype = torch.bfloat16) -> HostPool:
    shape = SHAPES[(kind, layout)]
    if seed is None:
        return HostPool(torch.zeros(shape, dtype=dtype), layout, kind == "mla")
    g = torch.Generator().manual_seed(seed)
    return HostPool(torch.randn(shape, generator=g).to(dtype), layout, kind == "mla")


def storage_config(extra: dict, *, mla: bool = False, tp_rank: int = 0, tp_size: int = 1,
                   model: str = MODEL) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=False, is_page_first_layout=False, model_name=model,
        extra_config={**BACKEND, **extra},
    )


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"chunk_size: {PAGE}\ntiers:\n  - {{type: disk, path: '{tmp_path / 'store'}'}}\n")
    return path


@pytest.fixture
def backends():
    """Backends built through SGLang's factory, as ``attach_storage_backend`` does; closed at the end."""
    made: list[KVTierHiCacheStorage] = []

    def build(pool: HostPool, extra: dict, **kwargs) -> KVTierHiCacheStorage:
        backend = StorageBackendFactory.create_backend("dynamic", storage_config(extra, **kwargs), pool)
        made.append(backend)  # SGLang closes a backend whose registration failed, too
        backend.register_mem_pool_host(pool)
        return backend

    yield build
    for backend in made:
        backend.close()


def host_pages(pages: list[int]) -> torch.Tensor:
    """Host indices of whole pages, ``page_size`` consecutive slots each (as SGLang's allocator)."""
    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages])


def tokens_of(n_pages: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n_pages * PAGE))


def page_kv(pool: HostPool, slots: torch.Tensor) -> torch.Tensor:
    """The KV of host ``slots`` as ``[L, planes, tokens, H, D]``, by plain indexing of the documented
    buffer shapes (independent of the backend's view code)."""
    buf, page = pool.kv_buffer, slots // PAGE
    off = slots % PAGE
    if pool.mla:
        per_layer = {"layer_first": lambda i: buf[i, slots], "page_first": lambda i: buf[slots, i],
                     "page_first_direct": lambda i: buf[page, i, off]}[pool.layout]
        return torch.stack([per_layer(i)[None] for i in range(L)])
    per_plane = {
        "layer_first": lambda p, i: buf[p, i, slots],
        "page_first": lambda p, i: buf[p, slots, i],
        "page_first_direct": lambda p, i: buf[p, page, i, off],
        "page_head": lambda p, i: buf[p, page, :, off, i],
    }[pool.layout]
    return torch.stack([torch.stack([per_plane(0, i), per_plane(1, i)]) for i in range(L)])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


# -- SGLang's factory and contract ------------------------------------------------------------------

def test_sglangs_factory_builds_the_backend_from_the_dynamic_config(backends, config_file: Path) -> None:
    backend = backends(make_pool("mha", "page_first", 1), {"config": str(config_file)})
    assert isinstance(backend, KVTierHiCacheStorage)
    assert backend._chunks.namespace.model == MODEL and backend._chunks.namespace.chunk_size == PAGE
    with pytest.raises(ConfigError, match="no_such_key"):
        StorageBackendFactory.create_backend("dynamic", storage_config({"config": str(config_file),
                                                                         "no_such_key": 1}), None)


def test_a_page_size_other_than_chunk_size_is_refused_naming_both(backends, config_file: Path) -> None:
    pool = make_pool("mha", "layer_first", 1)
    with pytest.raises(ValueError, match=r"chunk_size 8 must equal SGLang's page size 4"):
        backends(pool, {"config": str(config_file), "chunk_size": 8})


@pytest.mark.parametrize("kind, layout", sorted(SHAPES))
def test_pages_round_trip_byte_exact_between_host_slots(backends, config_file: Path, kind: str,
                                                        layout: str) -> None:
    src, dst = make_pool(kind, layout, 1), make_pool(kind, layout, None)
    writer = backends(src, {"config": str(config_file)}, mla=kind == "mla")
    reader = backends(dst, {"config": str(config_file)}, mla=kind == "mla")
    keys = get_hash_str(tokens_of(3), page_size=PAGE)
    src_idx, dst_idx = host_pages([5, 2, 9]), host_pages([0, 11, 3])
    assert reader.batch_exists(keys) == 0
    assert writer.batch_set_v1(keys, src_idx) == [True, True, True]
    assert reader.batch_exists(keys) == 3
    stored = writer._store.get(writer._chunks.keys_from_chain(keys))  # the canonical chunk format
    for j, chunk in enumerate(stored):
        payload = torch.frombuffer(bytearray(chunk.payload), dtype=torch.bfloat16).view(chunk.header.shape)
        assert same_bits(payload, page_kv(src, src_idx[j * PAGE : (j + 1) * PAGE]))
    assert reader.batch_get_v1(keys, dst_idx) == [True, True, True]
    assert same_bits(page_kv(dst, dst_idx), page_kv(src, src_idx))
    untouched = torch.ones(SLOTS, dtype=torch.bool)
    untouched[dst_idx] = False
    assert not page_kv(dst, torch.arange(SLOTS)[untouched]).any()


def test_leading_hit_semantics_a_missing_middle_page_stops_the_count(backends, config_file: Path) -> None:
    src, dst = make_pool("mha", "page_first", 1), make_pool("mha", "page_first", None)
    backend = backends(src, {"config": str(config_file)})
    keys = get_hash_str(tokens_of(4), page_size=PAGE)
    for i in (0, 1, 3):
        assert backend.batch_set_v1([keys[i]], host_pages([i])) == [True]
    assert backend.batch_exists(keys) == 2
    assert backend.batch_exists(keys[3:]) == 1
    reader = backends(dst, {"config": str(config_file)})
    assert reader.batch_get_v1(keys, host_pages([0, 1, 2, 3])) == [True, True, False, False]
    assert same_bits(page_kv(dst, host_pages([0, 1])), page_kv(src, host_pages([0, 1])))
    assert not page_kv(dst, host_pages([2, 3])).any()  # page 3 exists but follows a miss: not loaded


def test_bad_inputs_are_misses_never_exceptions(backends, config_file: Path) -> None:
    backend = backends(make_pool("mha", "page_first", 1), {"config": str(config_file)})
    keys = get_hash_str(tokens_of(2), page_size=PAGE)
    assert backend.batch_set_v1(keys, host_pages([0, 1])) == [True, True]
    assert backend.batch_exists([keys[0], "not-a-hash", keys[1]]) == 1
    assert backend.batch_get_v1(keys, host_pages([0])) == [False, False]  # indices for one page only
    assert backend.batch_set_v1(keys, host_pages([0])) == [False, False]
    assert backend.clear() is False  # a shared store is never wiped from one engine


def test_tp_ranks_have_their_own_keys_and_mla_is_written_once(backends, config_file: Path) -> None:
    keys = get_hash_str(tokens_of(1), page_size=PAGE)
    rank0 = backends(make_pool("mha", "layer_first", 1), {"config": str(config_file)}, tp_size=2, tp_rank=0)
    rank1 = backends(make_pool("mha", "layer_first", 2), {"config": str(config_file)}, tp_size=2, tp_rank=1)
    assert rank0.batch_set_v1(keys, host_pages([0])) == [True]
    assert rank0.batch_exists(keys) == 1 and rank1.batch_exists(keys) == 0
    mla1 = backends(make_pool("mla", "page_first", 3), {"config": str(config_file)}, mla=True, tp_size=4, tp_rank=1)
    mla0 = backends(make_pool("mla", "page_first", 4), {"config": str(config_file)}, mla=True, tp_size=4, tp_rank=0)
    assert mla1.batch_set_v1(keys, host_pages([0])) == [True]  # not the writer: nothing stored
    assert mla0.batch_exists(keys) == 0
    assert mla0.batch_set_v1(keys, host_pages([0])) == [True]
    assert mla1.batch_exists(keys) == 1  # every rank reads the one copy
    dst = make_pool("mla", "page_first", None)
    assert backends(dst, {"config": str(config_file)}, mla=True, tp_size=2, tp_rank=1).batch_get_v1(
        keys, host_pages([7])) == [True]
    assert same_bits(page_kv(dst, host_pages([7])), page_kv(make_pool("mla", "page_first", 4), host_pages([0])))


def test_generic_interface_moves_flat_host_pages(backends, config_file: Path) -> None:
    """Without interface_v1 SGLang passes flat pages (get_data_page / get_dummy_flat_data_page)."""
    src, dst = make_pool("mha", "layer_first", 1), make_pool("mha", "layer_first", None)
    backend = backends(src, {"config": str(config_file)})
    keys = get_hash_str(tokens_of(2), page_size=PAGE)
    assert backend.batch_set(keys, [src.get_data_page(4 * PAGE), src.get_data_page(1 * PAGE)]) is True
    assert backend.exists(keys[1]) and not backend.exists(get_hash_str(tokens_of(1, start=7))[0])
    pages = backend.batch_get(keys, [torch.zeros_like(src.get_data_page(0)) for _ in keys])
    assert all(p is not None for p in pages)
    assert same_bits(pages[0], src.get_data_page(4 * PAGE)) and same_bits(pages[1], src.get_data_page(PAGE))
    assert backend.get(get_hash_str(tokens_of(1, start=7))[0], torch.zeros_like(src.get_data_page(0))) is None
    assert dst.kv_buffer.count_nonzero() == 0


def test_a_redis_tier_and_its_outage(backends, tmp_path: Path, redis_server) -> None:
    path = tmp_path / "redis.yaml"
    path.write_text(f"chunk_size: {PAGE}\ntiers:\n  - {{type: redis, url: '{redis_server.url}', "
                    "connect_timeout_s: 0.2, op_timeout_s: 0.5, retry_interval_s: 0.1}\n")
    src, dst = make_pool("mha", "page_first", 1), make_pool("mha", "page_first", None)
    writer = backends(src, {"config": str(path)})
    keys = get_hash_str(tokens_of(3), page_size=PAGE)
    assert writer.batch_set_v1(keys, host_pages([0, 1, 2])) == [True] * 3
    assert writer.batch_exists(keys) == 3
    reader = backends(dst, {"config": str(path)})
    assert reader.batch_get_v1(keys, host_pages([3, 4, 5])) == [True] * 3
    assert same_bits(page_kv(dst, host_pages([3, 4, 5])), page_kv(src, host_pages([0, 1, 2])))
    redis_server.stop()
    more = get_hash_str(tokens_of(4), page_size=PAGE)
    assert reader.batch_exists(keys) == 0
    assert reader.batch_get_v1(keys, host_pages([6, 7, 8])) == [False] * 3
    assert writer.batch_set_v1(more, host_pages([0, 1, 2, 3])) == [False] * 4


# -- one cache for vLLM and SGLang ------------------------------------------------------------------

BLOCK, BLOCKS = 2, 16  # vLLM's block size divides the chunk (page) size


@pytest.fixture
def vllm_side():
    """ChunkStores built by the vLLM connector's own namespace construction (``vllm_layout.namespace``
    with the settings a default vLLM run reports) over the shared store of a config; released at the end."""
    acquired = []

    def build(config_path: Path, tp_size: int = 1, tp_rank: int = 0, mla: bool = False) -> ChunkStore:
        config = load_config(config_path)
        store, _ = STORES.acquire(config)
        acquired.append(config)
        shape = CacheShape(layer_names=tuple(f"layers.{i}.attn" for i in range(L)), block_size=BLOCK,
                           kv_heads=1 if mla else H, head_size=DM if mla else D, dtype=torch.bfloat16, mla=mla,
                           opaque_backend=None)
        model = SimpleNamespace(model=MODEL, revision=None, code_revision=None, quantization=None, hf_overrides={},
                                dtype=torch.bfloat16)
        vllm_config = SimpleNamespace(model_config=model, cache_config=SimpleNamespace(cache_dtype="auto"))
        layout = EngineLayout(tp_size=tp_size, pp_size=1, dp_local_rank=0, workers_apart=tp_size > 1, total_layers=L)
        setup = EngineSetup.of(config, MODEL, model_settings(vllm_config))
        ns = namespace(setup, shape, layout, tp_rank, 0, range(L))
        return ChunkStore(store, ns, make_copier("cpu"))

    yield build
    for config in acquired:
        STORES.release(config)


def vllm_cache(layout: str, seed: int | None, mla: bool = False) -> tuple[list[torch.Tensor], PagedKV]:
    """Per-layer GPU-layout tensors (on CPU): NHD ``[B, N, H, 2D]`` / HND ``[B, H, N, 2D]``, MLA ``[B, N, 1, DM]``."""
    shape = ((BLOCKS, BLOCK, 1, DM) if mla else
             (BLOCKS, BLOCK, H, 2 * D) if layout == "NHD" else (BLOCKS, H, BLOCK, 2 * D))
    g = torch.Generator().manual_seed(seed or 0)
    layers = [(torch.randn(shape, generator=g) if seed is not None else torch.zeros(shape)).to(torch.bfloat16)
              for _ in range(L)]
    return layers, PagedKV.from_vllm(layers, layout, DM if mla else D, mla=mla)


def vllm_kv(layers: list[torch.Tensor], layout: str, block_ids: list[int], n_tokens: int, mla: bool = False):
    """``[L, planes, tokens, H, D]`` read from the raw vLLM tensors, token by token."""
    out = []
    for t in layers:
        rows = []
        for pos in range(n_tokens):
            b, o = block_ids[pos // BLOCK], pos % BLOCK
            rows.append(t[b, o] if layout == "NHD" or mla else t[b, :, o])
        x = torch.stack(rows)  # [tokens, H, C]
        out.append(x[None] if mla else torch.stack([x[..., :D], x[..., D:]]))
    return torch.stack(out)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_a_chunk_saved_by_vllm_loads_through_the_sglang_backend(backends, vllm_side, config_file: Path,
                                                                 layout: str) -> None:
    tokens = tokens_of(3, start=40)
    layers, paged = vllm_cache(layout, 5)
    block_ids = [9, 3, 14, 0, 7, 11]
    spec = TransferSpec("req", [], len(tokens), block_ids, "", 0, 3)
    assert vllm_side(config_file).save(tokens, paged, chunk_slots(spec, PAGE, BLOCK, False), wait=True) == 3
    pool = make_pool("mha", "page_first", None)
    backend = backends(pool, {"config": str(config_file)})
    keys = get_hash_str(tokens, page_size=PAGE)  # what SGLang hands its backend for these tokens
    assert backend.batch_exists(keys) == 3
    idx = host_pages([6, 1, 12])
    assert backend.batch_get_v1(keys, idx) == [True] * 3
    assert same_bits(page_kv(pool, idx), vllm_kv(layers, layout, block_ids, len(tokens)))
    other = get_hash_str([1, *tokens[1:]], page_size=PAGE)  # one token differs: no page matches
    assert backend.batch_exists(other) == 0


def test_a_chunk_saved_by_sglang_loads_into_a_vllm_hnd_cache(backends, vllm_side, config_file: Path) -> None:
    tokens = tokens_of(2, start=77) + [5, 6]  # 2 full chunks and a tail vLLM would compute itself
    pool = make_pool("mha", "layer_first", 8)
    backend = backends(pool, {"config": str(config_file)})
    idx = host_pages([10, 4])
    assert backend.batch_set_v1(get_hash_str(tokens[:8], page_size=PAGE), idx) == [True, True]
    loader = vllm_side(config_file)
    assert loader.lookup(tokens) == 8
    layers, paged = vllm_cache("HND", None)
    block_ids = [2, 15, 6, 1, 12]
    spec = TransferSpec("req", [], len(tokens[:8]), block_ids, "", 0, 2)
    assert loader.load(tokens[:8], paged, chunk_slots(spec, PAGE, BLOCK, False)) == 2
    assert same_bits(vllm_kv(layers, "HND", block_ids, 8), page_kv(pool, idx))
    assert not torch.stack(layers)[:, [b for b in range(BLOCKS) if b not in block_ids[:4]]].any()
    assert vllm_side(config_file, tp_size=2, tp_rank=1).lookup(tokens) == 0  # other sharding, other keys


def test_mla_chunks_are_shared_across_engines_and_tp_sizes(backends, vllm_side, config_file: Path) -> None:
    tokens = tokens_of(2, start=300)
    layers, paged = vllm_cache("NHD", 9, mla=True)
    block_ids = [4, 8, 1, 13]
    spec = TransferSpec("req", [], len(tokens), block_ids, "", 0, 2)
    saver = vllm_side(config_file, tp_size=2, tp_rank=1, mla=True)  # a vLLM TP=2 worker
    assert saver.save(tokens, paged, chunk_slots(spec, PAGE, BLOCK, False), wait=True) == 2
    pool = make_pool("mla", "page_first", None)
    backend = backends(pool, {"config": str(config_file)}, mla=True, tp_size=4, tp_rank=3)
    idx = host_pages([2, 9])
    assert backend.batch_get_v1(get_hash_str(tokens, page_size=PAGE), idx) == [True, True]
    assert same_bits(page_kv(pool, idx), vllm_kv(layers, "NHD", block_ids, len(tokens), mla=True))


def test_sglang_settings_that_change_the_kv_enter_the_namespace(backends, config_file: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """SGLang's real ServerArgs; publishing them needs SGLang's GPU-side imports, so the accessor the
    backend reads them through returns them directly. Defaults name the same namespace as vLLM's."""
    from sglang.srt import runtime_context
    from sglang.srt.server_args import ServerArgs

    from kvtier.chunk_format.keys import ModelSettings
    from kvtier.connector.sglang import _model_settings

    scales = tmp_path / "kv_scales.json"
    scales.write_text('{"kv_cache": {"scaling_factor": {"0": {"0": 0.5}}}}')

    def settings(**options) -> ModelSettings:
        args = ServerArgs(model_path=MODEL, device="cpu", **options)
        monkeypatch.setattr(runtime_context, "get_server_args", lambda: args)
        return _model_settings()

    assert settings().digest() == "" == ModelSettings().digest()
    variants = [settings(revision="v2"), settings(json_model_override_args='{"rope_theta": 5.0}'),
                settings(kv_cache_dtype="fp8_e4m3"), settings(kv_cache_dtype="fp8_e4m3", quantization_param_path=str(scales)),
                settings(quantization="fp8")]
    digests = [v.digest() for v in variants]
    assert len(set(digests)) == len(digests) and "" not in digests
    assert variants[1].overrides == {"rope_theta": 5.0}  # the meaning vLLM's hf_overrides have
    settings()  # the saver runs with every default
    saver = backends(make_pool("mha", "page_first", 1), {"config": str(config_file)})
    keys = get_hash_str(tokens_of(1, start=5), page_size=PAGE)
    assert saver.batch_set_v1(keys, host_pages([0])) == [True]
    monkeypatch.setattr(runtime_context, "get_server_args", lambda: ServerArgs(model_path=MODEL, device="cpu",
                                                                                revision="v2"))
    other = backends(make_pool("mha", "page_first", None), {"config": str(config_file)})
    assert other.batch_exists(keys) == 0  # another revision: another namespace, no hit
