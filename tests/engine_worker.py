"""Runs one real vLLM engine in this process for a test, then prints its results as JSON.

Input: a JSON job file (argv[1]): model, kv (kv_transfer_config or null), steps (lists of prompts,
one ``generate`` call after another), max_tokens, prefix_caching, cache_salt, multiprocess,
kv_cache_bytes and max_model_len (the engine's KV cache size and context), tp and pp (tensor and
pipeline parallel sizes: one worker process per rank, one core each), engine_args (more LLM
arguments), pause (print ``PAUSED <i>`` after step i and wait for a line on stdin before going on).
A prompt is a text or a dict: ``{"embeds": [seed, length]}`` (random prompt embeddings of the
model's hidden size) or ``{"prompt": text, "audio": seed}`` (``kvtier.tiny_model.tone(seed)``).
Output: ``RESULT <json>`` (per step, per prompt: [generated token ids, num_cached_tokens]) and,
in-process only, ``STATS <json>`` (kvtier's per-tier counters).
"""

import json
import os
import sys

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        job = json.load(f)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if job.get("multiprocess") else "0"
    tp, pp = job.get("tp", 1), job.get("pp", 1)
    # Same cores with or without a connector; with several ranks, one core each.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % 2) for i in range(tp * pp)) if tp * pp > 1
                          else "0-1")

    import torch
    from vllm import LLM, SamplingParams

    kwargs = {"kv_transfer_config": job["kv"]} if job.get("kv") else {}
    kwargs.update(job.get("engine_args") or {})
    if tp * pp > 1:
        kwargs.update(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    llm = LLM(model=job["model"], max_model_len=job.get("max_model_len", 4096), enforce_eager=pp == 1,
              dtype="float32", kv_cache_memory_bytes=job.get("kv_cache_bytes", 128 << 20),
              enable_prefix_caching=job.get("prefix_caching", False), seed=0, **kwargs)
    params = SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0)
    hidden = llm.llm_engine.model_config.get_hidden_size()

    def as_input(p):
        if isinstance(p, str):
            return {"prompt": p}
        if "embeds" in p:
            seed, length = p["embeds"]
            return {"prompt_embeds": torch.randn(length, hidden, generator=torch.Generator().manual_seed(seed))}
        from kvtier.tiny_model import tone

        return {"prompt": p["prompt"], "multi_modal_data": {"audio": tone(p["audio"])}}

    results = []
    for i, step in enumerate(job["steps"]):
        if i in job.get("pause", []):
            print(f"PAUSED {i}", flush=True)
            sys.stdin.readline()
        salt = {"cache_salt": job["cache_salt"]} if job.get("cache_salt") else {}
        prompts = [{**as_input(p), **salt} for p in step]
        outs = llm.generate(prompts, params, use_tqdm=False)
        results.append([[list(o.outputs[0].token_ids), o.num_cached_tokens] for o in outs])
    print("RESULT " + json.dumps(results), flush=True)
    if job.get("kv") and not job.get("multiprocess"):
        from kvtier.connector.store_registry import STORES

        STORES.flush()  # background writes (the writers run below the engine's priority) are counted once done
        print("STATS " + json.dumps(STORES.stats()), flush=True)
