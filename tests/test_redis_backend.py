"""RedisBackend against a real redis-server: round trips, TTL, AUTH, TLS, crashes, slowness, OOM,
concurrent writers, and ``summarize_redis``. Nothing is mocked."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import socket
import threading
import time

import numpy as np
import pytest
from blob_reads import fetched
from redis_server import REDIS_SERVER, RedisServer, free_port, make_tls_files, redis_supports_tls

from kvtier.chunk_format.codec import ChunkCorrupt, decode_chunk, encode_chunk
from kvtier.storage_backends.redis_backend import RedisBackend, summarize_redis
from kvtier.storage_backends.redis_common import mask_url

LOGGER = "kvtier.storage_backends.redis_backend"

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def key_of(i: int) -> str:
    return hashlib.sha256(f"chunk-{i}".encode()).hexdigest()


def chunk(i: int, nbytes: int = 4096, model: str = "tiny-llama", layout: str = "LBNHC") -> tuple[str, bytearray]:
    """A valid encoded chunk whose content depends only on ``i`` (equal keys, equal bytes)."""
    payload = np.random.default_rng(i).bytes(nbytes)
    key = key_of(i)
    return key, encode_chunk(key, "float16", (nbytes // 2,), layout, model, 16, payload)


def test_round_trip_of_real_chunks_and_stats(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url)
    items = [chunk(i) for i in range(8)]
    big_key = key_of(999)
    big_payload = np.random.default_rng(7).bytes(32 * 2**20)
    big = encode_chunk(big_key, "uint8", (len(big_payload),), "LBNHC", "tiny-llama", 256, big_payload)
    items.append((big_key, memoryview(big)))  # a memoryview goes out without a copy
    assert backend.put(items) == 9

    keys = [k for k, _ in items]
    assert backend.contains(keys) == 9
    blobs = fetched(backend, keys)
    for (key, blob), got in zip(items, blobs):
        assert bytes(decode_chunk(got, key).payload) == bytes(decode_chunk(blob, key).payload)
    assert bytes(decode_chunk(blobs[-1], big_key).payload) == big_payload

    # Any buffer works: a multi-byte-format, multi-dimensional numpy array is stored as its raw bytes.
    array = np.arange(4096, dtype=np.float32).reshape(64, 64)
    assert backend.put([("ab" * 32, array), ("cd" * 32, array[:, ::2])]) == 2
    assert fetched(backend, ["ab" * 32, "cd" * 32]) == [array.tobytes(), array[:, ::2].tobytes()]

    assert backend.delete(keys[:2] + [key_of(12345)]) == 2
    assert backend.contains(keys) == 0
    assert fetched(backend, keys[:3]) == [None, None, blobs[2]]

    stats = backend.stats()
    assert stats["stored_chunks"] == 11 and stats["skipped_stores"] == 0 and stats["errors"] == 0
    assert stats["written_bytes"] >= 32 * 2**20 and stats["read_bytes"] >= 32 * 2**20
    assert stats["lookups"] == 2 and stats["lookup_hit_chunks"] == 9
    assert stats["get_hits"] == 9 + 2 + 1 and stats["get_misses"] == 2
    backend.close()
    backend.close()  # idempotent
    assert fetched(backend, keys[2:4]) == [None, None] and backend.contains(keys[2:]) == 0
    assert backend.put([chunk(50)]) == 0 and backend.delete(keys) == 0


def test_mask_url_hides_passwords() -> None:
    assert mask_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert mask_url("rediss://user:p@w:d@[::1]:6380/2?ssl_ca_certs=/ca.pem") == (
        "rediss://user:***@[::1]:6380/2?ssl_ca_certs=/ca.pem"
    )
    assert mask_url("redis://h:1?db=1&password=pw") == "redis://h:1?db=1&password=***"
    assert mask_url("redis://localhost:6379") == "redis://localhost:6379"


def test_contains_counts_leading_hits_only(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url)
    k = [key_of(i) for i in range(5)]
    assert backend.put([chunk(0), chunk(1), chunk(3), chunk(4)]) == 4
    assert backend.contains(k) == 2  # k[3], k[4] come after the gap at k[2]
    assert backend.contains(k[2:]) == 0
    assert backend.contains(k[3:]) == 2
    assert backend.contains([]) == 0
    assert fetched(backend, []) == [] and backend.put([]) == 0 and backend.delete([]) == 0
    backend.close()


def test_ttl_and_key_prefix_isolation(redis_server: RedisServer) -> None:
    raw = redis_server.client()
    with_ttl = RedisBackend(redis_server.url, key_prefix="a:", ttl_seconds=100)
    without = RedisBackend(redis_server.url, key_prefix="b:")
    key, blob = chunk(1)
    assert with_ttl.put([(key, blob)]) == 1 and without.put([chunk(2)]) == 1
    assert 0 < raw.pttl(f"a:{key}") <= 100_000
    assert raw.ttl(f"b:{key_of(2)}") == -1  # no expiry
    assert raw.get(f"a:{key}") == blob

    assert without.contains([key]) == 0 and fetched(without, [key]) == [None] and without.delete([key]) == 0
    assert with_ttl.contains([key_of(2)]) == 0
    assert with_ttl.contains([key]) == 1
    with pytest.raises(ValueError):
        RedisBackend(redis_server.url, ttl_seconds=0)
    for b in (with_ttl, without):
        b.close()
    raw.close()


def test_auth_right_and_wrong_password(caplog: pytest.LogCaptureFixture) -> None:
    password = "s3cr:t/@pw"  # URL-special characters, quoted in the URL
    with RedisServer(password=password) as server:
        good = RedisBackend(server.url)
        assert good.put([chunk(1)]) == 1 and good.contains([key_of(1)]) == 1
        user_url = server.url.replace("redis://:", "redis://default:")
        assert fetched(RedisBackend(user_url), [key_of(1)]) == [chunk(1)[1]]

        caplog.set_level(logging.WARNING, logger=LOGGER)
        for url in (server.url.replace("s3cr", "wrong"), f"redis://127.0.0.1:{server.port}/0"):
            bad = RedisBackend(url, retry_interval_s=0)
            assert bad.put([chunk(2)]) == 0
            assert bad.contains([key_of(1)]) == 0 and fetched(bad, [key_of(1)]) == [None]
            assert bad.delete([key_of(1)]) == 0
            stats = bad.stats()
            assert stats["errors"] == 4 and stats["skipped_stores"] == 1 and stats["stored_chunks"] == 0
            bad.close()
        assert good.contains([key_of(1)]) == 1  # nothing was deleted
        assert len(caplog.records) == 2 and all("s3cr" not in r.getMessage() for r in caplog.records)
        assert "***" in caplog.records[0].getMessage()
        good.close()


def test_tls_with_verified_certificate(tmp_path) -> None:
    if not redis_supports_tls():
        pytest.skip("this redis-server was built without TLS support")
    with RedisServer(tls=make_tls_files(tmp_path)) as server:
        assert server.url.startswith("rediss://")
        backend = RedisBackend(server.url)
        key, blob = chunk(3, nbytes=2 * 2**20)
        assert backend.put([(key, blob)]) == 1
        assert bytes(decode_chunk(fetched(backend, [key])[0], key).payload) == bytes(decode_chunk(blob, key).payload)
        assert backend.stats()["errors"] == 0
        backend.close()
        # A CA that did not sign the server's certificate: verification fails, misses, no exception.
        (tmp_path / "other").mkdir()
        other = make_tls_files(tmp_path / "other")
        untrusted = RedisBackend(server.url.replace(server.tls.ca, other.ca))
        assert fetched(untrusted, [key]) == [None] and untrusted.stats()["errors"] == 1
        untrusted.close()


def test_crash_and_restart_on_same_port(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    backend = RedisBackend(redis_server.url, connect_timeout_s=0.5, op_timeout_s=0.5, retry_interval_s=0.2)
    assert backend.put([chunk(i) for i in range(4)]) == 4
    keys = [key_of(i) for i in range(4)]
    redis_server.stop()

    calls, deadline = 0, time.monotonic() + 1.0  # spans several retry intervals: real reconnect attempts
    while time.monotonic() < deadline:
        for op in (
            lambda: backend.contains(keys) == 0,
            lambda: fetched(backend, keys) == [None] * 4,
            lambda: backend.put([chunk(9)]) == 0,
            lambda: backend.delete(keys) == 0,
        ):
            start = time.monotonic()
            assert op()
            assert time.monotonic() - start < 0.5 + 0.3
            calls += 1
        time.sleep(0.02)
    stats = backend.stats()
    assert stats["errors"] == calls and stats["skipped_stores"] == calls // 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"127.0.0.1:{redis_server.port}" in warnings[0].getMessage()

    redis_server.start()  # same port, empty (no persistence)
    time.sleep(0.25)  # past retry_interval_s
    assert backend.put([chunk(20), chunk(21)]) == 2
    assert fetched(backend, [key_of(20), key_of(21)]) == [chunk(20)[1], chunk(21)[1]]
    assert backend.contains(keys) == 0
    infos = [r for r in caplog.records if r.levelno == logging.INFO and "reachable again" in r.getMessage()]
    assert len(infos) == 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    backend.close()


def test_slow_redis_times_out_quickly(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url, connect_timeout_s=0.5, op_timeout_s=0.5, retry_interval_s=0.1)
    assert backend.put([chunk(1)]) == 1  # a pooled connection exists before the stall
    raw = redis_server.client()
    sleeper = threading.Thread(target=raw.execute_command, args=("DEBUG", "SLEEP", "3"))
    sleeper.start()
    time.sleep(0.3)  # let the server enter the sleep
    start = time.monotonic()
    assert fetched(backend, [key_of(1)]) == [None]
    assert time.monotonic() - start < 1.2
    start = time.monotonic()
    assert backend.contains([key_of(1)]) == 0  # breaker open: no network at all
    assert time.monotonic() - start < 0.2
    assert backend.stats()["errors"] == 2
    sleeper.join()
    time.sleep(0.15)
    assert fetched(backend, [key_of(1)]) == [chunk(1)[1]]  # recovered, same object
    backend.close()
    raw.close()


def test_unresponsive_host_costs_one_connect_timeout() -> None:
    """A host that drops SYNs (a listener whose accept queue is full): the first call waits
    ``connect_timeout_s``, the breaker answers the next ones at once."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port, fillers = listener.getsockname()[1], []
        try:
            for _ in range(8):  # fill the accept queue until a connect hangs
                filler = socket.socket()
                fillers.append(filler)
                filler.settimeout(0.2)
                try:
                    filler.connect(("127.0.0.1", port))
                except OSError:
                    break
            else:
                pytest.skip("this kernel does not drop SYNs on a full accept queue")
            backend = RedisBackend(f"redis://127.0.0.1:{port}/0", connect_timeout_s=0.3, retry_interval_s=5)
            start = time.monotonic()
            assert fetched(backend, [key_of(1)]) == [None]
            assert 0.25 < time.monotonic() - start < 0.3 + 0.3
            start = time.monotonic()
            assert backend.put([chunk(1)]) == 0 and backend.contains([key_of(1)]) == 0
            assert time.monotonic() - start < 0.2
            assert backend.stats()["errors"] == 3
            backend.close()
        finally:
            for filler in fillers:
                filler.close()


def test_out_of_memory_skips_stores_without_tripping(caplog: pytest.LogCaptureFixture) -> None:
    with RedisServer(extra_args=("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")) as server:
        caplog.set_level(logging.INFO, logger=LOGGER)
        backend = RedisBackend(server.url)
        assert backend.put([chunk(1)]) == 1
        assert backend.put([chunk(2, nbytes=8 * 2**20)]) == 0  # OOM reply: skipped, not raised
        assert backend.contains([key_of(1)]) == 1  # the breaker stays closed for command errors
        assert backend.put([chunk(3, nbytes=8 * 2**20)]) == 0
        stats = backend.stats()
        assert stats["errors"] == 2 and stats["skipped_stores"] == 2
        assert len(caplog.records) == 1 and "OutOfMemoryError" in caplog.records[0].getMessage()  # not one per call
        backend.close()


def _writer(url: str, first: int, count: int) -> int:
    """Spawned worker: write overlapping chunks in batches, then read them all back and decode."""
    backend = RedisBackend(url)
    ids = list(range(first, first + count))
    for start in range(0, count, 25):
        batch = [chunk(i) for i in ids[start : start + 25]]
        assert backend.put(batch) == len(batch)
        backend.contains([key_of(i) for i in ids[: start + 25]])
    blobs = fetched(backend, [key_of(i) for i in ids])
    for i, blob in zip(ids, blobs):
        decode_chunk(blob, key_of(i))
    assert backend.stats()["errors"] == 0
    backend.close()
    return len(blobs)


def test_threads_share_one_backend_with_a_small_pool(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url, max_connections=2)
    failures: list[BaseException] = []

    def work(t: int) -> None:
        try:
            ids = range(t * 20, t * 20 + 40)  # neighbours overlap
            for i in ids:
                assert backend.put([chunk(i)]) == 1
                assert backend.contains([key_of(i)]) == 1
            for i, blob in zip(ids, fetched(backend, [key_of(i) for i in ids])):
                decode_chunk(blob, key_of(i))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and backend.stats()["errors"] == 0
    backend.close()


def test_two_processes_write_the_same_redis(redis_server: RedisServer) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        counts = pool.starmap(_writer, [(redis_server.url, 0, 300), (redis_server.url, 150, 300)])
    assert counts == [300, 300]
    backend = RedisBackend(redis_server.url)
    keys = [key_of(i) for i in range(450)]
    assert backend.contains(keys) == 450
    for key, blob in zip(keys, fetched(backend, keys)):
        decode_chunk(blob, key)
    backend.close()


def test_summarize_redis(redis_server: RedisServer) -> None:
    prefix = "kv[t]:"  # glob characters must be matched literally
    backend = RedisBackend(redis_server.url, key_prefix=prefix)
    items = [chunk(i, model="model-a", layout="LBNHC") for i in range(5)]
    items += [chunk(i, model="model-b", layout="HND") for i in range(5, 8)]
    items.append(chunk(8, model="m" * 3000, layout="l" * 2000))  # header longer than the 4 KiB probe
    assert backend.put(items) == 9
    bad_key, bad = chunk(9)
    assert backend.put([(key_of(10), b"garbage, not a chunk"), (key_of(11), bad[:-1]), (key_of(12), bad)]) == 3
    with pytest.raises(ChunkCorrupt):
        decode_chunk(bad, key_of(12))  # stored under the wrong key
    raw = redis_server.client()
    raw.set("kvt:" + key_of(13), items[0][1])  # matches the unescaped glob kv[t]:*, must not count
    raw.set("other:" + key_of(14), items[0][1])

    summary = summarize_redis(redis_server.url, prefix)
    assert summary.chunks == 9 and summary.unreadable == 3
    assert summary.bytes == sum(len(blob) for _, blob in items) + len(b"garbage, not a chunk") + 2 * len(bad) - 1
    assert summary.models == {"model-a": 5, "model-b": 3, "m" * 3000: 1}
    assert summary.layouts == {"LBNHC": 5, "HND": 3, "l" * 2000: 1}
    assert summarize_redis(redis_server.url, "nothing:").chunks == 0

    with pytest.raises(ConnectionError, match=r"\*\*\*") as err:
        summarize_redis(f"redis://:hunter2@127.0.0.1:{free_port()}/0", connect_timeout_s=0.5)
    assert "hunter2" not in str(err.value)
    backend.close()
    raw.close()
