"""The tiered store: top-down lookups, promotion, write-through, and corrupt chunks as counted misses."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from kvtier.chunk_format.codec import encode_chunk
from kvtier.connector.config import load_config
from kvtier.connector.store_factory import build_store
from kvtier.storage_backends.base import Buffer, StorageBackend
from kvtier.storage_backends.cpu_backend import CpuBackend
from kvtier.storage_backends.disk_backend import DiskBackend
from kvtier.storage_backends.metrics import TierMetrics
from kvtier.storage_backends.redis_backend import RedisBackend
from kvtier.storage_backends.tiered import TieredStore


def _key(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _chunk(i: int, size: int = 4096) -> tuple[str, bytearray]:
    payload = (str(i).encode() * size)[:size]
    return _key(i), encode_chunk(_key(i), "float16", (size // 2,), "test", "tiny", 16, payload)


@pytest.fixture
def cpu_disk(tmp_path: Path) -> TieredStore:
    store = TieredStore([CpuBackend(1 << 20, 4096), DiskBackend(tmp_path / "disk", 1 << 22)])
    yield store
    store.close()


def test_put_writes_through_and_get_validates(cpu_disk: TieredStore) -> None:
    items = [_chunk(i) for i in range(4)]
    assert cpu_disk.put(items) == 4
    cpu_disk.flush()
    cpu, disk = cpu_disk.tiers
    assert cpu.contains([k for k, _ in items]) == 4 and disk.contains([k for k, _ in items]) == 4
    chunks = cpu_disk.get([k for k, _ in items])
    assert [bytes(c.payload) for c in chunks] == [bytes(b[-4096:]) for _, b in items]
    assert cpu.stats()["get_hits"] == 4 and disk.stats()["get_hits"] == 0


def test_contains_spans_tiers_and_get_promotes(cpu_disk: TieredStore) -> None:
    cpu, disk = cpu_disk.tiers
    disk.put([_chunk(0), _chunk(2)])
    cpu.put([_chunk(1)])
    keys = [_key(i) for i in range(4)]
    assert cpu_disk.contains(keys) == 3  # 0 on disk, 1 in memory, 2 on disk, 3 nowhere
    got = cpu_disk.get(keys)
    assert [c is not None for c in got] == [True, True, True, False]
    cpu_disk.flush()
    assert cpu.contains(keys) == 3  # the disk hits were promoted


def test_top_only_policy_does_not_write_lower_tiers(tmp_path: Path) -> None:
    store = TieredStore([CpuBackend(1 << 20, 4096), DiskBackend(tmp_path, 1 << 22)], write_policy="top_only")
    store.put([_chunk(0)])
    store.flush()
    assert store.tiers[1].contains([_key(0)]) == 0
    store.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "other_key"])
def test_corrupt_disk_chunk_is_a_counted_miss_and_is_removed(tmp_path: Path, damage: str) -> None:
    disk = DiskBackend(tmp_path, 1 << 22)
    store = TieredStore([disk])
    key, blob = _chunk(7)
    store.put([(key, blob)])
    path = next(tmp_path.rglob(f"{key}.kvc"))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"\x00" * len(data))
    else:
        data = _chunk(8)[1]  # a valid chunk, but stored under the wrong name
    path.write_bytes(data)
    assert store.get([key]) == [None]
    assert disk.stats()["corrupt_chunks"] == 1
    assert store.flush(timeout=10)  # the delete runs on the tier's writer: a read never waits for its lock
    assert disk.contains([key]) == 0  # dropped, so the next save rewrites it
    store.close()


def test_corrupt_upper_copy_falls_back_to_a_good_lower_copy(tmp_path: Path) -> None:
    upper, lower = DiskBackend(tmp_path / "a", 1 << 22, name="near"), DiskBackend(tmp_path / "b", 1 << 22, name="far")
    store = TieredStore([upper, lower])
    key, blob = _chunk(3)
    store.put([(key, blob)])
    store.flush()
    path = next((tmp_path / "a").rglob(f"{key}.kvc"))
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    chunk = store.get([key])[0]
    assert chunk is not None and bytes(chunk.payload) == bytes(blob[-4096:])
    assert upper.stats()["corrupt_chunks"] == 1 and lower.stats()["get_hits"] == 1
    store.flush()
    assert upper.contains([key]) == 1  # repaired by promotion
    store.close()


class _StalledTier(StorageBackend):
    """A tier whose writes hang until released (a Redis stuck in a long command, a dead NFS)."""

    def __init__(self) -> None:
        super().__init__("stalled", TierMetrics("stalled"))
        self.release = threading.Event()

    def contains(self, keys: Sequence[str]) -> int:
        return 0

    def get(self, keys: Sequence[str]) -> list[Buffer | None]:
        return [None] * len(keys)

    def put(self, items: Sequence[tuple[str, Buffer]]) -> int:
        self.release.wait(30)
        return 0

    def delete(self, keys: Sequence[str]) -> int:
        return 0


def test_a_stalled_lower_tier_never_blocks_the_caller_and_drops_are_counted() -> None:
    stalled = _StalledTier()
    store = TieredStore([CpuBackend(1 << 22, 4096), stalled], max_pending_writes=2)
    start = time.perf_counter()
    for i in range(20):
        assert store.put([_chunk(i)]) == 1
    assert time.perf_counter() - start < 2.0
    assert stalled.stats()["skipped_stores"] >= 17  # at most 2 queued and 1 in flight
    assert store.contains([_key(i) for i in range(20)]) == 20
    stalled.release.set()
    store.close()


def test_put_async_returns_at_once_and_lands(cpu_disk: TieredStore) -> None:
    future = cpu_disk.put_async([_chunk(i) for i in range(3)])
    assert future is not None and future.result(timeout=10) == 3
    cpu_disk.flush()
    assert cpu_disk.tiers[1].contains([_key(i) for i in range(3)]) == 3


def test_build_store_with_all_three_tiers_and_redis_outage(tmp_path: Path, redis_server) -> None:
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"""
chunk_size: 16
tiers:
  - {{type: cpu, max_bytes: 1MiB, slot_bytes: 4KiB}}
  - {{type: disk, path: {tmp_path / 'disk'}, max_bytes: 4MiB}}
  - {{type: redis, url: '{redis_server.url}', connect_timeout_s: 0.2, op_timeout_s: 0.5, retry_interval_s: 0.1}}
""")
    store = build_store(load_config(path, environ={}))
    assert [type(t) for t in store.tiers] == [CpuBackend, DiskBackend, RedisBackend]
    store.put([_chunk(i) for i in range(3)])
    store.flush()
    assert store.tiers[2].contains([_key(i) for i in range(3)]) == 3
    # Only Redis holds chunk 9; then Redis dies: a miss, no exception, other tiers still serve.
    store.tiers[2].put([_chunk(9)])
    redis_server.stop()
    assert store.contains([_key(9)]) == 0 and store.get([_key(9)]) == [None]
    assert all(c is not None for c in store.get([_key(i) for i in range(3)]))
    store.put([_chunk(4)])
    store.flush()
    assert store.tiers[2].stats()["errors"] >= 1
    store.close()


def test_metrics_are_served_over_http(tmp_path: Path) -> None:
    import socket
    import urllib.request

    from kvtier.connector.store_factory import serve_metrics
    from kvtier.storage_backends.metrics import MetricSet

    metric_set = MetricSet()
    store = TieredStore([CpuBackend(1 << 20, 4096, metrics=TierMetrics("cpu", metric_set))])
    store.put([_chunk(1)])
    store.get([_key(1), _key(2)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve_metrics(metric_set, port)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    assert 'kvtier_get_hits_total{tier="cpu"} 1.0' in text
    assert 'kvtier_get_misses_total{tier="cpu"} 1.0' in text
    assert 'kvtier_op_seconds_count{op="get",tier="cpu"} 1.0' in text
    store.close()


class _PriorityProbe(CpuBackend):
    """A cpu tier that records the nice value of the thread its puts run on."""

    def __init__(self, name: str) -> None:
        super().__init__(1 << 20, 4096, name=name)
        self.nice: list[int] = []

    def put(self, items: Sequence[tuple[str, Buffer]]) -> int:
        self.nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return super().put(items)


def test_writer_threads_run_below_the_engine_s_priority() -> None:
    ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if ours > 14:
        pytest.skip(f"this process already runs at nice {ours}")
    top, lower = _PriorityProbe("top"), _PriorityProbe("lower")
    store = TieredStore([top, lower], writer_nice=5)
    store.put([_chunk(1)])  # the top tier is written by the caller, the lower one by its writer
    store.put_async([_chunk(2)])
    assert store.flush(5.0)
    assert top.nice == [ours, ours + 5] and lower.nice == [ours + 5, ours + 5]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == ours  # the caller is untouched
    store.close()
    default = TieredStore([_PriorityProbe("only")])
    default.put_async([_chunk(3)])
    assert default.flush(5.0) and default.tiers[0].nice == [ours]
    default.close()
