"""The Redis tiers' reply reader: values received straight into reusable buffers, against a real
redis-server; buffers come back only when nothing derived from a value is alive."""

from __future__ import annotations

import gc
import socket
import threading
import time
import warnings

import numpy as np
import pytest
import redis
import torch
from redis_server import REDIS_SERVER, RedisServer

from kvtier.storage_backends import redis_reader
from kvtier.storage_backends.buffer_pool import BUFFER_GRANULE, BufferPool
from kvtier.storage_backends.redis_backend import RedisBackend
from kvtier.storage_backends.redis_reader import get_pooled

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_a_buffer_comes_back_only_when_every_derived_view_is_gone() -> None:
    buffers = BufferPool(kept_bytes=4 * BUFFER_GRANULE)
    buffer = buffers.take(1000)
    assert buffer.size == BUFFER_GRANULE and buffer.flags.writeable
    buffer[:5] = np.frombuffer(b"hello", dtype=np.uint8)
    value = buffers.hand_out(buffer, 5)
    assert bytes(value) == b"hello" and not value.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the buffer is read-only: it is only read
        derived = [value[1:], memoryview(value)[2:], torch.frombuffer(memoryview(value), dtype=torch.uint8)]
    del value
    gc.collect()
    other = buffers.take(1000)
    assert address(other) != address(buffer)
    buffers.give_back(other)
    derived.clear()
    gc.collect()
    assert address(buffers.take(1000)) == address(buffer)


def test_each_derived_view_alone_holds_the_buffer() -> None:
    for make in (lambda v: v[1:], lambda v: memoryview(v)[2:], lambda v: torch.frombuffer(memoryview(v), dtype=torch.uint8),
                 lambda v: v.view(np.int8).reshape(1, -1)):
        buffers = BufferPool()
        buffer = buffers.take(10)
        value = buffers.hand_out(buffer, 10)
        survivor = make(value)
        del value
        gc.collect()
        assert address(buffers.take(10)) != address(buffer)
        del survivor
        gc.collect()
        assert address(buffers.take(10)) == address(buffer)


def test_idle_buffers_are_kept_up_to_the_cap_and_by_size() -> None:
    buffers = BufferPool(kept_bytes=2 * BUFFER_GRANULE)
    taken = [buffers.take(BUFFER_GRANULE) for _ in range(3)] + [buffers.take(BUFFER_GRANULE + 1)]
    assert [b.size for b in taken] == [BUFFER_GRANULE] * 3 + [2 * BUFFER_GRANULE]
    for buffer in taken:
        buffers.give_back(buffer)
    buffers.take(1)  # takes back the returned buffers that fit under the cap, then reuses one
    assert buffers.idle_bytes == BUFFER_GRANULE
    assert BufferPool(kept_bytes=0).idle_bytes == 0
    with pytest.raises(ValueError, match="kept_bytes"):
        BufferPool(kept_bytes=-1)


def test_values_of_every_size_missing_keys_and_error_replies(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    rng = np.random.default_rng(0)
    sizes = [0, 1, 100, 65534, 65535, 65536, 65537, 3 * 2**20 + 17, 40]
    values = {f"v{i}": rng.bytes(n) for i, n in enumerate(sizes)}
    client.mset(values)
    client.rpush("a-list", "x")  # GET on it answers WRONGTYPE
    names = ["v0", "absent", *values, "a-list", "v8"]
    buffers = BufferPool()
    replies = get_pooled(client, names, buffers)
    assert len(replies) == len(names)
    assert bytes(replies[0]) == b"" and replies[1] is None
    for name, reply in zip(list(values), replies[2:-2]):
        assert isinstance(reply, np.ndarray) and not reply.flags.writeable
        assert bytes(reply) == values[name]
    assert isinstance(replies[-2], redis.ResponseError) and "WRONGTYPE" in str(replies[-2])
    assert bytes(replies[-1]) == values["v8"]
    assert client.get("v8") == values["v8"]  # the connection is in step for the next command


def test_a_later_get_never_writes_into_a_value_still_held(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url)
    first, second = np.random.default_rng(1).bytes(2**20), np.random.default_rng(2).bytes(2**20)
    backend.put([("a" * 64, first), ("b" * 64, second)])
    held = backend.get(["a" * 64])[0]
    for _ in range(3):
        assert bytes(backend.get(["b" * 64])[0]) == second  # same size: an idle buffer, never the held one
    assert bytes(held) == first
    address_of_held = address(held)
    del held
    gc.collect()
    again = backend.get(["b" * 64])[0]
    assert bytes(again) == second
    reused = address(again) == address_of_held
    del again
    gc.collect()
    assert reused or address(backend.get(["b" * 64])[0]) == address_of_held  # the buffer is reused


def test_redis_py_reads_the_replies_when_it_keeps_no_socket_we_know(redis_server: RedisServer,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    backend = RedisBackend(redis_server.url)
    blob = np.random.default_rng(3).bytes(300_000)
    backend.put([("c" * 64, blob)])
    monkeypatch.setattr(redis_reader, "_connection_socket", lambda conn: (conn.connect(), None)[1])
    assert [None if v is None else bytes(v) for v in backend.get(["c" * 64, "d" * 64])] == [blob, None]


def fake_server(reply_to_get: bytes, stall_s: float = 0.0) -> tuple[int, threading.Thread, socket.socket]:
    """A one-connection server that answers redis-py's handshake (HELLO 3, CLIENT SETINFO) and
    ``reply_to_get`` to the GET, then (after ``stall_s``, silent) closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                if b"GET" in data:
                    conn.sendall(reply_to_get)
                    time.sleep(stall_s)
                    return
                if b"HELLO" in data:
                    conn.sendall(b"%1\r\n$5\r\nproto\r\n:3\r\n")
                else:
                    conn.sendall(b"+OK\r\n" * (data.count(b"\r\n*") + data.startswith(b"*")))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread, listener


def test_a_server_that_dies_mid_reply_is_a_miss_then_the_tier_recovers(redis_server: RedisServer) -> None:
    """A fake server answers half a value and closes: the get misses (never raises, never a short
    value), and the next call on a healthy server works on a fresh connection."""
    port, thread, listener = fake_server(b"$1000\r\n" + b"x" * 400)
    broken = RedisBackend(f"redis://127.0.0.1:{port}/0", retry_interval_s=0)
    assert broken.get(["e" * 64]) == [None] and broken.stats()["errors"] == 1
    thread.join(5)
    listener.close()

    backend = RedisBackend(redis_server.url)
    backend.put([("f" * 64, b"value")])
    assert bytes(backend.get(["f" * 64])[0]) == b"value"


def test_a_reply_that_breaks_the_protocol_is_an_error_not_a_value(redis_server: RedisServer) -> None:
    port, thread, listener = fake_server(b"$3\r\nabcXY")  # no CRLF after the value
    broken = RedisBackend(f"redis://127.0.0.1:{port}/0", retry_interval_s=0, op_timeout_s=2)
    assert broken.get(["e" * 64]) == [None] and broken.stats()["errors"] == 1
    thread.join(5)
    listener.close()


def test_a_value_that_stops_arriving_costs_one_timeout(caplog: pytest.LogCaptureFixture) -> None:
    """Values are received with MSG_WAITALL on a blocking socket: the kernel's receive timeout still
    bounds every wait, and the tier sees redis-py's TimeoutError (its breaker then backs off)."""
    port, thread, listener = fake_server(b"$1000000\r\n" + b"x" * 400_000, stall_s=3.0)
    stalled = RedisBackend(f"redis://127.0.0.1:{port}/0", retry_interval_s=0, op_timeout_s=0.5)
    began = time.monotonic()
    assert stalled.get(["e" * 64]) == [None]
    assert time.monotonic() - began < 2.0 and stalled.stats()["errors"] == 1
    assert "TimeoutError" in caplog.text
    thread.join(5)
    listener.close()
