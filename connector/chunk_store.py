"""Save, look up and load a request's KV by token prefix: the engine-agnostic core of a connector.

An engine adapter hands over token ids, the engine's paged cache (as a ``PagedKV``) and, for each
chunk, the slots that hold it (token slots, or block ids for opaque layouts); this class names the
chunks with the prefix key chain, moves the KV through the copy layer and keeps it in the tiers.
An engine that hashes the tokens itself (SGLang hands over its page keys) uses the ``*_keys``
methods, which do the same on precomputed keys. Nothing here knows vLLM or SGLang.

The last chunk of a token list may be partial (fewer than ``chunk_size`` tokens): it gets its own
key (a chain link over fewer token bytes), so it is found only by a request with exactly the same
tokens — which is what lets a repeated prompt, or a decode instance, load all but its last token.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import numpy as np
import torch

from kvtier.chunk_format.codec import Chunk, encode_chunk, write_header_before
from kvtier.chunk_format.dtypes import dtype_name
from kvtier.chunk_format.keys import KeyNamespace, chunk_keys, page_key_digest, salted_digest, storage_key
from kvtier.cuda_ext import KVCopier, PagedKV
from kvtier.storage_backends.tiered import TieredStore

from .gather_buffers import HEADROOM, GatherBuffers, GatherRun
from .load_cost import LoadReport
from .transfers import ChunkLoad

log = logging.getLogger(__name__)

Tokens = Sequence[int] | np.ndarray


def split_slots(token_slots: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """Per-chunk slot tensors of a flat token-slot tensor (the last one may be shorter)."""
    return list(torch.split(token_slots, chunk_size))


class ChunkStore:
    """Prefix-keyed KV chunks of one model shard (one namespace) in a :class:`TieredStore`."""

    def __init__(self, store: TieredStore, namespace: KeyNamespace, copier: KVCopier) -> None:
        self.store = store
        self.namespace = namespace
        self.copier = copier
        self.chunk_size = namespace.chunk_size
        self._encoder: ThreadPoolExecutor | None = None  # GPU saves: encodes once the gather is done
        self._encoding: set[Future] = set()
        self._encoding_lock = threading.Lock()
        self._flush_late = False  # a flush ran out of time; logged once until one completes
        self._gather_buffers = GatherBuffers()  # saves gather straight into their blobs' places

    def digest(self, salt: str = "") -> bytes:
        """The namespace digest for a request salt (cache_salt, LoRA adapter...)."""
        return salted_digest(self.namespace, salt)

    def keys(self, tokens: Tokens, salt: str = "", include_partial: bool = False) -> list[str]:
        """Keys of the chunks of ``tokens`` (and of the trailing partial chunk if asked)."""
        return chunk_keys(self.digest(salt), tokens, self.chunk_size, include_partial)

    def lookup(self, tokens: Tokens, salt: str = "", include_partial: bool = True) -> int:
        """How many leading tokens the tiers hold (whole chunks; a stored partial tail counts too)."""
        keys = self.keys(tokens, salt, include_partial)
        return min(len(tokens), self.lookup_keys(keys) * self.chunk_size)

    def save(self, tokens: Tokens, paged: PagedKV, chunk_slots: Sequence[torch.Tensor], first_chunk: int = 0,
             salt: str = "", wait: bool = False) -> Future | int | None:
        """Gather chunks ``first_chunk, first_chunk + 1, ...`` (one slot tensor each) and store them.

        On CPU the gather happens now; on a CUDA cache it is queued on the current stream and the
        slots must stay unchanged until it is done (the vLLM adapter keeps a finished request's
        blocks until then). The tiers are written in the background unless ``wait`` (then: how many
        chunks the top tier stored).
        """
        if not chunk_slots:
            return 0 if wait else None
        keys = self._range_keys(tokens, salt, first_chunk, len(chunk_slots))
        counts = [self._tokens_in(tokens, first_chunk + j) for j in range(len(chunk_slots))]
        return self.save_keys(keys, paged, chunk_slots, counts, wait)

    def load(self, tokens: Tokens, paged: PagedKV, chunk_slots: Sequence[torch.Tensor], first_chunk: int = 0,
             salt: str = "", skip_units: int = 0) -> int:
        """Load chunks ``first_chunk, ...`` into their slots; the first ``skip_units`` slots of the
        first chunk are left alone (they already hold this KV, e.g. from the engine's own cache).

        Returns how many leading chunks were loaded; a missing, corrupt or mismatched chunk ends
        the prefix there (the engine recomputes from that point).
        """
        if not chunk_slots:
            return 0
        keys = self._range_keys(tokens, salt, first_chunk, len(chunk_slots))
        counts = [self._tokens_in(tokens, first_chunk + j) for j in range(len(chunk_slots))]
        return self.load_keys(keys, paged, chunk_slots, counts, skip_units)

    # -- the same on precomputed keys (the SGLang backend gets page hashes, not tokens) ------------

    def keys_from_chain(self, page_keys: Sequence[str], salt: str = "") -> list[str]:
        """Storage keys for an engine's own token-chain digests (SGLang page keys, hex)."""
        return self.keys_for_digests([page_key_digest(k) for k in page_keys], salt)

    def keys_for_digests(self, chain: Sequence[bytes], salt: str = "") -> list[str]:
        """Storage keys for token-chain digests ``t_i`` (raw bytes, e.g. a :class:`PromptChain`'s)."""
        digest = self.digest(salt)
        return [storage_key(digest, t) for t in chain]

    def lookup_keys(self, keys: Sequence[str]) -> int:
        """How many leading ``keys`` the tiers hold."""
        return self.store.contains(list(keys))

    def save_keys(self, keys: Sequence[str], paged: PagedKV, chunk_slots: Sequence[torch.Tensor],
                  num_tokens: Sequence[int], wait: bool = False) -> Future | int | None:
        """Gather each chunk's slots and store it under its key; ``num_tokens`` (tokens per chunk)
        goes into the headers. Returns as :meth:`save`."""
        if len(keys) != len(chunk_slots) or len(num_tokens) != len(chunk_slots):
            raise ValueError(f"{len(keys)} keys, {len(chunk_slots)} slot tensors, {len(num_tokens)} token counts")
        if not chunk_slots:
            return 0 if wait else None
        self._check_paged(paged)
        gathered = []
        for start, group in _same_length_runs(chunk_slots):
            slots = torch.stack(list(group))
            run = self._gather_buffers.take(len(group), paged.chunk_shape(slots.shape[1]), paged.dtype,
                                            pinned=paged.device.type == "cuda")  # pinned: the kernels write it
            _, done = self.copier.gather_async(paged, slots, out=run.out)
            gathered.append((start, run, done))
        if wait or all(done.query() for _, _, done in gathered):
            return self._store_gathered(keys, num_tokens, paged.format_id, gathered, wait)
        # A GPU gather still running on its stream: encode and store once it is done, off this thread.
        with self._encoding_lock:
            if self._encoder is None:
                self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-encode")
            future = self._encoder.submit(self._store_gathered, keys, num_tokens, paged.format_id, gathered, False)
            self._encoding.add(future)
            future.add_done_callback(self._encoding.discard)
        return future

    def _store_gathered(self, keys: Sequence[str], num_tokens: Sequence[int], format_id: str,
                        gathered: list, wait: bool) -> Future | int | None:
        items = []
        for start, run, done in gathered:
            done.synchronize()
            items += self._encode_run(keys[start : start + len(run.out)], num_tokens[start:], format_id, run)
        return self.store.put(items) if wait else self.store.put_async(items)

    def _encode_run(self, keys: Sequence[str], num_tokens: Sequence[int], format_id: str,
                    run: GatherRun) -> list[tuple[str, memoryview | bytearray]]:
        """The run's chunks as (key, blob): headers written before the gathered payloads; a header too
        long for the room (a very long model name) makes that chunk a copy."""
        shape = tuple(run.out.shape[1:])
        meta = dict(shard=self.namespace.shard_id, mac_key=self.store.integrity_key)
        starts, copied = [], {}
        for j, key in enumerate(keys):
            slot = run.slot(j)
            start = write_header_before(slot, HEADROOM, key, self.namespace.kv_dtype, shape, format_id,
                                        self.namespace.model, num_tokens[j], **meta)
            if start is None:
                copied[j] = encode_chunk(key, self.namespace.kv_dtype, shape, format_id, self.namespace.model,
                                         num_tokens[j], slot[HEADROOM:], **meta)
            starts.append(start or 0)
        blobs = self._gather_buffers.blobs(run, starts)
        return [(key, copied.get(j, blobs[j])) for j, key in enumerate(keys)]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every save so far has reached every tier (GPU gathers, encoding, tier writes), at
        most ``timeout`` seconds in all (None: the store's ``flush_timeout_s``, never unbounded: a hung
        tier must not hang a producer's step). False if time ran out, logged once until a flush completes."""
        limit = self.store.flush_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._encoding_lock:
            pending = list(self._encoding)
        _, encoding = futures_wait(pending, limit)
        flushed = self.store.flush(max(0.0, deadline - time.monotonic())) and not encoding
        if not flushed and not self._flush_late:
            log.warning("kvtier: saves had not reached every tier after %.1f s; going on without waiting "
                        "for them (not logged again until a flush completes)", limit)
        self._flush_late = not flushed
        return flushed

    def close(self) -> None:
        """Stop the encoding thread (after the saves it holds)."""
        with self._encoding_lock:
            encoder, self._encoder = self._encoder, None
        if encoder is not None:
            encoder.shutdown(wait=True)

    def load_keys(self, keys: Sequence[str], paged: PagedKV, chunk_slots: Sequence[torch.Tensor],
                  num_tokens: Sequence[int], skip_units: int = 0, recompute_s_per_token: float | None = None,
                  report: LoadReport | None = None) -> int:
        """Load the chunks under ``keys`` into their slots; returns as :meth:`load` (the other
        arguments as :meth:`fetch_keys`)."""
        if len(keys) != len(chunk_slots) or len(num_tokens) != len(chunk_slots):
            raise ValueError(f"{len(keys)} keys, {len(chunk_slots)} slot tensors, {len(num_tokens)} token counts")
        if not chunk_slots:
            return 0
        load = self.fetch_keys(keys, paged, chunk_slots, num_tokens, skip_units, recompute_s_per_token, report)
        for payload, slots in zip(load.payloads, load.slots):
            self.copier.scatter(payload[None], paged, slots[None])
        return len(load.payloads)

    def fetch(self, tokens: Tokens, paged: PagedKV, chunk_slots: Sequence[torch.Tensor], first_chunk: int = 0,
              salt: str = "", skip_units: int = 0) -> ChunkLoad:
        """The reading half of :meth:`load`: the usable leading chunks, checked, ready to copy in."""
        if not chunk_slots:
            return ChunkLoad([], [])
        keys = self._range_keys(tokens, salt, first_chunk, len(chunk_slots))
        counts = [self._tokens_in(tokens, first_chunk + j) for j in range(len(chunk_slots))]
        return self.fetch_keys(keys, paged, chunk_slots, counts, skip_units)

    def fetch_keys(self, keys: Sequence[str], paged: PagedKV, chunk_slots: Sequence[torch.Tensor],
                   num_tokens: Sequence[int], skip_units: int = 0, recompute_s_per_token: float | None = None,
                   report: LoadReport | None = None) -> ChunkLoad:
        """Read and check the chunks under ``keys``; a missing, corrupt or mismatched one ends the
        prefix there. Payloads are the tier's own buffers where possible (zero-copy views of the
        cpu tier); for a CUDA cache they are pinned, so the kernels read them directly.

        With ``recompute_s_per_token`` (the engine's prefill speed) the chunks are read 1, 2, 4...
        at a time, and reading stops, ending the prefix, once it runs slower per token than
        recomputing would: a tier slower than its estimate costs at most the reads before the check.
        ``report`` is told each tier read (tokens, seconds) for the estimates."""
        if len(keys) != len(chunk_slots) or len(num_tokens) != len(chunk_slots):
            raise ValueError(f"{len(keys)} keys, {len(chunk_slots)} slot tensors, {len(num_tokens)} token counts")
        load = ChunkLoad([], [])
        if not chunk_slots:
            return load
        self._check_paged(paged)
        found = self._read(list(keys), list(num_tokens), recompute_s_per_token, report)
        for j, (key, chunk) in enumerate(zip(keys, found)):
            expected = (paged.chunk_shape(len(chunk_slots[j])), num_tokens[j])
            if chunk is None or not self._matches(key, chunk, *expected, paged):
                break
            skip = skip_units if j == 0 else 0
            payload = _payload_tensor(chunk, paged.dtype)[:, :, skip:]
            if skip:
                payload = payload.contiguous()
            if paged.device.type == "cuda" and not payload.is_pinned():
                payload = payload.pin_memory()
            load.payloads.append(payload)
            load.slots.append(chunk_slots[j][skip:])
        return load

    def _read(self, keys: list[str], num_tokens: list[int], recompute_s_per_token: float | None,
              report: LoadReport | None) -> list[Chunk | None]:
        """The chunks under ``keys`` (see :meth:`fetch_keys`), possibly fewer: a prefix of them."""
        found: list[Chunk | None] = []
        batch = 1 if recompute_s_per_token else len(keys)
        started = time.perf_counter()
        while len(found) < len(keys):
            first = len(found)
            reads: list[tuple[str, int, float]] = []
            got = self.store.get(keys[first : first + batch], lambda *read, into=reads: into.append(read))
            found.extend(got)
            if report is not None and reads:
                hit_tokens = sum(n for n, chunk in zip(num_tokens[first:], got) if chunk is not None)
                read_bytes = sum(nbytes for _, nbytes, _ in reads) or 1
                for tier, nbytes, seconds in reads:  # a batch's tokens shared out by bytes among its tiers
                    report.add(tier, hit_tokens * nbytes / read_bytes, seconds)
            if any(chunk is None for chunk in got):
                break
            done = sum(num_tokens[: len(found)])
            elapsed = time.perf_counter() - started
            if recompute_s_per_token and len(found) < len(keys) and elapsed > done * recompute_s_per_token:
                log.info("kvtier: loading ran at %.3g ms per token, slower than recomputing (%.3g ms): "
                         "recomputing the last %d of %d chunks", 1e3 * elapsed / done, 1e3 * recompute_s_per_token,
                         len(keys) - len(found), len(keys))
                break
            batch *= 2
        return found

    def _range_keys(self, tokens: Tokens, salt: str, first: int, count: int) -> list[str]:
        include_partial = first + count > len(tokens) // self.chunk_size
        keys = self.keys(tokens, salt, include_partial)[first : first + count]
        if len(keys) != count:
            raise ValueError(f"{count} chunks from chunk {first} asked, but {len(tokens)} tokens make {len(keys) + first}")
        return keys

    def _tokens_in(self, tokens: Tokens, index: int) -> int:
        return min(self.chunk_size, len(tokens) - index * self.chunk_size)

    def _check_paged(self, paged: PagedKV) -> None:
        """The namespace names the chunk format (``format_id``), not the engine's layout, so NHD,
        HND and SGLang pools holding the same KV share chunks."""
        if dtype_name(paged.dtype) != self.namespace.kv_dtype or paged.format_id != self.namespace.layout:
            raise ValueError(
                f"paged KV ({dtype_name(paged.dtype)}, {paged.format_id}) does not match the key namespace "
                f"({self.namespace.kv_dtype}, {self.namespace.layout})")

    def _matches(self, key: str, chunk: Chunk, shape: tuple[int, ...], num_tokens: int, paged: PagedKV) -> bool:
        h = chunk.header
        expected = (self.namespace.kv_dtype, shape, paged.format_id, num_tokens, self.namespace.shard_id)
        if (h.dtype, h.shape, h.layout, h.num_tokens, h.shard) == expected:
            return True
        log.warning("kvtier: chunk %s... has format (%s, %s, %s, %d tokens, shard %r), expected (%s, %s, %s, %d, %r); "
                    "recomputing", key[:16], h.dtype, h.shape, h.layout, h.num_tokens, h.shard, *expected)
        return False


def _same_length_runs(chunk_slots: Sequence[torch.Tensor]) -> list[tuple[int, list[torch.Tensor]]]:
    """Consecutive chunks with equally many slots, so each run is one batched copy."""
    runs: list[tuple[int, list[torch.Tensor]]] = []
    for i, slots in enumerate(chunk_slots):
        if runs and len(runs[-1][1][0]) == len(slots):
            runs[-1][1].append(slots)
        else:
            runs.append((i, [slots]))
    return runs


def _payload_tensor(chunk: Chunk, dtype: torch.dtype) -> torch.Tensor:
    """The chunk's payload as a tensor of its shape, sharing the (read-only) bytes: it is only read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(chunk.payload, dtype=torch.uint8)
    return flat.view(dtype).view(chunk.header.shape)

