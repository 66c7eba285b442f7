"""Put/get throughput of the node tier (``kvtier server`` on a Unix socket) against a plain memcpy of
the same bytes and against the in-process cpu tier, measured in one run.

- **memcpy**: ``np.copyto`` into preallocated buffers (put: the blob into a "pool" buffer; get: that
  buffer into the loader's buffer), the limit for any host-memory store.
- **cpu**: the process-local cpu tier (``CpuBackend``, built from a config by ``build_store`` as an
  engine builds it), slot size as the server's.
- **node**: the node tier (a client of the server started here), built the same way.

Every tier's ``get`` is timed together with the one copy a loader makes into its own preallocated
buffer (the cpu tier hands out zero-copy views; the node tier may too). Every put round writes fresh
entries (the previous round's are deleted, untimed); one untimed round per variant first touches the
pools. Variants run interleaved, the order rotated every round, for ``--rounds`` rounds: on a small
shared machine the noise is large, so each figure is the median of the rounds with its spread
(min-max), and the ratios are computed per round (node / memcpy, node / cpu) and reported as their
median and range. Last, the cost of one call on a warm connection (``contains``, and a 1 MiB ``get`` and
``put``) in microseconds: the socket round trip that a single-chunk call pays on top of its copy, next to a
bare echo between two Python processes on a Unix socket (the floor of any round trip on this machine); and
how fast a copy out of ``/dev/shm`` runs against one out of anonymous memory (the zero-copy ceiling).

    python benchmarks/node_bench.py                        # starts its own kvtier server
    python benchmarks/node_bench.py --sizes 1 4 16 --batches 1 8 --rounds 7
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from kvtier.connector.config import load_config
from kvtier.connector.store_factory import build_store

sys.path.insert(0, str(Path(__file__).parent))
from storage_bench import batches, make_items  # noqa: E402

MiB = 2**20
VARIANTS = ("memcpy", "cpu", "node")


@contextmanager
def node_server(socket_path: str, max_bytes: str, slot_bytes: str, timeout_s: float = 30) -> Iterator[int]:
    """``kvtier server`` on ``socket_path`` (its output in a log file beside the socket); yields its pid."""
    log_path = Path(socket_path).with_suffix(".log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "server", "--socket", socket_path,
                                 "--max-bytes", max_bytes, "--slot-bytes", slot_bytes],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while "kvtier server: ready" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"FAIL: kvtier server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Cell:
    """GB/s per round of each variant for one (chunk size, batch, op)."""

    gbs: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})

    def ratios(self, num: str, den: str) -> list[float]:
        return [a / b for a, b in zip(self.gbs[num], self.gbs[den])]


def timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


class Memcpy:
    """The baseline: the same bytes copied into preallocated buffers and back out."""

    def __init__(self, items: list[tuple[str, bytes]]) -> None:
        self.srcs = [np.frombuffer(b, np.uint8) for _, b in items]
        self.pool = [np.empty_like(s) for s in self.srcs]

    def round(self, sinks: list[np.ndarray], batch: int) -> tuple[float, float]:
        def put() -> None:
            for d, s in zip(self.pool, self.srcs):
                np.copyto(d, s)

        def get() -> None:
            for d, s in zip(sinks, self.pool):
                np.copyto(d, s)

        return timed(put), timed(get)


class Tier:
    """A tier's put and get of the items in batches; get copies every blob into the loader's buffer."""

    def __init__(self, backend, items: list[tuple[str, bytes]]) -> None:
        self.backend, self.items = backend, items
        self.keys = [k for k, _ in items]

    def round(self, sinks: list[np.ndarray], batch: int) -> tuple[float, float]:
        self.backend.delete(self.keys)  # untimed: fresh entries for the put

        def put() -> None:
            for group in batches(self.items, batch):
                stored = self.backend.put(group)
                if stored != len(group):
                    raise SystemExit(f"FAIL: {self.backend.name} tier stored {stored} of {len(group)} chunks")

        def get() -> None:
            for i, group in enumerate(batches(self.keys, batch)):
                blobs = self.backend.get(group)
                for j, blob in enumerate(blobs):
                    if blob is None:
                        raise SystemExit(f"FAIL: {self.backend.name} tier lost a chunk it stored")
                    np.copyto(sinks[i * batch + j], np.frombuffer(blob, np.uint8))
                del blobs  # zero-copy views go before the next batch, as a loader drops them

        return timed(put), timed(get)


def build_tier(folder: Path, name: str, tier_yaml: str):
    """The store an engine would build from this one-tier config, and its tier."""
    path = folder / f"{name}.yaml"
    path.write_text(f"tiers:\n  - {tier_yaml}\n")
    store = build_store(load_config(path))
    return store, store.tiers[0]


def run(args: argparse.Namespace, folder: Path, socket_path: str) -> dict[tuple[int, int, str], Cell]:
    largest = max(max(4, args.total_mib // s) * s for s in args.sizes) * MiB
    pool_bytes = f"{largest // MiB + 64}MiB"
    cells: dict[tuple[int, int, str], Cell] = {}
    with node_server(socket_path, pool_bytes, f"{args.slot_mib}MiB"):
        node_store, node = build_tier(folder, "node", f"{{type: node, socket: '{socket_path}', op_timeout_s: 60}}")
        cpu_store, cpu = build_tier(folder, "cpu", f"{{type: cpu, max_bytes: {pool_bytes}, "
                                                   f"slot_bytes: {args.slot_mib}MiB, pinned: never}}")
        try:
            for size_mib in args.sizes:
                n = max(4, args.total_mib // size_mib)
                items = make_items(n, size_mib * MiB, f"node{size_mib}")
                nbytes = n * size_mib * MiB
                runners = {"memcpy": Memcpy(items), "cpu": Tier(cpu, items), "node": Tier(node, items)}
                sinks = [np.empty(len(b), np.uint8) for _, b in items]
                for batch in args.batches:
                    for runner in runners.values():  # untimed: touch the pools and the sinks
                        runner.round(sinks, batch)
                    put, get = cells.setdefault((size_mib, batch, "put"), Cell()), cells.setdefault(
                        (size_mib, batch, "get"), Cell())
                    for r in range(args.rounds):
                        order = VARIANTS[r % 3:] + VARIANTS[: r % 3]
                        for variant in order:
                            put_s, get_s = runners[variant].round(sinks, batch)
                            put.gbs[variant].append(nbytes / put_s / 1e9)
                            get.gbs[variant].append(nbytes / get_s / 1e9)
                    print(f"  {size_mib} MiB x {n}, batch {batch}: done", file=sys.stderr, flush=True)
                for runner in (runners["cpu"], runners["node"]):
                    runner.backend.delete(runner.keys)
            print(round_trips(node, args.rounds), flush=True)
            print(shm_ceiling(args.rounds), flush=True)
        finally:
            node_store.close()
            cpu_store.close()
    return cells


def round_trips(node, rounds: int, calls: int = 300) -> str:
    """Microseconds per call on a warm connection, one 1 MiB chunk: what a call costs beyond its copy."""
    key, blob = make_items(1, MiB, "rtt")[0]
    node.put([(key, blob)])
    calls_by_name = {"contains": lambda: node.contains([key]), "get (1 MiB)": lambda: node.get([key]),
                     "put (1 MiB)": lambda: node.put([(key, blob)])}
    per_call: dict[str, list[float]] = {name: [] for name in calls_by_name}
    for _ in range(rounds):
        for name, call in calls_by_name.items():
            per_call[name].append(timed(lambda call=call: [call() for _ in range(calls)]) / calls * 1e6)
    node.delete([key])
    per_call["bare echo"] = bare_echo(rounds, calls)
    return "node tier, us per call on a warm connection (median of rounds, min-max): " + ", ".join(
        f"{name} {_spread(values)}" for name, values in per_call.items())


ECHO = """
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
while data := sock.recv(65536):
    sock.sendall(data)
"""


def bare_echo(rounds: int, calls: int) -> list[float]:
    """Microseconds per round trip of a 40-byte message to a Python process that only echoes it, on a
    Unix socket: the floor under any call to the server (two process wake-ups), measured here."""
    ours, theirs = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-c", ECHO, str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    message = b"x" * 40

    def echo() -> None:
        ours.sendall(message)
        got = 0
        while got < len(message):
            got += len(ours.recv(65536))

    try:
        for _ in range(calls):
            echo()  # the child has started and is warm
        return [timed(lambda: [echo() for _ in range(calls)]) / calls * 1e6 for _ in range(rounds)]
    finally:
        ours.close()
        child.wait(10)


def shm_ceiling(rounds: int, nbytes: int = 256 * MiB, piece: int = 16 * MiB) -> str:
    """A copy out of a /dev/shm mapping against one out of anonymous memory, in this process: the
    ceiling of a zero-copy get against the memcpy baseline (tmpfs may get no transparent huge pages)."""
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="kvtier-bench-") as file:
        os.ftruncate(file.fileno(), nbytes)
        with mmap.mmap(file.fileno(), nbytes) as mapping:
            shm = np.frombuffer(mapping, np.uint8)
            anon = np.empty(nbytes, np.uint8)
            shm[:] = 3
            anon[:] = 3
            sink = np.zeros(piece, np.uint8)

            def copy_all(src: np.ndarray) -> None:
                for start in range(0, nbytes, piece):
                    np.copyto(sink, src[start : start + piece])

            ratios = [timed(partial(copy_all, anon)) / timed(partial(copy_all, shm)) for _ in range(rounds)]
            del shm  # the mapping cannot close while a view of it lives
    return f"copy out of /dev/shm / copy out of anonymous memory (16 MiB pieces, per round): {_spread(ratios)}"


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def to_markdown(cells: dict[tuple[int, int, str], Cell]) -> str:
    lines = ["| chunk | batch | op | memcpy GB/s | cpu tier GB/s | node tier GB/s | node / memcpy | node / cpu | "
             "node / cpu per round |", "|---|---|---|---|---|---|---|---|---|"]
    for (size_mib, batch, op), cell in cells.items():
        per_round = " ".join(f"{r:.2f}" for r in cell.ratios("node", "cpu"))
        lines.append(f"| {size_mib} MiB | {batch} | {op} | {_spread(cell.gbs['memcpy'])} | {_spread(cell.gbs['cpu'])} | "
                     f"{_spread(cell.gbs['node'])} | {_spread(cell.ratios('node', 'memcpy'))} | "
                     f"{_spread(cell.ratios('node', 'cpu'))} | {per_round} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], help="chunk sizes in MiB")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="chunks per put/get call")
    parser.add_argument("--total-mib", type=int, default=128, help="bytes moved per round, size and batch")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--slot-mib", type=int, default=1, help="slot size of the server's and the cpu tier's pools")
    args = parser.parse_args()
    print(f"# node_bench on {platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n# command: python {' '.join(sys.argv)}\n"
          f"# median of {args.rounds} interleaved rounds (min-max); ratios per round, then their median (min-max)",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="kvn-", dir="/tmp") as tmp:  # short: a socket path has <= 107 bytes
        cells = run(args, Path(tmp), os.path.join(tmp, "node.sock"))
    print(to_markdown(cells))


if __name__ == "__main__":
    main()
