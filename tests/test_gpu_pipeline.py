"""The whole GPU save/load path outside an engine (``-m gpu``): a CUDA cache, the pinned cpu tier,
saves gathered on a store stream and encoded once done, loads fetched then copied layer by layer
on a load stream, as the vLLM connector drives them."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvtier.chunk_format.dtypes import dtype_name
from kvtier.chunk_format.keys import KeyNamespace
from kvtier.connector.chunk_store import ChunkStore, split_slots
from kvtier.connector.config import CpuTier, KVTierConfig
from kvtier.connector.store_factory import build_store
from kvtier.connector.transfers import CopyStreams, LayerwiseLoad
from kvtier.cuda_ext import PagedKV, make_copier

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs CuPy (pip install kvtier[cuda])"),
]

LAYERS, HEADS, DIM, BLOCK, BLOCKS, CHUNK = 4, 8, 128, 16, 256, 64


def _cache(fill: bool) -> PagedKV:
    shape = (BLOCKS, HEADS, BLOCK, 2 * DIM)  # the standardized HND view vLLM hands connectors
    layers = [(torch.randn(shape, device="cuda") if fill else torch.zeros(shape, device="cuda")).bfloat16()
              for _ in range(LAYERS)]
    return PagedKV.from_vllm(layers, "HND", DIM)


@pytest.mark.parametrize("host_access", ["direct", "staged"])
def test_save_then_layerwise_load_through_the_pinned_cpu_tier(host_access: str) -> None:
    store = build_store(KVTierConfig(tiers=[CpuTier(type="cpu", max_bytes=256 << 20, slot_bytes=4 << 20)]))
    src, dst = _cache(fill=True), _cache(fill=False)
    ns = KeyNamespace(model="m", kv_dtype=dtype_name(src.dtype), layout=src.format_id, num_layers=LAYERS,
                      kv_heads=HEADS, head_dim=DIM, tp_size=1, tp_rank=0, chunk_size=CHUNK)
    chunks = ChunkStore(store, ns, make_copier("cuda", max_sms=4, host_access=host_access))
    tokens = list(range(1000, 1000 + 5 * CHUNK + 17))  # five full chunks and a partial tail
    perm = torch.randperm(BLOCKS, generator=torch.Generator().manual_seed(0))
    slots = (perm[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)[: len(tokens)]
    streams = CopyStreams(torch.device("cuda"))
    with streams.storing():
        chunks.save(tokens, src, split_slots(slots, CHUNK))
    chunks.flush(timeout=30)
    assert chunks.lookup(tokens) == len(tokens)
    load = chunks.fetch(tokens, dst, split_slots(slots, CHUNK), skip_units=5)
    assert len(load.payloads) == 6 and all(p.is_pinned() for p in load.payloads)
    layerwise = LayerwiseLoad(chunks.copier, dst, [load], streams)
    for layer in range(LAYERS):
        layerwise.wait(layer)  # the current stream waits on the GPU for this layer only
        got = chunks.copier.gather(dst, slots[5:][None], layers=range(layer, layer + 1))
        want = chunks.copier.gather(src, slots[5:][None], layers=range(layer, layer + 1))
        assert torch.equal(got[:, layer], want[:, layer])
    torch.cuda.synchronize()
    assert layerwise.copies_done()
    assert not chunks.copier.gather(dst, slots[:5][None]).view(torch.int16).any()  # skipped: untouched
    chunks.close()
    store.close()
