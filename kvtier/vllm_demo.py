"""``kvtier demo``: a real vLLM engine on CPU with kvtier's default tiers, showing the hit and the TTFT saved.

Engine 1 sees a fresh 2048-token prompt (a cold prefill, which kvtier stores in memory and on
disk), then the same prompt again (a hit from the cpu tier). Engine 2 starts in a new process, as
another instance or a restart would, and gets the prompt from the disk tier. vLLM's own prefix
cache is off, so every hit shown comes from kvtier. The model is a random-weight Llama built
locally (nothing is downloaded); its outputs are meaningless but must be identical with and
without the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .tiny_model import BENCH_SPEC, make_tiny_llama, prompt_text

PROMPT_TOKENS = 2048


def _child(job: dict) -> None:
    """Runs in a fresh process: one engine, the given requests, one JSON event per line."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    from vllm import LLM, SamplingParams

    extra = {"config": job["config"]} if job["config"] else {}
    llm = LLM(model=job["model"], dtype="float32", max_model_len=PROMPT_TOKENS + 64, enforce_eager=True,
              kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False, disable_log_stats=False,
              kv_transfer_config={"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.connector.vllm",
                                  "kv_role": "kv_both", "kv_connector_extra_config": extra})
    print("EVENT " + json.dumps({"ready": True}), flush=True)
    llm.generate(["w5 w6 w7"], SamplingParams(max_tokens=1), use_tqdm=False)  # warm-up, not timed
    for label in job["requests"]:
        start = time.perf_counter()
        out = llm.generate([job["prompt"]], SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0]
        ttft = out.metrics.first_token_latency if out.metrics else time.perf_counter() - start
        print("EVENT " + json.dumps({"label": label, "ttft": ttft, "cached": out.num_cached_tokens,
                                     "tokens": list(out.outputs[0].token_ids)}), flush=True)


def _run_engine(console: Console, title: str, job: dict) -> list[dict]:
    results = []
    with console.status(f"{title}: starting vLLM on CPU (10-60 s)...") as status:
        proc = subprocess.Popen([sys.executable, "-m", "kvtier.vllm_demo", json.dumps(job)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if not line.startswith("EVENT "):
                continue
            event = json.loads(line[len("EVENT "):])
            if event.get("ready"):
                status.update(f"{title}: engine ready, running the prompt...")
            else:
                results.append(event)
        stderr = proc.stderr.read()
        proc.wait()
    if proc.returncode != 0 or len(results) != len(job["requests"]):
        console.print(f"[red]{title} failed (exit {proc.returncode})[/red]\n{stderr[-4000:]}")
        raise SystemExit(1)
    return results


def run_engine_demo(console: Console, config_path: str | None = None) -> int:
    with console.status("building a random-weight Llama (8 layers, hidden 1024; first run only)..."):
        model = make_tiny_llama(Path.home() / ".cache" / "kvtier-demo" / "model", BENCH_SPEC)
    prompt = prompt_text(PROMPT_TOKENS, seed=time.time_ns())
    console.print(f"[bold]kvtier demo[/bold]: vLLM on CPU, {PROMPT_TOKENS}-token prompt, tiers from "
                  f"{config_path or 'the built-in default (cpu 2 GiB + disk ~/.cache/kvtier)'}")
    job = {"model": str(model), "prompt": prompt, "config": config_path}
    results = _run_engine(console, "engine 1", {**job, "requests": ["engine 1: new prompt (cold)",
                                                                    "engine 1: same prompt again"]})
    results += _run_engine(console, "engine 2", {**job, "requests": ["engine 2 (new process): same prompt"]})
    cold = results[0]
    table = Table(title="time to first token")
    for column in ("request", "TTFT", "tokens from kvtier", "vs cold", "output"):
        table.add_column(column)
    ok = True
    for r in results:
        same = r["tokens"] == cold["tokens"]
        ok &= same and (r is cold or r["cached"] >= PROMPT_TOKENS - 1)
        table.add_row(r["label"], f"{r['ttft'] * 1e3:.0f} ms", f"{r['cached']} / {PROMPT_TOKENS}",
                      "-" if r is cold else f"{cold['ttft'] / r['ttft']:.1f}x faster",
                      "identical" if same else "[red]DIFFERENT[/red]")
    console.print(table)
    saved = cold["ttft"] - results[-1]["ttft"]
    console.print(f"The restarted engine skipped {results[-1]['cached']} of {PROMPT_TOKENS} prompt tokens of prefill "
                  f"and saved {saved * 1e3:.0f} ms of TTFT." if ok else "[red]the cache did not behave as expected[/red]")
    return 0 if ok else 1


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
