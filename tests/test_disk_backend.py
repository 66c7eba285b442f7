"""Disk tier: real files in tmp_path, real encoded chunks, nothing mocked."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import resource
import shutil
import stat
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from kvtier.chunk_format.codec import ChunkCorrupt, decode_chunk, encode_chunk
from kvtier.storage_backends.disk_backend import DiskBackend, summarize_disk


def make_key(seed: object) -> str:
    return hashlib.sha256(repr(seed).encode()).hexdigest()


def make_chunk(key: str, payload_bytes: int, model: str = "test-model", layout: str = "test-layout") -> bytearray:
    """A real encoded chunk whose fp16 payload is ``payload_bytes`` (even) bytes of key-derived data."""
    assert payload_bytes % 2 == 0
    seed = bytes.fromhex(key)
    payload = (seed * (payload_bytes // len(seed) + 1))[:payload_bytes]
    return encode_chunk(key, "float16", (payload_bytes // 2,), layout, model, 16, payload)


def kvc_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.kvc"))


def disk_bytes(root: Path) -> int:
    """What is really on disk, measured without the backend's index."""
    return sum(p.stat().st_size for p in kvc_files(root))


def temp_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/.*.tmp"))


def dead_pid() -> int:
    """A pid no process has: above the kernel's pid_max."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "kv"


# 1. round trip, delete, prefix contains, key validation ------------------------------------------


def test_round_trip_delete_and_prefix_contains(store_dir: Path) -> None:
    disk = DiskBackend(store_dir, 256 << 20)
    keys = [make_key(("rt", i)) for i in range(4)]
    blobs = [make_chunk(k, 4096 * (i + 1)) for i, k in enumerate(keys)]
    big_key = make_key("big")
    big = make_chunk(big_key, 32 << 20)
    assert disk.put(list(zip(keys, blobs))) == 4
    assert disk.put([(big_key, big)]) == 1

    got = disk.get(keys + [big_key, make_key("absent")])
    assert got[-1] is None
    for key, blob, back in zip(keys + [big_key], blobs + [big], got):
        assert bytes(back) == bytes(blob)
        assert decode_chunk(back, key).header.model == "test-model"
    assert disk.stats()["get_hits"] == 5 and disk.stats()["get_misses"] == 1
    assert disk.stats()["used_bytes"] == disk_bytes(store_dir) == sum(map(len, blobs)) + len(big)

    assert disk.contains(keys) == 4
    assert disk.contains([keys[0], make_key("absent"), keys[2]]) == 1
    assert disk.contains([]) == 0
    assert disk.delete([keys[1], make_key("absent")]) == 1
    assert disk.contains(keys) == 1
    assert disk.get([keys[1]]) == [None]
    assert disk.stats()["used_bytes"] == disk_bytes(store_dir)
    assert disk.stats()["used_chunks"] == 4
    disk.close()
    disk.close()  # idempotent


def test_put_of_existing_key_replaces_it(store_dir: Path) -> None:
    disk = DiskBackend(store_dir, 1 << 20)
    key = make_key("replace")
    disk.put([(key, make_chunk(key, 8192))])
    newer = make_chunk(key, 2048)
    assert disk.put([(key, newer)]) == 1
    assert disk.get([key]) == [newer]
    assert disk.stats()["used_bytes"] == len(newer) == disk_bytes(store_dir)
    assert disk.stats()["used_chunks"] == 1


@pytest.mark.parametrize("bad", ["../x", "A" * 64, "a" * 63, "a" * 65, "../" + "a" * 61, "g" * 64, 42, "a" * 63 + "\n"])
def test_invalid_keys_are_rejected(store_dir: Path, bad: object) -> None:
    disk = DiskBackend(store_dir, 1 << 20)
    with pytest.raises(ValueError):
        disk.put([(bad, b"x")])
    with pytest.raises(ValueError):
        disk.get([bad])
    with pytest.raises(ValueError):
        disk.contains([bad])
    with pytest.raises(ValueError):
        disk.delete([bad])
    assert list(store_dir.parent.iterdir()) == [store_dir]  # nothing written outside the root


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        DiskBackend(tmp_path / "a", 0)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        DiskBackend(tmp_path / "file", 1 << 20)
    with pytest.raises(NotADirectoryError):  # a file where a parent should be: the path is wrong, not the disk
        DiskBackend(tmp_path / "file" / "kv", 1 << 20)
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lock_timeout_s"):
            DiskBackend(tmp_path / "b", 1 << 20, lock_timeout_s=bad)


# 2. permissions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_permissions_do_not_depend_on_umask(tmp_path: Path, umask: int) -> None:
    root = tmp_path / "perm"
    old = os.umask(umask)
    try:
        disk = DiskBackend(root, 1 << 20)
        keys = [make_key(("perm", i)) for i in range(8)]
        assert disk.put([(k, make_chunk(k, 512)) for k in keys]) == 8
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(root) == 0o700
    deep = tmp_path / "new" / "parents" / "kv"
    old = os.umask(umask)
    try:
        DiskBackend(deep, 1 << 20).close()
    finally:
        os.umask(old)
    assert [mode(p) for p in (deep, deep.parent, deep.parent.parent)] == [0o700] * 3  # parents it made too
    subs = [p for p in root.iterdir() if p.is_dir()]
    assert subs and all(mode(p) == 0o700 for p in subs)
    files = kvc_files(root)
    assert len(files) == 8 and all(mode(p) == 0o600 for p in files)
    assert mode(root / ".lock") == 0o600 and mode(root / ".generation") == 0o600


# 3. the cap under pressure, LRU, over-size blobs --------------------------------------------------


def test_cap_holds_after_every_put(store_dir: Path) -> None:
    cap = 96 * 1024
    disk = DiskBackend(store_dir, cap)
    sizes = [512, 30000, 4096, 12000, 60000, 2048, 24000]
    stored = 0
    for i in range(150):
        batch = [(make_key(("cap", i, j)), make_chunk(make_key(("cap", i, j)), sizes[(i + j) % len(sizes)]))
                 for j in range(1 + i % 3)]
        stored += disk.put(batch)
        on_disk = disk_bytes(store_dir)
        assert on_disk <= cap
        assert disk.stats()["used_bytes"] == on_disk
        assert disk.stats()["used_chunks"] == len(kvc_files(store_dir))
    assert stored > 0 and disk.stats()["evicted_chunks"] > 0
    assert not temp_files(store_dir)


def test_lru_keeps_recently_read_chunks(store_dir: Path) -> None:
    size = len(make_chunk(make_key(0), 8000))
    disk = DiskBackend(store_dir, 3 * size)
    a, b, c, d = (make_key(("lru", n)) for n in "abcd")
    for k in (a, b, c):
        disk.put([(k, make_chunk(k, 8000))])
    assert disk.get([a])[0] is not None  # a becomes the most recent
    disk.put([(d, make_chunk(d, 8000))])
    assert disk.contains([a]) == 1 and disk.contains([c]) == 1 and disk.contains([d]) == 1
    assert disk.contains([b]) == 0  # least recently used
    assert disk.stats()["evicted_chunks"] == 1


def test_oversize_blob_is_skipped_and_counted(store_dir: Path) -> None:
    disk = DiskBackend(store_dir, 16 * 1024)
    small, huge = make_key("small"), make_key("huge")
    assert disk.put([(small, make_chunk(small, 4096)), (huge, make_chunk(huge, 32 * 1024))]) == 1
    stats = disk.stats()
    assert stats["skipped_stores"] == 1 and stats["stored_chunks"] == 1 and stats["evicted_chunks"] == 0
    assert disk.contains([small]) == 1 and disk.contains([huge]) == 0


# 4. restart recovery -------------------------------------------------------------------------------


def test_restart_finds_every_chunk(store_dir: Path) -> None:
    keys = [make_key(("restart", i)) for i in range(20)]
    blobs = {k: make_chunk(k, 1024 * (1 + i % 4)) for i, k in enumerate(keys)}
    disk = DiskBackend(store_dir, 1 << 20)
    assert disk.put(list(blobs.items())) == 20
    disk.close()
    del disk

    again = DiskBackend(store_dir, 1 << 20)
    assert again.stats()["used_bytes"] == sum(map(len, blobs.values())) == disk_bytes(store_dir)
    assert again.stats()["used_chunks"] == 20
    assert again.contains(keys) == 20
    for key, back in zip(keys, again.get(keys)):
        assert back == blobs[key]
        decode_chunk(back, key)


def _age(root: Path, keys: list[str]) -> None:
    """Give the chunks distinct mtimes an hour ago, in list order (oldest first)."""
    base = time.time() - 3600
    for i, key in enumerate(keys):
        os.utime(root / key[:2] / f"{key}.kvc", (base + i, base + i))


def test_smaller_cap_on_reopen_evicts_oldest_at_start(store_dir: Path) -> None:
    keys = [make_key(("shrink", i)) for i in range(10)]
    disk = DiskBackend(store_dir, 1 << 20)
    disk.put([(k, make_chunk(k, 4000)) for k in keys])
    disk.close()
    size = kvc_files(store_dir)[0].stat().st_size
    _age(store_dir, keys)

    small = DiskBackend(store_dir, 4 * size)  # documented: eviction happens in the constructor
    assert disk_bytes(store_dir) <= 4 * size
    assert small.stats()["used_bytes"] == disk_bytes(store_dir) == 4 * size
    assert small.stats()["evicted_chunks"] == 6
    assert [small.contains([k]) for k in keys] == [0] * 6 + [1] * 4  # the newest survive


def test_lru_order_across_restart_follows_mtime(store_dir: Path) -> None:
    keys = [make_key(("mtime", i)) for i in range(4)]
    size = len(make_chunk(keys[0], 4000))
    disk = DiskBackend(store_dir, 4 * size)
    disk.put([(k, make_chunk(k, 4000)) for k in keys])
    disk.close()
    _age(store_dir, keys)  # keys[0] oldest ... keys[3] newest

    reader = DiskBackend(store_dir, 4 * size)
    assert reader.get([keys[0]])[0] is not None  # refreshes its mtime on disk
    reader.close()

    writer = DiskBackend(store_dir, 4 * size)  # new process view: order only from mtimes
    extra = [make_key(("mtime", "new", i)) for i in range(2)]
    writer.put([(k, make_chunk(k, 4000)) for k in extra])
    assert [writer.contains([k]) for k in keys] == [1, 0, 0, 1]
    assert writer.contains(extra) == 2


# 5. crash safety -----------------------------------------------------------------------------------


def test_leftover_temp_files(store_dir: Path) -> None:
    disk = DiskBackend(store_dir, 1 << 20)
    key = make_key("torn-writer")
    sub = store_dir / key[:2]
    sub.mkdir(mode=0o700)
    blob = make_chunk(key, 2048)
    dead = sub / f".{key}.{dead_pid()}.deadbeef.tmp"
    dead.write_bytes(blob[:100])
    stale = sub / f".{key}.{os.getpid()}.00000001.tmp"  # live pid, but 20 minutes old
    stale.write_bytes(blob)
    os.utime(stale, (time.time() - 1200, time.time() - 1200))
    live = sub / f".{key}.{os.getpid()}.00000002.tmp"  # a writer busy right now
    live.write_bytes(blob[:10])
    assert disk.contains([key]) == 0 and disk.get([key]) == [None]
    disk.close()

    again = DiskBackend(store_dir, 1 << 20)
    assert not dead.exists() and not stale.exists() and live.exists()
    assert again.stats()["used_bytes"] == 0 and again.contains([key]) == 0
    assert again.put([(key, blob)]) == 1 and again.get([key]) == [blob]


def test_torn_and_corrupted_files_are_returned_for_the_checksum_to_reject(store_dir: Path) -> None:
    disk = DiskBackend(store_dir, 1 << 20)
    torn, bad = make_key("torn"), make_key("bad")
    disk.put([(torn, make_chunk(torn, 8192)), (bad, make_chunk(bad, 8192))])
    path = store_dir / torn[:2] / f"{torn}.kvc"
    os.truncate(path, path.stat().st_size // 2)
    path = store_dir / bad[:2] / f"{bad}.kvc"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(data)

    got_torn, got_bad = disk.get([torn, bad])
    assert got_torn is not None and got_bad is not None
    with pytest.raises(ChunkCorrupt):
        decode_chunk(got_torn, torn)
    with pytest.raises(ChunkCorrupt, match="checksum"):
        decode_chunk(got_bad, bad)


# 6. two processes, one folder ----------------------------------------------------------------------


def _writer(root: str, cap: int, rank: int, count: int, barrier_dir: str) -> dict[str, float]:
    """Spawned worker: wait for the other one, then write ``count`` chunks in small batches."""
    Path(barrier_dir, f"ready-{rank}").touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(barrier_dir)) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    disk = DiskBackend(root, cap)
    sizes = (1024, 3000, 6000, 512)
    i = 0
    while i < count:
        batch = []
        for _ in range(1 + i % 3):
            key = make_key(("mp", rank, i))
            batch.append((key, make_chunk(key, sizes[i % len(sizes)])))
            i += 1
        disk.put(batch)
        disk.get([k for k, _ in batch[:1]])
        disk.contains([k for k, _ in batch])
    disk.close()
    return disk.stats()


def test_two_processes_share_one_folder_under_the_cap(tmp_path: Path) -> None:
    root, barrier = tmp_path / "shared", tmp_path / "barrier"
    barrier.mkdir()
    cap, count = 200 * 1024, 300
    DiskBackend(root, cap).close()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        futures = [pool.submit(_writer, str(root), cap, rank, count, str(barrier)) for rank in range(2)]
        results = [f.result(timeout=120) for f in futures]  # re-raises a worker's exception
    for stats in results:
        assert stats["errors"] == 0 and stats["stored_chunks"] == count
    assert disk_bytes(root) <= cap
    assert not temp_files(root)
    files = kvc_files(root)
    assert files
    for path in files:
        decode_chunk(path.read_bytes(), path.name[:-4])
    survivors = {p.name[:-4] for p in files}
    assert any(make_key(("mp", r, count - 1)) in survivors for r in range(2))
    reopened = DiskBackend(root, cap)
    assert reopened.stats()["used_bytes"] == disk_bytes(root)


def test_two_writers_in_turn_see_each_others_files(store_dir: Path) -> None:
    """Deterministic interleaving of two writers: the generation counter makes each rescan."""
    size = len(make_chunk(make_key(0), 4000))
    cap = 5 * size
    a, b = DiskBackend(store_dir, cap), DiskBackend(store_dir, cap)
    for i in range(12):
        writer = (a, b)[i % 2]
        key = make_key(("turns", i))
        assert writer.put([(key, make_chunk(key, 4000))]) == 1
        assert disk_bytes(store_dir) <= cap
        assert writer.stats()["used_bytes"] == disk_bytes(store_dir)
    assert len(kvc_files(store_dir)) == 5
    assert a.contains([make_key(("turns", 11))]) == 1  # reads see the other writer's files at once
    assert a.stats()["errors"] == b.stats()["errors"] == 0


def test_threads_share_one_backend(store_dir: Path) -> None:
    cap = 64 * 1024
    disk = DiskBackend(store_dir, cap)

    def work(t: int) -> None:
        for i in range(60):
            key = make_key(("thread", t, i))
            disk.put([(key, make_chunk(key, 1000 + 500 * (i % 7)))])
            disk.get([key, make_key(("thread", t, i - 1))])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert disk.stats()["errors"] == 0 and disk.stats()["stored_chunks"] == 240
    assert disk.stats()["used_bytes"] == disk_bytes(store_dir) <= cap
    assert not temp_files(store_dir)


def test_evicting_a_file_someone_else_removed_is_not_an_error(store_dir: Path) -> None:
    size = len(make_chunk(make_key(0), 4000))
    disk = DiskBackend(store_dir, 2 * size)
    k1, k2, k3 = (make_key(("gone-first", i)) for i in range(3))
    disk.put([(k1, make_chunk(k1, 4000)), (k2, make_chunk(k2, 4000))])
    os.unlink(store_dir / k1[:2] / f"{k1}.kvc")  # removed behind the index's back
    assert disk.put([(k3, make_chunk(k3, 4000))]) == 1
    assert disk.stats()["errors"] == 0 and disk.stats()["evicted_chunks"] == 1
    assert disk.contains([k2, k3]) == 2
    assert disk_bytes(store_dir) <= 2 * size


# 7. failures -----------------------------------------------------------------------------------------


def test_subfolder_replaced_by_a_file(store_dir: Path) -> None:
    disk = DiskBackend(store_dir, 1 << 20)
    key, other = "ab" + make_key("blocked")[2:], make_key("fine")
    (store_dir / "ab").write_bytes(b"not a folder")
    assert disk.put([(key, make_chunk(key, 1024)), (other, make_chunk(other, 1024))]) == 1
    stats = disk.stats()
    assert stats["errors"] == 1 and stats["skipped_stores"] == 1 and stats["stored_chunks"] == 1
    assert disk.contains([key]) == 0 and disk.get([key]) == [None]
    assert disk.contains([other]) == 1


def test_root_deleted_under_the_backend(store_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = DiskBackend(store_dir, 1 << 20)
    keys = [make_key(("gone", i)) for i in range(3)]
    assert disk.put([(k, make_chunk(k, 1024)) for k in keys]) == 3
    shutil.rmtree(store_dir)
    with caplog.at_level(logging.WARNING, logger="kvtier.storage_backends.disk_backend"):
        for i in range(5):
            k = make_key(("after", i))
            assert disk.put([(k, make_chunk(k, 1024))]) == 0
    assert len(caplog.records) == 1  # one warning, not one per failed put
    assert disk.contains(keys) == 0
    assert disk.get(keys) == [None, None, None]
    assert disk.delete(keys) == 0
    stats = disk.stats()
    assert stats["errors"] == 6 and stats["skipped_stores"] == 5 and stats["get_misses"] == 3
    disk.close()


def test_write_failure_midway_leaves_no_temp_file(store_dir: Path) -> None:
    """A file-size limit makes write() fail half way (EFBIG), as a full disk would (ENOSPC)."""
    disk = DiskBackend(store_dir, 64 << 20)
    small, large = make_key("fits"), make_key("too-large")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        stored = disk.put([(large, make_chunk(large, 1 << 20)), (small, make_chunk(small, 4096))])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert stored == 1
    assert disk.stats()["errors"] == 1 and disk.stats()["skipped_stores"] == 1
    assert not temp_files(store_dir)
    assert disk.contains([large]) == 0 and disk.contains([small]) == 1
    assert disk.stats()["used_bytes"] == disk_bytes(store_dir)
    assert disk.put([(large, make_chunk(large, 1 << 20))]) == 1  # works again once there is room


# 8. summarize_disk ----------------------------------------------------------------------------------


def test_summarize_disk(store_dir: Path) -> None:
    disk = DiskBackend(store_dir, 1 << 20)
    for i in range(5):
        k = make_key(("sum", i))
        disk.put([(k, make_chunk(k, 2048, model="llama" if i < 3 else "qwen", layout="LBNHC"))])
    garbage = make_key("garbage")
    (store_dir / garbage[:2]).mkdir(exist_ok=True)
    (store_dir / garbage[:2] / f"{garbage}.kvc").write_bytes(b"\x00garbage" * 10)
    mislabelled = make_key("mislabelled")
    (store_dir / mislabelled[:2]).mkdir(exist_ok=True)
    (store_dir / mislabelled[:2] / f"{mislabelled}.kvc").write_bytes(make_chunk(make_key("other"), 64))
    (store_dir / garbage[:2] / f".{garbage}.1.ab.tmp").write_bytes(b"temp, not counted")

    summary = summarize_disk(store_dir)
    assert summary.location == str(store_dir)
    assert summary.chunks == 5 and summary.unreadable == 2
    assert summary.bytes == disk_bytes(store_dir)
    assert summary.models == {"llama": 3, "qwen": 2}
    assert summary.layouts == {"LBNHC": 5}
    with pytest.raises(FileNotFoundError):
        summarize_disk(store_dir.parent / "missing")
