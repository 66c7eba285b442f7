"""``kvtier demo``: a KV cache saved into the configured tiers and loaded back, byte-exact.

It stands in for two engine instances: the first "computes" (random) KV for a 4096-token
prompt in its paged cache and saves it; the second, with a cache laid out in other blocks, looks
the prompt up and loads it. Then the store is reopened, as after a restart, and the load comes
from the persistent tier. The vLLM engine demo builds on the same ChunkStore.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table

from kvtier.chunk_format.dtypes import dtype_name
from kvtier.chunk_format.keys import KeyNamespace
from kvtier.connector.chunk_store import ChunkStore, split_slots
from kvtier.connector.config import load_config
from kvtier.connector.store_factory import build_store
from kvtier.cuda_ext import PagedKV, make_copier

LAYERS, HEADS, HEAD_DIM, BLOCK, NUM_BLOCKS, PROMPT = 8, 4, 64, 16, 320, 4096


def _engine_cache(seed: int) -> tuple[PagedKV, torch.Tensor]:
    """A vLLM-style NHD paged cache (K|V packed in the last dim) and a shuffled block table."""
    layers = [torch.zeros(NUM_BLOCKS, BLOCK, HEADS, 2 * HEAD_DIM, dtype=torch.float16) for _ in range(LAYERS)]
    blocks = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed))[: PROMPT // BLOCK]
    slots = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)
    return PagedKV.from_vllm(layers, "NHD", HEAD_DIM), slots


def _prompt_kv(paged: PagedKV, slots: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.stack([k.reshape(-1, HEADS, HEAD_DIM)[slots], v.reshape(-1, HEADS, HEAD_DIM)[slots]])
                        for k, v in zip(paged.keys, paged.values)])


def run_demo(console: Console, config_path: str | None = None) -> int:
    config = load_config(config_path)
    copier = make_copier(torch.device("cpu"))
    paged_a, slots_a = _engine_cache(seed=1)
    namespace = KeyNamespace(model="demo/llama-8l", kv_dtype=dtype_name(paged_a.dtype), layout=paged_a.format_id,
                             num_layers=LAYERS, kv_heads=HEADS, head_dim=HEAD_DIM, tp_size=1, tp_rank=0,
                             chunk_size=config.chunk_size, salt=config.namespace)
    tokens = torch.randint(0, 32000, (PROMPT,), generator=torch.Generator().manual_seed(time.time_ns())).tolist()
    for layer in paged_a.keys:  # "prefill": the KV that a real engine would compute
        layer.copy_(torch.randn(layer.shape).to(torch.float16))
    for layer in paged_a.values:
        layer.copy_(torch.randn(layer.shape).to(torch.float16))

    tiers = ", ".join(f"{t.name} ({t.type})" for t in config.tiers)
    console.print(f"[bold]kvtier demo[/bold]: {PROMPT}-token prompt, {LAYERS} layers x {HEADS} KV heads x {HEAD_DIM}, "
                  f"fp16, chunks of {config.chunk_size} tokens; tiers: {tiers}")
    table = Table()
    for column in ("step", "tokens found", "time", "KV identical"):
        table.add_column(column)

    store = build_store(config)
    chunks = ChunkStore(store, namespace, copier)
    t0 = time.perf_counter()
    found = chunks.lookup(tokens)
    stored = chunks.save(tokens, paged_a, split_slots(slots_a, config.chunk_size), wait=True)
    store.flush()
    table.add_row("engine A: lookup (miss), save", str(found), f"{(time.perf_counter() - t0) * 1e3:.1f} ms",
                  f"{stored} chunks stored")

    expected = _prompt_kv(paged_a, slots_a)[:, :, : (PROMPT // config.chunk_size) * config.chunk_size]
    ok = True
    for step, reopen in (("engine B: lookup + load", False), ("after restart: lookup + load", True)):
        if reopen:
            store.close()
            store = build_store(config)
            chunks = ChunkStore(store, namespace, copier)
        paged_b, slots_b = _engine_cache(seed=2 + reopen)
        t0 = time.perf_counter()
        hit_tokens = chunks.lookup(tokens)
        loaded = chunks.load(tokens, paged_b, split_slots(slots_b, config.chunk_size)[: hit_tokens // config.chunk_size])
        elapsed = time.perf_counter() - t0
        same = torch.equal(_prompt_kv(paged_b, slots_b)[:, :, : expected.shape[2]], expected)
        ok &= same and loaded * config.chunk_size == expected.shape[2]
        table.add_row(step, str(hit_tokens), f"{elapsed * 1e3:.1f} ms", "yes" if same else "[red]NO[/red]")
    console.print(table)
    stats = store.stats()
    console.print("after restart, hits by tier: " + ", ".join(f"{n} {int(s['get_hits'])}" for n, s in stats.items()))
    store.close()
    return 0 if ok else 1
