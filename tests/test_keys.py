"""Chunk keys: SGLang's token chain wrapped with the namespace; deterministic, prefix-shaped, and
sensitive to everything in the namespace."""

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

from kvtier.connector.keys import (
    KeyNamespace,
    chain_hash,
    chunk_keys,
    page_key_digest,
    storage_key,
    token_chain,
    tokens_to_bytes,
)

NS = KeyNamespace(model="tiny-llama", kv_dtype="float16", layout="vllm-nhd", num_layers=8, kv_heads=4,
                  head_dim=64, tp_size=1, tp_rank=0, chunk_size=4)
token_lists = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=40)


def test_chain_matches_the_documented_formula() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    t0 = hashlib.sha256(np.array([1, 2, 3, 4], "<u4").tobytes()).digest()  # no seed: SGLang's chain
    t1 = hashlib.sha256(t0 + np.array([5, 6, 7, 8], "<u4").tobytes()).digest()
    t2 = hashlib.sha256(t1 + np.array([9], "<u4").tobytes()).digest()
    ns = NS.digest()
    k0, k1, k2 = (hashlib.sha256(ns + t).hexdigest() for t in (t0, t1, t2))
    assert token_chain(tokens, 4, include_partial=True) == [t0, t1, t2]
    assert chunk_keys(ns, tokens, 4) == [k0, k1]
    assert chunk_keys(ns, tokens, 4, include_partial=True) == [k0, k1, k2]
    assert storage_key(ns, page_key_digest(t1.hex())) == k1


def test_keys_equal_the_namespace_over_sglangs_own_page_hashes() -> None:
    """The real sglang function (its native extension): chunk_size == page_size gives SGLang's page keys."""
    from sglang.srt.mem_cache.utils import get_hash_str

    tokens = [7, 2**32 - 1, 0, 12345, *range(1000, 1021)]  # 25 tokens: 3 pages of 8 and a partial one
    pages = get_hash_str(tokens, page_size=8)
    assert [t.hex() for t in token_chain(tokens, 8, include_partial=True)] == pages
    ns = NS.digest()
    assert chunk_keys(ns, tokens, 8, include_partial=True) == [
        hashlib.sha256(ns + bytes.fromhex(p)).hexdigest() for p in pages]
    assert get_hash_str(tokens[8:16], prior_hash=pages[0]) == pages[1]  # the chain continues as SGLang's does


def test_page_keys_that_are_not_sha256_hex_are_rejected() -> None:
    for bad in ("", "ab", "zz" * 32, "a" * 63, "a" * 66, None):
        with pytest.raises(ValueError):
            page_key_digest(bad)


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
    ("chunk_size", 8), ("format_version", 1), ("salt", "tenant-b"),
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
