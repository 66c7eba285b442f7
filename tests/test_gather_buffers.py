"""Saves gather straight into their blobs' places: headers written before the payloads, byte for
byte what encode_chunk makes, buffers reused once every blob is gone."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from kvtier.chunk_format.codec import decode_chunk, encode_chunk, write_header_before
from kvtier.chunk_format.integrity import IntegrityKey
from kvtier.connector.gather_buffers import HEADROOM, GatherBuffers


@pytest.mark.parametrize("mac", [False, True])
def test_a_header_written_before_its_payload_makes_the_same_blob(mac: bool) -> None:
    payload = np.random.default_rng(0).bytes(3 * 1000 * 2)
    key = "ab" * 32
    mac_key = IntegrityKey(b"0123456789abcdef0123") if mac else None
    expected = encode_chunk(key, "bfloat16", (3, 1000), "LBNHC", "tiny", 16, payload, shard="tp0", mac_key=mac_key)
    buffer = bytearray(HEADROOM) + bytearray(payload)
    start = write_header_before(memoryview(buffer), HEADROOM, key, "bfloat16", (3, 1000), "LBNHC", "tiny", 16,
                                shard="tp0", mac_key=mac_key)
    assert start is not None and start % 64 == 0
    assert bytes(buffer[start:]) == bytes(expected)
    assert bytes(decode_chunk(memoryview(buffer)[start:], key, mac_key=mac_key).payload) == payload


def test_a_header_that_does_not_fit_is_refused() -> None:
    buffer = bytearray(64 + 16)
    assert write_header_before(memoryview(buffer), 64, "cd" * 32, "uint8", (16,), "LBNHC", "m" * 200, 1) is None
    assert bytes(buffer) == bytes(80)  # nothing written


def test_the_copy_layer_s_view_puts_each_chunk_after_its_room() -> None:
    buffers = GatherBuffers(kept_bytes=64 << 20)
    run = buffers.take(3, (2, 2, 5, 3, 4), torch.bfloat16, pinned=False)
    assert run.out.shape == (3, 2, 2, 5, 3, 4) and all(run.out[j].is_contiguous() for j in range(3))
    values = torch.randn(3, 2, 2, 5, 3, 4).to(torch.bfloat16)
    run.out.copy_(values)
    for j in range(3):
        payload = bytes(run.slot(j)[HEADROOM:])
        assert payload == values[j].contiguous().view(torch.uint8).numpy().tobytes()
    assert run.slot_bytes % 64 == 0 and run.slot_bytes >= HEADROOM + run.payload_bytes


def test_blobs_are_read_only_and_the_buffer_is_reused_once_they_are_gone() -> None:
    buffers = GatherBuffers(kept_bytes=64 << 20)
    run = buffers.take(2, (4, 1000), torch.float32, pinned=False)
    run.out.fill_(1.5)
    starts = [write_header_before(run.slot(j), HEADROOM, f"{j:064x}", "float32", (4, 1000), "L", "m", 8)
              for j in range(2)]
    blobs = buffers.blobs(run, starts)
    assert all(blob.readonly for blob in blobs)
    assert np.frombuffer(decode_chunk(blobs[1], f"{1:064x}").payload, np.float32).tolist() == [1.5] * 4000
    address = run.buffer.__array_interface__["data"][0]
    kept = blobs[0]
    del blobs, run
    gc.collect()
    again = buffers.take(2, (4, 1000), torch.float32, pinned=False)
    assert again.buffer.__array_interface__["data"][0] != address  # one blob still lives: not reused
    del kept, again
    gc.collect()
    third = buffers.take(2, (4, 1000), torch.float32, pinned=False)
    assert third.buffer.__array_interface__["data"][0] == address
