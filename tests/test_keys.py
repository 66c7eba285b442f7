"""The prefix hash chain: deterministic, prefix-shaped, and sensitive to everything in the namespace."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.connector.keys import KeyNamespace, chain_hash, chunk_keys, tokens_to_bytes

NS = KeyNamespace(model="tiny-llama", kv_dtype="float16", layout="vllm-nhd", num_layers=8, kv_heads=4,
                  head_dim=64, tp_size=1, tp_rank=0, chunk_size=4)
token_lists = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=40)


def test_chain_matches_the_documented_formula() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    h0 = hashlib.sha256(NS.digest() + np.array([1, 2, 3, 4], "<u4").tobytes()).digest()
    h1 = hashlib.sha256(h0 + np.array([5, 6, 7, 8], "<u4").tobytes()).digest()
    assert chunk_keys(NS.digest(), tokens, 4) == [h0.hex(), h1.hex()]
    partial = hashlib.sha256(h1 + np.array([9], "<u4").tobytes()).hexdigest()
    assert chunk_keys(NS.digest(), tokens, 4, include_partial=True) == [h0.hex(), h1.hex(), partial]


@given(token_lists, token_lists)
def test_keys_are_prefix_shaped(a: list[int], b: list[int]) -> None:
    """Chunk i's key depends on exactly the tokens up to the end of chunk i."""
    ka, kb = chunk_keys(NS.digest(), a, 4), chunk_keys(NS.digest(), b, 4)
    for i, (x, y) in enumerate(zip(ka, kb)):
        assert (x == y) == (a[: 4 * (i + 1)] == b[: 4 * (i + 1)])
    assert len(ka) == len(a) // 4


@given(token_lists)
def test_partial_chunk_key_never_equals_a_full_chunk_key(tokens: list[int]) -> None:
    full = chunk_keys(NS.digest(), tokens, 4)
    with_partial = chunk_keys(NS.digest(), tokens, 4, include_partial=True)
    assert with_partial[: len(full)] == full
    if len(tokens) % 4:
        assert with_partial[-1] not in full and len(with_partial) == len(full) + 1


@given(token_lists)
def test_numpy_and_list_tokens_agree(tokens: list[int]) -> None:
    arr = np.array(tokens, dtype=np.int64)
    assert chunk_keys(NS.digest(), arr, 4, True) == chunk_keys(NS.digest(), tokens, 4, True)


@pytest.mark.parametrize("field, value", [
    ("model", "other-model"), ("kv_dtype", "bfloat16"), ("kv_dtype", "float8_e4m3fn"), ("layout", "vllm-hnd"),
    ("num_layers", 9), ("kv_heads", 2), ("head_dim", 128), ("tp_size", 2), ("tp_rank", 0),
    ("chunk_size", 8), ("format_version", 2), ("salt", "tenant-b"),
])
def test_every_namespace_field_changes_the_keys(field: str, value: object) -> None:
    changed = dataclasses.replace(NS, **{field: value, **({"tp_size": 2, "tp_rank": 1} if field == "tp_rank" else {})})
    assert changed.digest() != NS.digest()
    assert chunk_keys(changed.digest(), range(8), 4)[0] != chunk_keys(NS.digest(), range(8), 4)[0]


def test_invalid_namespace_and_tokens_are_rejected() -> None:
    with pytest.raises(ValueError, match="tp_rank"):
        dataclasses.replace(NS, tp_size=2, tp_rank=2)
    with pytest.raises(ValueError, match="chunk_size"):
        dataclasses.replace(NS, chunk_size=0)
    with pytest.raises(ValueError, match="uint32"):
        tokens_to_bytes([2**32])
    with pytest.raises(ValueError, match="uint32"):
        chain_hash(NS.digest(), [-1])


_CHILD = """
import json, sys
from kvtier.connector.keys import KeyNamespace, chunk_keys
ns = KeyNamespace(model="m", kv_dtype="bfloat16", layout="vllm-nhd", num_layers=32, kv_heads=8, head_dim=128,
                  tp_size=2, tp_rank=1, chunk_size=256, salt="s")
print(json.dumps([ns.digest().hex(), chunk_keys(ns.digest(), list(range(1000)), 256, include_partial=True)]))
"""


def test_keys_agree_across_processes_with_different_hash_seeds() -> None:
    outputs = []
    for seed in ("0", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout))
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(outputs[0][1]) == 4  # three full chunks and the partial one


@settings(max_examples=50)
@given(st.integers(min_value=1, max_value=9), token_lists)
def test_chunk_size_only_cuts_the_tokens(chunk_size: int, tokens: list[int]) -> None:
    keys = chunk_keys(NS.digest(), tokens, chunk_size, include_partial=True)
    assert len(keys) == -(-len(tokens) // chunk_size)
    assert len(set(keys)) == len(keys)
