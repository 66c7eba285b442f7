"""The ``node`` tier against a real ``kvtier server``: round trips, sharing between processes, the
config path, and the failure contract (server absent, killed, restarted, hung) with no mocks."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from node_server_proc import NodeServerProcess

from kvtier.chunk_format.codec import encode_chunk
from kvtier.cli import main
from kvtier.connector.config import ConfigError, load_config
from kvtier.connector.store_factory import build_store, is_process_local
from kvtier.storage_backends import node_protocol as proto
from kvtier.storage_backends.builtin_tiers import NodeTier
from kvtier.storage_backends.node_backend import NodeBackend
from kvtier.storage_backends.node_mapping import SegmentMap

KiB, MiB = 2**10, 2**20
BACKEND_LOG = "kvtier.storage_backends.node_backend"


def _key(name: object) -> str:
    return hashlib.sha256(str(name).encode()).hexdigest()


def _got(node: NodeBackend, keys: list[str]) -> list[bytes | None]:
    """``get`` as bytes (it returns zero-copy views or copies)."""
    return [None if b is None else bytes(b) for b in node.get(keys)]


def _blob(name: object, size: int) -> bytes:
    seed = hashlib.sha256(f"blob{name}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kvn-", dir="/tmp"))  # short: Unix socket paths stay under 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[NodeServerProcess]:
    """One server for the tests that do not stop it: 16 slots of 64 KiB."""
    with NodeServerProcess(folder / "shared.sock", max_bytes="1MiB", slot_bytes="64KiB") as srv:
        yield srv


@pytest.fixture
def node(server: NodeServerProcess) -> Iterator[NodeBackend]:
    backend = NodeBackend(server.socket_path)
    yield backend
    backend.delete([_key(i) for i in range(64)] + [_key(f"big{i}") for i in range(8)])
    backend.close()


def test_round_trip_multi_slot_and_scattered_slots(node: NodeBackend) -> None:
    items = [(_key(i), _blob(i, size)) for i, size in enumerate([100, 64 * KiB, 200 * KiB, 1])]
    assert node.put(items) == 4
    assert node.contains([k for k, _ in items] + [_key("absent"), items[0][0]]) == 4
    got = node.get([items[2][0], _key("absent"), items[0][0]])
    assert bytes(got[0]) == items[2][1] and got[1] is None and bytes(got[2]) == items[0][1]
    assert isinstance(got[0], np.ndarray) and not got[0].flags.writeable  # a view of the segment, read-only
    assert node.server_stats()["holds"] == 1  # one hold for the batch while its views live
    assert node.delete([items[1][0], _key("absent")]) == 1  # frees one slot between others
    scattered = (_key(5), _blob(5, 180 * KiB))  # 3 slots: the freed one and two elsewhere
    assert node.put([scattered]) == 1 and _got(node, [scattered[0]]) == [scattered[1]]
    assert node.server_stats()["leases"] == 1  # scattered: copied out, its lease already back
    stats = node.stats()
    assert stats["stored_chunks"] == 5 and stats["get_hits"] == 3 and stats["errors"] == 0
    assert stats["used_chunks"] == 4
    del got
    assert node.server_stats()["leases"] == 0  # the views are gone: the next request handed the hold back


def test_zero_copy_views_hold_their_slots_until_the_last_is_dropped(node: NodeBackend) -> None:
    """Deleted or overwritten while a view (or anything derived from it) lives, an entry's slots are
    not reused: the view keeps the bytes it had. Dropped, they are freed."""
    blob = _blob("held", 300 * KiB)
    assert node.put([(_key("held"), blob)]) == 1
    view = node.get([_key("held")])[0]
    derived = [np.asarray(view)[KiB:], memoryview(view)[:10], view.view(np.uint32)]
    del view
    assert node.delete([_key("held")]) == 1
    others = [(_key(f"fill{i}"), _blob(f"fill{i}", 100 * KiB)) for i in range(12)]  # 1.2 MiB into a 1 MiB pool
    node.put(others)
    stats = node.server_stats()
    assert stats["holds"] == 1 and stats["free_slots"] < 2  # full, but for the 5 held slots
    assert stats["used_slots"] + stats["free_slots"] == stats["num_slots"] - 5
    assert bytes(derived[0]) == blob[KiB:] and bytes(derived[1]) == blob[:10]
    assert derived[2].tobytes() == blob
    derived.pop()
    assert node.server_stats()["holds"] == 1
    derived.clear()
    node.contains([_key("held")])  # a request: the hold goes back with it
    after = node.server_stats()
    assert after["holds"] == 0 and after["free_slots"] == stats["free_slots"] + 5
    node.delete([k for k, _ in others])


def test_a_failed_connection_is_set_aside_while_views_live(folder: Path) -> None:
    """Closing the connection would make the server free held slots under live views; a connection
    that fails while it holds some stays open until the last view is dropped."""
    srv = NodeServerProcess(folder / "aside.sock", max_bytes="1MiB", slot_bytes="256KiB").start()
    node = NodeBackend(srv.socket_path, op_timeout_s=0.3, retry_interval_s=0.05)
    other = NodeBackend(srv.socket_path)
    try:
        blob = _blob("aside", 500 * KiB)
        assert node.put([(_key("aside"), blob)]) == 1
        view = node.get([_key("aside")])[0]
        srv.pause()
        assert node.contains([_key("aside")]) == 0  # timed out: the connection failed
        srv.resume()
        time.sleep(0.1)
        assert node.contains([_key("aside")]) == 1  # a new connection; the old one is set aside
        other.delete([_key("aside")])
        assert other.put([(_key(f"new{i}"), _blob(f"new{i}", 200 * KiB)) for i in range(4)]) == 2
        assert other.server_stats()["holds"] == 1 and bytes(view) == blob  # still held: unchanged
        del view
        node.contains([_key("aside")])  # closes the set-aside connection: the server frees its hold
        deadline = time.monotonic() + 5
        while other.server_stats()["holds"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert other.put([(_key(f"new{i}"), _blob(f"new{i}", 200 * KiB)) for i in range(2, 4)]) == 2
    finally:
        node.close()
        other.close()
        srv.stop()


def test_a_connection_that_fails_mid_copy_is_set_aside_until_the_copy_ends(
        folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing it would free the reserved slots under a copy that goes on, which could then change a
    chunk another writer published there; the server keeps them until the copy is over."""
    srv = NodeServerProcess(folder / "midcopy.sock", max_bytes="1MiB", slot_bytes="256KiB").start()
    node = NodeBackend(srv.socket_path, op_timeout_s=0.3, retry_interval_s=0.05)
    other = NodeBackend(srv.socket_path)
    write = SegmentMap.write
    during: list[dict] = []

    def write_after_a_failure(segments: SegmentMap, slots: list[int], data: memoryview) -> None:
        if not during:
            srv.pause()
            assert node.contains([_key("mid")]) == 0  # times out: the connection fails while this put copies
            srv.resume()
            during.append(other.server_stats())
        write(segments, slots, data)

    try:
        monkeypatch.setattr(SegmentMap, "write", write_after_a_failure)
        assert node.put([(_key("mid"), _blob("mid", 500 * KiB))]) == 0  # its connection failed: no commit
        monkeypatch.undo()
        assert during[0]["reservations"] == 1 and during[0]["free_slots"] == 2  # not freed under the copy
        time.sleep(0.1)
        assert node.contains([_key("mid")]) == 0  # a new connection; the set-aside one is closed now
        deadline = time.monotonic() + 5
        while other.server_stats()["reservations"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert other.server_stats()["free_slots"] == 4
    finally:
        node.close()
        other.close()
        srv.stop()


def test_too_large_and_empty_chunks_are_skipped(node: NodeBackend) -> None:
    assert node.put([(_key("big0"), _blob(0, MiB + 1)), (_key(1), b""), (_key(2), b"x")]) == 1
    assert node.contains([_key("big0")]) == 0 and node.stats()["skipped_stores"] == 2
    assert node.stats()["errors"] == 0  # not a failure, only too large


def test_full_pool_evicts_lru_and_never_the_read(node: NodeBackend) -> None:
    chunks = [(_key(i), _blob(i, 100 * KiB)) for i in range(10)]  # 2 slots each, 16 slots: 8 fit
    for item in chunks:
        assert node.put([item]) == 1
    stats = node.server_stats()
    assert stats["entries"] == 8 and stats["evicted_chunks"] >= 2 and stats["used_bytes"] <= MiB
    assert node.contains([chunks[0][0]]) == 0 and _got(node, [chunks[9][0]]) == [chunks[9][1]]


def test_threads_share_one_client(node: NodeBackend) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(30):
                key, blob = _key(t * 100 + i % 3), _blob(t * 100 + i % 3, 20 * KiB + t)
                node.put([(key, blob)])
                got = _got(node, [key])[0]
                assert got is None or got == blob  # evicted by another thread, or exactly what was stored
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and node.stats()["errors"] == 0
    node.delete([_key(t * 100 + i) for t in range(4) for i in range(3)])


PEER = textwrap.dedent("""
    import hashlib, sys
    from kvtier.storage_backends.node_backend import NodeBackend
    node = NodeBackend(sys.argv[1])
    mine = [(f"peer-{i}", hashlib.sha256(f"peer{i}".encode()).digest() * 3000) for i in range(3)]
    assert node.put(mine) == 3
    theirs = node.get(["parent-0", "parent-1"])
    print(",".join(hashlib.sha256(b).hexdigest()[:12] if b is not None else "-" for b in theirs), flush=True)
    node.close()
""")


def test_processes_see_each_others_chunks(node: NodeBackend, server: NodeServerProcess) -> None:
    parent = [(f"parent-{i}", _blob(f"p{i}", 150 * KiB)) for i in range(2)]
    assert node.put(parent) == 2
    done = subprocess.run([sys.executable, "-c", PEER, server.socket_path], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ",".join(hashlib.sha256(b).hexdigest()[:12] for _, b in parent)
    got = _got(node, [f"peer-{i}" for i in range(3)])
    assert got == [hashlib.sha256(f"peer{i}".encode()).digest() * 3000 for i in range(3)]
    node.delete([k for k, _ in parent] + [f"peer-{i}" for i in range(3)])


# -- through the config ---------------------------------------------------------------------------------------------


def test_settings_defaults_and_expansion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    tier = NodeTier(type="node")
    assert tier.name == "node" and tier.socket == str(tmp_path / "kvtier" / "node.sock")
    assert (tier.connect_timeout_s, tier.op_timeout_s, tier.retry_interval_s) == (0.5, 1.0, 1.0)
    monkeypatch.setenv("NODE_DIR", "/run/x")
    assert NodeTier(type="node", socket="$NODE_DIR/n.sock").socket == "/run/x/n.sock"
    assert NodeTier(type="node", socket="~/n.sock").socket == os.path.expanduser("~/n.sock")
    assert not is_process_local(tier)
    config = tmp_path / "bad.yaml"
    config.write_text("tiers: [{type: node, op_timeout_s: 0}]\n")
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.op_timeout_s"):
        load_config(config)
    config.write_text("tiers: [{type: node, port: 1}]\n")
    with pytest.raises(ConfigError, match="port"):
        load_config(config)


def test_node_over_disk_through_load_config(server: NodeServerProcess, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "kvtier.yaml"
    config.write_text(f"tiers:\n  - {{type: node, socket: {server.socket_path}}}\n"
                      f"  - {{type: disk, path: {tmp_path / 'disk'}, max_bytes: 16MiB}}\n")
    store = build_store(load_config(config))
    try:
        key = _key("tiered")
        blob = encode_chunk(key, "float16", (4096,), "test", "tiny", 16, _blob("t", 8192))
        assert store.put([(key, blob)]) == 1 and store.flush()
        node, disk = store.tiers
        assert node.contains([key]) == 1 and disk.contains([key]) == 1  # written through
        assert store.contains([key]) == 1 and bytes(store.get([key])[0].payload) == _blob("t", 8192)
        node.delete([key])
        assert bytes(store.get([key])[0].payload) == _blob("t", 8192) and store.flush()  # from disk...
        assert node.contains([key]) == 1  # ...and promoted back into the node tier
        node.delete([key])
    finally:
        store.close()
    assert main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert server.socket_path in out and "server-managed" in out


# -- the failure contract --------------------------------------------------------------------------------------------


def test_server_not_running_misses_and_warns_once(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=BACKEND_LOG)
    node = NodeBackend(str(folder / "nobody.sock"), retry_interval_s=0.05)
    start = time.monotonic()
    for _ in range(5):
        assert node.contains([_key(1)]) == 0 and node.get([_key(1)]) == [None]
        assert node.put([(_key(1), b"x")]) == 0 and node.delete([_key(1)]) == 0
        time.sleep(0.06)  # past the retry interval: each round tries again
    assert time.monotonic() - start < 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nobody.sock" in warnings[0].getMessage()
    assert node.stats()["errors"] >= 20 and node.stats()["skipped_stores"] == 5
    node.close()
    node.close()


def test_killed_then_restarted_server_reconnects_and_remaps(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=BACKEND_LOG)
    srv = NodeServerProcess(folder / "restart.sock", max_bytes="2MiB").start()
    node = NodeBackend(srv.socket_path, retry_interval_s=0.1)
    try:
        assert node.put([(_key(1), _blob(1, 1500 * KiB))]) == 1
        first = node.server_stats()["pid"]
        srv.kill()
        for _ in range(3):
            assert node.get([_key(1)]) == [None] and node.contains([_key(1)]) == 0
        assert node.put([(_key(2), b"y" * 10)]) == 0
        srv.start()  # a new, empty cache with new segments
        time.sleep(0.15)
        assert node.contains([_key(1)]) == 0  # what the old server held is gone
        assert node.put([(_key(2), _blob(2, 1500 * KiB))]) == 1
        assert _got(node, [_key(2)]) == [_blob(2, 1500 * KiB)]
        assert node.server_stats()["pid"] == srv.pid != first
        fresh = NodeBackend(srv.socket_path)  # wrote into the new server's segments, not the old mapping
        assert _got(fresh, [_key(2)]) == [_blob(2, 1500 * KiB)]
        fresh.close()
    finally:
        node.close()
        srv.stop()
    levels = [r.levelno for r in caplog.records]
    assert levels.count(logging.WARNING) == 1 and levels.count(logging.INFO) == 1
    assert "reachable again" in caplog.records[-1].getMessage()


def test_a_hung_server_costs_at_most_the_timeouts(folder: Path) -> None:
    srv = NodeServerProcess(folder / "hung.sock", max_bytes="2MiB").start()
    node = NodeBackend(srv.socket_path, op_timeout_s=0.3, retry_interval_s=5)
    try:
        assert node.put([(_key(1), b"z" * 100)]) == 1
        srv.pause()
        start = time.monotonic()
        results = []
        threads = [threading.Thread(target=lambda: results.append(node.get([_key(1)]))) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
        assert results == [[None]] * 3 and time.monotonic() - start < 1.5  # one timeout, the others skip
        assert node.contains([_key(1)]) == 0  # while paused for retry_interval_s: at once
        assert time.monotonic() - start < 1.6
    finally:
        srv.resume()
        node.close()
        srv.stop()


@pytest.mark.gpu
def test_mapping_is_page_locked_with_cuda(server: NodeServerProcess) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    node = NodeBackend(server.socket_path, pin=True)
    try:
        assert node.pinned
        assert node.put([(_key("pin"), _blob("pin", 300 * KiB))]) == 1
        assert _got(node, [_key("pin")]) == [_blob("pin", 300 * KiB)]
        node.delete([_key("pin")])
    finally:
        node.close()


# -- a soak ----------------------------------------------------------------------------------------------------------


def test_churn_stays_within_the_cap(folder: Path) -> None:
    """Puts of varying sizes from two threads for a few seconds: the server's accounting, its own memory
    and the shared memory all stay within --max-bytes."""
    with NodeServerProcess(folder / "soak.sock", max_bytes="8MiB", slot_bytes="64KiB") as srv:
        node = NodeBackend(srv.socket_path)
        baseline = srv.memory_status()
        stop = time.monotonic() + 3
        failures: list[BaseException] = []

        def churn(seed: int) -> None:
            i = 0
            try:
                while time.monotonic() < stop:
                    size = 1 + (i * 7919 + seed * 104729) % (600 * KiB)
                    node.put([(_key(f"soak{seed}-{i}"), _blob(i % 50, size))])
                    if i % 3 == 0:
                        node.get([_key(f"soak{seed}-{i - 3}")])
                    i += 1
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=churn, args=(s,)) for s in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = node.server_stats()
        assert not failures and node.stats()["errors"] == 0 and stats["evicted_chunks"] > 100
        assert stats["used_bytes"] <= 8 * MiB and stats["leases"] == 0 and stats["reservations"] == 0
        status = srv.memory_status()
        assert status["RssAnon"] - baseline["RssAnon"] < 16 * MiB, (baseline, status)
        assert status.get("RssShmem", 0) == 0  # the server never maps its segments
        hello_segments = [p for p in Path(proto.SHM_DIR).iterdir() if f"-{srv.pid}-" in p.name]
        assert sum(p.stat().st_blocks * 512 for p in hello_segments) <= 8 * MiB
        node.close()
