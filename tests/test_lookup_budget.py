"""Every lookup wait is bounded: a tier that does not answer ``contains`` within ``lookup_budget_s``
is a miss and is skipped with backoff; the Redis tiers' breakers back off while a server keeps
timing out.

The stalls are real: a ``redis-server`` (or one master of a Redis Cluster) is SIGSTOPped, so the
kernel still accepts connections but nothing answers, and SIGCONT lets it go on. Without the lookup
budget each such lookup waits ``op_timeout_s``; without the breaker backoff a stalled server costs a
timeout every ``retry_interval_s``. The guard's own state machine is also checked with a tier whose
delay the test sets, where exact timings matter."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest
from blob_reads import fetched
from redis_cluster import RedisCluster
from redis_server import REDIS_SERVER, RedisServer

from kvtier.chunk_format.codec import encode_chunk
from kvtier.connector.config import ConfigError, load_config
from kvtier.connector.store_factory import build_store
from kvtier.storage_backends.base import Buffer, StorageBackend
from kvtier.storage_backends.cpu_backend import CpuBackend
from kvtier.storage_backends.lookup_guard import GuardedLookup, bounded_lookup
from kvtier.storage_backends.metrics import MetricSet, TierMetrics
from kvtier.storage_backends.redis_backend import RedisBackend
from kvtier.storage_backends.redis_cluster import RedisClusterBackend
from kvtier.storage_backends.tiered import TieredStore

GUARD_LOG = "kvtier.storage_backends.lookup_guard"
BUDGET = 0.1
SLACK = 0.15  # scheduling noise on a loaded 2-core machine; far below any op_timeout_s used here

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def key_of(i: int, tag: str = "") -> str:
    return hashlib.sha256(f"{tag}budget-{i}".encode()).hexdigest()


def chunk(i: int, tag: str = "") -> tuple[str, bytearray]:
    key = key_of(i, tag)
    payload = np.random.default_rng(int(key[:8], 16)).bytes(4096)
    return key, encode_chunk(key, "float16", (2048,), "LBNHC", "tiny-llama", 16, payload)


def timed(call: Callable[[], int]) -> tuple[int, float]:
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


def poll(calls: int, interval_s: float, call: Callable[[], int]) -> tuple[list[int], list[float]]:
    """``calls`` timed calls, ``interval_s`` apart: their results and wall times."""
    results, times = [], []
    for _ in range(calls):
        result, seconds = timed(call)
        results.append(result)
        times.append(seconds)
        time.sleep(interval_s)
    return results, times


def wait_for(condition: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until ``condition()`` holds (polled every 20 ms); fails after ``timeout_s``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - start


def guard_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == GUARD_LOG and r.levelno == level]


@pytest.fixture
def paused(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The test server, resumed at teardown whatever happened (a SIGSTOPped server cannot be killed
    politely, and a later test must not meet it stopped)."""
    yield redis_server
    redis_server.resume()


# --- one stalled redis-server under a cpu tier ----------------------------------------------------------


@needs_redis
def test_stalled_redis_lookups_stay_within_budget_then_hit_again(paused: RedisServer,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=GUARD_LOG)
    metric_set = MetricSet()
    cpu = CpuBackend(1 << 22, 8192, metrics=TierMetrics("cpu", metric_set))
    redis = RedisBackend(paused.url, metrics=TierMetrics("redis", metric_set), connect_timeout_s=0.5,
                         op_timeout_s=1.0, retry_interval_s=1.0)
    store = TieredStore([cpu, redis], lookup_budget_s=BUDGET)
    items = [chunk(i) for i in range(6)]
    keys = [k for k, _ in items]
    assert redis.put(items) == 6 and cpu.put(items[:1]) == 1  # chunk 0 also in host memory
    assert store.contains(keys) == 6

    paused.pause()
    results, times = poll(20, 0.05, lambda: store.contains(keys))
    assert results == [1] * 20  # the cpu tier's chunk still counts; the stalled redis is a miss
    assert max(times) < BUDGET + SLACK, times  # without the budget: op_timeout_s (1 s)
    assert sum(t > BUDGET / 2 for t in times) <= 2, times  # the rest skip the stuck tier at once
    assert store.stats()["redis"]["lookup_timeouts"] >= 10  # the overrun and the lookups that skipped it
    assert store.stats()["cpu"]["lookup_timeouts"] == 0
    assert len(guard_records(caplog, logging.WARNING)) == 1

    paused.resume()
    # Back within the breaker's pause (1 s after the timeout) and the guard's (0.5 s after the call returned).
    assert wait_for(lambda: store.contains(keys) == 6, timeout_s=5.0) < 3.0
    assert len(guard_records(caplog, logging.INFO)) == 1
    assert "redis" in guard_records(caplog, logging.WARNING)[0].getMessage()
    store.close()


@needs_redis
def test_a_stuck_call_never_makes_another_lookup_wait(paused: RedisServer) -> None:
    redis = RedisBackend(paused.url, op_timeout_s=2.0)  # the default: what a scheduler would wait without a budget
    store = TieredStore([redis], lookup_budget_s=BUDGET)
    keys = [key_of(i, "stuck") for i in range(4)]
    assert redis.put([chunk(i, "stuck") for i in range(4)]) == 4 and store.contains(keys) == 4
    assert redis.stats()["lookups"] == 1

    paused.pause()
    # Two lookups at once while nothing is stuck yet: the second call queues behind the first, both
    # give up at the budget, and the queued one is dropped, never sent to the stalled server.
    answers: list[tuple[int, float]] = []
    threads = [threading.Thread(target=lambda: answers.append(timed(lambda: store.contains(keys))))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert [a for a, _ in answers] == [0, 0] and max(t for _, t in answers) < BUDGET + SLACK, answers
    # Two lookups in a row while the first call is still blocked: both return at once.
    for _ in range(2):
        found, seconds = timed(lambda: store.contains(keys))
        assert found == 0 and seconds < 0.05
    assert store.stats()["redis"]["lookup_timeouts"] == 4

    paused.resume()  # the stuck call gets its answer (too late for its lookup)
    assert wait_for(lambda: store.contains(keys) == 4, timeout_s=5.0) < 2.0
    assert redis.stats()["lookups"] == 1 + 1 + 1  # warm-up, the one stuck call, the first answered lookup
    store.close()


# --- one stalled master of a Redis Cluster --------------------------------------------------------------


def _first_index_per_master(cluster: RedisCluster, keys: list[str]) -> dict[int, int]:
    with cluster.client() as raw:
        ports = [raw.get_node_from_key("kvtier:" + key).port for key in keys]
    first: dict[int, int] = {}
    for i, port in enumerate(ports):
        first.setdefault(port, i)
    return first


@needs_redis
def test_stalled_cluster_master_counts_up_to_its_first_chunk(redis_cluster: RedisCluster,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=GUARD_LOG)
    cpu = CpuBackend(1 << 22, 8192)
    cluster = RedisClusterBackend(redis_cluster.url(), connect_timeout_s=0.5, op_timeout_s=0.5, retry_interval_s=1.0)
    store = TieredStore([cpu, cluster], lookup_budget_s=BUDGET)
    items = [chunk(i, "cluster") for i in range(30)]
    keys = [k for k, _ in items]
    first = _first_index_per_master(redis_cluster, keys)
    victim = max(first, key=first.get)  # the master whose first chunk comes last
    first_lost = first[victim]
    assert len(first) == 3 and first_lost >= 2
    assert cluster.put(items) == 30 and cpu.put(items[:1]) == 1
    assert store.contains(keys) == 30

    redis_cluster.pause(victim)
    try:
        results, times = poll(30, 0.1, lambda: store.contains(keys))
    finally:
        redis_cluster.resume(victim)
    assert max(times) < BUDGET + SLACK, times  # without the budget: op_timeout_s (0.5 s), each time
    assert sum(t > BUDGET / 2 for t in times) <= 4, times
    assert set(results) <= {1, first_lost}, results  # skipped (the cpu chunk), or the prefix rule
    # Once the stalled master's breaker is open, the tier answers again: the other masters' chunks
    # count, up to the first chunk on the stalled one.
    assert first_lost in results, results
    assert store.stats()["redis"]["lookup_timeouts"] >= 1

    redis_cluster.wait_ok()
    assert wait_for(lambda: store.contains(keys) == 30, timeout_s=10.0) < 8.0
    store.close()


# --- the Redis breakers back off while a server keeps timing out -----------------------------------------


def _slow_calls(call: Callable[[], object], seconds: float, slow_s: float) -> list[tuple[float, float]]:
    """Call ``call`` every 10 ms for ``seconds``; (start, end) of each call that took over ``slow_s``."""
    slow, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.monotonic()
        call()
        end = time.monotonic()
        if end - start > slow_s:
            slow.append((start, end))
        time.sleep(0.01)
    return slow


def _pauses(slow: list[tuple[float, float]]) -> list[float]:
    """The breaker's pause between one timed-out call's end and the next slow call's start."""
    return [nxt[0] - prev[1] for prev, nxt in zip(slow, slow[1:])]


def _assert_doubling(pauses: list[float], first: float) -> None:
    assert len(pauses) >= 2, pauses
    assert first * 0.9 < pauses[0] < first + 0.15, pauses
    for shorter, longer in zip(pauses, pauses[1:]):
        assert longer > 1.6 * shorter, pauses  # a fixed retry interval would repeat `first`


@needs_redis
def test_redis_breaker_backs_off_while_the_server_times_out_and_resets(paused: RedisServer) -> None:
    backend = RedisBackend(paused.url, connect_timeout_s=0.3, op_timeout_s=0.3, retry_interval_s=0.2)
    key, blob = chunk(1, "backoff")
    assert backend.put([(key, blob)]) == 1

    paused.pause()
    slow = _slow_calls(lambda: backend.get([key]), 3.5, slow_s=0.2)
    _assert_doubling(_pauses(slow), first=0.2)  # 0.2, 0.4, 0.8 s: timeouts at 0, 0.5, 1.2, 2.3 s
    assert len(slow) <= 5, slow  # a fixed 0.2 s interval: one every 0.5 s, 7 or 8

    paused.resume()
    assert wait_for(lambda: fetched(backend, [key]) == [blob], timeout_s=5.0) < 3.0
    paused.pause()  # after a success the pause starts again from retry_interval_s
    slow = _slow_calls(lambda: backend.get([key]), 1.6, slow_s=0.2)
    _assert_doubling(_pauses(slow), first=0.2)
    paused.resume()
    assert wait_for(lambda: fetched(backend, [key]) == [blob], timeout_s=5.0) < 3.0
    backend.close()


@needs_redis
def test_cluster_breaker_backs_off_per_master(redis_cluster: RedisCluster) -> None:
    backend = RedisClusterBackend(redis_cluster.url(), connect_timeout_s=0.3, op_timeout_s=0.3, retry_interval_s=0.2)
    items = [chunk(i, "cluster-backoff") for i in range(30)]
    keys = [k for k, _ in items]
    victim = next(iter(_first_index_per_master(redis_cluster, keys)))
    with redis_cluster.client() as raw:
        on_victim = {i for i, k in enumerate(keys) if raw.get_node_from_key("kvtier:" + k).port == victim}
    assert backend.put(items) == 30

    def get_others() -> None:
        got = backend.get(keys)
        assert [i for i, v in enumerate(got) if v is None] == sorted(on_victim)  # the other masters serve

    redis_cluster.pause(victim)
    try:
        slow = _slow_calls(get_others, 3.5, slow_s=0.2)
    finally:
        redis_cluster.resume(victim)
    _assert_doubling(_pauses(slow), first=0.2)
    assert len(slow) <= 5, slow
    redis_cluster.wait_ok()
    assert wait_for(lambda: fetched(backend, keys) == [bytes(b) for _, b in items], timeout_s=10.0) < 8.0
    backend.close()


# --- the guard's state machine, with a tier whose delay the test sets -------------------------------------


class _DelayedTier(StorageBackend):
    """Answers ``contains`` with ``answer`` after ``delay_s``; records when each call ran and where."""

    def __init__(self, name: str = "slow", process_local: bool = False) -> None:
        super().__init__(name, TierMetrics(name))
        self.process_local = process_local
        self.delay_s = 0.0
        self.answer = 1
        self.error: Exception | None = None
        self.calls: list[tuple[float, float, str]] = []  # (start, end, thread name)

    def contains(self, keys: Sequence[str]) -> int:
        start = time.monotonic()
        time.sleep(self.delay_s)
        self.calls.append((start, time.monotonic(), threading.current_thread().name))
        if self.error is not None:
            raise self.error
        return self.answer

    def get(self, keys: Sequence[str]) -> list[Buffer | None]:
        return [None] * len(keys)

    def put(self, items: Sequence[tuple[str, Buffer]]) -> int:
        return 0

    def delete(self, keys: Sequence[str]) -> int:
        return 0


def test_process_local_tiers_are_asked_inline_the_others_on_their_lookup_thread() -> None:
    local, remote = _DelayedTier("local", process_local=True), _DelayedTier("remote")
    assert bounded_lookup(local) is local
    guarded = bounded_lookup(remote)
    assert isinstance(guarded, GuardedLookup) and guarded.contains(["k"]) == 1
    assert remote.calls[0][2] == "kvtier-remote-lookup"
    assert [t.name for t in threading.enumerate()].count("kvtier-remote-lookup") == 1
    guarded.close()
    guarded.close()  # idempotent
    assert "kvtier-remote-lookup" not in [t.name for t in threading.enumerate()]
    assert guarded.contains(["k"]) == 1 and remote.calls[-1][2] == threading.current_thread().name  # closed: inline
    store = TieredStore([local, remote], lookup_budget_s=BUDGET)
    assert store.contains(["a", "b"]) == 2 and local.calls[-1][2] == threading.current_thread().name
    store.close()


def test_backoff_doubles_per_overrun_up_to_the_cap_and_resets_on_an_answer(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=GUARD_LOG)
    tier = _DelayedTier()
    guard = GuardedLookup(tier, budget_s=0.03, backoff_s=0.1, max_backoff_s=0.4)
    tier.delay_s = 0.08  # every call overruns the budget

    def probes_during(seconds: float) -> list[tuple[float, float, str]]:
        before = len(tier.calls)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found, took = timed(lambda: guard.contains(["k"]))
            assert found == 0 and took < 0.03 + SLACK
            time.sleep(0.005)
        time.sleep(0.1)  # let the last call return
        return tier.calls[before:]

    calls = probes_during(1.6)
    pauses = [nxt[0] - prev[1] for prev, nxt in zip(calls, calls[1:])]
    assert len(pauses) >= 4, pauses  # 0.1, 0.2, 0.4, 0.4 (capped)
    for got, want in zip(pauses, [0.1, 0.2, 0.4, 0.4]):
        assert want - 0.01 < got < want + 0.08, pauses
    assert tier.metrics.snapshot()["lookup_timeouts"] > 50
    assert len(guard_records(caplog, logging.WARNING)) == 1

    tier.delay_s = 0.0  # answers in time: counted as a hit again, the backoff forgotten
    assert wait_for(lambda: guard.contains(["k"]) == 1, timeout_s=2.0) < 0.6
    assert len(guard_records(caplog, logging.INFO)) == 1
    tier.delay_s = 0.08
    calls = probes_during(0.45)
    pauses = [nxt[0] - prev[1] for prev, nxt in zip(calls, calls[1:])]
    assert 0.09 < pauses[0] < 0.18, pauses  # from backoff_s again, not from the cap
    assert len(guard_records(caplog, logging.WARNING)) == 1  # a flapping tier: one WARNING a minute
    guard.close()


def test_a_tier_bug_reaches_the_caller_and_the_lookup_thread_survives() -> None:
    tier = _DelayedTier()
    guard = GuardedLookup(tier, budget_s=1.0)
    tier.error = RuntimeError("backend bug")
    with pytest.raises(RuntimeError, match="backend bug"):
        guard.contains(["k"])
    tier.error = None
    assert guard.contains(["k"]) == 1
    guard.close()


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="lookup budget"):
        GuardedLookup(_DelayedTier(), budget_s=0)
    with pytest.raises(ValueError, match="lookup budget"):
        TieredStore([_DelayedTier()], lookup_budget_s=-1.0)


# --- configuration -----------------------------------------------------------------------------------------


def test_lookup_budget_from_config_reaches_the_store(tmp_path) -> None:
    base = {"tiers": [{"type": "cpu", "max_bytes": "1MiB", "slot_bytes": "4KiB"}]}
    assert load_config(overrides=base, environ={}).lookup_budget_s == 0.1
    config = load_config(overrides={**base, "lookup_budget_s": 0.25}, environ={})
    store = build_store(config)
    assert store.lookup_budget_s == 0.25
    store.close()
    assert load_config(overrides=base, environ={"KVTIER_LOOKUP_BUDGET_S": "0.05"}).lookup_budget_s == 0.05


@pytest.mark.parametrize("value, rule", [
    (0, "greater than 0"), (-1, "greater than 0"), (61, "less than or equal to 60"), ("soon", "valid number"),
])
def test_bad_lookup_budget_names_key_value_and_rule(tmp_path, value: object, rule: str) -> None:
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"tiers: [{{type: cpu}}]\nlookup_budget_s: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    for part in ("lookup_budget_s", repr(value), rule):
        assert part in message, f"{part!r} missing from: {message}"
