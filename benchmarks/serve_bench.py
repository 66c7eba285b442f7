"""kvtier under real traffic: an OpenAI server (``vllm serve``) driven by vLLM's own load generator
(``vllm bench serve``), with and without kvtier, on the same model and cores.

Variants (``--variants``): **baseline** (plain ``vllm serve``, vLLM's own prefix cache on, as by
default), **kvtier-always** (the same plus ``--kv-transfer-config`` with ``KVTierConnector`` and
kvtier's default config: tiers cpu over disk, the disk folder in this run's work folder, ``save_policy:
always``, every prompt stored) and **kvtier-on-reuse** (the same with ``save_policy: on_reuse``: a
chunk stored once an earlier request shared it). ``vllm serve`` runs its worker in a process of its own, so kvtier's scheduler looks up in the
disk tier and the cpu tier is the worker's read cache, as kvtier logs at start-up. Each kvtier
variant has a store of its own. Workloads (``--workloads``):

- **no-reuse**: random prompts of ``--input-len`` tokens that share nothing, each run with a seed and
  an empty store of its own (the model's small vocabulary makes vLLM's random prompts recur across
  runs now and then): what kvtier's lookups and stores cost;
- **shared-prefix**: random prompts that start with one common ``--prefix-len``-token prefix (a
  system prompt), the rest random; a fresh server each time, so the first requests compute it;
- **restart**: a fresh server, the shared-prefix run's prompts again; the kvtier server starts over
  the disk store that the shared-prefix run left (a warm start), the baseline is simply a fresh
  baseline server.

Every run is its own server process (``examples/vllm_serve.py serve``, its own process group, one
warm-up request of 24 tokens), then one ``vllm bench serve`` (``--dataset-name random``,
``--max-concurrency``, ``--ignore-eos``, greedy) whose ``--save-result`` JSON is read back. Each
round runs every workload with baseline and kvtier alternately, the order rotating per round. The
tables show per round requests/s, output tokens/s, mean and median TTFT, prompt tokens from vLLM's
prefix cache and from kvtier (the server's ``/metrics`` counters, the warm-up left out), the chunks
in the variant's disk folder after the run, the CPU seconds per request of the server's processes,
and each kvtier variant's ratios to the baseline per round and their median. A run during which other processes used more than ``NOISY`` cores is
flagged (``*``). The model is ``ttft_bench.py``'s random float32 Llama, built once into ``--model-dir``;
the engine's OpenMP threads are bound as there (``VLLM_CPU_OMP_THREADS_BIND``). Exits non-zero if
a server does not come up, a request fails, or the kvtier restart run loads nothing from kvtier.

    python benchmarks/serve_bench.py                          # 3 rounds, 32 prompts per run
    python benchmarks/serve_bench.py --rounds 1 --num-prompts 8 --output-len 16 --workloads no-reuse
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from engine_profile import GroupProfile, group_stats, summarize  # noqa: E402
from ttft_bench import BLOCK, CHILD_ENV, CHUNK, NOISY, SETTLE_S, cpu_busy_s, machine, wait_for_quiet  # noqa: E402

from kvtier.connector.config import default_config_text  # noqa: E402
from kvtier.storage_backends.disk_backend import summarize_disk  # noqa: E402
from kvtier.tiny_model import BENCH_SPEC, make_tiny_llama, prompt_text  # noqa: E402

LAUNCHER = Path(__file__).resolve().parents[1] / "examples" / "vllm_serve.py"
VARIANTS = ("baseline", "kvtier-always", "kvtier-on-reuse")
SAVE_POLICY = {"kvtier-always": "always", "kvtier-on-reuse": "on_reuse"}
WORKLOADS = ("no-reuse", "shared-prefix", "restart")
# The engine as ttft_bench runs it, but with vLLM's engine-core process as ``vllm serve`` has it.
SERVER_ENV = {k: v for k, v in CHILD_ENV.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
# --shutdown-timeout: vLLM's default (0) kills the engine processes at once on SIGTERM, before kvtier's
# worker flushes its queued writes; with a grace period they shut down and flush (idle: no delay).
SERVER_ARGS = ("--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", str(1 << 30), "--seed", "0",
               "--shutdown-timeout", "30")
# (key in vllm bench serve's result JSON, column, number format)
METRICS = (("request_throughput", "req/s", ".3f"), ("output_throughput", "out tok/s", ".1f"),
           ("mean_ttft_ms", "mean TTFT ms", ".0f"), ("median_ttft_ms", "median TTFT ms", ".0f"))
HITS = {"local": "vllm:prefix_cache_hits", "kvtier": "vllm:external_prefix_cache_hits"}


class BenchError(SystemExit):
    """A failure that ends the benchmark: a message (with log tails) and exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(f"FAIL: {message}")


@dataclass
class Run:
    """One server process and one ``vllm bench serve`` against it."""

    workload: str
    round: int
    variant: str
    seed: int
    result: dict[str, Any]
    hits: dict[str, float]  # prompt tokens not computed: vLLM's prefix cache, kvtier (warm-up excluded)
    foreign_s: float  # CPU seconds other processes used while the client ran
    wall_s: float  # the client's wall time
    store_chunks: int | None  # chunks in kvtier's disk folder after the run (kvtier only)
    server_cpu_s: float = 0.0  # CPU seconds the server's processes used while the client ran

    @property
    def noisy(self) -> bool:
        return self.foreign_s > max(NOISY * self.wall_s, 0.03)


# -- processes ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return f"--- last lines of {path} ---\n{text[-chars:]}"


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 10) -> tuple[int, str]:
    """GET (or POST ``body`` as JSON) on the loopback; status and text of the answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 (loopback)
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def stop(proc: subprocess.Popen) -> None:
    """End a server: SIGTERM to its API server, which stops its engine processes (kvtier flushes);
    after 60 s, and for anything of its process group that outlived it, SIGKILL to the group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            print(f"WARN: server {proc.pid} still running 60 s after SIGTERM; killing it", file=sys.stderr)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing of the group left
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        print(f"WARN: server process {proc.pid} did not end after SIGKILL", file=sys.stderr)


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float) -> float:
    """Seconds until ``/health`` answers 200; fails if the server exits or ``timeout`` passes."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if proc.poll() is not None:
            raise BenchError(f"the server exited with {proc.returncode} before it came up\n{tail(log)}")
        try:
            if http(f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                return time.monotonic() - began
        except OSError:
            pass
        time.sleep(0.5)
    raise BenchError(f"the server did not come up within {timeout:g} s\n{tail(log)}")


@contextmanager
def serving(argv: list[str], port: int, log: Path, timeout: float) -> Iterator[subprocess.Popen]:
    """A ``vllm serve`` in a session (process group) of its own, healthy; stopped at exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(LAUNCHER), *argv], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **SERVER_ENV}, start_new_session=True)
    try:
        up = wait_healthy(proc, port, log, timeout)
        print(f"    server up in {up:.0f} s", file=sys.stderr, flush=True)
        yield proc
    finally:
        began = time.monotonic()
        stop(proc)
        print(f"    server stopped in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of the live processes in process group ``pgid`` and of the
    children they have waited for."""
    ticks = sum(sum(int(f) for f in fields[11:15]) for _, _, fields in group_stats(pgid))  # [cs]utime, [cs]stime
    return ticks / os.sysconf("SC_CLK_TCK")


def counters(port: int) -> dict[str, float]:
    """vLLM's prefix-cache hit counters (tokens) from the server's Prometheus ``/metrics``."""
    status, text = http(f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        raise BenchError(f"GET /metrics answered {status}")
    out = {}
    for key, name in HITS.items():
        pattern = re.compile(rf"^{re.escape(name)}(?:_total)?(?:\{{[^}}]*\}})? (\S+)$")
        out[key] = sum(float(m.group(1)) for line in text.splitlines() if (m := pattern.match(line)))
    return out


# -- one run --------------------------------------------------------------------------------------

def kvtier_transfer_config(work: Path, store: Path, save_policy: str, name: str) -> dict[str, Any]:
    """``--kv-transfer-config`` for kvtier: its default config (cpu over disk) with the disk tier in
    ``store`` and ``save_policy``; the YAML written into ``work`` as ``<name>.yaml``."""
    config = yaml.safe_load(default_config_text())
    for tier in config["tiers"]:
        if tier["type"] == "disk":
            tier["path"] = str(store)
    config["save_policy"] = save_policy
    if config["chunk_size"] != CHUNK:
        raise BenchError(f"kvtier's default chunk_size is {config['chunk_size']}, this benchmark assumes {CHUNK}")
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.connector.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": {"config": str(path)}}


def server_argv(model: Path, port: int, max_len: int, kv: dict[str, Any] | None) -> list[str]:
    argv = ["serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_len),
            *SERVER_ARGS]
    return argv + (["--kv-transfer-config", json.dumps(kv)] if kv else [])


def client_argv(args: argparse.Namespace, model: Path, port: int, workload: str, seed: int,
                result: Path) -> list[str]:
    """``vllm bench serve``: the random dataset, greedy, every request to its full output length."""
    prefix = 0 if workload == "no-reuse" else args.prefix_len
    return ["bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
            "--model", str(model), "--tokenizer", str(model), "--dataset-name", "random",
            "--random-input-len", str(args.input_len - prefix), "--random-prefix-len", str(prefix),
            "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
            "--max-concurrency", str(args.concurrency), "--seed", str(seed), "--ignore-eos",
            "--temperature", "0", "--disable-tqdm", "--save-result", "--result-dir", str(result.parent),
            "--result-filename", result.name]


def run_client(argv: list[str], result: Path, log: Path, server_log: Path, timeout: float) -> dict[str, Any]:
    """Run ``vllm bench serve``; its result JSON. Fails on a non-zero exit or a failed request."""
    with open(log, "wb") as out:
        try:
            done = subprocess.run([sys.executable, str(LAUNCHER), *argv], stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"vllm bench serve ran past {timeout:g} s\n{tail(log)}\n{tail(server_log)}") from None
    if done.returncode != 0 or not result.exists():
        raise BenchError(f"vllm bench serve exited with {done.returncode}\n{tail(log)}\n{tail(server_log)}")
    data = json.loads(result.read_text())
    if data.get("failed", 0) or data.get("completed") != data.get("num_prompts"):
        raise BenchError(f"{data.get('failed')} of {data.get('num_prompts')} requests failed "
                         f"({data.get('completed')} completed; result {result})\n{tail(log)}\n{tail(server_log)}")
    return data


def one_run(args: argparse.Namespace, model: Path, work: Path, workload: str, rnd: int, variant: str) -> Run:
    """Start a server of ``variant``, warm it up, run the client once, stop the server."""
    seed = args.seed + 1000 * rnd + (1 if workload == "no-reuse" else 2)  # restart: shared-prefix's prompts
    name = f"r{rnd}-{workload}-{variant}"
    print(f"  round {rnd}: {workload}, {variant} (seed {seed}) ...", file=sys.stderr, flush=True)
    port, logs = free_port(), work / "logs"
    server_log, client_log, result = logs / f"{name}.server.log", logs / f"{name}.client.log", work / f"{name}.json"
    # no-reuse: an empty store per run; shared-prefix and restart: one store per variant, kept between them
    store = work / (f"store-{name}" if workload == "no-reuse" else f"store-{variant}")
    kv = kvtier_transfer_config(work, store, SAVE_POLICY[variant], variant) if variant != "baseline" else None
    max_len = args.input_len + args.output_len + 64  # room for a prompt that re-tokenizes longer
    with serving(server_argv(model, port, max_len, kv), port, server_log, args.server_timeout) as proc:
        warmup = {"model": str(model), "prompt": prompt_text(24, seed=1, vocab=BENCH_SPEC.vocab), "max_tokens": 1}
        status, text = http(f"http://127.0.0.1:{port}/v1/completions", warmup, timeout=300)
        if status != 200:
            raise BenchError(f"the warm-up request answered {status}: {text[:500]}\n{tail(server_log)}")
        wait_for_quiet()
        before = counters(port)
        busy, server_cpu, own, began = cpu_busy_s(), group_cpu_s(proc.pid), sum(os.times()[:2]), time.monotonic()
        client_cpu = _children_cpu_s()
        with GroupProfile(proc.pid, work / "profiles", name) if args.profile else contextlib.nullcontext():
            data = run_client(client_argv(args, model, port, workload, seed, result), result, client_log, server_log,
                              args.client_timeout)
        wall = time.monotonic() - began
        server_used = group_cpu_s(proc.pid) - server_cpu
        ours = server_used + (_children_cpu_s() - client_cpu) + (sum(os.times()[:2]) - own)
        foreign = max(0.0, cpu_busy_s() - busy - ours)
        after = counters(port)
        time.sleep(SETTLE_S)  # kvtier's background writes land before the server stops (it flushes too)
    chunks = summarize_disk(store).chunks if kv and store.is_dir() else None
    if workload == "no-reuse":
        shutil.rmtree(store, ignore_errors=True)
    run = Run(workload, rnd, variant, seed, data, {k: after[k] - before[k] for k in HITS}, foreign, wall, chunks,
              server_used)
    print(f"    {data['completed']} requests, {data['request_throughput']:.3f} req/s, mean TTFT "
          f"{data['mean_ttft_ms']:.0f} ms, hits local {run.hits['local']:.0f} / kvtier {run.hits['kvtier']:.0f} "
          f"tokens", file=sys.stderr, flush=True)
    return run


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(args: argparse.Namespace, model: Path, work: Path) -> list[Run]:
    """Every round: every workload (in ``WORKLOADS`` order), every variant, the order rotating per round."""
    workloads = [w for w in WORKLOADS if w in args.workloads]
    variants = [v for v in VARIANTS if v in args.variants]
    runs = []
    for rnd in range(args.rounds):
        shift = rnd % len(variants)
        order = variants[shift:] + variants[:shift]
        for workload in workloads:
            runs += [one_run(args, model, work, workload, rnd, variant) for variant in order]
    return runs


# -- report ---------------------------------------------------------------------------------------

def run_table(runs: list[Run]) -> list[str]:
    """One row per run: the client's figures and where the prompt tokens came from."""
    head = ["round", "variant", "seed", *(label for _, label, _ in METRICS), "done / failed",
            "prompt tok", "vLLM prefix-cache tok", "kvtier tok", "store chunks", "server CPU s / req"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in sorted(runs, key=lambda r: (r.round, VARIANTS.index(r.variant))):
        data = run.result
        cells = [str(run.round), run.variant + (" *" if run.noisy else ""), str(run.seed),
                 *(format(data[key], fmt) for key, _, fmt in METRICS), f"{data['completed']} / {data['failed']}",
                 str(data["total_input_tokens"]), f"{run.hits['local']:.0f}", f"{run.hits['kvtier']:.0f}",
                 "-" if run.store_chunks is None else str(run.store_chunks),
                 f"{run.server_cpu_s / max(1, data['completed']):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratio_table(runs: list[Run]) -> list[str]:
    """Each kvtier variant / baseline per metric: one column per round, then the median over rounds."""
    by = {(r.round, r.variant): r for r in runs}
    rounds = sorted({r.round for r in runs})
    lines = ["| ratio | " + " | ".join(f"round {r}" for r in rounds) + " | median |",
             "|---|" + "---|" * (len(rounds) + 1)]
    for variant in (v for v in VARIANTS[1:] if any(r.variant == v for r in runs)):
        for key, label, _ in METRICS:
            pairs = [(by[(r, variant)], by[(r, "baseline")]) for r in rounds if (r, variant) in by and (r, "baseline") in by]
            ratios = [a.result[key] / b.result[key] for a, b in pairs]
            cells = [f"{x:.3f}" for x in ratios] + [f"**{statistics.median(ratios):.3f}**" if ratios else "-"]
            lines.append(f"| {variant} / baseline: {label} | " + " | ".join(cells) + " |")
    return lines


def describe(args: argparse.Namespace, workload: str) -> str:
    shape = (f"{args.input_len} tokens" if workload == "no-reuse"
             else f"{args.prefix_len} shared + {args.input_len - args.prefix_len} random tokens")
    what = {"no-reuse": "nothing shared, a seed of its own per run",
            "shared-prefix": "one common prefix, fresh servers",
            "restart": "the shared-prefix prompts again on fresh servers; kvtier over the store that run left"}
    return (f"### {workload}: {args.num_prompts} prompts of {shape}, {args.output_len} output tokens, "
            f"concurrency {args.concurrency} ({what[workload]})")


def report(args: argparse.Namespace, runs: list[Run]) -> str:
    parts = []
    for workload in (w for w in WORKLOADS if w in args.workloads):
        mine = [r for r in runs if r.workload == workload]
        parts += ["", describe(args, workload), "", *run_table(mine), "", *ratio_table(mine)]
    return "\n".join(parts)


def checks(runs: list[Run]) -> tuple[list[str], list[str]]:
    """FAIL lines (a kvtier restart run that loaded nothing from kvtier) and WARN lines (kvtier hits
    where nothing can hit, kvtier hits in a baseline, runs other processes disturbed)."""
    fails = [f"FAIL: round {r.round}, restart: the {r.variant} server loaded no prompt token from kvtier"
             for r in runs if r.workload == "restart" and r.variant != "baseline" and r.hits["kvtier"] <= 0]
    warns = [f"WARN: round {r.round}, {r.workload}, {r.variant}: {r.hits['kvtier']:.0f} tokens from kvtier"
             for r in runs if r.hits["kvtier"] > 0 and (r.variant == "baseline" or r.workload != "restart")]
    warns += [f"WARN: round {r.round}, {r.workload}, {r.variant}: other processes used {r.foreign_s:.1f} CPU s "
              f"in {r.wall_s:.0f} s" for r in runs if r.noisy]
    return fails, warns


# -- main -----------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=32, help="requests per run")
    parser.add_argument("--input-len", type=int, default=1152, help="prompt tokens (the shared prefix included)")
    parser.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix / restart: common prefix tokens")
    parser.add_argument("--output-len", type=int, default=16, help="generated tokens per request (EOS ignored)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (--max-concurrency)")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions; baseline/kvtier order rotates")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="baseline is always run (the ratios' denominator)")
    parser.add_argument("--seed", type=int, default=0, help="base of the per-run dataset seeds")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "kvtier-ttft-llama",
                        help="where the random Llama is built (once; shared with ttft_bench.py)")
    parser.add_argument("--work-dir", type=Path, help="logs and result JSON (default: a new temporary folder, kept)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy every server process during each client run (engine_profile.py)")
    parser.add_argument("--server-timeout", type=float, default=600, help="seconds for a server to come up")
    parser.add_argument("--client-timeout", type=float, default=1800, help="seconds for one vllm bench serve")
    args = parser.parse_args()
    if not 0 < args.prefix_len < args.input_len:
        parser.error("--prefix-len must be between 0 and --input-len (exclusive)")
    if args.input_len + args.output_len + 64 > BENCH_SPEC.max_positions:
        parser.error(f"--input-len + --output-len must stay below {BENCH_SPEC.max_positions - 64}")
    if "restart" in args.workloads and "shared-prefix" not in args.workloads:
        parser.error("the restart workload reuses the store of the shared-prefix runs: add shared-prefix")
    if "baseline" not in args.variants:
        args.variants = ["baseline", *args.variants]
    if min(args.num_prompts, args.output_len, args.concurrency, args.rounds) < 1:
        parser.error("--num-prompts, --output-len, --concurrency and --rounds must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: servers get stopped
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kvtier-serve-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = " ".join(f"{k}={v}" for k, v in SERVER_ENV.items() if k != "PYTHONUNBUFFERED")
    print(f"# serve_bench on {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n# command: python "
          f"{' '.join(sys.argv)}\n# model: random Llama {BENCH_SPEC}, float32; vLLM block {BLOCK}, kvtier chunk "
          f"{CHUNK}; env {env}\n# server: vllm serve MODEL {' '.join(SERVER_ARGS)} (prefix caching: vLLM's "
          f"default, on); kvtier-*: kvtier's default config, tiers cpu + disk (disk in the work folder), save_policy always or on_reuse\n# client: vllm bench "
          f"serve --backend vllm --dataset-name random --ignore-eos --temperature 0; logs and results in {work}",
          flush=True)
    model = make_tiny_llama(args.model_dir, BENCH_SPEC)
    began = time.monotonic()
    try:
        runs = measure(args, model, work)
    finally:
        for store in work.glob("store-*"):
            shutil.rmtree(store, ignore_errors=True)
    print(report(args, runs))
    fails, warns = checks(runs)
    print("\n".join(warns) or f"noise: other processes used < {NOISY} cores in every run; no unexpected kvtier hits")
    restart = "; the kvtier restart runs loaded from kvtier" if "restart" in args.workloads else ""
    print("\n".join(fails) or f"checks: every request completed{restart}")
    if args.profile:
        print("\n".join(summarize(path) for path in sorted((work / "profiles").glob("*.txt"))))
    print(f"total {time.monotonic() - began:.0f} s for {len(runs)} runs")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
