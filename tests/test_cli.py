"""The kvtier command: inspect a disk folder and a Redis namespace, run the demo."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.chunk_format.codec import encode_chunk
from kvtier.cli import main
from kvtier.storage_backends.disk_backend import DiskBackend
from kvtier.storage_backends.redis_backend import RedisBackend


def _items(model: str, n: int) -> list[tuple[str, bytearray]]:
    keys = [hashlib.sha256(f"{model}{i}".encode()).hexdigest() for i in range(n)]
    return [(k, encode_chunk(k, "bfloat16", (8,), "vllm-nhd", model, 4, bytes(16))) for k in keys]


def test_inspect_disk_and_redis(tmp_path: Path, redis_server, capsys: pytest.CaptureFixture[str]) -> None:
    disk = DiskBackend(tmp_path / "d", 1 << 20)
    disk.put(_items("llama-a", 3) + _items("qwen-b", 2))
    (tmp_path / "d" / "ab").mkdir(exist_ok=True)
    (tmp_path / "d" / "ab" / ("ab" * 32 + ".kvc")).write_bytes(b"not a chunk")
    remote = RedisBackend(redis_server.url)
    remote.put(_items("llama-a", 4))
    assert main(["inspect", "--disk", str(tmp_path / "d"), "--redis", redis_server.url]) == 0
    out = capsys.readouterr().out
    assert "llama-a (3)" in out and "qwen-b (2)" in out and "llama-a (4)" in out
    assert "vllm-nhd" in out


def test_inspect_reads_the_tiers_of_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    DiskBackend(tmp_path / "d", 1 << 20).put(_items("m", 2))
    config = tmp_path / "c.yaml"
    config.write_text(f"tiers: [{{type: cpu}}, {{type: disk, path: {tmp_path / 'd'}, max_bytes: 1MiB}}]\n")
    assert main(["inspect", "--config", str(config)]) == 0
    assert "m (2)" in capsys.readouterr().out


def test_inspect_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--disk", str(tmp_path / "absent")]) == 1
    assert main(["inspect", "--redis", "redis://:secret@127.0.0.1:1/0"]) == 1
    err = capsys.readouterr().err
    assert "absent" in err and "secret" not in err


def test_tier_demo_stores_and_loads_back_byte_exact(tmp_path: Path) -> None:
    env = {"KVTIER_DISK__PATH": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "demo", "--tiers-only"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("yes") == 2 and "4096" in done.stdout
    assert any((tmp_path / "cache").rglob("*.kvc"))


def test_engine_demo_shows_hits_from_memory_and_disk(tmp_path: Path) -> None:
    """The README's first command: real vLLM engines with the built-in tiers."""
    env = {**os.environ, "HOME": str(tmp_path), "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "demo"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("2047 / 2048") == 2 and "DIFFERENT" not in done.stdout
    assert "skipped 2047 of 2048 prompt tokens" in done.stdout
    assert any((tmp_path / ".cache" / "kvtier").rglob("*.kvc"))  # the built-in disk tier
