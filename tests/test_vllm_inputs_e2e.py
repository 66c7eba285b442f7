"""Inputs that token ids do not name, in real vLLM engines: audio clips, prompt embeddings, and
engine settings that change the KV. Each must get its own chunks, so a hit never serves KV computed
from another input or under another setting.
"""

from __future__ import annotations

import time
from pathlib import Path

from vllm_harness import kvtier_transfer_config, run_engine

from kvtier.tiny_model import AUDIO_PLACEHOLDER, prompt_text


def _config(tmp_path: Path, tier: str) -> Path:
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"chunk_size: 256\ntiers:\n  - {tier}\n")
    return path


def _pause(step: int) -> None:
    time.sleep(1.0)  # the previous step's chunks reach the cpu tier in the background


def test_another_audio_clip_never_loads_the_first_ones_kv(tiny_audio_model: Path, tmp_path: Path) -> None:
    """vLLM gives every clip the same placeholder ids: keyed by ids alone, the second clip loaded the
    first one's KV and answered as if it had heard the first clip."""
    text = f"{AUDIO_PLACEHOLDER} {prompt_text(300, seed=3)}"  # 250 audio tokens + 302: 552 tokens
    clip_a, clip_b = {"prompt": text, "audio": 1}, {"prompt": text, "audio": 2}
    kv = kvtier_transfer_config(_config(tmp_path, "{type: cpu, max_bytes: 256MiB}"))
    run = run_engine(tiny_audio_model, [[clip_a], [clip_b], [clip_a]], kv, between_steps=_pause,
                     engine_args={"limit_mm_per_prompt": {"audio": 1}})
    a, b, a_again = (step[0] for step in run.steps)
    assert a.tokens != b.tokens  # the clip matters to the model (else this test could not tell)
    assert (a.cached, b.cached) == (0, 0)
    assert a_again.cached == 551 and a_again.tokens == a.tokens


def test_prompt_embeddings_are_cached_by_their_values(tiny_model: Path, tmp_path: Path) -> None:
    first, second = {"embeds": [1, 600]}, {"embeds": [2, 600]}
    kv = kvtier_transfer_config(_config(tmp_path, "{type: cpu, max_bytes: 256MiB}"))
    run = run_engine(tiny_model, [[first], [second], [first]], kv, between_steps=_pause,
                     engine_args={"enable_prompt_embeds": True})
    one, two, one_again = (step[0] for step in run.steps)
    assert one.tokens != two.tokens
    assert (one.cached, two.cached) == (0, 0)  # same length, same placeholder ids, other embeddings
    assert one_again.cached == 599 and one_again.tokens == one.tokens


def test_a_disk_store_never_serves_kv_computed_under_other_model_settings(tiny_model: Path, tmp_path: Path) -> None:
    """An engine run with a model-config override (hf_overrides) stores its KV; the same model without it finds none."""
    prompt = prompt_text(700, seed=4)
    kv = kvtier_transfer_config(_config(tmp_path, f"{{type: disk, path: {tmp_path / 'store'}, max_bytes: 1GiB}}"))
    overridden = run_engine(tiny_model, [[prompt]], kv, engine_args={"hf_overrides": {"rms_norm_eps": 0.5}})
    plain = run_engine(tiny_model, [[prompt], [prompt]], kv, between_steps=_pause)
    assert overridden[0][0].tokens != plain[0][0].tokens  # the override changes the KV
    assert plain[0][0].cached == 0
    assert plain[1][0].cached == 699 and plain[1][0].tokens == plain[0][0].tokens
    again = run_engine(tiny_model, [[prompt]], kv, engine_args={"hf_overrides": {"rms_norm_eps": 0.5}})
    assert again[0][0].cached == 699 and again[0][0].tokens == overridden[0][0].tokens
