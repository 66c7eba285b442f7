"""A random-weight Llama and a word-level tokenizer built locally, for demos, tests and benchmarks.

Nothing is downloaded: the weights come from ``transformers`` with a fixed seed and the tokenizer
from ``tokenizers``, so an engine can load the folder with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape of the model; the CPU attention backend needs head_dim in {32, 64, 80, 96, 112, 128, ...}."""

    layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vocab: int = 1024
    max_positions: int = 8192
    seed: int = 0


# The shape DESIGN.md's reference figures were measured on: a 2048-token prefill takes ~2 s on 2 cores.
BENCH_SPEC = TinyLlamaSpec(layers=8, hidden=1024, heads=16, kv_heads=4, intermediate=2816, vocab=1024)


def word(i: int) -> str:
    """The vocabulary word of token id ``i`` (ids below 4 are special tokens)."""
    return f"w{i}"


def make_tiny_llama(folder: str | Path, spec: TinyLlamaSpec = TinyLlamaSpec()) -> Path:
    """Write (once) a float32 random Llama and its tokenizer to ``folder``; returns the folder."""
    folder = Path(folder)
    stamp = folder / "kvtier-tiny-model.json"
    if stamp.exists() and json.loads(stamp.read_text()) == asdict(spec):
        return folder
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions, torch_dtype="float32", bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder, safe_serialization=True)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {word(i): i for i in range(4, spec.vocab)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    ).save_pretrained(folder)
    stamp.write_text(json.dumps(asdict(spec)))
    return folder


def prompt_text(num_tokens: int, seed: int, vocab: int = 1024) -> str:
    """A reproducible prompt of exactly ``num_tokens`` words of the tiny vocabulary."""
    import random

    rng = random.Random(seed)
    return " ".join(word(rng.randrange(4, vocab)) for _ in range(num_tokens))
