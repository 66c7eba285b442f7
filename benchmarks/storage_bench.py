"""Put/get throughput of each storage tier as a ratio to a raw baseline measured in the same run.

Baselines (the same bytes, the same batch sizes): cpu vs ``memcpy`` into preallocated memory;
disk vs plain ``open().write()`` / ``open().read()`` of files in the same folder; redis vs raw
redis-py pipelined SET / GET against the same server. Every put round writes fresh entries on both
sides (the previous round's are deleted, untimed). The cpu tier's get returns zero-copy views, so
its get is timed together with the one copy a loader makes into its own buffer. Each figure is the
best of ``--repeats`` rounds. Disk reads come from the page cache for both kvtier and the baseline
(the benchmark does not drop caches).

    python benchmarks/storage_bench.py            # starts its own redis-server on a free port
    python benchmarks/storage_bench.py --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import redis

from kvtier.storage_backends.base import StorageBackend
from kvtier.storage_backends.cpu_backend import CpuBackend
from kvtier.storage_backends.disk_backend import DiskBackend
from kvtier.storage_backends.redis_backend import RedisBackend

MiB = 2**20
TARGETS = {"cpu": 0.5, "disk": 0.7, "redis": 0.8}


@dataclass
class Row:
    tier: str
    chunk_mib: int
    op: str
    kvtier_gbs: float
    baseline_gbs: float

    @property
    def ratio(self) -> float:
        return self.kvtier_gbs / self.baseline_gbs


def best_gbs(nbytes: int, repeats: int, run: Callable[[], None], reset: Callable[[], None] = lambda: None) -> float:
    """Best throughput over ``repeats`` rounds of ``run``; ``reset`` runs untimed before each round."""
    best = float("inf")
    for _ in range(repeats):
        reset()
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def make_items(n: int, size: int, tag: str) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(size + n)
    return [(hashlib.sha256(f"{tag}{i}".encode()).hexdigest(), rng.bytes(size)) for i in range(n)]


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def bench_backend(backend: StorageBackend, items: list[tuple[str, bytes]], batch: int, repeats: int,
                  consume: bool = False) -> tuple[float, float]:
    """kvtier put and get; ``consume`` also copies each returned blob into a preallocated buffer."""
    nbytes = sum(len(b) for _, b in items)
    keys = [k for k, _ in items]
    sinks = [np.empty(len(b), np.uint8) for _, b in items] if consume else []

    def put() -> None:
        for group in batches(items, batch):
            assert backend.put(group) == len(group)

    def get() -> None:
        for i, group in enumerate(batches(keys, batch)):
            blobs = backend.get(group)
            assert all(b is not None for b in blobs)
            for j, blob in enumerate(blobs if consume else ()):
                np.copyto(sinks[i * batch + j], np.frombuffer(blob, np.uint8))

    put_gbs = best_gbs(nbytes, repeats, put, reset=lambda: backend.delete(keys))
    return put_gbs, best_gbs(nbytes, repeats, get)


def bench_memcpy(items: list[tuple[str, bytes]], repeats: int) -> tuple[float, float]:
    srcs = [np.frombuffer(b, np.uint8) for _, b in items]
    dsts = [np.empty_like(s) for s in srcs]
    nbytes = sum(s.nbytes for s in srcs)

    def copy() -> None:
        for s, d in zip(srcs, dsts):
            np.copyto(d, s)

    gbs = best_gbs(nbytes, repeats, copy)
    return gbs, gbs


def bench_files(folder: str, items: list[tuple[str, bytes]], batch: int, repeats: int) -> tuple[float, float]:
    nbytes = sum(len(b) for _, b in items)
    paths = [os.path.join(folder, k) for k, _ in items]

    def write() -> None:
        for path, (_, blob) in zip(paths, items):
            with open(path, "wb") as f:
                f.write(blob)

    def read_file(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def read() -> None:  # a batch's blobs stay alive together, as kvtier's get returns them
        for group in batches(paths, batch):
            assert all([read_file(path) for path in group])

    def remove() -> None:
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)

    return best_gbs(nbytes, repeats, write, reset=remove), best_gbs(nbytes, repeats, read)


def bench_raw_redis(client: redis.Redis, items: list[tuple[str, bytes]], batch: int, repeats: int) -> tuple[float, float]:
    nbytes = sum(len(b) for _, b in items)

    def put() -> None:
        for group in batches(items, batch):
            pipe = client.pipeline(transaction=False)
            for key, blob in group:
                pipe.set("raw:" + key, blob)
            pipe.execute()

    def get() -> None:
        for group in batches(items, batch):
            assert all(v is not None for v in client.mget(["raw:" + k for k, _ in group]))

    def remove() -> None:
        client.delete(*("raw:" + k for k, _ in items))

    return best_gbs(nbytes, repeats, put, reset=remove), best_gbs(nbytes, repeats, get)


@contextmanager
def redis_server(url: str | None):
    """The given Redis, or a throwaway redis-server on a free loopback port."""
    if url:
        yield url
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="kvtier-bench-redis-")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    with redis_server(args.redis_url) as url, tempfile.TemporaryDirectory(dir=args.disk_dir) as disk_dir:
        client = redis.Redis.from_url(url)
        for chunk_mib in args.sizes:
            size = chunk_mib * MiB
            n = max(4, args.total_mib // chunk_mib)
            items = make_items(n, size, f"bench{chunk_mib}")
            total = n * size
            cpu = CpuBackend(total + 64 * MiB, MiB)
            rows += _rows("cpu", chunk_mib, bench_backend(cpu, items, args.batch, args.repeats, consume=True),
                          bench_memcpy(items, args.repeats))
            cpu.close()
            os.makedirs(os.path.join(disk_dir, "raw"), exist_ok=True)
            disk = DiskBackend(os.path.join(disk_dir, "kvtier"), 4 * total)
            rows += _rows("disk", chunk_mib, bench_backend(disk, items, args.batch, args.repeats),
                          bench_files(os.path.join(disk_dir, "raw"), items, args.batch, args.repeats))
            disk.close()
            remote = RedisBackend(url, op_timeout_s=60, connect_timeout_s=5)
            rows += _rows("redis", chunk_mib, bench_backend(remote, items, args.batch, args.repeats),
                          bench_raw_redis(client, items, args.batch, args.repeats))
            remote.close()
            client.flushall()
    return rows


def _rows(tier: str, chunk_mib: int, ours: tuple[float, float], base: tuple[float, float]) -> list[Row]:
    return [Row(tier, chunk_mib, "put", ours[0], base[0]), Row(tier, chunk_mib, "get", ours[1], base[1])]


def to_markdown(rows: list[Row]) -> str:
    lines = ["| tier | chunk | op | kvtier GB/s | baseline GB/s | ratio | target |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        target = TARGETS[r.tier]
        mark = "ok" if r.ratio >= target else "MISSED"
        lines.append(f"| {r.tier} | {r.chunk_mib} MiB | {r.op} | {r.kvtier_gbs:.2f} | {r.baseline_gbs:.2f} | "
                     f"{r.ratio:.2f} | >= {target} {mark} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 32], help="chunk sizes in MiB")
    parser.add_argument("--total-mib", type=int, default=256, help="bytes moved per round and size")
    parser.add_argument("--batch", type=int, default=8, help="chunks per put/get call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--disk-dir", help="parent folder for the disk tier (default: system temp)")
    args = parser.parse_args()
    print(f"# storage_bench on {platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(to_markdown(run(args)))


if __name__ == "__main__":
    main()
