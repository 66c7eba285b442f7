"""Why the first kvtier hit of a tensor-parallel engine is slower than the later ones.

A TP=2 vLLM engine on CPU (two worker processes, one core each) with kvtier's cpu + disk tiers
prefills ``--prompts`` prompts of 1024 tokens, waits until their chunks are stored, then sends each
again (a hit: one token computed) and times it. In mode ``plain`` the cold requests generate one
token (a prefill only); in mode ``decoded`` they generate two, so the engine has run one step of a
single new token before the first hit. Modes alternate, each ``--repeats`` times, every run in a
fresh engine process.

    python benchmarks/tp_first_hit.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvtier.tiny_model import BENCH_SPEC

CHILD_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_KVCACHE_SPACE": "1",
             "PYTHONUNBUFFERED": "1"}


def child(mode: str, model: Path, store: Path, prompts: int) -> None:
    from vllm import LLM, SamplingParams

    from kvtier.tiny_model import prompt_text

    config = store.parent / "kvtier.yaml"
    config.write_text(f"chunk_size: 256\ntiers:\n  - {{type: cpu, max_bytes: 1GiB}}\n"
                      f"  - {{type: disk, path: {store}, max_bytes: 4GiB}}\n")
    kv = {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.connector.vllm",
          "kv_role": "kv_both", "kv_connector_extra_config": {"config": str(config)}}
    llm = LLM(model=str(model), max_model_len=4096, enforce_eager=True, dtype="float32", tensor_parallel_size=2,
              kv_transfer_config=kv, seed=0, enable_prefix_caching=False)
    texts = [prompt_text(1024, seed=500 + i) for i in range(prompts)]
    cold = SamplingParams(max_tokens=2 if mode == "decoded" else 1, temperature=0)
    for text in texts:
        llm.generate([text], cold, use_tqdm=False)
    deadline = time.monotonic() + 60
    while len(list(store.rglob("*.kvc"))) < 8 * prompts and time.monotonic() < deadline:
        time.sleep(0.2)  # both ranks' four chunks of every prompt are on disk
    hits = []
    for text in texts:
        start = time.perf_counter()
        out = llm.generate([text], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)[0]
        hits.append([time.perf_counter() - start, out.num_cached_tokens])
    print("RESULT " + json.dumps(hits), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, model, store = args.child
        child(mode, Path(model), Path(store), args.prompts)
        return
    from kvtier.tiny_model import make_tiny_llama

    work = Path(tempfile.mkdtemp(prefix="kvtier-tp-first-hit-"))
    model = make_tiny_llama(work / "model", BENCH_SPEC)
    results: dict[str, list[list[float]]] = {"plain": [], "decoded": []}
    for repeat in range(args.repeats):
        for mode in ("plain", "decoded") if repeat % 2 == 0 else ("decoded", "plain"):
            store = work / f"store-{mode}-{repeat}"
            done = subprocess.run([sys.executable, __file__, "--prompts", str(args.prompts), "--child", mode,
                                   str(model), str(store)], env={**os.environ, **CHILD_ENV}, capture_output=True,
                                  text=True, timeout=900)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.exit(f"{mode} run failed:\n{done.stderr[-4000:]}")
            hits = json.loads(lines[-1][len("RESULT "):])
            assert all(cached == 1023 for _, cached in hits), hits
            results[mode].append([t for t, _ in hits])
            print(f"{mode:8s} run {repeat}: hit TTFTs " + " ".join(f"{t:.3f}" for t, _ in hits), flush=True)
    print("\nmode     first hit (median)  later hits (median)  first / later")
    for mode, runs in results.items():
        first = statistics.median(r[0] for r in runs)
        later = statistics.median(t for r in runs for t in r[1:])
        print(f"{mode:8s} {first:18.3f}  {later:19.3f}  {first / later:13.2f}")


if __name__ == "__main__":
    main()
