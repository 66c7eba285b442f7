"""The vLLM adapter's own rules, checked with vLLM's real classes (no engine needed)."""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vllm.v1.request import Request

from kvtier.connector.vllm import _request_salt


def _request(**kw) -> Request:
    return Request("r", [1, 2, 3], SamplingParams(max_tokens=1), None, **kw)


def test_cache_salt_and_lora_adapter_enter_the_salt() -> None:
    plain = _request()
    salted = _request(cache_salt="tenant-a")
    lora_a = _request(lora_request=LoRARequest("adapter-a", 1, "/tmp/a"))
    lora_b = _request(lora_request=LoRARequest("adapter-b", 2, "/tmp/b"))
    both = _request(cache_salt="tenant-a", lora_request=LoRARequest("adapter-a", 1, "/tmp/a"))
    forged = _request(cache_salt='tenant-a", ["adapter-a", 1]]')  # tries to spell "both"
    salts = [_request_salt(r) for r in (plain, salted, lora_a, lora_b, both, forged)]
    assert salts[0] == "" and len(set(salts)) == 6


def test_chunk_size_must_be_a_multiple_of_the_block_size(tiny_model, tmp_path) -> None:
    from vllm_harness import kvtier_transfer_config, run_engine

    config = tmp_path / "kvtier.yaml"
    config.write_text(f"chunk_size: 200\ntiers: [{{type: disk, path: {tmp_path / 'd'}, max_bytes: 1GiB}}]\n")
    with pytest.raises(AssertionError, match="chunk_size 200 must be a multiple of vLLM's block size 128"):
        run_engine(tiny_model, [["w5 w6"]], kvtier_transfer_config(config))
