"""Integrity key: keyed MACs in chunk headers, so whoever can write a shared store cannot inject KV."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import struct
from pathlib import Path

import msgpack
import pytest
import torch
import xxhash

from kvtier.chunk_format.codec import PREFIX_BYTES, decode_chunk, encode_chunk, payload_offset
from kvtier.chunk_format.dtypes import dtype_name
from kvtier.chunk_format.integrity import IntegrityKey
from kvtier.chunk_format.keys import KeyNamespace
from kvtier.cli import main as cli_main
from kvtier.connector.chunk_store import ChunkStore, split_slots
from kvtier.connector.config import ConfigError, load_config
from kvtier.connector.integrity_key import load_integrity_key
from kvtier.connector.store_factory import build_store
from kvtier.cuda_ext import PagedKV, make_copier
from kvtier.storage_backends.disk_backend import DiskBackend
from kvtier.storage_backends.tiered import TieredStore

SECRET = b"correct horse battery staple 42"
OTHER = b"another secret of enough bytes!"
KEY = IntegrityKey(SECRET)
SIZE = 4096


def _key(i: int) -> str:
    return f"{i:064x}"


def _blob(i: int, mac_key: IntegrityKey | None = KEY) -> bytearray:
    payload = (f"{i:08d}".encode() * SIZE)[:SIZE]
    return encode_chunk(_key(i), "float16", (SIZE // 2,), "test", "tiny", 16, payload, shard="tp0", mac_key=mac_key)


def _rewrite(blob: bytes, flip_payload: bool = False, **changes: object) -> bytes:
    """The chunk with header fields changed (None: removed) and/or a payload byte flipped, and every
    xxh3 recomputed: what anyone with write access to the store can do."""
    view = memoryview(bytes(blob))
    magic, header_len, _ = struct.unpack_from("<4sIQ", view, 0)
    header = msgpack.unpackb(view[PREFIX_BYTES : PREFIX_BYTES + header_len])
    payload = bytearray(view[payload_offset(header_len) :])
    if flip_payload:
        payload[100] ^= 0x01
    header.update(changes)
    header = {k: v for k, v in header.items() if v is not None}
    header["xxh3"] = xxhash.xxh3_64_intdigest(bytes(payload))
    packed = msgpack.packb(header, use_bin_type=True)
    prefix = struct.pack("<4sIQ", magic, len(packed), xxhash.xxh3_64_intdigest(packed))
    return prefix + packed + bytes(payload_offset(len(packed)) - PREFIX_BYTES - len(packed)) + bytes(payload)


def _disk_store(path: Path, mac_key: IntegrityKey | None) -> tuple[TieredStore, DiskBackend]:
    disk = DiskBackend(path, 1 << 22)
    return TieredStore([disk], integrity_key=mac_key), disk


def test_round_trip_with_a_key_and_a_keyless_reader_reads_it(tmp_path: Path) -> None:
    keyed, _ = _disk_store(tmp_path / "d", KEY)
    assert keyed.put([(_key(i), _blob(i)) for i in range(3)]) == 3
    chunks = keyed.get([_key(i) for i in range(3)])
    assert all(c is not None and len(c.header.mac) == 32 for c in chunks)
    assert bytes(chunks[1].payload) == bytes(_blob(1)[-SIZE:])
    keyed.close()
    keyless, disk = _disk_store(tmp_path / "d", None)  # the same folder, read without the key
    assert all(c is not None for c in keyless.get([_key(i) for i in range(3)]))
    assert disk.stats()["corrupt_chunks"] == 0
    keyless.close()


def test_the_same_secret_from_a_file_with_a_newline_and_from_the_environment_is_one_key(tmp_path: Path) -> None:
    from_file = load_integrity_key(_config(tmp_path, _write_key(tmp_path / "key", SECRET + b"\n")))
    from_env = load_integrity_key(load_config(overrides={"integrity_key_env": "KV_KEY"}, environ={}),
                                  environ={"KV_KEY": SECRET.decode()})
    assert decode_chunk(_blob(1, from_file), _key(1), mac_key=from_env).header.key == _key(1)


FORGERIES = {
    "written_without_key": lambda: _blob(5, None),
    "written_with_another_key": lambda: _blob(5, IntegrityKey(OTHER)),
    "mac_removed": lambda: _rewrite(_blob(5), mac=None),
    "mac_of_another_chunk": lambda: _rewrite(_blob(5), mac=_header_mac(_blob(6))),
    "payload_byte": lambda: _rewrite(_blob(5), flip_payload=True),
    "tokens": lambda: _rewrite(_blob(5), tokens=15),
    "model": lambda: _rewrite(_blob(5), model="other"),
    "layout": lambda: _rewrite(_blob(5), layout="other"),
    "shape": lambda: _rewrite(_blob(5), shape=[SIZE // 4, 2]),
    "dtype": lambda: _rewrite(_blob(5), dtype="bfloat16"),
    "shard": lambda: _rewrite(_blob(5), shard="tp1"),
    "key": lambda: _rewrite(_blob(6), key=_key(5)),  # chunk 6's bytes renamed to chunk 5
}


def _header_mac(blob: bytes) -> str:
    header_len = struct.unpack_from("<I", blob, 4)[0]
    return msgpack.unpackb(bytes(blob[PREFIX_BYTES : PREFIX_BYTES + header_len]))["mac"]


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_chunk_is_a_counted_miss_for_a_keyed_reader(tmp_path: Path, forgery: str) -> None:
    blob = FORGERIES[forgery]()
    keyless, _ = _disk_store(tmp_path / "d", None)
    keyless.put([(_key(5), blob)])
    assert keyless.get([_key(5)])[0] is not None  # well-formed, xxh3 right: only the MAC can tell
    keyless.close()
    keyed, disk = _disk_store(tmp_path / "d", KEY)
    assert keyed.get([_key(5)]) == [None]
    assert disk.stats()["corrupt_chunks"] == 1
    assert keyed.flush(timeout=10) and disk.contains([_key(5)]) == 0  # dropped from the tier
    keyed.close()


def test_a_bad_mac_field_is_corrupt_even_for_a_keyless_reader(tmp_path: Path) -> None:
    store, disk = _disk_store(tmp_path / "d", None)
    store.put([(_key(5), _rewrite(_blob(5), mac="zz" * 32)), (_key(6), _rewrite(_blob(6), mac=12))])
    assert store.get([_key(5), _key(6)]) == [None, None] and disk.stats()["corrupt_chunks"] == 2
    store.close()


# -- wired through the config, build_store and ChunkStore --------------------------------------------------------

LAYERS, HEADS, DIM, BLOCK, BLOCKS, CHUNK = 2, 2, 8, 4, 16, 8


def _write_key(path: Path, secret: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(secret)
    path.chmod(mode)
    return path


def _config(tmp_path: Path, key_file: Path | None):
    text = (f"tiers:\n  - {{type: cpu, max_bytes: 1MiB, slot_bytes: 4096, pinned: never}}\n"
            f"  - {{type: disk, path: '{tmp_path / 'disk'}', max_bytes: 4MiB}}\n")
    if key_file is not None:
        text += f"integrity_key_file: '{key_file}'\n"
    (tmp_path / "kvtier.yaml").write_text(text)
    return load_config(tmp_path / "kvtier.yaml", environ={})


def _chunks(store: TieredStore, paged: PagedKV) -> ChunkStore:
    ns = KeyNamespace(model="tiny", kv_dtype=dtype_name(paged.dtype), layout=paged.format_id, num_layers=LAYERS,
                      kv_heads=HEADS, head_dim=DIM, tp_size=1, tp_rank=0, chunk_size=CHUNK)
    return ChunkStore(store, ns, make_copier("cpu"))


def test_build_store_reads_the_key_and_chunk_store_writes_and_checks_macs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    config = _config(tmp_path, _write_key(tmp_path / "key", SECRET + b"\n"))
    shape = (BLOCKS, BLOCK, HEADS, 2 * DIM)
    src = PagedKV.from_vllm([torch.randn(shape) for _ in range(LAYERS)], "NHD", DIM)
    tokens, slots = list(range(32)), split_slots(torch.arange(32), CHUNK)
    saver = build_store(config)
    assert repr(saver.integrity_key) == f"IntegrityKey(source='integrity_key_file {tmp_path / 'key'}')"
    assert _chunks(saver, src).save(tokens, src, slots, wait=True) == 4
    assert saver.flush(timeout=10)
    saver.close()
    on_disk = next((tmp_path / "disk").rglob("*.kvc")).read_bytes()
    assert len(bytes.fromhex(_header_mac(on_disk))) == 32

    def load_with(cfg) -> tuple[int, TieredStore]:
        dst = PagedKV.from_vllm([torch.zeros(shape) for _ in range(LAYERS)], "NHD", DIM)
        store = build_store(cfg)
        loaded = _chunks(store, dst).load(tokens, dst, slots)
        loaded_kv = [kv.reshape(-1, HEADS, DIM)[:32] for kv in (*dst.keys, *dst.values)]
        assert loaded == 0 or all(torch.equal(a, kv.reshape(-1, HEADS, DIM)[:32])
                                  for a, kv in zip(loaded_kv, (*src.keys, *src.values)))
        return loaded, store

    loaded, reader = load_with(config)  # another process with the key: a fresh cpu tier, all from disk
    assert loaded == 4 and reader.stats()["disk"]["corrupt_chunks"] == 0
    reader.close()
    loaded, keyless = load_with(_config(tmp_path, None))
    assert loaded == 4
    keyless.close()
    loaded, other = load_with(_config(tmp_path, _write_key(tmp_path / "other", OTHER)))
    assert loaded == 0 and other.stats()["disk"]["corrupt_chunks"] == 4  # each chunk of the batch is refused
    other.close()
    _assert_secret_nowhere([r.getMessage() for r in caplog.records], [str(config), repr(config)],
                           [config.model_dump_json(), repr(vars(saver)), str(saver.integrity_key)])
    assert any("integrity MAC mismatch" in r.getMessage() for r in caplog.records)


def _assert_secret_nowhere(*texts: list[str]) -> None:
    for text in (t for group in texts for t in group):
        assert SECRET.decode() not in text and SECRET[:16].decode() not in text, text


def test_the_key_is_never_pickled_or_shown(tmp_path: Path) -> None:
    key = IntegrityKey(SECRET, "integrity_key_env KV_KEY")
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        copy.copy(key)
    assert not hasattr(key, "__dict__")
    store = TieredStore([DiskBackend(tmp_path, 4096)], integrity_key=key)
    _assert_secret_nowhere([repr(key), str(key), repr(store), repr(vars(store))])
    store.close()


# -- config errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, mode, must_name", [
    (None, 0o600, ["no such file"]),
    (SECRET, 0o644, ["readable or writable by group or others", "0644", "chmod 600"]),
    (SECRET, 0o640, ["group or others", "0640"]),
    (SECRET, 0o602, ["group or others", "0602"]),
    (b"", 0o600, ["empty"]),
    (b"\n", 0o600, ["empty"]),
    (b"fifteen bytes!!", 0o600, ["shorter than 16 bytes"]),
    ("dir", 0o700, ["not a regular file"]),
])
def test_bad_key_files_fail_naming_key_path_and_rule(tmp_path: Path, content: object, mode: int,
                                                     must_name: list[str]) -> None:
    path = tmp_path / "key"
    if content == "dir":
        path.mkdir(mode=mode)
    elif content is not None:
        _write_key(path, content, mode)
    config = _config(tmp_path, path)
    with pytest.raises(ConfigError) as info:
        build_store(config)
    message = str(info.value)
    for part in ["invalid kvtier config: integrity_key_file", repr(str(path)), *must_name]:
        assert part in message, f"{part!r} missing from: {message}"
    assert "fifteen" not in message and SECRET.decode() not in message


@pytest.mark.parametrize("value, must_name", [
    (None, ["KV_KEY", "not set"]),
    ("", ["KV_KEY", "empty"]),
    ("fifteen bytes!!", ["KV_KEY", "shorter than 16 bytes"]),
])
def test_bad_key_variables_fail_naming_it(tmp_path: Path, value: str | None, must_name: list[str]) -> None:
    config = load_config(overrides={"integrity_key_env": "KV_KEY"}, environ={})
    with pytest.raises(ConfigError) as info:
        load_integrity_key(config, environ={} if value is None else {"KV_KEY": value})
    message = str(info.value)
    for part in ["invalid kvtier config: integrity_key_env = 'KV_KEY'", *must_name]:
        assert part in message, f"{part!r} missing from: {message}"
    assert "fifteen" not in message


def test_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KV_KEY", SECRET.decode())
    config = load_config(overrides={"integrity_key_env": "KV_KEY", "tiers": [{"type": "cpu", "pinned": "never",
                                                                             "max_bytes": "1MiB"}]}, environ={})
    store = build_store(config)
    assert decode_chunk(_blob(1, store.integrity_key), _key(1), mac_key=KEY).header.mac
    assert SECRET.decode() not in config.model_dump_json() + repr(config)
    store.close()


def test_both_sources_or_a_secret_instead_of_a_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="integrity_key_file and integrity_key_env are both set: set at most one"):
        load_config(overrides={"integrity_key_env": "KV_KEY", "integrity_key_file": "/k"}, environ={})
    with pytest.raises(ConfigError) as info:  # the secret itself, put where its variable's name belongs
        load_config(overrides={"integrity_key_env": SECRET.decode()}, environ={})
    message = str(info.value)
    assert "integrity_key_env = (value not shown): must be the name of an environment variable" in message
    assert SECRET.decode() not in message and "horse" not in message
    with pytest.raises(ConfigError, match="integrity_key_file"):
        load_config(overrides={"integrity_key_file": ""}, environ={})


def test_check_config_reads_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _config(tmp_path, _write_key(tmp_path / "key", SECRET))
    assert cli_main(["check-config", str(tmp_path / "kvtier.yaml")]) == 0
    out = capsys.readouterr().out
    assert "integrity key: integrity_key_file" in out and "(read, ok)" in out and SECRET.decode() not in out
    os.chmod(tmp_path / "key", 0o644)
    assert cli_main(["check-config", str(tmp_path / "kvtier.yaml")]) == 2
    assert "group or others" in capsys.readouterr().err
