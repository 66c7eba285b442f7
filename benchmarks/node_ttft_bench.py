"""The node tier with vLLM on CPU: warm TTFT in a fresh engine process, and host memory per node.

**TTFT** (default): one run times, for each prompt length and round,
- cold: plain vLLM (prefix caching off);
- kvtier cpu warm: the in-process cpu tier, the repeat in the process that stored (2 s later);
- kvtier disk warm: a fresh process loading what another process stored on disk (page cache);
- kvtier node warm: a fresh process loading what another process stored in the node server, and
  the storing process's own repeat 2 s later (the node tier without the cost of a fresh process);
and reports the ratios node / cpu, node / disk and node / cold per round (and node same-process /
cpu, node fresh / node same-process, which tell the tier's cost from the fresh process's). Engines, TTFT, warm-up,
noise control and checks are ``ttft_bench.py``'s (its child runs every engine; the server's CPU
counts as part of a load, not as noise). Every round uses prompts of its own, so no storing run hits.

**Memory** (``--memory``): two engine processes side by side, each having sent the same prompts, with
(a) no kvtier, (b) a cpu tier each (``max_bytes`` = the server's ``--max-bytes``), (c) one node tier (one
server). While both engines wait, it reads
``/proc/<pid>/smaps_rollup`` of both engines and the server, and the bytes the server's segment files
hold in ``/dev/shm``. Memory used once per node = the processes' PSS without their shared-memory part
(``Pss - Pss_Shmem``) + the segment files' bytes (shared memory counted once, mapped or not).

    python benchmarks/node_ttft_bench.py --tokens 2048 4096 --rounds 2
    python benchmarks/node_ttft_bench.py --memory --tokens 2048 --prompts 4 --server-max-bytes 256MiB
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from node_bench import node_server  # noqa: E402
from ttft_bench import (  # noqa: E402
    BLOCK,
    CHILD_ENV,
    CHUNK,
    NOISY,
    Timed,
    machine,
    one_tier_config,
    run_child,
    wait_for_quiet,
)

from kvtier.tiny_model import BENCH_SPEC, prompt_text  # noqa: E402

TIERS = ("cpu", "disk", "node")
LABELS = {"cold": "cold (plain vLLM)", "cpu": "kvtier cpu warm (same process)",
          "disk": "kvtier disk warm (fresh process)", "node": "kvtier node warm (fresh process)",
          "node same": "kvtier node warm (same process, 2 s after storing)",
          "cpu store": "kvtier cpu, storing run", "disk store": "kvtier disk, storing run",
          "node store": "kvtier node, storing run"}
RATIOS = (("node", "cpu"), ("node", "disk"), ("node", "cold"), ("disk", "cpu"), ("node same", "cpu"),
          ("node", "node same"))
WARM = ("cpu", "disk", "node", "node same")


def kv_config(folder: Path, tier: str, socket_path: str, cpu_bytes: str = "2GiB") -> dict[str, Any]:
    tiers = {"cpu": f"{{type: cpu, max_bytes: {cpu_bytes}}}",
             "disk": f"{{type: disk, path: '{folder / 'disk'}', max_bytes: 8GiB}}",
             "node": f"{{type: node, socket: '{socket_path}'}}"}
    return one_tier_config(folder, tier, tiers[tier])


# -- TTFT ---------------------------------------------------------------------------------------------

def measure_ttft(model: Path, token_counts: list[int], rounds: int, folder: Path, socket_path: str,
                 server_pid: int) -> list[dict[str, list[Timed]]]:
    """Per round: ``name -> one Timed per prompt length``."""
    out = []
    for r in range(rounds):
        base = {"model": str(model), "max_len": max(token_counts) + 16, "kv": None, "prefix_caching": False,
                "redis_port": None, "server_pids": [server_pid],
                "prompts": [prompt_text(n, seed=5000 + 100 * r + n, vocab=BENCH_SPEC.vocab) for n in token_counts]}

        def job(name: str, repeats: int = 1, retries: int = 2, r: int = r, base: dict = base,
                **overrides: Any) -> list[list[Timed]]:
            print(f"  round {r}: {name} ...", file=sys.stderr, flush=True)
            return run_child({**base, "name": name, "repeats": repeats, **overrides}, retries)

        got: dict[str, list[Timed]] = {}
        groups = ["cold", *TIERS]
        for group in groups[r % 4:] + groups[: r % 4]:  # the order rotates from round to round
            if group == "cold":
                got["cold"] = [p[0] for p in job("cold")]
            elif group == "cpu":
                cpu = job("kvtier cpu", repeats=2, kv=kv_config(folder, "cpu", socket_path))
                got["cpu store"], got["cpu"] = [p[0] for p in cpu], [p[1] for p in cpu]
            else:
                kv = kv_config(folder, group, socket_path)
                if group == "node":  # the storing process repeats too: the tier alone, without a fresh process
                    stored = job("node store + repeat", repeats=2, retries=0, kv=kv)
                    got["node store"], got["node same"] = [p[0] for p in stored], [p[1] for p in stored]
                else:
                    got[f"{group} store"] = [p[0] for p in job(f"{group} store", retries=0, kv=kv)]
                got[group] = [p[0] for p in job(f"{group} load (fresh process)", kv=kv)]
        out.append(got)
    return out


def ttft_report(results: list[dict[str, list[Timed]]], token_counts: list[int]) -> tuple[str, list[str]]:
    head = "| round | configuration | " + " | ".join(f"{n} tok: TTFT s | cached" for n in token_counts) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(token_counts)]
    for r, got in enumerate(results):
        for name, label in LABELS.items():
            cells = " | ".join(f"{t.ttft:.3f} | {t.cached}" for t in got[name])
            lines.append(f"| {r} | {label} | {cells} |")
    lines += ["", "| ratio | " + " | ".join(f"{n} tok: per round | median" for n in token_counts) + " |",
              "|---|" + "---|---|" * len(token_counts)]
    for num, den in RATIOS:
        cells = []
        for i in range(len(token_counts)):
            per_round = [got[num][i].ttft / got[den][i].ttft for got in results]
            cells.append(f"{' '.join(f'{x:.2f}' for x in per_round)} | {statistics.median(per_round):.2f}")
        lines.append(f"| {LABELS[num]} / {LABELS[den]} | " + " | ".join(cells) + " |")
    fails, warns = [], []
    for r, got in enumerate(results):
        for i, n in enumerate(token_counts):
            cold = got["cold"][i]
            fails += [f"FAIL: round {r}, {n} tokens, {LABELS[t]}: first token {got[t][i].token} != cold {cold.token}"
                      for t in WARM if got[t][i].token != cold.token]
            fails += [f"FAIL: round {r}, {n} tokens, {LABELS[t]}: {got[t][i].cached} cached, want >= {n - BLOCK}"
                      for t in WARM if got[t][i].cached < n - BLOCK]
        warns += [f"WARN: round {r}, {LABELS[name]}, {n} tokens: other processes used {t.foreign_s:.2f} CPU s in "
                  f"{t.ttft:.2f} s" for name, runs in got.items() for n, t in zip(token_counts, runs)
                  if t.excess_noise_s > 0]
    notes = warns or [f"noise: other processes used < {NOISY} cores in every timed run"]
    notes += fails or ["checks: every warm run has the cold run's first token; every kvtier warm run hit"]
    return "\n".join(lines), notes


# -- memory ----------------------------------------------------------------------------------------

def hold_child(job: dict[str, Any]) -> None:
    """An engine that sends its prompts, waits ``settle_s``, says HOLDING and waits for a line on stdin."""
    from vllm import LLM, SamplingParams

    extra = {"kv_transfer_config": job["kv"]} if job["kv"] else {}
    llm = LLM(model=job["model"], max_model_len=job["max_len"], enforce_eager=True, dtype="float32", seed=0,
              kv_cache_memory_bytes=job["kv_cache_bytes"], enable_prefix_caching=False, **extra)
    params = SamplingParams(max_tokens=1, temperature=0)
    cached = [llm.generate([p], params, use_tqdm=False)[0].num_cached_tokens or 0 for p in job["prompts"]]
    time.sleep(job["settle_s"])
    print("HOLDING " + json.dumps(cached), flush=True)
    sys.stdin.readline()
    llm.llm_engine.engine_core.shutdown()


def smaps(pid: int) -> dict[str, int]:
    """Bytes by field of ``/proc/<pid>/smaps_rollup``, summed over the process and its descendants."""
    total: dict[str, int] = {}
    pending = [pid]
    while pending:
        p = pending.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:]:
                name, value = line.split(":", 1)
                total[name] = total.get(name, 0) + int(value.split()[0]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # gone meanwhile
            continue
    return total


def segment_bytes(server_pid: int | None) -> int:
    """Bytes allocated to the server's segment files in /dev/shm (kvtier-node-<uid>-<pid>-...)."""
    if server_pid is None:
        return 0
    prefix = f"kvtier-node-{os.getuid()}-{server_pid}-"
    return sum(f.stat().st_blocks * 512 for f in Path("/dev/shm").iterdir() if f.name.startswith(prefix))


def measure_memory(model: Path, tokens: int, prompts: int, folder: Path, socket_path: str, server_pid: int,
                   pool_bytes: str) -> list[dict[str, Any]]:
    """The cpu tiers get the server's ``pool_bytes`` each: the same capacity per engine."""
    texts = [prompt_text(tokens, seed=7000 + i, vocab=BENCH_SPEC.vocab) for i in range(prompts)]
    rows = []
    for scenario in ("none", "cpu", "node"):
        kv = None if scenario == "none" else kv_config(folder, scenario, socket_path, pool_bytes)
        job = {"model": str(model), "max_len": tokens + 16, "kv": kv, "prompts": texts, "kv_cache_bytes": 512 << 20,
               "settle_s": 3.0}
        engines, cached = [], []
        try:
            for i in range(2):  # one after the other: the second one's prompts find the first one's chunks
                wait_for_quiet(max_wait_s=60)
                log = folder / f"memory-{scenario}-{i}.log"
                with open(log, "w") as err:
                    proc = subprocess.Popen([sys.executable, __file__, "--hold", json.dumps(job)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                            env={**os.environ, **CHILD_ENV})
                engines.append(proc)
                line = next((ln for ln in proc.stdout if ln.startswith("HOLDING ")), None)
                if line is None:
                    raise SystemExit(f"FAIL: {scenario} engine exited with {proc.wait()}:\n{log.read_text()[-4000:]}")
                cached.append(json.loads(line.removeprefix("HOLDING ")))
            per_engine = [smaps(p.pid) for p in engines]
            server = smaps(server_pid) if scenario == "node" else {}
            shm = segment_bytes(server_pid) if scenario == "node" else 0
            rows.append({"scenario": scenario, "engines": per_engine, "server": server, "shm": shm, "cached": cached})
        finally:
            for proc in engines:
                try:
                    proc.stdin.write("go\n")
                    proc.stdin.close()
                except OSError:
                    pass
            for proc in engines:
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return rows


def memory_report(rows: list[dict[str, Any]], tokens: int, prompts: int) -> str:
    mib = 2**20
    kv_bytes = tokens * prompts * BENCH_SPEC.layers * 2 * BENCH_SPEC.kv_heads * (BENCH_SPEC.hidden // BENCH_SPEC.heads) * 4

    def own(s: dict[str, int]) -> int:  # PSS without the shared-memory part, which the segment files count once
        return s.get("Pss", 0) - s.get("Pss_Shmem", 0)

    lines = [f"KV of the prompts: {prompts} x {tokens} tokens = {kv_bytes / mib:.0f} MiB (fp32, "
             f"{BENCH_SPEC.layers} layers, {BENCH_SPEC.kv_heads} KV heads x {BENCH_SPEC.hidden // BENCH_SPEC.heads})", "",
             "| engines | cached tokens (engine A / B) | engine A PSS / Pss_Shmem MiB | engine B PSS / Pss_Shmem MiB | "
             "server PSS MiB | segment files MiB | once per node MiB | vs no kvtier MiB |", "|---|---|---|---|---|---|---|---|"]
    base = None
    for row in rows:
        total = sum(own(s) for s in row["engines"]) + own(row["server"]) + row["shm"]
        base = total if base is None else base
        a, b = row["engines"]
        lines.append(f"| {row['scenario']} | {sum(row['cached'][0])} / {sum(row['cached'][1])} | "
                     f"{a.get('Pss', 0) / mib:.0f} / {a.get('Pss_Shmem', 0) / mib:.0f} | "
                     f"{b.get('Pss', 0) / mib:.0f} / {b.get('Pss_Shmem', 0) / mib:.0f} | "
                     f"{row['server'].get('Pss', 0) / mib:.0f} | {row['shm'] / mib:.0f} | {total / mib:.0f} | "
                     f"{(total - base) / mib:+.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048], help="prompt lengths")
    parser.add_argument("--rounds", type=int, default=1, help="TTFT: rounds, each with prompts of its own")
    parser.add_argument("--memory", action="store_true", help="measure host memory instead of TTFT")
    parser.add_argument("--prompts", type=int, default=4, help="memory: prompts each engine sends")
    parser.add_argument("--server-max-bytes", default="2GiB")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "kvtier-ttft-llama")
    parser.add_argument("--hold", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold:
        hold_child(json.loads(args.hold))
        return
    from kvtier.tiny_model import make_tiny_llama

    env = " ".join(f"{k}={v}" for k, v in CHILD_ENV.items() if k != "PYTHONUNBUFFERED")
    print(f"# node_ttft_bench on {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n# command: "
          f"python {' '.join(sys.argv)}\n# model: random Llama {BENCH_SPEC}, float32; vLLM block {BLOCK}, kvtier "
          f"chunk {CHUNK}; env {env}; kvtier server --max-bytes {args.server_max_bytes} --slot-bytes 1MiB", flush=True)
    model = make_tiny_llama(args.model_dir, BENCH_SPEC)
    with tempfile.TemporaryDirectory(prefix="kvn-", dir="/tmp") as tmp:  # short: a socket path has <= 107 bytes
        socket_path = os.path.join(tmp, "node.sock")
        with node_server(socket_path, args.server_max_bytes, "1MiB") as pid:
            if args.memory:
                rows = measure_memory(model, args.tokens[0], args.prompts, Path(tmp), socket_path, pid,
                                      args.server_max_bytes)
                print(f"# cpu tiers: max_bytes {args.server_max_bytes} each")
                print(memory_report(rows, args.tokens[0], args.prompts))
                return
            results = measure_ttft(model, args.tokens, args.rounds, Path(tmp), socket_path, pid)
    table, notes = ttft_report(results, args.tokens)
    print(table)
    print("\n".join(notes))
    sys.exit(1 if any(n.startswith("FAIL") for n in notes) else 0)


if __name__ == "__main__":
    main()
