"""What names a vLLM request's KV besides its token ids: its salt and its chunks' extras.

vLLM gives every image of a prompt the same placeholder token ids, and a prompt given as
embeddings has placeholder ids (zeros, or a sentinel) where the embeddings go. Keyed by token ids
alone, a request with another image would load the first one's KV: a wrong answer, and one user's
image leaking into another's. So each chunk's chain link also hashes what vLLM's own prefix-cache
block hashes use (``vllm/v1/core/kv_cache_utils.py``): every multimodal item it overlaps
(``mm_features``: the item's content hash and placeholder position) and a digest of its slice of
the prompt embeddings. The chain carries them on to every later chunk. Scheduler side only: the
workers receive the finished chain digests.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import msgpack
import torch

from kvtier.chunk_format.keys import PlacedItem, chunk_extras

from .shards import PromptChain

if TYPE_CHECKING:
    from vllm.v1.request import Request


def request_salt(request: Request) -> str:
    """cache_salt and the LoRA adapter: requests differing in either never share KV.

    The adapter counts by name and path (its weights), not by vLLM's integer id, which each
    instance numbers in its own order. JSON, so no client-chosen cache_salt can spell another
    request's (salt, adapter) pair.
    """
    salt = getattr(request, "cache_salt", None) or None
    lora = getattr(request, "lora_request", None)
    if salt is None and lora is None:
        return ""
    adapter = None if lora is None else [lora.lora_name, str(getattr(lora, "lora_path", "") or "")]
    return json.dumps([salt, adapter])


def request_chain(request: Request, chunk_size: int) -> PromptChain:
    """The request's chain: its prompt token ids (placeholders where it has none) with the
    multimodal items and embeddings of each chunk hashed in."""
    embeds = getattr(request, "prompt_embeds", None)
    tokens = request.prompt_token_ids
    if tokens is None:
        tokens = [0] * int(request.num_prompt_tokens)
    items = [PlacedItem(str(f.identifier), int(f.mm_position.offset), int(f.mm_position.length))
             for f in getattr(request, "mm_features", None) or ()]
    digests = None
    if embeds is not None:
        digests = _embeds_digests(embeds, getattr(request, "prompt_is_token_ids", None), len(tokens), chunk_size)
    extras = chunk_extras(len(tokens), chunk_size, items, digests) if items or digests else None
    return PromptChain.of(tokens, chunk_size, extras)


def _embeds_digests(embeds: torch.Tensor, is_token: list[bool] | None, num_tokens: int,
                    chunk_size: int) -> dict[int, bytes]:
    """sha256 of each chunk's slice of the prompt embeddings (dtype, shape and bytes), and of the
    mixed-mode mask saying which positions are token ids."""
    out = {}
    for index, start in enumerate(range(0, num_tokens, chunk_size)):
        part = embeds[start : start + chunk_size].detach().cpu().contiguous()
        h = hashlib.sha256(msgpack.packb([str(part.dtype), list(part.shape)]))
        h.update(part.view(torch.uint8).numpy() if part.numel() else b"")
        if is_token is not None:
            h.update(bytes(bool(t) for t in is_token[start : start + chunk_size]))
        out[index] = h.digest()
    return out
