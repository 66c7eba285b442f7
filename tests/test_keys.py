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

from kvtier.chunk_format.keys import (
    KeyNamespace,
    ModelSettings,
    PlacedItem,
    chain_hash,
    chunk_extras,
    chunk_keys,
    make_namespace,
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
    ("chunk_size", 8), ("format_version", 1), ("salt", "tenant-b"), ("pp_size", 2), ("pp_rank", 1),
    ("first_layer", 8), ("settings", "ab" * 32),
])
def test_every_namespace_field_changes_the_keys(field: str, value: object) -> None:
    extra = {"tp_rank": {"tp_size": 2, "tp_rank": 1}, "pp_rank": {"pp_size": 2, "pp_rank": 1}}.get(field, {})
    changed = dataclasses.replace(NS, **{field: value, **extra})
    assert changed.digest() != NS.digest()
    assert chunk_keys(changed.digest(), range(8), 4)[0] != chunk_keys(NS.digest(), range(8), 4)[0]


def test_invalid_namespace_and_tokens_are_rejected() -> None:
    with pytest.raises(ValueError, match="tp_rank"):
        dataclasses.replace(NS, tp_size=2, tp_rank=2)
    with pytest.raises(ValueError, match="pp_rank"):
        dataclasses.replace(NS, pp_size=2, pp_rank=2)
    with pytest.raises(ValueError, match="first_layer"):
        dataclasses.replace(NS, first_layer=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        dataclasses.replace(NS, chunk_size=0)
    with pytest.raises(ValueError, match="uint32"):
        tokens_to_bytes([2**32])
    with pytest.raises(ValueError, match="uint32"):
        chain_hash(NS.digest(), [-1])


_CHILD = """
import json, sys
from kvtier.chunk_format.keys import KeyNamespace, chunk_keys
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


def test_shard_id_names_rank_stage_and_layers() -> None:
    ns = dataclasses.replace(NS, tp_size=2, tp_rank=1, pp_size=2, pp_rank=1, first_layer=8, num_layers=8)
    assert ns.shard_id == "tp1/2 pp1/2 layers8-15"
    assert make_namespace(model="m", kv_dtype="bfloat16", layout="mla", num_layers=4, kv_heads=1, head_dim=64,
                          tp_size=4, tp_rank=3, chunk_size=4).shard_id == "tp0/1 pp0/1 layers0-3"  # MLA: one for all ranks


def test_an_extra_changes_its_chunk_and_every_later_one_but_no_earlier_one() -> None:
    tokens = list(range(10, 22))  # three chunks of 4
    plain = token_chain(tokens, 4, True)
    with_extra = token_chain(tokens, 4, True, extras={1: b"item-a"})
    other = token_chain(tokens, 4, True, extras={1: b"item-b"})
    assert with_extra[0] == plain[0]
    assert all(a != b for a, b in zip(with_extra[1:], plain[1:]))
    assert all(a != b for a, b in zip(with_extra[1:], other[1:]))
    assert token_chain(tokens, 4, True, extras={1: b""}) == plain  # an empty extra is no extra
    assert token_chain(tokens, 4, True, extras={1: b"item-a"}) == with_extra  # deterministic


@settings(max_examples=100)
@given(token_lists, token_lists.filter(bool))
def test_no_extra_passes_for_token_bytes(tokens: list[int], more: list[int]) -> None:
    """A link with an extra is domain-separated from any plain link: an extra spelling the bytes of
    more tokens (which a plain concatenation would confuse with them) names another input."""
    extra = tokens_to_bytes(more)
    assert chain_hash(b"", tokens, extra) != chain_hash(b"", tokens + more)
    prev = hashlib.sha256(b"p").digest()
    assert chain_hash(prev, tokens, extra) != chain_hash(prev, tokens + more)


def test_chunk_extras_list_each_item_in_every_chunk_it_overlaps() -> None:
    items = [PlacedItem("img-a", offset=3, length=6), PlacedItem("img-b", offset=20, length=2)]
    extras = chunk_extras(num_tokens=12, chunk_size=4, items=items, embeds_digests={2: b"\x01" * 32})
    assert sorted(extras) == [0, 1, 2]  # img-a covers tokens 3..8 (chunks 0-2); img-b lies past the prompt
    moved = chunk_extras(12, 4, [PlacedItem("img-a", offset=4, length=6)])
    assert moved[1] != extras[1]  # the same item at another offset is another input
    assert chunk_extras(12, 4) == {}


def test_model_settings_digest_is_empty_only_for_defaults() -> None:
    assert ModelSettings().digest() == ""
    variants = [ModelSettings(revision="abc"), ModelSettings(quantization="fp8"), ModelSettings(kv_cache_dtype="fp8"),
                ModelSettings(kv_cache_dtype="fp8", model_dtype="bfloat16"), ModelSettings(kv_scales="calculated"),
                ModelSettings(overrides={"rope_scaling": {"type": "yarn", "factor": 4.0}}),
                ModelSettings(code_revision="v2")]
    digests = [v.digest() for v in variants]
    assert all(len(d) == 64 for d in digests) and len(set(digests)) == len(digests)
    assert ModelSettings(overrides={"a": 1, "b": 2}).digest() == ModelSettings(overrides={"b": 2, "a": 1}).digest()
