"""Disk faults with real processes and real file systems, nothing mocked.

- A peer holding the folder's lock is another process (a child that ``flock``s ``<root>/.lock``):
  puts and deletes give up after ``lock_timeout_s``, reads never wait, flush, close and the
  registry's release stay within ``flush_timeout_s``, and a constructor starts anyway.
- A read-only folder and a full file system are real mounts: this file re-runs itself as a child
  inside ``unshare -rm`` (a user and mount namespace, no privileges needed), mounts a read-only
  bind mount or a small tmpfs there, exercises the tier and prints its findings as JSON for the
  test to check. Without usable namespaces those tests are skipped and say why.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kvtier.chunk_format.codec import decode_chunk, encode_chunk
from kvtier.connector.config import load_config
from kvtier.connector.store_factory import build_store
from kvtier.storage_backends.cpu_backend import CpuBackend
from kvtier.storage_backends.disk_backend import DiskBackend
from kvtier.storage_backends.tiered import TieredStore

T = TypeVar("T")
SLACK_S = 1.5  # the machine's cores may be busy with other work: generous, the waits under test are minutes long if broken
_DISK_LOG = "kvtier.storage_backends.disk_backend"


def make_key(seed: object, prefix: str = "") -> str:
    digest = hashlib.sha256(repr(seed).encode()).hexdigest()
    return prefix + digest[len(prefix):]


def make_chunk(key: str, payload_bytes: int) -> bytearray:
    seed = bytes.fromhex(key)
    payload = (seed * (payload_bytes // len(seed) + 1))[:payload_bytes]
    return encode_chunk(key, "float16", (payload_bytes // 2,), "test-layout", "test-model", 16, payload)


def chunk_file(root: Path, key: str) -> Path:
    return root / key[:2] / f"{key}.kvc"


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*/*.kvc"))


def timed(fn: Callable[[], T], limit: float) -> tuple[T, float]:
    """``fn()`` and its duration; fails at once if it has not returned after ``limit`` seconds (it is
    left running in a daemon thread, to finish when the lock holder goes away)."""
    out: dict[str, Any] = {}

    def run() -> None:
        start = time.monotonic()
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            out["error"] = exc
        out["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still waiting after {limit:.1f} s"
    if "error" in out:
        raise out["error"]
    return out["value"], out["seconds"]


_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
"""


class LockHolder:
    """Another process holding ``<root>/.lock`` (exclusive ``flock``) until :meth:`release`."""

    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(root / ".lock")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)

    def __enter__(self) -> LockHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _lock_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "lock_timeout_s" in r.getMessage()]


# 1. another process holds the lock ---------------------------------------------------------------


def test_put_and_delete_give_up_after_lock_timeout_and_work_again_once_it_is_free(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "kv"
    disk = DiskBackend(root, 1 << 20, lock_timeout_s=0.5)
    old = make_key("old")
    assert disk.put([(old, make_chunk(old, 2048))]) == 1
    batches = [[(make_key(("held", i, j)), make_chunk(make_key(("held", i, j)), 2048)) for j in range(2)]
               for i in range(3)]
    with LockHolder(root) as holder, caplog.at_level(logging.INFO, logger=_DISK_LOG):
        for batch in batches:
            stored, seconds = timed(lambda batch=batch: disk.put(batch), 0.5 + SLACK_S)
            assert stored == 0
            assert seconds >= 0.45  # it did wait for the lock, up to lock_timeout_s
        present, _ = timed(lambda: disk.delete([old]), 0.5 + SLACK_S)
        assert present == 0
        assert disk.contains([old]) == 1 and disk.get([old])[0] is not None  # reads never take the lock
        assert all(disk.contains([k]) == 0 for batch in batches for k, _ in batch)
        stats = disk.stats()
        assert stats["skipped_stores"] == 6 and stats["errors"] == 4
        assert len(_lock_warnings(caplog)) == 1  # once per episode, not per batch
        holder.release()
        assert disk.put(batches[0]) == 2
        assert disk.delete([old]) == 1
    assert disk.contains([k for k, _ in batches[0]]) == 2 and disk.contains([old]) == 0
    assert disk.stats()["errors"] == 4


def test_constructor_starts_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    keys = [make_key(("ctor", i)) for i in range(6)]
    first = DiskBackend(root, 1 << 20)
    assert first.put([(k, make_chunk(k, 4000)) for k in keys]) == 6
    first.close()
    size = chunk_file(root, keys[0]).stat().st_size
    with LockHolder(root) as holder:
        disk, _ = timed(lambda: DiskBackend(root, 2 * size, lock_timeout_s=0.5), 0.5 + SLACK_S)
        assert disk.contains(keys) == 6  # start-up eviction skipped: it needs the lock
        assert disk.get(keys[:1])[0] == make_chunk(keys[0], 4000)
        assert disk.stats()["used_chunks"] == 6  # indexed from the unlocked scan
        holder.release()
    new = make_key("ctor-new")
    assert disk.put([(new, make_chunk(new, 4000))]) == 1  # rescans under the lock, evicts down to the cap
    assert disk_bytes(root) <= 2 * size and disk.contains([new]) == 1
    assert disk.stats()["used_bytes"] == disk_bytes(root)


def test_a_corrupt_chunk_is_a_miss_at_once_and_is_deleted_once_the_lock_is_free(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    disk = DiskBackend(root, 1 << 22, lock_timeout_s=5.0)
    store = TieredStore([disk])
    key = make_key("corrupt")
    store.put([(key, make_chunk(key, 8192))])
    path = chunk_file(root, key)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with LockHolder(root) as holder:
        got, _ = timed(lambda: store.get([key]), 2.5)  # half of lock_timeout_s: the read did not wait for it
        assert got == [None] and disk.stats()["corrupt_chunks"] == 1
        assert path.exists()  # the delete is queued on the tier's writer, waiting for the lock
        holder.release()
    assert store.flush(timeout=10)
    assert not path.exists() and disk.contains([key]) == 0
    assert store.close()


def test_flush_and_close_return_within_their_bound_while_a_tier_waits_for_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    disk = DiskBackend(root, 1 << 22, lock_timeout_s=4.0)
    store = TieredStore([CpuBackend(1 << 22, 16384), disk], flush_timeout_s=0.4)
    with LockHolder(root):
        for i in range(3):
            key = make_key(("flush", i))
            assert store.put([(key, make_chunk(key, 4096))]) == 1  # the cpu tier; the disk writer is stuck
        flushed, seconds = timed(lambda: store.flush(timeout=0.3), 0.3 + SLACK_S)
        assert flushed is False and seconds >= 0.25
        flushed, seconds = timed(store.flush, 0.4 + SLACK_S)  # no timeout: flush_timeout_s, never unbounded
        assert flushed is False and seconds >= 0.35
        flushed, _ = timed(store.close, 0.4 + SLACK_S)  # flushes with the bound, drops what is queued
        assert flushed is False


def test_build_store_and_registry_release_use_the_configured_bounds(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kvtier.connector.store_registry import StoreRegistry

    root = tmp_path / "disk"
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"flush_timeout_s: 0.5\ntiers:\n  - {{type: cpu, max_bytes: 1MiB, slot_bytes: 16KiB}}\n"
                    f"  - {{type: disk, path: {root}, max_bytes: 4MiB, lock_timeout_s: 5}}\n")
    config = load_config(path, environ={})
    registry = StoreRegistry()
    store, _ = registry.acquire(config)
    assert store.flush_timeout_s == 0.5 and store.tiers[1].lock_timeout_s == 5.0
    with LockHolder(root), caplog.at_level(logging.WARNING, logger="kvtier.connector.store_registry"):
        key = make_key("release")
        store.put([(key, make_chunk(key, 4096))])
        _, seconds = timed(lambda: registry.release(config), 0.5 + SLACK_S)  # the disk put alone may wait 5 s
        assert [r for r in caplog.records if "flush_timeout_s" in r.getMessage()]


def test_chunk_store_flush_is_bounded_by_flush_timeout_s(tmp_path: Path) -> None:
    from kvtier.chunk_format.keys import KeyNamespace
    from kvtier.connector.chunk_store import ChunkStore
    from kvtier.cuda_ext import make_copier

    root = tmp_path / "kv"
    store = TieredStore([CpuBackend(1 << 22, 16384), DiskBackend(root, 1 << 22, lock_timeout_s=4.0)],
                        flush_timeout_s=0.4)
    namespace = KeyNamespace(model="tiny", kv_dtype="float16", layout="test", num_layers=1, kv_heads=1,
                             head_dim=8, tp_size=1, tp_rank=0, chunk_size=16)
    chunks = ChunkStore(store, namespace, make_copier("cpu"))
    with LockHolder(root):
        key = make_key("chunk-store")
        store.put([(key, make_chunk(key, 4096))])
        flushed, seconds = timed(chunks.flush, 0.4 + SLACK_S)  # a producer's save wait
        assert flushed is False and seconds >= 0.35
    assert chunks.flush(timeout=10)
    store.close()


def test_build_store_passes_the_defaults(tmp_path: Path) -> None:
    config = load_config(overrides={"disk.path": str(tmp_path / "d")}, environ={"HOME": str(tmp_path)})
    store = build_store(config)
    assert store.flush_timeout_s == 30.0 and store.tiers[1].lock_timeout_s == 2.0
    store.close()


# 2. read-only and full file systems (real mounts in a user + mount namespace) -------------------


@pytest.fixture(scope="module")
def namespaces(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip unless ``unshare -rm`` can mount a tmpfs and a read-only bind mount here."""
    probe = tmp_path_factory.mktemp("probe")
    script = 'mount -t tmpfs -o size=1m tmpfs "$0" && mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"'
    try:
        done = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(probe)], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"needs `unshare -rm` (user + mount namespaces) to mount real file systems: {exc}")
    if done.returncode:
        pytest.skip(f"needs `unshare -rm` (user + mount namespaces) to mount real file systems; it failed here "
                    f"(rc {done.returncode}): {done.stderr.strip()}")


def run_child(mount: str, scenario: str, folder: Path) -> dict[str, Any]:
    """Run ``scenario`` of this file in a new user + mount namespace after ``mount`` ($2 is ``folder``)."""
    script = f'{mount} && exec "$0" "$1" {scenario} "$2"'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, sys.executable, str(Path(__file__).resolve()),
                           str(folder)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"child failed (rc {done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


RO_KEYS = [make_key(("ro", i)) for i in range(3)]  # the last one is stored corrupt


def test_a_read_only_folder_serves_reads_and_skips_stores(tmp_path: Path, namespaces: None) -> None:
    mount_point = tmp_path / "ro"
    root = mount_point / "kv"
    disk = DiskBackend(root, 1 << 20)
    assert disk.put([(k, make_chunk(k, 4096)) for k in RO_KEYS]) == 3
    disk.close()
    bad = chunk_file(root, RO_KEYS[2])
    bad.write_bytes(bad.read_bytes()[:-1] + b"\x00")

    found = run_child('mount --bind "$2" "$2" && mount -o remount,bind,ro "$2"', "readonly", mount_point)
    assert found["write_probe"] == "EROFS"  # the folder really was read-only
    assert found["contains"] == 2 and found["get_equal"] is True
    assert found["puts"] == [0, 0, 0]
    assert found["delete"] == 0 and found["deleted_file_still_there"] is True
    assert found["corrupt_get"] == [None]
    stats = found["stats"]
    assert stats["skipped_stores"] == 3 and stats["stored_chunks"] == 0 and stats["corrupt_chunks"] == 1
    assert len(found["warnings"]) == 1 and "not writable" in found["warnings"][0]

    missing = found["missing"]  # a folder that cannot be created at all: misses, one warning
    assert missing["contains"] == 0 and missing["get"] == [None] and missing["put"] == 0
    assert len(missing["warnings"]) == 1 and "cannot create" in missing["warnings"][0]
    assert all(chunk_file(root, k).exists() for k in RO_KEYS)


def _check_full_run(found: dict[str, Any], cap: int) -> None:
    """Every write landed, the newest chunks are what is left, nothing torn, one warning per episode."""
    assert found["stored"] == found["asked"]
    order, present = found["order"], found["present"]
    assert present and present == order[-len(present):]  # the newest are kept, the oldest evicted
    assert found["undecodable"] == [] and found["temp_files"] == []  # nothing torn, nothing left over
    assert found["on_disk"] <= cap
    assert found["stats"]["errors"] == 0 and found["stats"]["evicted_chunks"] > 0
    assert found["stats"]["used_bytes"] == found["on_disk"]
    first = found["first"]["warnings"]  # the first episode began with a real ENOSPC (then: evict ahead)
    assert len(first) == 1 and "full below max_bytes" in first[0] and "No space left" in first[0]
    assert len(found["warnings"]) == 2  # the refill after room was made is a second episode
    assert any("fit on the file system again" in m for m in found["infos"])


def test_a_full_file_system_below_max_bytes_evicts_to_keep_writing(tmp_path: Path, namespaces: None) -> None:
    mount_point = tmp_path / "small"
    mount_point.mkdir(mode=0o700)
    found = run_child('mount -t tmpfs -o size=2m,mode=0700 tmpfs "$2"', "full", mount_point)
    assert found["fs_bytes"] == 2 << 20 and found["max_bytes"] > 10 * found["fs_bytes"]
    assert len(found["present"]) >= 8  # most of the file system is used, not just one chunk
    _check_full_run(found, 2 << 20)


def test_running_out_of_inodes_evicts_too(tmp_path: Path, namespaces: None) -> None:
    mount_point = tmp_path / "few-inodes"
    mount_point.mkdir(mode=0o700)
    found = run_child('mount -t tmpfs -o size=16m,nr_inodes=32,mode=0700 tmpfs "$2"', "inodes", mount_point)
    assert len(found["present"]) >= 15
    _check_full_run(found, 16 << 20)


# -- the child side (run by run_child inside the namespace) ------------------------------------------


class _Warnings(logging.Handler):
    """WARNING messages in ``messages``, INFO ones in ``infos``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.infos: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        (self.messages if record.levelno >= logging.WARNING else self.infos).append(record.getMessage())


def _capture() -> _Warnings:
    """The disk tier's warnings (the tiered layer's own, e.g. about a corrupt chunk, are not counted)."""
    handler = _Warnings()
    logging.getLogger(_DISK_LOG).addHandler(handler)
    logging.getLogger(_DISK_LOG).setLevel(logging.INFO)
    return handler


def _child_readonly(mount_point: Path) -> dict[str, Any]:
    root = mount_point / "kv"
    try:
        (root / "probe").write_bytes(b"")
        probe = "writable"
    except OSError as exc:
        probe = errno.errorcode.get(exc.errno or 0, str(exc))
    seen = _capture()
    disk = DiskBackend(root, 1 << 20)
    blobs = [make_chunk(k, 4096) for k in RO_KEYS[:2]]
    found: dict[str, Any] = {"write_probe": probe, "contains": disk.contains(RO_KEYS[:2]),
                             "get_equal": disk.get(RO_KEYS[:2]) == blobs}
    found["puts"] = [disk.put([(make_key(("ro-new", i)), make_chunk(make_key(("ro-new", i)), 4096))])
                     for i in range(3)]
    found["delete"] = disk.delete(RO_KEYS[:1])
    found["deleted_file_still_there"] = chunk_file(root, RO_KEYS[0]).exists()
    store = TieredStore([disk])
    found["corrupt_get"] = store.get(RO_KEYS[2:])
    store.close()
    found["stats"], found["warnings"] = disk.stats(), list(seen.messages)
    seen.messages.clear()
    missing = DiskBackend(mount_point / "missing" / "kv", 1 << 20)
    key = make_key("missing")
    found["missing"] = {"contains": missing.contains([key]), "get": missing.get([key]),
                        "put": missing.put([(key, make_chunk(key, 1024))]), "warnings": list(seen.messages)}
    return found


def _child_fill(mount_point: Path, payload: int, rounds: int, prefix: str) -> dict[str, Any]:
    root = mount_point / "kv"
    seen = _capture()
    disk = DiskBackend(root, 64 << 20)
    order: list[str] = []
    asked = stored = 0
    for i in range(2 * rounds):
        if i == rounds:  # first episode over: make room, one write fits without evicting (ends it), refill
            first = {"warnings": list(seen.messages), "present": [k for k in order if disk.contains([k])]}
            disk.delete(first["present"][:-1])
        batch = [(make_key((i, j), prefix), make_chunk(make_key((i, j), prefix), payload)) for j in range(2)]
        order += [k for k, _ in batch]
        asked += len(batch)
        stored += disk.put(batch)
    files = sorted(root.glob("*/*.kvc"))
    undecodable = []
    for path in files:
        try:
            decode_chunk(path.read_bytes(), path.name[:-4])
        except Exception:
            undecodable.append(path.name)
    st = os.statvfs(mount_point)
    return {"asked": asked, "stored": stored, "order": order, "present": [k for k in order if disk.contains([k])],
            "undecodable": undecodable, "temp_files": [p.name for p in root.glob("*/.*.tmp")],
            "on_disk": disk_bytes(root), "stats": disk.stats(), "first": first, "warnings": list(seen.messages),
            "infos": list(seen.infos), "fs_bytes": st.f_blocks * st.f_frsize, "max_bytes": disk.max_bytes}


def _child_main(scenario: str, folder: str) -> None:
    if scenario == "readonly":
        found = _child_readonly(Path(folder))
    elif scenario == "full":
        found = _child_fill(Path(folder), 96 * 1024, 40, "")
    elif scenario == "inodes":
        found = _child_fill(Path(folder), 2048, 40, "ab")  # one subfolder: inodes go to chunk files
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    print(json.dumps(found))


if __name__ == "__main__":
    _child_main(*sys.argv[1:])
