"""The benchmarks' throttling proxy (``benchmarks/throttle_proxy.py``) in front of a real redis-server:
bytes pass unchanged, and no faster than the cap allows (a lower bound on time, safe on a busy machine)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from throttle_proxy import ThrottledProxy  # noqa: E402


def test_a_throttled_link_keeps_bytes_and_its_pace(redis_server) -> None:
    value = bytes(range(256)) * 4096  # 1 MiB
    with ThrottledProxy("127.0.0.1", redis_server.port, bytes_per_s=4e6, latency_s=0.005) as proxy:
        client = redis.Redis(host="127.0.0.1", port=proxy.port, socket_timeout=20)
        began = time.monotonic()
        client.set("k", value)
        assert client.get("k") == value
        elapsed = time.monotonic() - began
        assert elapsed >= 2 * len(value) / 4e6 * 0.95  # 1 MiB up and 1 MiB down at 4 MB/s
        began = time.monotonic()
        assert client.ping()
        assert time.monotonic() - began >= 2 * 0.005  # one round trip: the delay each way
        client.close()
    assert redis_server.client().get("k") == value  # the proxy's writes reached the real server
