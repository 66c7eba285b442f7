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


# -- views derived from what get hands out (slices, dtype views, memoryviews, tensors) ---------------------------

def _derive(kind: str, view: np.ndarray) -> object:
    """An object derived from a handed-out view the way loaders derive them; the original is dropped after."""
    import warnings

    import torch

    even = len(view) // 8 * 8  # dtype views need a whole number of items
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the buffer is not writable
        if kind == "slice":
            return view[8:]
        if kind == "slice_of_slice":
            return view[8:][16:-8]
        if kind == "reshape":
            return view[:even].reshape(-1, 8)
        if kind == "dtype_view":
            return view[:even].view(np.float16)
        if kind == "asarray":
            return np.asarray(view)[4:]
        if kind == "frombuffer":
            return np.frombuffer(view, np.uint8)[4:]
        if kind == "ascontiguousarray":
            return np.ascontiguousarray(view)
        if kind == "memoryview":
            return memoryview(view)[64:]
        if kind == "memoryview_cast":
            return memoryview(view).cast("B")[64:].toreadonly()
        if kind == "torch_frombuffer":
            return torch.frombuffer(memoryview(view)[:even], dtype=torch.uint8).view(torch.float16)[4:]
        if kind == "torch_from_numpy":
            return torch.from_numpy(view[:even]).view(torch.int16)[4:]
    raise AssertionError(kind)


_DERIVED = ["slice", "slice_of_slice", "reshape", "dtype_view", "asarray", "frombuffer", "ascontiguousarray",
            "memoryview", "memoryview_cast", "torch_frombuffer", "torch_from_numpy"]


def _as_bytes(obj: object) -> bytes:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.view(torch.uint8).numpy().tobytes() if obj.dim() else bytes(obj.numpy())
    return bytes(memoryview(obj).cast("B")) if isinstance(obj, memoryview) else np.asarray(obj).tobytes()


def _slot_count(backend: CpuBackend) -> int:
    """Every slot, counted once: free, held by an entry, or quarantined under a reader."""
    held = sum(len(e.slots) for e in backend._entries.values())
    return len(backend._free) + held + sum(len(e.slots) for e in backend._quarantine)


@pytest.mark.parametrize("kind", _DERIVED)
def test_a_derived_view_keeps_the_slots_after_the_original_is_dropped(kind: str) -> None:
    import gc

    backend = CpuBackend(4 * SLOT, SLOT)
    original_bytes = os.urandom(2 * SLOT + 100)  # 3 slots
    backend.put([(_key(0), original_bytes)])
    original = backend.get([_key(0)])[0]
    assert np.shares_memory(original, backend._pool)
    derived = _derive(kind, original)
    expected = _as_bytes(derived)
    del original
    gc.collect()
    backend.put([(_key(0), b"b" * (2 * SLOT))])  # overwrite the key
    for i in range(1, 40):  # and churn: every put wants slots the derived view covers
        backend.put([(_key(i), bytes([i]) * (1 + (i * 997) % (4 * SLOT)))])
    assert _as_bytes(derived) == expected
    assert backend.put([(_key(99), b"z" * (4 * SLOT))]) == 0  # the reader still pins 3 slots
    del derived
    gc.collect()
    assert backend.put([(_key(99), b"z" * (4 * SLOT))]) == 1  # all 4 slots came back
    assert bytes(backend.get([_key(99)])[0]) == b"z" * (4 * SLOT)


def test_handed_out_views_cannot_be_made_writeable() -> None:
    backend = CpuBackend(4 * SLOT, SLOT)
    backend.put([(_key(0), b"a" * SLOT)])
    view = backend.get([_key(0)])[0]
    with pytest.raises(ValueError):
        view.flags.writeable = True
    with pytest.raises(ValueError):
        view[0] = 1


def test_long_held_derived_views_survive_thousands_of_puts_and_every_slot_comes_back() -> None:
    import gc

    total = 64
    backend = CpuBackend(total * SLOT, SLOT)
    rng = np.random.default_rng(1)
    held: list[tuple[object, bytes]] = []
    for i in range(4000):
        size = int(rng.integers(64, 4 * SLOT))
        backend.put([(_key(int(rng.integers(0, 200))), rng.bytes(size))])
        if i % 5 == 0:
            backend.delete([_key(int(rng.integers(0, 200)))])
        if i % 3 == 0:  # take a derived view of some entry, drop the handed-out array at once
            found = backend.get([_key(int(rng.integers(0, 200)))])[0]
            if found is not None and np.shares_memory(found, backend._pool):
                derived = _derive(_DERIVED[i % len(_DERIVED)], found)
                held.append((derived, _as_bytes(derived)))
                del found, derived
        if len(held) > 12:  # readers let go in random order
            held.pop(int(rng.integers(0, len(held))))
        if i % 250 == 0:
            gc.collect()
            assert all(_as_bytes(obj) == expected for obj, expected in held), f"a held view changed by put {i}"
            assert _slot_count(backend) == total
    assert all(_as_bytes(obj) == expected for obj, expected in held)
    assert backend.stats()["evicted_chunks"] > 100
    held.clear()
    gc.collect()
    backend.delete([_key(k) for k in range(200)])
    assert backend.put([(_key(999), b"f" * (total * SLOT))]) == 1  # needs every slot: all came back
    backend.delete([_key(999)])
    assert len(backend._free) == total and not backend._quarantine and len(set(backend._free)) == total


def test_a_put_that_readers_block_evicts_nothing() -> None:
    backend = CpuBackend(8 * SLOT, SLOT)
    blobs = {_key(i): bytes([i]) * SLOT for i in range(8)}
    backend.put(list(blobs.items()))
    readers = [backend.get([_key(i)])[0][1:] for i in range(5)]  # slices of the 5 oldest entries
    assert backend.put([(_key(50), b"n" * (4 * SLOT))]) == 0  # 3 readerless slots: cannot fit 4
    assert backend.contains(list(blobs)) == 8 and backend.stats()["evicted_chunks"] == 0
    assert [bytes(b) for b in backend.get(list(blobs))] == list(blobs.values())
    assert backend.put([(_key(51), b"m" * (3 * SLOT))]) == 1  # fits by evicting exactly the readerless 3
    assert backend.stats()["evicted_chunks"] == 3
    assert backend.contains([_key(i) for i in range(5)]) == 5  # entries under a reader stay cached
    assert [bytes(r) for r in readers] == [bytes([i]) * (SLOT - 1) for i in range(5)]
    assert backend.get([_key(i) for i in range(5, 8)]) == [None] * 3


def test_a_failed_replacing_put_keeps_the_old_copy() -> None:
    backend = CpuBackend(4 * SLOT, SLOT)
    backend.put([(_key(0), b"a" * SLOT), (_key(1), b"b" * (3 * SLOT))])
    reader = backend.get([_key(1)])[0][:10]
    assert backend.put([(_key(0), b"A" * (2 * SLOT))]) == 0  # key 1's 3 slots are read
    assert bytes(backend.get([_key(0)])[0]) == b"a" * SLOT and bytes(reader) == b"b" * 10
