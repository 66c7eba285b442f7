"""The chunk codec: round trips, and every kind of damage becomes ChunkCorrupt (never another error)."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.chunk_format.codec import (
    DTYPE_SIZES,
    MAGIC,
    PREFIX_BYTES,
    ChunkCorrupt,
    decode_chunk,
    decode_header,
    encode_chunk,
    encode_header,
)
from kvtier.chunk_format.keys import FORMAT_VERSION

KEY = "ab" * 32


def _blob(payload: bytes = bytes(range(24)), shape=(2, 3, 2), dtype="float16", key=KEY) -> bytearray:
    return encode_chunk(key, dtype, shape, "vllm-nhd", "tiny", 3, payload)


def test_round_trip_keeps_every_field_and_the_bytes() -> None:
    payload = np.random.default_rng(0).bytes(2 * 4 * 3 * 8 * 4)
    blob = encode_chunk(KEY, "float32", (2, 4, 3, 8), "vllm-hnd", "model/x", 3, payload)
    chunk = decode_chunk(blob, KEY)
    h = chunk.header
    assert (h.key, h.dtype, h.shape, h.layout, h.model, h.num_tokens) == (KEY, "float32", (2, 4, 3, 8), "vllm-hnd", "model/x", 3)
    assert bytes(chunk.payload) == payload and chunk.payload.readonly


@pytest.mark.parametrize("dtype", sorted(DTYPE_SIZES))
def test_every_dtype_round_trips(dtype: str) -> None:
    payload = bytes(range(256))[: 12 * DTYPE_SIZES[dtype]]
    assert bytes(decode_chunk(_blob(payload, (3, 4), dtype), KEY).payload) == payload


def test_encoder_refuses_inconsistent_input() -> None:
    with pytest.raises(ValueError, match="needs"):
        encode_header(KEY, "float16", (2, 3), "l", "m", 1, bytes(5))
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode_header(KEY, "complex64", (1,), "l", "m", 1, bytes(8))


def test_wrong_key_is_corrupt() -> None:
    with pytest.raises(ChunkCorrupt, match="names key"):
        decode_chunk(_blob(), "cd" * 32)


def test_truncation_anywhere_is_corrupt() -> None:
    blob = bytes(_blob())
    for cut in range(len(blob)):
        with pytest.raises(ChunkCorrupt):
            decode_chunk(blob[:cut], KEY)


def test_flipped_payload_bit_fails_the_checksum_unless_trusted() -> None:
    blob = _blob()
    blob[-1] ^= 0x10
    with pytest.raises(ChunkCorrupt, match="checksum"):
        decode_chunk(blob, KEY)
    assert decode_chunk(blob, KEY, verify_checksum=False).payload[-1] == blob[-1]


def _with_header(fields: dict) -> bytes:
    head = msgpack.packb(fields, use_bin_type=True)
    return struct.pack("<4sIQ", MAGIC, len(head), xxhash.xxh3_64_intdigest(head)) + head + bytes(24)


GOOD = {"v": FORMAT_VERSION, "key": KEY, "dtype": "float16", "shape": [2, 3, 2], "layout": "l", "model": "m",
        "tokens": 3, "nbytes": 24, "xxh3": 0}


@pytest.mark.parametrize("change", [
    {"v": 99}, {"v": "1"}, {"v": True}, {"dtype": "object"}, {"shape": []}, {"shape": [2, -3, 2]},
    {"shape": [2, 3, 2, 1, 1, 1, 1, 1, 1]}, {"shape": "2x3"}, {"shape": [2**40, 2**40]}, {"nbytes": 23},
    {"nbytes": 2**60}, {"xxh3": -1}, {"tokens": -1}, {"key": 7}, {"layout": None}, {"model": b"m"},
])
def test_each_bad_header_field_is_corrupt(change: dict) -> None:
    with pytest.raises(ChunkCorrupt):
        decode_chunk(_with_header({**GOOD, **change}), KEY)


def test_missing_fields_and_non_map_headers_are_corrupt() -> None:
    for name in GOOD:
        with pytest.raises(ChunkCorrupt):
            decode_chunk(_with_header({k: v for k, v in GOOD.items() if k != name}), KEY)
    head = msgpack.packb([1, 2, 3])
    with pytest.raises(ChunkCorrupt, match="not a map"):
        decode_header(struct.pack("<4sIQ", MAGIC, len(head), xxhash.xxh3_64_intdigest(head)) + head)


def test_damaged_header_bytes_fail_the_header_checksum() -> None:
    blob = _blob()
    blob[PREFIX_BYTES + 5] ^= 1
    with pytest.raises(ChunkCorrupt, match="header checksum"):
        decode_chunk(blob, KEY)


def test_header_length_is_bounded_before_reading() -> None:
    with pytest.raises(ChunkCorrupt, match="out of bounds"):
        decode_header(struct.pack("<4sIQ", MAGIC, 2**31, 0) + bytes(16))
    with pytest.raises(ChunkCorrupt, match="magic"):
        decode_header(b"PK\x03\x04" + bytes(PREFIX_BYTES))


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_corrupt(data: bytes) -> None:
    for blob in (data, MAGIC + data, MAGIC + struct.pack("<IQ", len(data), xxhash.xxh3_64_intdigest(data)) + data):
        with pytest.raises(ChunkCorrupt):
            decode_chunk(blob, KEY)


@settings(max_examples=300)
@given(st.data())
def test_random_damage_to_a_valid_chunk_is_detected(data: st.DataObject) -> None:
    blob = bytearray(_blob(np.random.default_rng(1).bytes(24)))
    pos = data.draw(st.integers(0, len(blob) - 1))
    mask = data.draw(st.integers(1, 255))
    blob[pos] ^= mask
    try:
        chunk = decode_chunk(blob, KEY)
    except ChunkCorrupt:
        return
    # Header and payload both carry checksums, so no single-byte change may pass.
    pytest.fail(f"damage at byte {pos} went unnoticed: {chunk.header}")


@given(st.sampled_from(sorted(DTYPE_SIZES)), st.lists(st.integers(1, 5), min_size=1, max_size=5),
       st.text(max_size=30), st.text(max_size=30), st.integers(0, 10**6))
def test_round_trip_property(dtype: str, shape: list[int], layout: str, model: str, tokens: int) -> None:
    nbytes = int(np.prod(shape)) * DTYPE_SIZES[dtype]
    payload = np.random.default_rng(len(shape)).bytes(nbytes)
    chunk = decode_chunk(encode_chunk(KEY, dtype, tuple(shape), layout, model, tokens, payload), KEY)
    assert bytes(chunk.payload) == payload
    assert (chunk.header.layout, chunk.header.model, chunk.header.num_tokens) == (layout, model, tokens)
