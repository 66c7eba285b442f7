"""The host-memory tier: fixed slots, LRU inside the cap, no leak of slots over many cycles."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from kvtier.storage_backends.cpu_backend import CpuBackend

SLOT = 4096


def _key(i: int) -> str:
    return f"{i:064x}"


def test_round_trip_across_slot_boundaries() -> None:
    backend = CpuBackend(64 * SLOT, SLOT)
    blobs = {_key(i): os.urandom(n) for i, n in enumerate([1, SLOT - 1, SLOT, SLOT + 1, 5 * SLOT + 7])}
    assert backend.put(list(blobs.items())) == len(blobs)
    assert [bytes(b) for b in backend.get(list(blobs))] == list(blobs.values())
    assert backend.contains(list(blobs)) == len(blobs)
    stats = backend.stats()
    assert stats["used_bytes"] == sum(map(len, blobs.values())) and stats["get_hits"] == len(blobs)


def test_contains_counts_leading_hits_only() -> None:
    backend = CpuBackend(8 * SLOT, SLOT)
    backend.put([(_key(0), b"a"), (_key(2), b"c")])
    assert backend.contains([_key(0), _key(1), _key(2)]) == 1
    assert backend.contains([_key(1), _key(2)]) == 0
    assert backend.contains([]) == 0


def test_lru_eviction_respects_the_cap_and_recency() -> None:
    backend = CpuBackend(4 * SLOT, SLOT)
    backend.put([(_key(i), bytes([i]) * SLOT) for i in range(4)])
    backend.get([_key(0)])  # 0 becomes most recent; 1 is now the oldest
    backend.put([(_key(9), b"x" * (2 * SLOT))])
    assert backend.get([_key(1)]) == [None] and backend.get([_key(2)]) == [None]
    assert bytes(backend.get([_key(0)])[0]) == bytes([0]) * SLOT
    stats = backend.stats()
    assert stats["evicted_chunks"] == 2 and stats["used_bytes"] <= 4 * SLOT


def test_oversized_and_empty_blobs_are_skipped() -> None:
    backend = CpuBackend(2 * SLOT, SLOT)
    assert backend.put([(_key(0), b"x" * (3 * SLOT)), (_key(1), b"")]) == 0
    assert backend.stats()["skipped_stores"] == 2


def test_replacing_a_key_frees_its_old_slots() -> None:
    backend = CpuBackend(4 * SLOT, SLOT)
    for n in (4 * SLOT, SLOT, 4 * SLOT):
        assert backend.put([(_key(0), b"z" * n)]) == 1
    assert backend.stats()["used_bytes"] == 4 * SLOT and backend.stats()["evicted_chunks"] == 0


def test_no_slot_leak_over_many_cycles() -> None:
    backend = CpuBackend(16 * SLOT, SLOT)
    rng = np.random.default_rng(0)
    for i in range(3000):
        n = int(rng.integers(1, 3 * SLOT))
        backend.put([(_key(i % 50), bytes(n))])
        if i % 7 == 0:
            backend.delete([_key(int(rng.integers(0, 50)))])
    held = sum(-(-e.nbytes // SLOT) for e in backend._entries.values())
    quarantined = sum(len(e.slots) for e in backend._quarantine)
    assert held + quarantined + len(backend._free) == 16  # every slot is either held or free, exactly once
    assert len(set(backend._free)) == len(backend._free)


def test_concurrent_readers_and_writers_never_see_torn_blobs() -> None:
    backend = CpuBackend(32 * SLOT, SLOT)
    errors: list[str] = []

    def writer(seed: int) -> None:
        for i in range(300):
            key = _key(i % 20)
            backend.put([(key, key.encode() * (1 + (i + seed) % 200))])

    def reader() -> None:
        for i in range(600):
            key = _key(i % 20)
            blob = backend.get([key])[0]
            if blob is not None and bytes(blob) != key.encode() * (len(blob) // 64):
                errors.append(key)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(2)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_get_is_a_read_only_zero_copy_view_of_adjacent_slots() -> None:
    backend = CpuBackend(8 * SLOT, SLOT)
    backend.put([(_key(0), b"q" * (3 * SLOT))])
    first, second = backend.get([_key(0)])[0], backend.get([_key(0)])[0]
    assert np.shares_memory(first, backend._pool) and first is second
    with pytest.raises(ValueError):
        first[0] = 1


def test_a_held_view_never_changes_under_eviction_or_overwrite() -> None:
    backend = CpuBackend(4 * SLOT, SLOT)
    backend.put([(_key(0), b"a" * (2 * SLOT))])
    held = memoryview(backend.get([_key(0)])[0])  # what decode_chunk keeps
    backend.put([(_key(0), b"b" * (2 * SLOT))])  # overwrite the key
    for i in range(1, 20):  # and churn the pool so eviction happens
        backend.put([(_key(i), bytes([i]) * (2 * SLOT))])
    assert bytes(held) == b"a" * (2 * SLOT)
    assert backend.stats()["evicted_chunks"] > 0
    del held
    backend.put([(_key(99), b"z" * (4 * SLOT))])  # needs every slot: possible only once the view is gone
    assert bytes(backend.get([_key(99)])[0]) == b"z" * (4 * SLOT)


def test_views_that_pin_the_whole_pool_make_puts_skip_not_corrupt() -> None:
    backend = CpuBackend(2 * SLOT, SLOT)
    backend.put([(_key(0), b"a" * (2 * SLOT))])
    held = backend.get([_key(0)])[0]
    assert backend.put([(_key(1), b"b" * SLOT)]) == 0
    assert bytes(held) == b"a" * (2 * SLOT)


def test_scattered_slots_are_copied_out() -> None:
    backend = CpuBackend(4 * SLOT, SLOT)
    backend.put([(_key(i), bytes([i]) * SLOT) for i in range(4)])
    backend.delete([_key(0), _key(2)])  # frees slots 0 and 2: not adjacent
    backend.put([(_key(7), b"s" * (2 * SLOT))])
    blob = backend.get([_key(7)])[0]
    assert bytes(blob) == b"s" * (2 * SLOT) and not np.shares_memory(blob, backend._pool)


def test_close_releases_and_later_calls_miss() -> None:
    backend = CpuBackend(4 * SLOT, SLOT)
    backend.put([(_key(0), b"a")])
    backend.close()
    backend.close()
    assert backend.get([_key(0)]) == [None] and backend.contains([_key(0)]) == 0 and backend.put([(_key(1), b"b")]) == 0


def test_bad_geometry_is_rejected() -> None:
    with pytest.raises(ValueError, match="slot_bytes"):
        CpuBackend(SLOT, 2 * SLOT)
    with pytest.raises(ValueError, match="pool"):
        CpuBackend(4 * SLOT, SLOT, pool=np.empty((3, SLOT), np.uint8))


def test_lookups_do_not_wait_for_a_large_put() -> None:
    import time

    backend = CpuBackend(1 << 30, 1 << 20)
    blob = bytes(512 << 20)  # a copy of this takes tens of milliseconds
    backend.put([(_key(0), b"x")])
    waits: list[float] = []
    writer = threading.Thread(target=backend.put, args=([(_key(1), blob)],))
    put_start = time.perf_counter()
    writer.start()
    while writer.is_alive():
        start = time.perf_counter()
        backend.contains([_key(0)])
        waits.append(time.perf_counter() - start)
    writer.join()
    put_seconds = time.perf_counter() - put_start
    assert len(waits) > 10 and max(waits) < put_seconds / 3  # the copy ran outside the lock
    assert bytes(backend.get([_key(1)])[0][:8]) == bytes(8)
