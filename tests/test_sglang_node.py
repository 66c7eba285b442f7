"""SGLang's storage backend (KVTierHiCacheStorage, built by SGLang's own factory) with the node tier:
pages that one process stores through ``batch_set_v1`` are found (``batch_exists``) and loaded
byte-exact (``batch_get_v1``) by a backend in another process, through one ``kvtier server``.

As in test_sglang_backend.py, CPU tensors in SGLang's host layouts stand in for the host pools (they
need a GPU in SGLang). The reading backends run in a child process (this file run as a script), so
nothing is shared with the writer but the server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_sglang_backend as sgl
import torch
from node_server_proc import NodeServerProcess
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
from sglang.srt.mem_cache.utils import get_hash_str
from test_sglang_backend import PAGE, SLOTS, HostPool, host_pages, make_pool, page_kv, same_bits, tokens_of

RETRY_S = 0.2


@pytest.fixture
def node() -> Iterator[NodeServerProcess]:
    folder = tempfile.mkdtemp(prefix="kvn-", dir="/tmp")  # a Unix socket path has at most 107 bytes
    try:
        with NodeServerProcess(str(Path(folder) / "node.sock"), max_bytes="64MiB", slot_bytes="64KiB") as server:
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def config_file(tmp_path: Path, node) -> Path:
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"chunk_size: {PAGE}\ntiers:\n  - {{type: node, socket: '{node.socket_path}', "
                    f"connect_timeout_s: 0.3, op_timeout_s: 2, retry_interval_s: {RETRY_S}}}\n")
    return path


def build_backend(pool, config: Path, **kwargs):
    """A backend as SGLang's ``attach_storage_backend`` builds it."""
    backend = StorageBackendFactory.create_backend("dynamic", sgl.storage_config({"config": str(config)}, **kwargs), pool)
    backend.register_mem_pool_host(pool)
    return backend


@pytest.fixture
def backends():
    made = []

    def build(pool, config: Path, **kwargs):
        backend = build_backend(pool, config, **kwargs)
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()


def read_in_another_process(config: Path, reads: list[dict], tmp_path: Path) -> list[dict]:
    """Run each read (a fresh backend over an empty pool: batch_exists, then batch_get_v1 into host
    pages) in one child process; per read: the count, the flags and the pool it filled."""
    job = tmp_path / "reads.json"
    job.write_text(json.dumps({"config": str(config), "reads": reads, "out": str(tmp_path)}))
    done = subprocess.run([sys.executable, __file__, str(job)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(done.stdout.splitlines()[-1])
    for i, (read, result) in enumerate(zip(reads, results)):
        result["pool"] = HostPool(torch.load(tmp_path / f"pool{i}.pt"), read["layout"], read["kind"] == "mla")
    return results


@pytest.mark.slow  # the child process imports SGLang and torch (about 10 s)
def test_pages_stored_in_one_process_load_byte_exact_in_another(backends, config_file: Path, tmp_path: Path) -> None:
    keys = get_hash_str(tokens_of(3), page_size=PAGE)
    src = make_pool("mha", "page_first", 1)
    assert backends(src, config_file).batch_set_v1(keys, host_pages([5, 2, 9])) == [True] * 3
    rank0, rank1 = make_pool("mha", "layer_first", 2), make_pool("mha", "layer_first", 3)  # a TP=2 engine
    tp_keys = get_hash_str(tokens_of(2, start=5000), page_size=PAGE)
    assert backends(rank0, config_file, tp_size=2, tp_rank=0).batch_set_v1(tp_keys, host_pages([1, 4])) == [True] * 2
    assert backends(rank1, config_file, tp_size=2, tp_rank=1).batch_set_v1(tp_keys, host_pages([7, 3])) == [True] * 2
    mla = make_pool("mla", "page_first", 4)
    assert backends(mla, config_file, mla=True).batch_set_v1(keys[:2], host_pages([6, 0])) == [True] * 2

    reads = [
        {"kind": "mha", "layout": "page_first", "keys": keys, "pages": [0, 11, 3]},
        {"kind": "mha", "layout": "layer_first", "keys": keys, "pages": [8, 1, 14]},  # another host layout
        {"kind": "mha", "layout": "page_first", "keys": [*keys[:2], "0" * 64], "pages": [2, 3, 4]},
        {"kind": "mha", "layout": "layer_first", "keys": tp_keys, "pages": [9, 10], "tp_size": 2, "tp_rank": 1},
        {"kind": "mha", "layout": "layer_first", "keys": tp_keys, "pages": [0, 2], "tp_size": 2, "tp_rank": 0},
        {"kind": "mha", "layout": "layer_first", "keys": tp_keys, "pages": [0, 2]},  # TP=1: other keys
        {"kind": "mla", "layout": "page_first_direct", "keys": keys[:2], "pages": [5, 12], "tp_size": 4, "tp_rank": 3},
    ]
    full, cross, partial, tp1, tp0, unsharded, latent = read_in_another_process(config_file, reads, tmp_path)

    assert (full["exists"], full["got"]) == (3, [True] * 3)
    assert same_bits(page_kv(full["pool"], host_pages([0, 11, 3])), page_kv(src, host_pages([5, 2, 9])))
    untouched = torch.ones(SLOTS, dtype=torch.bool)
    untouched[host_pages([0, 11, 3])] = False
    assert not page_kv(full["pool"], torch.arange(SLOTS)[untouched]).any()
    assert (cross["exists"], cross["got"]) == (3, [True] * 3)
    assert same_bits(page_kv(cross["pool"], host_pages([8, 1, 14])), page_kv(src, host_pages([5, 2, 9])))
    assert (partial["exists"], partial["got"]) == (2, [True, True, False])
    assert not page_kv(partial["pool"], host_pages([4])).any()
    assert (tp1["exists"], tp1["got"]) == (2, [True] * 2)
    assert same_bits(page_kv(tp1["pool"], host_pages([9, 10])), page_kv(rank1, host_pages([7, 3])))
    assert (tp0["exists"], tp0["got"]) == (2, [True] * 2)
    assert same_bits(page_kv(tp0["pool"], host_pages([0, 2])), page_kv(rank0, host_pages([1, 4])))
    assert (unsharded["exists"], unsharded["got"]) == (0, [False] * 2)
    assert (latent["exists"], latent["got"]) == (2, [True] * 2)  # MLA: one copy for every TP size and rank
    assert same_bits(page_kv(latent["pool"], host_pages([5, 12])), page_kv(mla, host_pages([6, 0])))


def test_a_dead_server_gives_misses_and_falses_then_the_backend_recovers(backends, config_file: Path,
                                                                         node) -> None:
    keys = get_hash_str(tokens_of(2, start=9000), page_size=PAGE)
    src, dst = make_pool("mha", "page_first", 1), make_pool("mha", "page_first", None)
    writer, reader = backends(src, config_file), backends(dst, config_file)
    assert writer.batch_set_v1(keys, host_pages([0, 1])) == [True] * 2
    node.kill()
    assert reader.batch_exists(keys) == 0
    assert reader.batch_get_v1(keys, host_pages([2, 3])) == [False] * 2
    assert writer.batch_set_v1(keys, host_pages([0, 1])) == [False] * 2
    assert not dst.kv_buffer.any()
    node.start()
    deadline = time.monotonic() + 10
    while writer.batch_set_v1(keys, host_pages([0, 1])) != [True] * 2:  # after the tier's retry interval
        assert time.monotonic() < deadline, "the backend did not store again within 10 s of the restart"
        time.sleep(RETRY_S)
    assert reader.batch_exists(keys) == 2
    assert reader.batch_get_v1(keys, host_pages([2, 3])) == [True] * 2
    assert same_bits(page_kv(dst, host_pages([2, 3])), page_kv(src, host_pages([0, 1])))


def _child(job_file: str) -> None:
    """The reading process: one backend per read, each over a pool of its own."""
    job = json.loads(Path(job_file).read_text())
    results = []
    for i, read in enumerate(job["reads"]):
        pool = make_pool(read["kind"], read["layout"], None)
        backend = build_backend(pool, Path(job["config"]), mla=read["kind"] == "mla",
                                tp_size=read.get("tp_size", 1), tp_rank=read.get("tp_rank", 0))
        try:
            exists = backend.batch_exists(read["keys"])
            got = backend.batch_get_v1(read["keys"], host_pages(read["pages"]))
        finally:
            backend.close()
        torch.save(pool.kv_buffer, Path(job["out"]) / f"pool{i}.pt")
        results.append({"exists": exists, "got": got})
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1])
