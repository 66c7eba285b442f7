"""Load or recompute: the estimates, the choice per request, and loads that stop once reading runs
slower than recompute (through a real ChunkStore over a tier that really sleeps)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import pytest
import torch

from kvtier.chunk_format.dtypes import dtype_name
from kvtier.chunk_format.keys import KeyNamespace
from kvtier.connector.chunk_store import ChunkStore, split_slots
from kvtier.connector.load_cost import LoadCosts, LoadReport, StepReport, StepTimer
from kvtier.cuda_ext import PagedKV, make_copier
from kvtier.storage_backends.base import Buffer, StorageBackend
from kvtier.storage_backends.cpu_backend import CpuBackend
from kvtier.storage_backends.metrics import TierMetrics
from kvtier.storage_backends.tiered import TieredStore

MS = 1e-3


def taught(costs: LoadCosts, prefill_s_per_token: float, tiers: dict[str, float]) -> LoadCosts:
    """``costs`` after one 1000-token step at the given speed and one 1000-token read per tier."""
    costs.observe_step(1000, 1000 * prefill_s_per_token)
    report = LoadReport()
    for tier, s_per_token in tiers.items():
        report.add(tier, 1000, 1000 * s_per_token)
    costs.observe_reads(report)
    return costs


def test_without_a_prefill_estimate_everything_held_is_loaded_in_the_step() -> None:
    costs = LoadCosts()
    choice = costs.choose([("redis", 512)], 0, 511)
    assert (choice.tokens, choice.background, choice.estimated_s) == (511, False, None)
    assert costs.choose([("redis", 512)], 300, 300).tokens == 0


def test_only_the_prefix_that_pays_is_loaded() -> None:
    costs = taught(LoadCosts(), 1 * MS, {"cpu": 0.01 * MS, "disk": 0.1 * MS, "redis-slow": 5 * MS})
    assert costs.choose([("cpu", 256), ("disk", 256)], 0, 511).tokens == 511  # both faster than recompute
    assert costs.choose([("redis-slow", 512)], 0, 511).tokens == 0  # slower: recompute
    assert costs.choose([("cpu", 256), ("redis-slow", 256)], 0, 511).tokens == 256  # the cpu run alone
    # A slow run followed by a long fast one: the prefix through both still pays (the choice is a prefix).
    assert costs.choose([("redis-slow", 256), ("cpu", 4096)], 0, 4352).tokens == 4352
    # The engine's own hit comes first: only tokens beyond it count.
    assert costs.choose([("cpu", 256), ("redis-slow", 256)], 256, 511).tokens == 0


def test_a_tier_s_latency_counts_once_per_run() -> None:
    costs = taught(LoadCosts(), 1 * MS, {"remote": 0.1 * MS})
    for _ in range(20):
        costs.observe_lookup("remote", 50 * MS)  # a round trip of 50 ms: as long as recomputing 50 tokens
    assert costs.tier_estimate("remote")[0] == pytest.approx(50 * MS, rel=0.01)
    assert costs.choose([("remote", 32)], 0, 32).tokens == 0  # 32 tokens do not pay the round trip
    assert costs.choose([("remote", 512)], 0, 512).tokens == 512


def test_a_tier_not_read_yet_is_assumed_fast() -> None:
    costs = taught(LoadCosts(), 1 * MS, {})
    choice = costs.choose([("disk", 256)], 0, 256)
    assert choice.tokens == 256 and not choice.background and choice.estimated_s is None


def test_the_settings_force_either_behaviour() -> None:
    slow = {"redis-slow": 5 * MS}
    assert taught(LoadCosts(policy="always"), 1 * MS, slow).choose([("redis-slow", 512)], 0, 511).tokens == 511
    assert taught(LoadCosts(policy="never"), 1 * MS, {}).choose([("cpu", 512)], 0, 511).tokens == 0


def test_long_loads_go_to_the_background_in_auto_mode() -> None:
    tiers = {"cpu": 0.001 * MS, "disk": 0.5 * MS}
    auto = taught(LoadCosts(mode="auto", async_above_s=0.1), 1 * MS, tiers)
    assert not auto.choose([("cpu", 4096)], 0, 4096).background  # about 4 ms
    choice = auto.choose([("disk", 4096)], 0, 4096)  # about 2 s, still cheaper than 4 s of recompute
    assert choice.tokens == 4096 and choice.background and choice.estimated_s == pytest.approx(2.048, rel=0.01)
    alone = auto.choose([("disk", 4096)], 0, 4096, others_running=False)  # nobody to serve meanwhile
    assert alone.tokens == 4096 and not alone.background
    assert not taught(LoadCosts(mode="sync"), 1 * MS, tiers).choose([("disk", 4096)], 0, 4096).background
    assert taught(LoadCosts(mode="async"), 1 * MS, tiers).choose([("cpu", 256)], 0, 256).background


def test_estimates_follow_a_tier_that_slows_down_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    costs = taught(LoadCosts(), 1 * MS, {"disk": 0.1 * MS})
    assert costs.choose([("disk", 512)], 0, 512).tokens == 512
    caplog.set_level(logging.INFO, "kvtier.connector.load_cost")
    busy = LoadReport()
    busy.add("disk", 100, 100 * 10 * MS)
    for _ in range(5):
        costs.observe_reads(busy)
    assert costs.choose([("disk", 512)], 0, 512).tokens == 0
    assert "disk tier is now slower than recomputing" in caplog.text
    quick = LoadReport()
    quick.add("disk", 1000, 1000 * 0.05 * MS)
    for _ in range(15):
        costs.observe_reads(quick)
    assert costs.choose([("disk", 512)], 0, 512).tokens == 512
    assert "disk tier is now faster than recomputing" in caplog.text


def test_short_steps_do_not_price_recompute() -> None:
    costs = LoadCosts(min_step_tokens=16)
    costs.observe_step(1, 0.05)  # a decode step: its fixed costs are not prefill
    assert costs.recompute_s_per_token is None
    costs.observe_step(100, 0.2)
    assert costs.recompute_s_per_token == pytest.approx(2 * MS)


def test_the_step_timer_takes_kvtier_s_time_out_and_forgets_lost_reports() -> None:
    costs = LoadCosts(min_step_tokens=16)
    timer = StepTimer(costs, keep=4)
    assert not timer.planned(1, 8, now=0.0)  # too few tokens: not timed
    assert timer.planned(2, 200, now=10.0)
    timer.reported(StepReport(2, timed=True, kvtier_s=0.1), now=10.5)
    assert costs.recompute_s_per_token == pytest.approx(0.4 / 200)
    timer.planned(3, 100, now=20.0)
    for step in range(4, 10):
        timer.planned(step, 100, now=20.0)
    timer.reported(StepReport(3, timed=True), now=99.0)  # dropped meanwhile: not a 79 s step
    assert costs.recompute_s_per_token == pytest.approx(0.4 / 200)


def test_reports_of_several_workers_merge() -> None:
    first, second = StepReport(5, timed=True, kvtier_s=0.2), StepReport(5, timed=True, kvtier_s=0.3)
    first.loads.add("disk", 100, 0.01)
    second.loads.add("disk", 100, 0.03)
    second.loads.add("redis", 50, 0.05)
    merged = first.merge(second)
    assert merged.kvtier_s == 0.3 and merged.loads.tiers["disk"].tokens == 200
    assert merged.loads.tiers["disk"].seconds == pytest.approx(0.04) and merged.loads.tiers["redis"].reads == 1


# -- loads that stop: a real ChunkStore over a tier that sleeps per call ---------------------------

LAYERS, HEADS, DIM, BLOCK, BLOCKS, CHUNK = 2, 2, 8, 4, 64, 8


class SleepyTier(StorageBackend):
    """A cpu tier whose reads take ``delay_s`` longer (a slow link), counting its get calls."""

    def __init__(self, delay_s: float) -> None:
        super().__init__("sleepy", TierMetrics("sleepy"))
        self.inner = CpuBackend(1 << 22, 4096, name="sleepy-inner")
        self.delay_s = delay_s
        self.gets: list[int] = []

    def contains(self, keys: Sequence[str]) -> int:
        return self.inner.contains(keys)

    def get(self, keys: Sequence[str]) -> list[Buffer | None]:
        self.gets.append(len(keys))
        time.sleep(self.delay_s)
        return self.inner.get(keys)

    def put(self, items: Sequence[tuple[str, Buffer]]) -> int:
        return self.inner.put(items)

    def delete(self, keys: Sequence[str]) -> int:
        return self.inner.delete(keys)


def chunk_store(tier: StorageBackend) -> tuple[ChunkStore, PagedKV, list[torch.Tensor], list[int]]:
    layers = [torch.randn(BLOCKS, BLOCK, HEADS, 2 * DIM) for _ in range(LAYERS)]
    paged = PagedKV.from_vllm(layers, "NHD", DIM)
    namespace = KeyNamespace(model="tiny", kv_dtype=dtype_name(paged.dtype), layout=paged.format_id,
                             num_layers=LAYERS, kv_heads=HEADS, head_dim=DIM, tp_size=1, tp_rank=0, chunk_size=CHUNK)
    chunks = ChunkStore(TieredStore([tier]), namespace, make_copier("cpu"))
    tokens = list(range(64))  # 8 chunks
    slots = split_slots(torch.arange(64), CHUNK)
    assert chunks.save(tokens, paged, slots, wait=True) == 8
    return chunks, paged, slots, tokens


def test_a_load_reads_1_2_4_chunks_and_reports_what_it_read() -> None:
    tier = SleepyTier(0.0)
    chunks, paged, slots, tokens = chunk_store(tier)
    report = LoadReport()
    load = chunks.fetch_keys(chunks.keys(tokens), paged, slots, [CHUNK] * 8, recompute_s_per_token=1.0,
                             report=report)
    assert len(load.payloads) == 8 and tier.gets == [1, 2, 4, 1]
    assert report.tiers["sleepy"].tokens == pytest.approx(64) and report.tiers["sleepy"].reads == 4
    tier.gets.clear()
    assert len(chunks.fetch_keys(chunks.keys(tokens), paged, slots, [CHUNK] * 8).payloads) == 8
    assert tier.gets == [8]  # without a recompute price: one read


def test_a_load_slower_than_recompute_stops_after_its_first_read(caplog: pytest.LogCaptureFixture) -> None:
    tier = SleepyTier(0.05)  # 50 ms per read: over 6 ms per token
    chunks, paged, slots, tokens = chunk_store(tier)
    caplog.set_level(logging.INFO, "kvtier.connector.chunk_store")
    report = LoadReport()
    load = chunks.fetch_keys(chunks.keys(tokens), paged, slots, [CHUNK] * 8, recompute_s_per_token=1 * MS,
                             report=report)
    assert len(load.payloads) == 1 and tier.gets == [1]  # the rest is left to be recomputed
    assert "slower than recomputing" in caplog.text and "last 7 of 8 chunks" in caplog.text
    assert report.tiers["sleepy"].seconds >= 0.05


# -- which tier holds what: the runs the choice weighs ------------------------------------------------

def test_lookups_tell_which_tier_holds_each_run_and_how_long_each_took() -> None:
    top, lower = CpuBackend(1 << 20, 4096, name="top"), CpuBackend(1 << 20, 4096, name="lower")
    store = TieredStore([top, lower])
    keys = [f"{i:064x}" for i in range(5)]
    top.put([(keys[0], b"a")])
    lower.put([(k, b"b") for k in keys[1:3]])
    top.put([(keys[3], b"c")])
    looked: list[tuple[str, float]] = []
    assert store.contains_by_tier(keys, lambda tier, s: looked.append((tier, s))) == [("top", 1), ("lower", 2),
                                                                                    ("top", 1)]
    assert store.contains(keys) == 4
    assert [tier for tier, _ in looked] == ["top", "top", "lower", "top", "top", "lower"]
    assert all(seconds >= 0 for _, seconds in looked)
    store.close()


def test_a_chunk_counts_for_every_shard_in_the_runs() -> None:
    from kvtier.connector.shards import PromptChain, ShardSet

    base = KeyNamespace(model="tiny", kv_dtype="float32", layout="LBNHC", num_layers=2, kv_heads=2, head_dim=8,
                        tp_size=2, tp_rank=0, chunk_size=CHUNK)
    shards = ShardSet([base, dataclasses.replace(base, tp_rank=1)])
    chain = PromptChain.of(list(range(4 * CHUNK + 3)), CHUNK)  # 4 chunks and a tail
    keys = shards.keys(chain.digests)  # chunk-major: c0/r0, c0/r1, c1/r0, ...
    top, lower = CpuBackend(1 << 20, 4096, name="top"), CpuBackend(1 << 20, 4096, name="lower")
    store = TieredStore([top, lower])
    top.put([(k, b"x") for k in keys[:3]])  # chunk 0 on both ranks, chunk 1 on rank 0 only...
    lower.put([(k, b"x") for k in keys[3:6]])  # ...its rank 1 below, and chunk 2 (both ranks) below
    assert shards.held_runs(store, chain) == [("top", CHUNK), ("lower", 2 * CHUNK)]
    assert shards.held_tokens(store, chain) == 3 * CHUNK
    lower.put([(k, b"x") for k in keys[6:]])  # everything: the tail's tokens end the last run
    assert shards.held_runs(store, chain)[-1] == ("lower", 3 * CHUNK + 3)
    store.close()
