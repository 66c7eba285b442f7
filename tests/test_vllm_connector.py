"""The vLLM adapter's own rules, checked with vLLM's real classes (no engine needed): what names a
request's KV (salt, images/audio, embeddings), the settings and shards in the namespace."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.v1.request import Request

from kvtier.chunk_format.keys import token_chain
from kvtier.connector.config import load_config
from kvtier.connector.engine_setup import EngineSetup
from kvtier.connector.vllm_inputs import request_chain
from kvtier.connector.vllm_inputs import request_salt as _request_salt
from kvtier.connector.vllm_layout import CacheShape, EngineLayout, all_shards, model_settings

CHUNK = 256


def _request(tokens: list[int] | tuple[int, ...] | None = (1, 2, 3), **kw) -> Request:
    """A real vLLM request; ``tokens=None``: a prompt given as embeddings only."""
    return Request("r", None if tokens is None else list(tokens), SamplingParams(max_tokens=1), None, **kw)


def _audio(identifier: str, offset: int, length: int = 250) -> MultiModalFeatureSpec:
    return MultiModalFeatureSpec(data=None, modality="audio", identifier=identifier,
                                 mm_position=PlaceholderRange(offset=offset, length=length))


def test_cache_salt_and_lora_adapter_enter_the_salt() -> None:
    plain = _request()
    salted = _request(cache_salt="tenant-a")
    lora_a = _request(lora_request=LoRARequest("adapter-a", 1, "/tmp/a"))
    lora_b = _request(lora_request=LoRARequest("adapter-b", 2, "/tmp/b"))
    both = _request(cache_salt="tenant-a", lora_request=LoRARequest("adapter-a", 1, "/tmp/a"))
    forged = _request(cache_salt='tenant-a", ["adapter-a", 1]]')  # tries to spell "both"
    salts = [_request_salt(r) for r in (plain, salted, lora_a, lora_b, both, forged)]
    assert salts[0] == "" and len(set(salts)) == 6


def test_the_lora_adapter_counts_by_name_and_path_not_by_vllms_id() -> None:
    """vLLM numbers adapters per instance; the weights are the path. Same name, other path: other KV."""
    first = _request(lora_request=LoRARequest("adapter-a", 1, "/models/a-v1"))
    renumbered = _request(lora_request=LoRARequest("adapter-a", 7, "/models/a-v1"))
    retrained = _request(lora_request=LoRARequest("adapter-a", 1, "/models/a-v2"))
    assert _request_salt(first) == _request_salt(renumbered)
    assert _request_salt(first) != _request_salt(retrained)


PLACEHOLDER = 1024  # the tiny audio model's <|AUDIO|> id: every clip of a prompt gets the same ids
TOKENS = [5] * 20 + [PLACEHOLDER] * 250 + list(range(10, 740))  # 1000 tokens; the clip covers 20..269


def test_a_text_chain_is_the_plain_token_chain() -> None:
    assert request_chain(_request(TOKENS), CHUNK).digests == tuple(token_chain(TOKENS, CHUNK, True))


def test_another_clip_changes_every_chunk_from_its_position_on() -> None:
    chain_a = request_chain(_request(TOKENS, mm_features=[_audio("hash-a", 20)]), CHUNK).digests
    chain_b = request_chain(_request(TOKENS, mm_features=[_audio("hash-b", 20)]), CHUNK).digests
    same = request_chain(_request(TOKENS, mm_features=[_audio("hash-a", 20)]), CHUNK).digests
    text = tuple(token_chain(TOKENS, CHUNK, True))
    assert len(chain_a) == 4 and chain_a == same
    assert all(a != b for a, b in zip(chain_a, chain_b))  # the clip starts in chunk 0: every chunk differs
    assert all(a != t for a, t in zip(chain_a, text))  # never keyed by the placeholder ids alone
    late = request_chain(_request(TOKENS, mm_features=[_audio("hash-a", 300, 100)]), CHUNK).digests
    late_b = request_chain(_request(TOKENS, mm_features=[_audio("hash-b", 300, 100)]), CHUNK).digests
    assert late[0] == late_b[0] == text[0]  # chunk 0 holds no part of the clip: shared
    assert all(a != b for a, b in zip(late[1:], late_b[1:]))


def test_the_same_clip_elsewhere_is_another_input() -> None:
    at_20 = request_chain(_request(TOKENS, mm_features=[_audio("hash-a", 20)]), CHUNK).digests
    at_21 = request_chain(_request(TOKENS, mm_features=[_audio("hash-a", 21)]), CHUNK).digests
    assert at_20[0] != at_21[0]


def _embeds(seed: int, n: int = 600, hidden: int = 128) -> torch.Tensor:
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed))


def test_prompt_embeddings_are_keyed_by_their_bytes() -> None:
    a, b = _embeds(1), _embeds(2)
    chain_a = request_chain(_request(None, prompt_embeds=a), CHUNK)
    assert chain_a.num_tokens == 600 and len(chain_a.digests) == 3
    assert request_chain(_request(None, prompt_embeds=a.clone()), CHUNK) == chain_a
    chain_b = request_chain(_request(None, prompt_embeds=b), CHUNK)
    assert all(x != y for x, y in zip(chain_a.digests, chain_b.digests))
    zeros = tuple(token_chain([0] * 600, CHUNK, True))  # vLLM's placeholder ids for an embeddings prompt
    assert all(x != z for x, z in zip(chain_a.digests, zeros))
    tail = b.clone()
    tail[300] += 1.0  # one value of chunk 1 differs: chunk 0 is shared, chunk 1 on differ
    chain_t = request_chain(_request(None, prompt_embeds=tail), CHUNK)
    assert chain_t.digests[0] == chain_b.digests[0] and chain_t.digests[1:] != chain_b.digests[1:]


def test_mixed_token_and_embedding_prompts_never_key_by_the_sentinel_ids() -> None:
    """Chat prompts mixing token ids and embeddings: positions covered by embeddings hold a sentinel."""
    ids = list(range(10, 610))
    mask = [i % 3 != 0 for i in range(600)]
    first = request_chain(_request(ids, prompt_embeds=_embeds(1), prompt_is_token_ids=mask), CHUNK)
    second = request_chain(_request(ids, prompt_embeds=_embeds(2), prompt_is_token_ids=mask), CHUNK)
    other_mask = request_chain(_request(ids, prompt_embeds=_embeds(1), prompt_is_token_ids=[not m for m in mask]),
                               CHUNK)
    assert first.digests[0] != second.digests[0] and first.digests[0] != other_mask.digests[0]
    assert first.digests[0] != token_chain(ids, CHUNK)[0]


def test_chunk_size_must_be_a_multiple_of_the_block_size(tiny_model, tmp_path) -> None:
    from vllm_harness import kvtier_transfer_config, run_engine

    config = tmp_path / "kvtier.yaml"
    config.write_text(f"chunk_size: 200\ntiers: [{{type: disk, path: {tmp_path / 'd'}, max_bytes: 1GiB}}]\n")
    with pytest.raises(AssertionError, match="chunk_size 200 must be a multiple of vLLM's block size 128"):
        run_engine(tiny_model, [["w5 w6"]], kvtier_transfer_config(config))


@pytest.fixture(scope="module")
def engine_config(tiny_model: Path):
    """vLLM's own VllmConfig for the tiny model with some engine options (no engine is started)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm.engine.arg_utils import EngineArgs

    return lambda **options: EngineArgs(model=str(tiny_model), dtype="float32", **options).create_engine_config()


def _shape(layers: int = 2, mla: bool = False) -> CacheShape:
    return CacheShape(layer_names=tuple(f"model.layers.{i}.self_attn.attn" for i in range(layers)), block_size=128,
                      kv_heads=1, head_size=32, dtype=torch.float32, mla=mla, opaque_backend=None)


def _digests(vllm_config, config, mla: bool = False) -> list[bytes]:
    layout = EngineLayout.of(vllm_config)
    setup = EngineSetup.of(config, vllm_config.model_config.model, model_settings(vllm_config))
    return [ns.digest() for ns in all_shards(setup, _shape(mla=mla), layout)]


def test_every_engine_setting_that_changes_the_kv_changes_the_keys(engine_config, tmp_path: Path) -> None:
    """A persistent store must never serve KV computed under another revision, KV-cache dtype or
    model-config override: each gets its own namespace; the defaults keep the plain one."""
    config = load_config(overrides={"tiers": [{"type": "disk", "path": str(tmp_path / "d")}]}, environ={})
    base = engine_config()
    assert model_settings(base).digest() == ""  # a default run: the namespace vLLM and SGLang share
    variants = [engine_config(revision="v2"), engine_config(kv_cache_dtype="fp8"),
                engine_config(hf_overrides={"rope_theta": 20000.0}),
                engine_config(hf_overrides={"rope_scaling": {"rope_type": "linear", "factor": 2.0}})]
    digests = [_digests(base, config)[0]] + [_digests(v, config)[0] for v in variants]
    assert len(set(digests)) == len(digests)
    assert _digests(engine_config(), config) == _digests(base, config)  # and the same settings agree


def test_each_rank_and_stage_has_its_own_shard_and_mla_ranks_share_one(engine_config, tmp_path: Path) -> None:
    config = load_config(overrides={"tiers": [{"type": "disk", "path": str(tmp_path / "d")}]}, environ={})
    tp_pp = engine_config(tensor_parallel_size=2, pipeline_parallel_size=2)
    layout = EngineLayout.of(tp_pp)
    assert (layout.tp_size, layout.pp_size, layout.workers_apart) == (2, 2, True)
    shards = all_shards(EngineSetup.of(config, tp_pp.model_config.model, model_settings(tp_pp)), _shape(), layout)
    assert [ns.shard_id for ns in shards] == ["tp0/2 pp0/2 layers0-0", "tp1/2 pp0/2 layers0-0",
                                              "tp0/2 pp1/2 layers1-1", "tp1/2 pp1/2 layers1-1"]
    assert len({ns.digest() for ns in shards}) == 4  # two stages with one layer each never share keys
    assert len(set(_digests(tp_pp, config, mla=True))) == 2  # MLA: one latent cache per stage


def test_each_process_of_an_engine_serves_metrics_on_its_own_port() -> None:
    apart = EngineLayout(tp_size=2, pp_size=2, dp_local_rank=0, workers_apart=True, total_layers=4)
    offsets = [apart.metrics_offset(None)] + [apart.metrics_offset(rank) for rank in range(4)]
    assert offsets == [0, 1, 2, 3, 4]
    replica = dataclasses.replace(apart, dp_local_rank=1)
    assert [replica.metrics_offset(None), replica.metrics_offset(3)] == [5, 9]  # no clash with replica 0
    together = EngineLayout(tp_size=1, pp_size=1, dp_local_rank=0, workers_apart=False, total_layers=4)
    assert together.metrics_offset(None) == together.metrics_offset(0) == 0  # one process, one store
    assert dataclasses.replace(together, dp_local_rank=2).metrics_offset(0) == 2


def test_external_launcher_is_refused_with_a_reason(engine_config, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    # vLLM sets this variable for the external launcher; keep it out of the later tests' engines
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"))
    with pytest.raises(ValueError, match="external_launcher"):
        EngineLayout.of(engine_config(tensor_parallel_size=2, distributed_executor_backend="external_launcher"))


def test_a_stage_must_hold_exactly_its_partition_of_the_layers() -> None:
    from kvtier.connector.vllm_layout import worker_layers

    staged = EngineLayout(tp_size=1, pp_size=2, dp_local_rank=0, workers_apart=True, total_layers=4)
    stage1 = dataclasses.replace(_shape(2), layer_names=("model.layers.2.self_attn.attn", "model.layers.3.self_attn.attn"))
    assert worker_layers(stage1, staged, pp_rank=1) == range(2, 4)
    with pytest.raises(ValueError, match="pipeline stage 0 holds the KV of layers 2-3"):
        worker_layers(stage1, staged, pp_rank=0)
    single = EngineLayout(tp_size=2, pp_size=1, dp_local_rank=0, workers_apart=True, total_layers=40)
    assert worker_layers(_shape(2), single, pp_rank=0) == range(0, 2)  # without stages: the cache's own layers
