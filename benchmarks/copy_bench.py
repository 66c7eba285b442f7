"""Copy-layer throughput: kvtier's batched kernels against the practical limit and naive copies.

Llama-3-8B-shaped KV by default (32 layers, 8 KV heads, head_dim 128, bf16, vLLM NHD blocks of 16
tokens), 256-token chunks, batches of 1..64 chunks. Store = cache -> host chunks (gather), load =
host chunks -> cache (scatter). Measured in the same run, on the same bytes:

* ``kvtier-direct``: the kernels reading/writing pinned host memory directly (zero-copy);
* ``kvtier-staged``: the kernels into a device staging buffer plus one DMA;
* ``memcpy``: one contiguous copy of the same number of bytes between device and pinned memory
  (one ``cudaMemcpyAsync``): the practical limit;
* ``per-block``: one copy per (layer, block), what a naive connector does;
* ``torch``: torch ``index_select`` + one copy (kvtier's torch copier).

    python benchmarks/copy_bench.py                   # on a CUDA machine (needs CuPy)
    python benchmarks/copy_bench.py --json out.json   # also write the raw figures
    python benchmarks/copy_bench.py --device cpu --layers 4 --blocks 256 --batches 1 4   # smoke run

Prints a markdown table of GB/s and the ratios kvtier / memcpy and kvtier / per-block.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from kvtier.cuda_ext import PagedKV, TorchCopier, make_copier


@dataclass
class Row:
    batch: int
    direction: str  # "store" (gather) or "load" (scatter)
    mib: float
    gbps: dict[str, float]


def _timer(device: torch.device) -> Callable[[Callable[[], None], int], float]:
    """Median seconds of ``fn`` over ``repeats`` runs (CUDA events on GPU)."""

    def cuda_time(fn: Callable[[], None], repeats: int) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    def cpu_time(fn: Callable[[], None], repeats: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return cuda_time if device.type == "cuda" else cpu_time


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    layers, bs, heads, dim = args.layers, args.block_size, args.kv_heads, args.head_dim
    cache = torch.empty((layers, args.blocks, bs, heads, 2 * dim), dtype=dtype, device=device)
    cache.view(torch.uint8).random_(0, 256)
    paged = PagedKV.from_vllm(list(cache), "NHD", dim)
    per_chunk = args.chunk_tokens // bs
    max_batch = max(args.batches)
    if max_batch * per_chunk > args.blocks:
        raise SystemExit(f"--blocks {args.blocks} too small for {max_batch} chunks of {per_chunk} blocks")
    gen = torch.Generator().manual_seed(0)
    block_order = torch.randperm(args.blocks, generator=gen)  # chunks spread over the cache
    timer = _timer(device)
    pin = cuda
    host = torch.empty((max_batch, *paged.chunk_shape(args.chunk_tokens)), dtype=dtype, pin_memory=pin)
    staging = torch.empty_like(host, device=device)
    copiers = {"torch": TorchCopier()}
    if cuda:
        copiers["kvtier-direct"] = make_copier(device, max_sms=args.max_sms, host_access="direct")
        copiers["kvtier-staged"] = make_copier(device, max_sms=args.max_sms, host_access="staged")
    rows = []
    for n in args.batches:
        blocks = block_order[: n * per_chunk].view(n, per_chunk)
        slots = (blocks[:, :, None] * bs + torch.arange(bs)).reshape(n, args.chunk_tokens)
        out, dev = host[:n], staging[:n]
        nbytes = out.numel() * out.element_size()
        flat_blocks = blocks.reshape(-1).tolist()

        def per_block_store(n=n, flat_blocks=flat_blocks, out=out) -> None:
            dst = out.view(-1, bs, heads, 2 * dim)  # byte-equal volume; block-major, not canonical
            i = 0
            for b in flat_blocks:
                for layer in range(layers):
                    dst[i].copy_(cache[layer, b], non_blocking=pin)
                    i += 1

        def per_block_load(n=n, flat_blocks=flat_blocks, out=out) -> None:
            src = out.view(-1, bs, heads, 2 * dim)
            i = 0
            for b in flat_blocks:
                for layer in range(layers):
                    cache[layer, b].copy_(src[i], non_blocking=pin)
                    i += 1

        for direction in ("store", "load"):
            gbps = {}
            if direction == "store":
                gbps["memcpy"] = nbytes / timer(lambda out=out, dev=dev: out.copy_(dev, non_blocking=pin), args.repeats)
                gbps["per-block"] = nbytes / timer(per_block_store, args.repeats)
                for name, copier in copiers.items():
                    gbps[name] = nbytes / timer(lambda c=copier, s=slots, o=out: c.gather_async(paged, s, out=o),
                                                args.repeats)
            else:
                gbps["memcpy"] = nbytes / timer(lambda out=out, dev=dev: dev.copy_(out, non_blocking=pin), args.repeats)
                gbps["per-block"] = nbytes / timer(per_block_load, args.repeats)
                for name, copier in copiers.items():
                    gbps[name] = nbytes / timer(lambda c=copier, s=slots, o=out: c.scatter_async(o, paged, s),
                                                args.repeats)
            rows.append(Row(n, direction, nbytes / 2**20, {k: v / 1e9 for k, v in gbps.items()}))
            print(f"  {direction} {n:3d} chunks: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in gbps.items()), flush=True)
    return rows


def table(rows: list[Row], best: str) -> str:
    names = list(rows[0].gbps)
    head = "| chunks | dir | MiB | " + " | ".join(f"{n} GB/s" for n in names) + f" | {best} / memcpy | {best} / per-block |"
    lines = [head, "|" + "---|" * (len(names) + 5)]
    for r in rows:
        g = r.gbps
        lines.append(f"| {r.batch} | {r.direction} | {r.mib:.0f} | " + " | ".join(f"{g[n]:.1f}" for n in names)
                     + f" | {g[best] / g['memcpy']:.2f} | {g[best] / g['per-block']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=2048)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--max-sms", type=int, default=None, help="cap on the SMs the copy kernels use")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("copy_bench: no CUDA device here; --device cpu runs the torch copier only")
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"copy_bench on {where}: {args.layers} layers, {args.kv_heads} KV heads x {args.head_dim}, {args.dtype}, "
          f"block {args.block_size}, {args.chunk_tokens}-token chunks")
    rows = run(args)
    best = "kvtier-direct" if args.device.startswith("cuda") else "torch"
    print(table(rows, best))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "args": vars(args), "rows": [asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
