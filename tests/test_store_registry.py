"""The process-wide store registry: per-process metrics ports, shared-only stores, nothing leaked."""

from __future__ import annotations

import logging
import socket
import urllib.request
from pathlib import Path

import pytest

from kvtier.connector import store_registry
from kvtier.connector.config import load_config
from kvtier.connector.store_registry import StoreRegistry


def _config(tmp_path: Path, port: int):
    return load_config(overrides={"tiers": [{"type": "cpu", "max_bytes": "4MiB"},
                                            {"type": "disk", "path": str(tmp_path / "d")}],
                                  "metrics.port": port}, environ={})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_process_serves_on_its_offset_and_a_taken_port_is_skipped(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    base = _free_port() - 1  # the process at offset 1 serves on the port that was just free
    registry = StoreRegistry()
    config = _config(tmp_path, base)
    store, _ = registry.acquire(config, metrics_port_offset=1)  # e.g. the worker of rank 0
    with urllib.request.urlopen(f"http://127.0.0.1:{base + 1}/metrics", timeout=5) as reply:
        assert b"kvtier_used_bytes" in reply.read()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        other = _config(tmp_path, taken.getsockname()[1])
        with caplog.at_level(logging.WARNING):
            shared, _ = registry.acquire(other, shared_only=True)  # the port is taken: no error
        assert "cannot serve metrics" in caplog.text
    assert [t.name for t in shared.tiers] == ["disk"] and [t.name for t in store.tiers] == ["cpu", "disk"]
    registry.release(other, shared_only=True)
    registry.release(config)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{base + 1}/metrics", timeout=2)


def test_a_port_past_the_range_is_logged_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = StoreRegistry()
    config = _config(tmp_path, 65535)
    with caplog.at_level(logging.WARNING):
        registry.acquire(config, metrics_port_offset=3)
    assert "past 65535" in caplog.text
    registry.release(config)


def test_a_store_is_closed_when_its_set_up_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing may keep a store nobody holds: a failure after the tiers were built closes them."""
    built = []
    real_build = store_registry.build_store

    def build(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    def fail(*args, **kwargs):
        raise RuntimeError("metrics exporter broke")

    monkeypatch.setattr(store_registry, "build_store", build)
    monkeypatch.setattr(store_registry, "serve_metrics", fail)
    registry = StoreRegistry()
    with pytest.raises(RuntimeError, match="exporter broke"):
        registry.acquire(_config(tmp_path, _free_port()))
    assert built and built[0].tiers[0].capacity_bytes == 0  # the cpu tier's pool was released
    assert registry.stats() == {}
