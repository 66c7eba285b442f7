"""What an integrity key costs: chunk encode + decode with and without a keyed MAC, as a ratio.

Both variants run in the same process, interleaved (keyless, keyed, keyless, keyed, ...) and
repeated, so drifts in clock speed or cache state hit both alike; each figure is the best of
``--repeats`` rounds and the ratio is keyed / keyless throughput of chunk bytes (encode and decode
each touch the payload once; decode includes the xxh3 check in both variants). The hash rows are
the MAC candidates alone on the same payloads: keyed BLAKE3 (used) and keyed BLAKE2b (stdlib).

    python benchmarks/integrity_bench.py                 # 1, 2, 4, 8 MiB chunks
    python benchmarks/integrity_bench.py --sizes 2 --repeats 11
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import time
from collections.abc import Callable

import blake3
import xxhash

from kvtier.chunk_format.codec import decode_chunk, encode_chunk
from kvtier.chunk_format.integrity import IntegrityKey

MiB = 2**20
KEY = "ab" * 32


def encode_decode(payloads: list[bytes], mac_key: IntegrityKey | None) -> Callable[[], None]:
    """One round: encode every payload as a chunk, then decode and verify it."""

    def run() -> None:
        for payload in payloads:
            blob = encode_chunk(KEY, "bfloat16", (len(payload) // 2,), "bench", "model", 256, payload,
                                shard="tp0", mac_key=mac_key)
            decode_chunk(blob, KEY, mac_key=mac_key)

    return run


def hash_all(payloads: list[bytes], digest: Callable[[bytes], object]) -> Callable[[], None]:
    """One round of a hash alone over every payload."""

    def run() -> None:
        for payload in payloads:
            digest(payload)

    return run


def interleaved(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run per round, the runs alternating within every round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="chunk sizes in MiB")
    parser.add_argument("--total-mib", type=int, default=64, help="payload bytes per round and size")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    key = IntegrityKey(os.urandom(32))
    raw_key = os.urandom(32)
    print(f"# integrity_bench on {platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, best of {args.repeats} interleaved rounds")
    print("| chunk | keyless encode+decode GB/s | keyed GB/s | ratio (median) | xxh3 GB/s | blake3 keyed GB/s | "
          "blake2b keyed GB/s |")
    print("|---|---|---|---|---|---|---|")
    for mib in args.sizes:
        payloads = [os.urandom(mib * MiB) for _ in range(max(2, args.total_mib // mib))]
        nbytes = sum(map(len, payloads))
        times = interleaved({
            "keyless": encode_decode(payloads, None),
            "keyed": encode_decode(payloads, key),
            "xxh3": hash_all(payloads, xxhash.xxh3_64_intdigest),
            "blake3": hash_all(payloads, lambda p: blake3.blake3(p, key=raw_key).digest()),
            "blake2b": hash_all(payloads, lambda p: hashlib.blake2b(p, key=raw_key, digest_size=32).digest()),
        }, args.repeats)
        gbs = {name: nbytes / min(t) / 1e9 for name, t in times.items()}
        ratio = statistics.median(a / b for a, b in zip(times["keyless"], times["keyed"]))
        print(f"| {mib} MiB | {gbs['keyless']:.2f} | {gbs['keyed']:.2f} | {gbs['keyed'] / gbs['keyless']:.2f} "
              f"({ratio:.2f}) | {gbs['xxh3']:.1f} | {gbs['blake3']:.2f} | {gbs['blake2b']:.2f} |")


if __name__ == "__main__":
    main()
