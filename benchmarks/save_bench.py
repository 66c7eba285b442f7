"""The save path's cost before the tiers: gathering a request's chunks out of the paged cache and
making their blobs, kvtier's way against the way it was done before (same run, interleaved).

- ``kvtier``: ``ChunkStore``'s path: the chunks are gathered straight into their blobs' places in a
  reused buffer (``connector/gather_buffers.py``), headers written before the payloads;
- ``copy`` (the baseline, kvtier before 2026-12-01): gathered into a fresh tensor, then each blob
  made by ``encode_chunk``, which allocates it and copies the payload in.

Both then put the blobs into a cpu tier (one more copy, the same for both), since a cpu tier is
where a save's bytes go first. Reported: wall time per round (median over rounds) and the ratio.
The CPU engine's paged cache is a float32 Llama of the TTFT benchmark's shape (8 layers, 4 KV heads
x 64, 256-token chunks: 4 MiB each).

    python benchmarks/save_bench.py --chunks 8 --rounds 15
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

from kvtier.chunk_format.codec import encode_chunk
from kvtier.chunk_format.dtypes import dtype_name
from kvtier.chunk_format.keys import KeyNamespace
from kvtier.connector.chunk_store import ChunkStore, split_slots
from kvtier.cuda_ext import PagedKV, make_copier
from kvtier.storage_backends.cpu_backend import CpuBackend
from kvtier.storage_backends.tiered import TieredStore

LAYERS, HEADS, DIM, BLOCK, CHUNK = 8, 4, 64, 128, 256


def paged_cache(blocks: int) -> PagedKV:
    layers = [torch.randn(blocks, HEADS, BLOCK, 2 * DIM) for _ in range(LAYERS)]
    return PagedKV.from_vllm(layers, "HND", DIM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=8, help="chunks per save (one request's prompt)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    paged = paged_cache(args.chunks * CHUNK // BLOCK + 1)
    namespace = KeyNamespace(model="bench", kv_dtype=dtype_name(paged.dtype), layout=paged.format_id,
                             num_layers=LAYERS, kv_heads=HEADS, head_dim=DIM, tp_size=1, tp_rank=0, chunk_size=CHUNK)
    copier = make_copier("cpu")
    slots = split_slots(torch.arange(args.chunks * CHUNK), CHUNK)
    tier = CpuBackend(4 * args.chunks * 4 * 2**20, 2**20)
    chunks = ChunkStore(TieredStore([tier]), namespace, copier)
    nbytes = args.chunks * LAYERS * 2 * CHUNK * HEADS * DIM * 4

    def kvtier(round_: int) -> None:
        tokens = [round_ * 100_000 + i for i in range(args.chunks * CHUNK)]  # new keys every round
        assert chunks.save(tokens, paged, slots, wait=True) == args.chunks

    def copy(round_: int) -> None:
        tokens = [round_ * 100_000 + 50_000 + i for i in range(args.chunks * CHUNK)]
        keys = chunks.keys(tokens)
        out = torch.empty((args.chunks, *paged.chunk_shape(CHUNK)), dtype=paged.dtype)
        copier.gather(paged, torch.stack(slots), out=out)
        items = [(key, encode_chunk(key, namespace.kv_dtype, tuple(chunk.shape), paged.format_id, namespace.model,
                                    CHUNK, memoryview(chunk.view(torch.uint8).reshape(-1).numpy())))
                 for key, chunk in zip(keys, out)]
        assert chunks.store.put(items) == args.chunks

    times: dict[str, list[float]] = {"kvtier": [], "copy": []}
    for round_ in range(args.rounds + 1):
        for name, run in (("copy", copy), ("kvtier", kvtier)) if round_ % 2 else (("kvtier", kvtier), ("copy", copy)):
            gc.collect()
            start = time.perf_counter()
            run(round_)
            elapsed = time.perf_counter() - start
            if round_:  # round 0 warms both paths up
                times[name].append(elapsed)
    print(f"# save_bench: {args.chunks} chunks of {nbytes // args.chunks / 2**20:.0f} MiB per save, "
          f"{args.rounds} rounds, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: python "
          f"{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print("| path | median ms per save | GB/s | ratio to copy |")
    print("|---|---|---|---|")
    base = statistics.median(times["copy"])
    for name in ("copy", "kvtier"):
        median = statistics.median(times[name])
        print(f"| {name} | {1e3 * median:.1f} | {nbytes / median / 1e9:.2f} | {median / base:.2f} |")
    chunks.close()


if __name__ == "__main__":
    main()
