"""What the lookup budget costs a fast tier: µs per ``contains`` with and without the guard's thread hop.

A tier that is not process-local answers lookups on its own thread so that a lookup can stop
waiting after ``lookup_budget_s`` (``storage_backends/lookup_guard.py``). This measures that hop on
a live local ``redis-server`` (the benchmark starts its own) and on a tier that answers at once (the
hop alone), interleaved: each round times ``--calls`` direct calls and as many guarded calls (which
goes first alternates), and the figure is the median over ``--rounds`` rounds of the per-call mean.

    python benchmarks/lookup_guard_bench.py                  # 1, 16 and 256 keys per lookup
    python benchmarks/lookup_guard_bench.py --keys 1 512 --rounds 40
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' redis-server helper

from kvtier.storage_backends.base import Buffer, StorageBackend  # noqa: E402
from kvtier.storage_backends.lookup_guard import GuardedLookup  # noqa: E402
from kvtier.storage_backends.metrics import TierMetrics  # noqa: E402


class _InstantTier(StorageBackend):
    """A remote-looking tier that answers at once: the guarded figure is the hop alone."""

    def __init__(self) -> None:
        super().__init__("instant", TierMetrics("instant"))

    def contains(self, keys: Sequence[str]) -> int:
        return len(keys)

    def get(self, keys: Sequence[str]) -> list[Buffer | None]:
        return [None] * len(keys)

    def put(self, items: Sequence[tuple[str, Buffer]]) -> int:
        return 0

    def delete(self, keys: Sequence[str]) -> int:
        return 0


def _per_call_us(call: Callable[[], int], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def measure(tier: StorageBackend, keys: list[str], calls: int, rounds: int) -> tuple[float, float]:
    """Median per-call µs of (direct, guarded), rounds interleaved."""
    guard = GuardedLookup(tier, budget_s=1.0)  # a budget no call here comes near
    try:
        for _ in range(max(1, calls // 10)):  # warm up: the connection, the thread
            tier.contains(keys)
            guard.contains(keys)
        direct, guarded = [], []
        for r in range(rounds):  # which variant goes first alternates, so neither gets the warmer round
            for variant in ((0, 1) if r % 2 == 0 else (1, 0)):
                if variant == 0:
                    direct.append(_per_call_us(lambda: tier.contains(keys), calls))
                else:
                    guarded.append(_per_call_us(lambda: guard.contains(keys), calls))
        return statistics.median(direct), statistics.median(guarded)
    finally:
        guard.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[1, 16, 256], help="keys per lookup")
    parser.add_argument("--calls", type=int, default=200, help="calls per round and variant")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    from redis_server import RedisServer

    from kvtier.storage_backends.redis_backend import RedisBackend

    print(f"# Python {platform.python_version()}, {platform.machine()}, calls={args.calls}, rounds={args.rounds}")
    print("| tier | keys | direct µs | guarded µs | hop µs |")
    print("|---|---|---|---|---|")
    with RedisServer() as server:
        redis = RedisBackend(server.url)
        for n in args.keys:
            keys = [hashlib.sha256(f"bench-{i}".encode()).hexdigest() for i in range(n)]
            redis.put([(k, b"x") for k in keys])  # all present: every key is asked
            for name, tier in (("redis", redis), ("instant", _InstantTier())):
                direct, guarded = measure(tier, keys, args.calls, args.rounds)
                print(f"| {name} | {n} | {direct:.1f} | {guarded:.1f} | {guarded - direct:+.1f} |")
        redis.close()


if __name__ == "__main__":
    main()
