"""The start-up both engine adapters share (connector/engine_setup.py) and SGLang's host-pool views
(cuda_ext/host_layouts.py), on their own: neither imports an engine."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from kvtier.chunk_format.keys import ModelSettings, make_namespace
from kvtier.connector.config import load_config
from kvtier.connector.engine_setup import CacheFormat, EngineSetup, Shard, StoreLease, engine_config, writes_chunks
from kvtier.cuda_ext import PagedKV
from kvtier.cuda_ext.host_layouts import SGLANG_HOST_LAYOUTS, sglang_host_view, sglang_one_page_shape, sglang_page_view

ROOT = Path(__file__).resolve().parents[1]


def test_the_config_comes_from_the_extra_dict_without_the_engines_own_keys(tmp_path: Path) -> None:
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"chunk_size: 32\ntiers:\n  - {{type: disk, path: '{tmp_path / 'd'}'}}\n")
    extra = {"config": str(path), "namespace": "tenant", "backend_name": "kvtier"}
    config = engine_config(extra, engine_keys={"backend_name"})
    assert config.chunk_size == 32 and config.namespace == "tenant"
    assert "config" in extra  # the engine's dict is left as it was


def test_every_rank_writes_except_mla_ranks_past_zero_unless_the_engine_names_its_writer() -> None:
    assert writes_chunks(False, 3) and writes_chunks(True, 0) and not writes_chunks(True, 1)
    assert writes_chunks(True, 1, declared=True) and not writes_chunks(False, 0, declared=False)
    assert not writes_chunks(True, 2, declared=None)  # not a bool: the MLA rule


def test_the_namespace_joins_the_configs_salt_with_the_shards() -> None:
    config = load_config(overrides={"namespace": "tenant", "chunk_size": 16}, environ={})
    setup = EngineSetup.of(config, "org/model", ModelSettings(revision="v2"))
    cache = CacheFormat("bfloat16", "kv", 4, 2, 64)
    ns = setup.namespace(cache, Shard(2, 1, 2, 1, first_layer=2, salt="attn_cp0/2"))
    assert ns == make_namespace(model="org/model", kv_dtype="bfloat16", layout="kv", num_layers=4, kv_heads=2,
                                head_dim=64, tp_size=2, tp_rank=1, chunk_size=16, salt="tenant\x00attn_cp0/2",
                                pp_size=2, pp_rank=1, first_layer=2, settings=ModelSettings(revision="v2").digest())
    assert setup.namespace(cache, Shard()).salt == "tenant"
    named = load_config(overrides={"model_id": "shared-name"}, environ={})
    assert EngineSetup.of(named, "/local/path", ModelSettings()).model == "shared-name"
    with pytest.raises(ValueError, match="SGLang passed no model name"):
        EngineSetup.of(load_config(environ={}), None, ModelSettings(), engine="SGLang")


def test_a_store_lease_is_given_back_once(tmp_path: Path) -> None:
    config = load_config(overrides={"tiers": [{"type": "disk", "path": str(tmp_path / "d")}]}, environ={})
    first = StoreLease(config)
    second = EngineSetup.of(config, "m", ModelSettings()).lease_store()
    assert first.store is second.store  # one store per config per process
    first.release()
    first.release()  # a second release drops nobody else's hold
    third = StoreLease(config)
    assert third.store is second.store  # still open for the second holder
    second.release()
    third.release()
    again = StoreLease(config)
    assert again.store is not first.store  # the last release closed it
    again.release()


def test_cache_format_of_a_paged_view() -> None:
    paged = PagedKV.from_sglang_page_first(torch.zeros(2, 8, 3, 2, 4, dtype=torch.float16), 4)
    assert CacheFormat.of(paged) == CacheFormat("float16", "kv", 3, 2, 4)


@pytest.mark.parametrize("layout", SGLANG_HOST_LAYOUTS)
def test_a_flat_page_reads_as_the_pools_own_page(layout: str) -> None:
    shapes = {"layer_first": (2, 3, 16, 2, 4), "page_first": (2, 16, 3, 2, 4),
              "page_first_direct": (2, 4, 3, 4, 2, 4), "page_head": (2, 4, 2, 4, 3, 4)}
    pool = torch.arange(torch.Size(shapes[layout]).numel(), dtype=torch.float32).view(shapes[layout])
    view = sglang_host_view(pool, layout, 4, mla=False)
    assert (view.num_layers, view.block_size, view.heads, view.dim) == (3, 4, 2, 4)
    page_shape = sglang_one_page_shape(tuple(pool.shape), layout, 4, mla=False)
    page = torch.zeros(page_shape).flatten()
    one = sglang_page_view(page, tuple(pool.shape), layout, 4, mla=False)
    assert one.num_blocks == 1 and one.keys[0].data_ptr() == page.data_ptr()


def test_bad_host_buffers_are_refused_naming_the_shape() -> None:
    with pytest.raises(ValueError, match=r"MHA host buffer of layout page_first has shape \(3, 16, 3, 2, 4\)"):
        sglang_host_view(torch.zeros(3, 16, 3, 2, 4), "page_first", 4, mla=False)
    with pytest.raises(ValueError, match="no page_head layout"):
        sglang_host_view(torch.zeros(4, 2, 4, 3, 4), "page_head", 4, mla=True)
    with pytest.raises(ValueError, match="unknown SGLang host layout"):
        sglang_host_view(torch.zeros(2, 16, 3, 2, 4), "page_last", 4, mla=False)


@pytest.mark.parametrize("path", ["connector/engine_setup.py", "cuda_ext/host_layouts.py"])
def test_the_core_and_the_copy_layer_import_no_engine_adapter(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text())
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    engines = ("vllm", "sglang", "kvtier.connector.vllm", "kvtier.connector.sglang")
    assert not [n for n in names if n.lstrip(".").startswith(engines)]
    if path.startswith("cuda_ext"):
        assert not [n for n in names if n.startswith(("kvtier.connector", "kvtier.storage_backends"))]
