"""Aggregate throughput of the redis tier: one redis-server vs a 3-master Redis Cluster, same run.

Several client processes (each a kvtier redis tier, as separate engines would be) put and then get
their own chunks at the same time; the figure is all clients' bytes divided by the time from the
first client's start to the last client's end, best of ``--repeats`` rounds (each round writes
fresh keys; the previous round's are deleted untimed). The cluster's figure is given as a ratio to
the single server's, both measured in this run, on this machine, with the same bytes and batches.

    python benchmarks/redis_scale_bench.py                  # 1, 2 and 4 clients, 2 MiB chunks
    python benchmarks/redis_scale_bench.py --clients 1 4 8 --chunk-mib 8
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' redis-server helpers

MiB = 2**20


@dataclass
class Row:
    clients: int
    op: str
    single_gbs: float
    cluster_gbs: float

    @property
    def ratio(self) -> float:
        return self.cluster_gbs / self.single_gbs


def _client(url: str, index: int, n: int, size: int, batch: int, repeats: int, barrier, results) -> None:
    """One client process: per round, put its chunks, then get them, in step with the others."""
    from kvtier.storage_backends.redis_backend import RedisBackend
    from kvtier.storage_backends.redis_cluster import RedisClusterBackend, is_cluster_url

    kind = RedisClusterBackend if is_cluster_url(url) else RedisBackend
    backend = kind(url, op_timeout_s=60, connect_timeout_s=5)
    blobs = [np.random.default_rng(index * 1000 + i).bytes(size) for i in range(n)]
    times = []
    for r in range(repeats):
        items = [(hashlib.sha256(f"{index}/{r}/{i}".encode()).hexdigest(), b) for i, b in enumerate(blobs)]
        keys = [k for k, _ in items]
        barrier.wait()
        t0 = time.monotonic()
        for start in range(0, n, batch):
            assert backend.put(items[start : start + batch]) == len(items[start : start + batch])
        t1 = time.monotonic()
        barrier.wait()
        t2 = time.monotonic()
        for start in range(0, n, batch):
            assert all(v is not None for v in backend.get(keys[start : start + batch]))
        t3 = time.monotonic()
        barrier.wait()
        backend.delete(keys)
        times.append((t0, t1, t2, t3))
    assert backend.stats()["errors"] == 0
    backend.close()
    results.put(times)


def measure(url: str, clients: int, n: int, size: int, batch: int, repeats: int) -> tuple[float, float]:
    """Best aggregate (put, get) GB/s of ``clients`` processes against ``url``."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(url, i, n, size, batch, repeats, barrier, results))
             for i in range(clients)]
    for p in procs:
        p.start()
    per_client = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a client failed (exit code {p.exitcode})")
    total = clients * n * size
    put = max(total / (max(t[r][1] for t in per_client) - min(t[r][0] for t in per_client)) for r in range(repeats))
    get = max(total / (max(t[r][3] for t in per_client) - min(t[r][2] for t in per_client)) for r in range(repeats))
    return put / 1e9, get / 1e9


def run(args: argparse.Namespace) -> list[Row]:
    from redis_cluster import RedisCluster
    from redis_server import RedisServer

    size, n = args.chunk_mib * MiB, max(1, args.mib_per_client // args.chunk_mib)
    rows = []
    with RedisServer() as single, RedisCluster(masters=3) as cluster:
        for clients in args.clients:
            one = measure(single.url, clients, n, size, args.batch, args.repeats)
            three = measure(cluster.url(), clients, n, size, args.batch, args.repeats)
            rows += [Row(clients, "put", one[0], three[0]), Row(clients, "get", one[1], three[1])]
    return rows


def to_markdown(rows: list[Row]) -> str:
    lines = ["| clients | op | 1 node GB/s | 3-master cluster GB/s | cluster / 1 node |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.clients} | {r.op} | {r.single_gbs:.2f} | {r.cluster_gbs:.2f} | {r.ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4], help="concurrent client processes")
    parser.add_argument("--chunk-mib", type=int, default=2, help="chunk size in MiB")
    parser.add_argument("--mib-per-client", type=int, default=128, help="bytes each client moves per round")
    parser.add_argument("--batch", type=int, default=8, help="chunks per put/get call")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# redis_scale_bench on {platform.node()} ({os.cpu_count()} cores), "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; chunks of {args.chunk_mib} MiB, "
          f"{args.mib_per_client} MiB per client and round, batches of {args.batch}, best of {args.repeats}")
    print(to_markdown(run(args)))


if __name__ == "__main__":
    main()
