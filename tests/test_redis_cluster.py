"""RedisClusterBackend against a real Redis Cluster (redis-server --cluster-enabled yes, joined by
redis-cli): round trips and leading hits across masters, one pipeline per master, keys spread over
slots, slot migration (ASK, MOVED), a master killed and restarted, failover to a replica, AUTH,
TLS, and the config/factory path. Nothing is mocked."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter

import numpy as np
import pytest
from blob_reads import fetched
from redis.cluster import key_slot
from redis_cluster import RedisCluster, make_cluster_tls_files
from redis_server import REDIS_SERVER, redis_supports_tls

from kvtier.chunk_format.codec import decode_chunk, encode_chunk
from kvtier.connector.config import load_config
from kvtier.connector.store_factory import build_store
from kvtier.storage_backends.redis_backend import summarize_redis
from kvtier.storage_backends.redis_cluster import RedisClusterBackend, parse_cluster_url

LOGGER = "kvtier.storage_backends.redis_cluster"
PASSWORD = "cluster pw"  # the conftest cluster's

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def key_of(i: int, tag: str = "") -> str:
    return hashlib.sha256(f"{tag}chunk-{i}".encode()).hexdigest()


def chunk(i: int, nbytes: int = 4096, tag: str = "") -> tuple[str, bytearray]:
    """A valid encoded chunk whose content depends only on (tag, i)."""
    key = key_of(i, tag)
    payload = np.random.default_rng(int(key[:8], 16)).bytes(nbytes)
    return key, encode_chunk(key, "float16", (nbytes // 2,), "LBNHC", "tiny-llama", 16, payload)


def owner(cluster: RedisCluster, key: str, prefix: str = "kvtier:") -> int:
    return owners(cluster, [key], prefix)[0]


def owners(cluster: RedisCluster, keys: list[str], prefix: str = "kvtier:") -> list[int]:
    """The port of the master serving each key now."""
    with cluster.client() as raw:
        return [raw.get_node_from_key(prefix + key).port for key in keys]


def reads_processed(cluster: RedisCluster) -> dict[int, int]:
    """Read events each master has processed: a pipeline costs one or a few, a command each would cost one each."""
    out = {}
    for port in cluster.master_ports():
        with cluster.node(port).client() as c:
            out[port] = c.info("stats")["total_reads_processed"]
    return out


def fast_backend(url: str, **kwargs) -> RedisClusterBackend:
    args = {"connect_timeout_s": 0.5, "op_timeout_s": 0.5, "retry_interval_s": 0.2} | kwargs
    return RedisClusterBackend(url, **args)


def test_round_trip_across_masters_in_one_pipeline_each(redis_cluster: RedisCluster) -> None:
    backend = RedisClusterBackend(redis_cluster.url(seeds=1))  # one seed: the others are discovered
    items = [chunk(i, tag="rt") for i in range(60)]
    big_key, big = chunk(999, nbytes=16 * 2**20, tag="rt")
    items.append((big_key, memoryview(big)))
    keys = [k for k, _ in items]
    assert sorted(set(owners(redis_cluster, keys))) == redis_cluster.master_ports()  # the batch spans every master

    assert backend.put(items) == 61
    assert backend.contains(keys) == 61
    blobs = fetched(backend, keys)
    for (key, blob), got in zip(items, blobs):
        assert bytes(got) == bytes(blob)
        decode_chunk(got, key)

    # One pipeline per master and call: 600 lookups cost each master a few reads, not ~200.
    absent = [key_of(i, "absent") for i in range(600)]
    before = reads_processed(redis_cluster)
    assert fetched(backend, absent) == [None] * 600 and backend.contains(absent) == 0
    after = reads_processed(redis_cluster)
    assert all(after[port] - before[port] < 30 for port in before), (before, after)

    assert backend.delete(keys[:5] + [key_of(12345, "rt")]) == 5
    assert backend.contains(keys) == 0 and backend.contains(keys[5:]) == 56
    assert fetched(backend, keys[3:7])[:2] == [None, None]

    stats = backend.stats()
    assert stats["stored_chunks"] == 61 and stats["skipped_stores"] == 0 and stats["errors"] == 0
    assert stats["written_bytes"] >= 16 * 2**20 and stats["read_bytes"] >= 16 * 2**20
    assert stats["lookups"] == 4 and stats["lookup_hit_chunks"] == 61 + 56
    assert stats["get_hits"] == 61 + 2 and stats["get_misses"] == 600 + 2
    backend.close()
    backend.close()  # idempotent
    assert fetched(backend, keys[5:7]) == [None, None] and backend.contains(keys[5:]) == 0
    assert backend.put([chunk(50, tag="rt")]) == 0 and backend.delete(keys) == 0


def test_leading_hits_stop_at_a_gap_on_another_master(redis_cluster: RedisCluster) -> None:
    backend = RedisClusterBackend(redis_cluster.url())
    keys = [key_of(i, "gap") for i in range(12)]
    assert len(set(owners(redis_cluster, keys))) == 3
    assert backend.put([chunk(i, tag="gap") for i in range(12) if i != 7]) == 11
    assert backend.contains(keys) == 7
    assert backend.contains(keys[8:]) == 4 and backend.contains(keys[7:]) == 0
    assert backend.contains([]) == 0 and fetched(backend, []) == [] and backend.put([]) == 0 and backend.delete([]) == 0
    backend.close()


def test_chunk_keys_spread_over_slots_and_masters(redis_cluster: RedisCluster) -> None:
    """Hex sha256 keys carry no hash tag: CRC16 spreads them evenly, so no master holds a whole model."""
    keys = [f"kvtier:{key_of(i, 'spread')}" for i in range(3000)]
    slots = [key_slot(k.encode()) for k in keys]
    assert len(set(slots)) > 2500  # 3000 keys in 16384 slots: few collisions
    with redis_cluster.client() as raw:
        per_master = Counter(raw.get_node_from_key(k).port for k in keys)
    assert len(per_master) == 3 and all(800 < n < 1200 for n in per_master.values()), per_master

    backend = RedisClusterBackend(redis_cluster.url(), key_prefix="spread:")
    assert backend.put([chunk(i, 64, tag="spread") for i in range(300)]) == 300
    for port in redis_cluster.master_ports():
        with redis_cluster.node(port).client() as node:
            assert 60 < len(node.keys("spread:*")) < 140  # every master stores its share
    backend.close()
    with pytest.raises(ValueError, match="hash tag"):
        RedisClusterBackend(redis_cluster.url(), key_prefix="{kvtier}:")


def test_ttl_prefix_and_summary(redis_cluster: RedisCluster) -> None:
    backend = RedisClusterBackend(redis_cluster.url(), key_prefix="ttl:", ttl_seconds=100)
    items = [chunk(i, tag="ttl") for i in range(20)]
    assert backend.put(items) == 20
    with redis_cluster.client() as raw:
        assert all(0 < raw.pttl(f"ttl:{k}") <= 100_000 for k, _ in items)
    other = RedisClusterBackend(redis_cluster.url(), key_prefix="other:")
    assert other.contains([items[0][0]]) == 0
    summary = summarize_redis(redis_cluster.url(seeds=1), "ttl:")
    assert summary.chunks == 20 and summary.models == {"tiny-llama": 20}
    assert summary.bytes == sum(len(b) for _, b in items) and "***" in summary.location
    for b in (backend, other):
        b.close()


def test_slot_migration_ask_and_moved_are_followed(redis_cluster: RedisCluster) -> None:
    backend = RedisClusterBackend(redis_cluster.url())
    items = [chunk(i, tag="mig") for i in range(30)]
    assert backend.put(items) == 30
    key, blob = items[3]
    slot = key_slot(f"kvtier:{key}".encode())
    source = owner(redis_cluster, key)
    target = next(p for p in redis_cluster.master_ports() if p != source)
    ids = {n.port: n.node_id for n in redis_cluster.topology()}
    src, dst = redis_cluster.node(source).client(), redis_cluster.node(target).client()
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
    src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "AUTH", PASSWORD, "KEYS", f"kvtier:{key}")
    # Mid-migration the source answers ASK for the moved key: followed with ASKING, same bytes.
    keys = [k for k, _ in items]
    assert backend.contains(keys) == 30
    assert fetched(backend, keys)[3] == blob
    for port in redis_cluster.master_ports():
        with redis_cluster.node(port).client() as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    # Now the source answers MOVED: followed, and the client's slot map is patched for later batches.
    assert fetched(backend, keys) == [b for _, b in items]
    assert backend._client.nodes_manager.get_node_from_slot(slot).port == target
    assert backend.put([items[3]]) == 1 and backend.contains(keys) == 30
    assert backend.stats()["errors"] == 0
    backend.close()
    src.close()
    dst.close()


def test_wrong_password_misses_without_raising(redis_cluster: RedisCluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    url = redis_cluster.url().replace("cluster%20pw", "wrong%20pw")
    assert url != redis_cluster.url()
    start = time.monotonic()
    bad = fast_backend(url)  # no slot map can be read: misses until it can
    assert bad.put([chunk(1, tag="auth")]) == 0
    assert bad.contains([key_of(1, "auth")]) == 0 and fetched(bad, [key_of(1, "auth")]) == [None]
    assert bad.delete([key_of(1, "auth")]) == 0
    assert time.monotonic() - start < 2.0
    stats = bad.stats()
    assert stats["errors"] == 4 and stats["skipped_stores"] == 1
    assert len(caplog.records) == 1 and "***" in caplog.records[0].getMessage()
    assert all("wrong" not in r.getMessage() for r in caplog.records)
    bad.close()


def test_master_killed_its_keys_miss_the_others_serve_then_it_recovers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with RedisCluster(masters=3, password="pw") as cluster:
        backend = fast_backend(cluster.url())
        items = [chunk(i, tag="kill") for i in range(30)]
        keys = [k for k, _ in items]
        assert backend.put(items) == 30
        victim = owner(cluster, keys[10])
        on_victim = {i for i, port in enumerate(owners(cluster, keys)) if port == victim}
        first_lost = min(on_victim)
        cluster.kill(victim)

        calls, deadline = 0, time.monotonic() + 1.0  # spans several retry intervals: real reconnect attempts
        while time.monotonic() < deadline:
            start = time.monotonic()
            assert backend.contains(keys) == first_lost
            got = fetched(backend, keys)
            assert [i for i, v in enumerate(got) if v is None] == sorted(on_victim)
            assert all(v == items[i][1] for i, v in enumerate(got) if v is not None)
            assert backend.put(items) == 30 - len(on_victim)
            assert time.monotonic() - start < 3 * (0.5 + 0.3)
            calls += 3
        stats = backend.stats()
        assert stats["errors"] == calls and stats["skipped_stores"] == len(on_victim) * calls // 3
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and f"127.0.0.1:{victim}" in warnings[0].getMessage()
        assert "pw@" not in warnings[0].getMessage()

        # Every node down: still misses, fast, and a tier built now does not raise either.
        for port in cluster.master_ports():
            cluster.kill(port)
        start = time.monotonic()
        assert fetched(backend, keys) == [None] * 30 and backend.put(items) == 0
        late = fast_backend(cluster.url())
        assert late.contains(keys) == 0 and late.put(items) == 0
        assert time.monotonic() - start < 4.0

        for node in cluster.nodes:  # the cluster heals (empty: no persistence)
            node.start()
        cluster.wait_ok()
        deadline = time.monotonic() + 10
        while backend.put(items) < 30 or late.contains(keys) < 30:
            assert time.monotonic() < deadline, backend.stats()
            time.sleep(0.1)
        assert fetched(backend, keys) == [b for _, b in items] and fetched(late, keys) == [b for _, b in items]
        infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert any(f"{victim} is reachable again" in m for m in infos)
        backend.close()
        late.close()


def test_a_slot_map_refresh_does_not_close_connections_in_use(redis_cluster: RedisCluster) -> None:
    """redis-py closes a node's idle connections after reading the slot map, but its blocking pool
    hands connections out without the lock that close takes: a caller's socket was closed under it
    (EBADF, a healthy master's keys missed). Ours marks them for reconnect instead."""
    backend = fast_backend(redis_cluster.url())
    assert backend.put([chunk(1, tag="refresh")]) == 1
    node = backend._client.get_primaries()[0]
    pool = node.redis_connection.connection_pool
    taken = pool.get_connection()
    idle = pool.get_connection()
    pool.release(idle)
    pool.disconnect_free_connections()  # what NodesManager.initialize does after CLUSTER SLOTS
    assert taken.is_connected and idle.is_connected  # nothing closed
    assert idle.should_reconnect()
    pool.release(taken)
    backend._client.nodes_manager.initialize()  # a real refresh, then every call still serves
    assert fetched(backend, [key_of(1, "refresh")]) == [chunk(1, tag="refresh")[1]]
    assert backend.stats()["errors"] == 0
    backend.close()


def test_failover_to_a_replica_recovers_by_itself(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with RedisCluster(masters=3, replicas=1) as cluster:
        backend = fast_backend(cluster.url(seeds=2))
        items = [chunk(i, tag="failover") for i in range(30)]
        keys = [k for k, _ in items]
        assert backend.put(items) == 30
        victim = owner(cluster, keys[0])
        heirs = cluster.replicas_of(victim)
        with cluster.node(victim).client() as c:
            assert c.execute_command("WAIT", 1, 2000) == 1  # the replica has every chunk
        cluster.kill(victim)
        assert backend.contains(keys) == 0  # chunk 0's master is gone

        start, slowest = time.monotonic(), 0.0
        while backend.contains(keys) < 30:  # the replica is promoted and the tier finds it by itself
            assert time.monotonic() - start < 20, backend.stats()
            call = time.monotonic()
            fetched(backend, keys)
            slowest = max(slowest, time.monotonic() - call)
            time.sleep(0.05)
        assert slowest < 0.5 + 0.3
        assert fetched(backend, keys) == [b for _, b in items]
        new_master = owner(cluster, keys[0])
        assert new_master in heirs
        assert backend.put([chunk(100, tag="failover")]) == 1

        cluster.restart(victim)  # comes back as a replica of its heir: nothing changes for the tier
        cluster.wait_ok()
        assert fetched(backend, keys) == [b for _, b in items] and backend.contains(keys) == 30
        infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert any(f"{victim} serves no slot any more" in m for m in infos), infos
        backend.close()


def test_tls_cluster(tmp_path) -> None:
    if not redis_supports_tls():
        pytest.skip("this redis-server was built without TLS support")
    with RedisCluster(masters=3, tls=make_cluster_tls_files(tmp_path), password="tls pw") as cluster:
        assert cluster.url().startswith("rediss+cluster://")
        backend = RedisClusterBackend(cluster.url())
        items = [chunk(i, 2**20, tag="tls") for i in range(9)]
        assert backend.put(items) == 9
        assert fetched(backend, [k for k, _ in items]) == [b for _, b in items]
        assert backend.stats()["errors"] == 0
        backend.close()
        (tmp_path / "other").mkdir()
        untrusted = fast_backend(cluster.url().replace(cluster.tls.ca, make_cluster_tls_files(tmp_path / "other").ca))
        assert fetched(untrusted, [items[0][0]]) == [None] and untrusted.stats()["errors"] == 1
        untrusted.close()


def test_config_builds_the_cluster_tier_under_a_tiered_store(redis_cluster: RedisCluster) -> None:
    config = load_config(overrides={"tiers": [{"type": "redis", "url": redis_cluster.url(seeds=1)}]}, environ={})
    store = build_store(config)
    assert type(store.tiers[0]).__name__ == "RedisClusterBackend"
    items = [chunk(i, tag="cfg") for i in range(10)]
    assert store.put(items) == 10
    chunks = store.get([k for k, _ in items])
    assert [bytes(c.payload) for c in chunks] == [bytes(decode_chunk(b, k).payload) for k, b in items]
    store.close()


def test_parse_cluster_url() -> None:
    spec = parse_cluster_url("rediss+cluster://u:p%40w@a:7000,[::1]:7001,b/0?ssl_ca_certs=/ca.pem")
    assert spec.nodes == (("a", 7000), ("[::1]", 7001), ("b", 6379))
    assert spec.node_url(0) == "rediss://u:p%40w@a:7000/0?ssl_ca_certs=/ca.pem"
    for bad, reason in [("redis+cluster://:secret@a:1,b:x", "'b:x' is not host:port"),
                        ("redis+cluster://:secret@a:1/2", "only database 0"),
                        ("redis+cluster://", "names no node"), ("redis+cluster://a:99999", "not host:port"),
                        ("redis://a:1", "does not start with")]:
        with pytest.raises(ValueError, match=reason) as err:
            parse_cluster_url(bad)
        assert "secret" not in str(err.value)
