"""kvtier as a vLLM KV connector (vLLM >= 0.30, v1 engine).

Enable it with ``--kv-transfer-config '{"kv_connector":"KVTierConnector",
"kv_connector_module_path":"kvtier.connector.vllm","kv_role":"kv_both",
"kv_connector_extra_config":{"config":"kvtier.yaml"}}'`` (other extra-config keys override the
YAML, e.g. ``"redis.url"``), or the same dict as ``LLM(kv_transfer_config=...)``. With kvtier
installed, its ``vllm.general_plugins`` entry point registers the bare name ``KVTierConnector``.

This file only translates vLLM's objects: planning is :class:`RequestPlanner`, moving bytes is
:class:`ChunkStore` and the copy layer, overlapping them with the forward pass is
:mod:`.transfers`; what the engine's config says (cache shape, shards, settings) is
:mod:`.vllm_layout`, what names a request's KV (salt, images, embeddings) is :mod:`.vllm_inputs`.
An engine may run as several processes (tensor ranks, pipeline stages): each worker stores its own
shard's chunks, and the scheduler, which sees only the tiers shared between processes, promises a
chunk only when every shard holds it (:class:`ShardSet`). Loads are fetched and checked before the forward pass and copied into the
cache layer by layer (on GPU on a side stream, each layer awaited just before its attention), or
with ``load_mode: async`` run on a loader thread while vLLM parks the request in
WAITING_FOR_REMOTE_KVS and keeps serving others (worth it when a tier is slow). Saves are
gathered after the forward pass (on GPU on a side stream; a finished request's blocks are kept
until its gathers are done) and written to the tiers by background threads; a ``kv_producer``
(the prefill side of a disaggregated deployment) waits until they have reached every tier, so the
decoder finds them. Anything that goes wrong becomes a miss or a recompute: kvtier sets
``kv_load_failure_policy`` to ``"recompute"``, because a cache must never fail a request.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvtier.config import KVTierConfig, load_config
from kvtier.cuda_ext import PagedKV, make_copier
from kvtier.storage_backends.factory import is_process_local

from .chunk_store import ChunkStore
from .keys import ModelSettings
from .planner import RequestPlanner, StepPlan, TransferSpec, chunk_slots
from .shards import PromptChain, ShardSet
from .store_registry import STORES
from .transfers import ChunkLoad, CopyStreams, LayerwiseLoad, SaveTracker
from .vllm_inputs import request_chain, request_salt
from .vllm_layout import CacheShape, EngineLayout, all_shards, model_settings, namespace, worker_layers, worker_ranks

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


def _log_like_vllm() -> None:
    """Show kvtier's log lines (from every module) where and as vLLM shows its own: vLLM configures
    only its ``vllm`` logger, so kvtier's INFO lines would otherwise be dropped."""
    ours, theirs = logging.getLogger("kvtier"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level or logging.INFO)
    ours.propagate = False


@dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    plan: StepPlan


class KVTierConnector(KVConnectorBase_V1):
    """Tiered prefix cache and prefill->decode transfer for vLLM."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _log_like_vllm()
        transfer = self._kv_transfer_config
        extra = dict(transfer.kv_connector_extra_config or {})
        self._config: KVTierConfig = load_config(extra.pop("config", None), overrides=extra)
        self._shape = CacheShape.of(vllm_config, kv_cache_config)
        if self._config.chunk_size % self._shape.block_size:
            raise ValueError(f"kvtier chunk_size {self._config.chunk_size} must be a multiple of vLLM's block size "
                             f"{self._shape.block_size}")
        self._layout = EngineLayout.of(vllm_config)
        settings = model_settings(vllm_config)
        # A scheduler whose workers run in processes of their own sees only the tiers shared between processes.
        self._shared_only = role == KVConnectorRole.SCHEDULER and self._layout.workers_apart
        self._active = self._check_usable(settings, announce=role == KVConnectorRole.SCHEDULER)
        self._ranks = worker_ranks() if role != KVConnectorRole.SCHEDULER else None
        offset = self._layout.metrics_offset(None if self._ranks is None else
                                             self._ranks[0] + self._layout.tp_size * self._ranks[1])
        self._store = None
        if self._active:
            self._store, _ = STORES.acquire(self._config, shared_only=self._shared_only, metrics_port_offset=offset)
        # A prefill instance's answer tells the router the KV is ready: its saves must have reached
        # every tier (the decoder may read any of them) before the step returns.
        self._durable_saves = transfer.kv_role == "kv_producer"
        self._closed = False
        self._chunks: ChunkStore | None = None
        self._paged: PagedKV | None = None
        self._failed_blocks: set[int] = set()
        self._planner: RequestPlanner | None = None
        try:
            if role == KVConnectorRole.SCHEDULER:
                self._shards = ShardSet(all_shards(vllm_config, self._config, self._shape, self._layout, settings))
                if transfer.kv_load_failure_policy != "recompute":
                    log.info("kvtier: setting kv_load_failure_policy=recompute (a cache miss must not fail a request)")
                    transfer.kv_load_failure_policy = "recompute"
                self._chains: dict[str, PromptChain] = {}
                self._planner = RequestPlanner(self._config.chunk_size, self._lookup,
                                               save=transfer.is_kv_producer and self._active,
                                               load=transfer.is_kv_consumer and self._active,
                                               async_loads=self._config.load_mode == "async")
            else:
                tp_rank, pp_rank = self._ranks
                layers = worker_layers(self._shape, self._layout, pp_rank)
                self._namespace = namespace(vllm_config, self._config, self._shape, self._layout, settings,
                                            tp_rank, pp_rank, layers)
                self._writer = not self._shape.mla or tp_rank == 0  # MLA: ranks hold the same latent KV
                self._loader: ThreadPoolExecutor | None = None  # async loads, started on first use
                self._loading: dict[str, Future] = {}
                self._failed_lock = threading.Lock()
                self._streams: CopyStreams | None = None
                self._layer_load: LayerwiseLoad | None = None
                self._retired_loads: list[LayerwiseLoad] = []
                self._layer_index: dict[str, int] = {}
                self._saves = SaveTracker()
        except BaseException:
            self._release_store()
            raise

    def _check_usable(self, settings: ModelSettings, announce: bool) -> bool:
        """Whether kvtier can do anything in this engine; the scheduler says (once, at start-up) which
        tiers it looks up in when the workers run in processes of their own."""
        if settings.kv_scales == "calculated":  # scales from the first batch: no chunk is right for another instance
            if announce:
                log.warning("kvtier: KV-cache scales are calculated at run time (calculate_kv_scales), so the KV "
                            "differs per instance; kvtier neither loads nor saves")
            return False
        if not self._layout.workers_apart:
            return True
        shared = [t.name for t in self._config.tiers if not is_process_local(t)]
        local = [t.name for t in self._config.tiers if is_process_local(t)]
        shape = f"tensor_parallel_size={self._layout.tp_size}, pipeline_parallel_size={self._layout.pp_size}"
        if not shared:
            if announce:
                log.warning("kvtier: the workers of this engine (%s) run in processes of their own and every "
                            "configured tier (%s) is per process, so the scheduler can see none of their chunks: "
                            "kvtier neither loads nor saves. Add a disk or redis tier.", shape, ", ".join(local))
            return False
        if announce:
            log.info("kvtier: the workers of this engine (%s) run in processes of their own: the scheduler looks "
                     "up in the %s tier(s)%s; a chunk counts only when every shard (rank, stage) holds it", shape,
                     ", ".join(shared), f", not in the per-process {', '.join(local)} tier(s) (each worker's own "
                     "read cache)" if local else "")
        return True

    def _release_store(self) -> None:
        if self._store is not None:
            self._store = None
            STORES.release(self._config, shared_only=self._shared_only)

    # -- scheduler side ---------------------------------------------------------------------------

    def _lookup(self, chain: PromptChain, salt: str) -> int:
        try:
            return self._shards.held_tokens(self._store, chain, salt)
        except Exception:  # a lookup must never fail the scheduler
            log.exception("kvtier: lookup failed; treating as a miss")
            return 0

    def _chain(self, request: Request) -> PromptChain:
        """The request's chunk chain, computed once (a waiting request is asked about every step)."""
        chain = self._chains.get(request.request_id)
        if chain is None:
            chain = self._chains[request.request_id] = request_chain(request, self._config.chunk_size)
        return chain

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        matched = self._planner.matched_tokens(request.request_id, self._chain(request), request_salt(request),
                                               num_computed_tokens)
        return matched, bool(matched) and self._planner.async_loads

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if request.num_prompt_tokens:
            self._planner.allocated(request.request_id, self._chain(request), request_salt(request),
                                    num_external_tokens, blocks.get_block_ids()[0] if num_external_tokens else ())

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        plan = StepPlan()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            self._planner.scheduled(new.req_id, new.block_ids[0], True, new.num_computed_tokens,
                                    scheduled.get(new.req_id, 0), plan)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            self._planner.scheduled(req_id, new_blocks[0] if new_blocks else [], req_id in cached.resumed_req_ids,
                                    cached.num_computed_tokens[i], scheduled.get(req_id, 0), plan)
        self._planner.take_async_loads(plan)
        plan.preempted = bool(getattr(scheduler_output, "preempted_req_ids", None))
        return KVTierConnectorMetadata(plan)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # A request with saves keeps its blocks until the workers report the gathers done
        # (get_finished), so a copy on a side stream never reads blocks handed to another request.
        self._chains.pop(request.request_id, None)
        return self._planner.finished(request.request_id), None

    # -- worker side ------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = [kv_caches[name] for name in self._shape.layer_names]
        if self._shape.per_block:
            self._paged = PagedKV.from_opaque_blocks(layers, self._shape.opaque_backend)
        else:  # vLLM hands standardized [B, H, N, C] views whatever the physical layout
            self._paged = PagedKV.from_vllm(layers, "HND", self._shape.head_size, mla=self._shape.mla)
        device = layers[0].device
        copier = make_copier(device, max_sms=self._config.gpu.copy_sms, host_access=self._config.gpu.host_access)
        self._chunks = ChunkStore(self._store, self._namespace, copier)
        self._streams = CopyStreams(layers[0].device)
        self._layer_index = {name: i for i, name in enumerate(self._shape.layer_names)}

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if kv_connector_metadata.plan.preempted:  # their blocks are free again: no gather may still read them
            self._streams.finish_stores()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        plan = self._get_connector_metadata().plan
        self._finish_layer_load()
        fetched = [(spec, load) for spec in plan.loads if (load := self._fetch(spec)) is not None]
        try:
            self._layer_load = LayerwiseLoad(self._chunks.copier, self._paged, [ld for _, ld in fetched], self._streams)
        except Exception:  # nothing was copied: vLLM recomputes these requests
            log.exception("kvtier: starting this step's loads failed; vLLM recomputes them")
            for spec, _ in fetched:
                self._check_loaded(spec, 0)
        for spec in plan.async_loads:  # parked requests: vLLM waits for get_finished to name them
            if self._loader is None:
                self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-load")
            self._loading[spec.req_id] = self._loader.submit(self._load, spec)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Finished requests whose saves are copied out (vLLM frees their blocks now), and async
        loads that completed; their failed blocks were recorded before completion, so
        ``get_block_ids_with_load_errors`` reports them in this same pass."""
        sent = self._saves.finished(finished_req_ids)
        done = {req_id for req_id, future in self._loading.items() if future.done()}
        for req_id in done:
            del self._loading[req_id]
        return sent or None, done or None

    def _moves(self, spec: TransferSpec) -> tuple:
        """(keys, paged cache, slots, tokens per chunk) of a spec's chunks, for this worker's shard."""
        size, block = self._config.chunk_size, self._shape.block_size
        return (self._chunks.keys_for_digests(spec.chain, spec.salt), self._paged,
                chunk_slots(spec, size, block, self._shape.per_block), spec.tokens_in(size))

    def _skip_units(self, spec: TransferSpec) -> int:
        return spec.skip_tokens // self._shape.block_size if self._shape.per_block else spec.skip_tokens

    def _fetch(self, spec: TransferSpec) -> ChunkLoad | None:
        """A synchronous load's chunks, read and checked now; copied into the cache layer by layer."""
        try:
            load = self._chunks.fetch_keys(*self._moves(spec), self._skip_units(spec))
        except Exception:
            log.exception("kvtier: loading %s failed; vLLM recomputes it", spec.req_id)
            load = ChunkLoad([], [])
        self._check_loaded(spec, len(load.payloads))
        return load if load.payloads else None

    def _load(self, spec: TransferSpec) -> None:
        """An async load: fetch and copy at once, on the loader thread."""
        try:
            loaded = self._chunks.load_keys(*self._moves(spec), self._skip_units(spec))
        except Exception:
            log.exception("kvtier: loading %s failed; vLLM recomputes it", spec.req_id)
            loaded = 0
        self._check_loaded(spec, loaded)

    def _check_loaded(self, spec: TransferSpec, loaded: int) -> None:
        size, block = self._config.chunk_size, self._shape.block_size
        if loaded < spec.num_chunks:
            first_bad = max((spec.first_chunk + loaded) * size, spec.first_chunk * size + spec.skip_tokens)
            with self._failed_lock:
                self._failed_blocks.update(spec.block_ids[first_bad // block : -(-spec.end_token // block)])
            log.warning("kvtier: %s: loaded %d of %d chunks; recomputing from token %d",
                        spec.req_id, loaded, spec.num_chunks, first_bad)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._layer_load is not None:
            self._layer_load.wait(self._layer_index.get(layer_name, len(self._layer_index) - 1))

    def _finish_layer_load(self) -> None:
        if self._layer_load is not None:
            self._layer_load.finish()  # layers the forward pass did not ask for
            # Kept until its copies are done: they read tier buffers (pinned views of the cpu tier)
            # that must not be reused under them.
            self._retired_loads = [ld for ld in self._retired_loads if not ld.copies_done()]
            if not self._layer_load.copies_done():
                self._retired_loads.append(self._layer_load)
            self._layer_load = None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # chunks are gathered for all layers at once in wait_for_save

    def wait_for_save(self) -> None:
        self._finish_layer_load()
        if not self.has_connector_metadata():
            return
        saves = self._get_connector_metadata().plan.saves
        with self._streams.storing():
            for spec in saves if self._writer else ():  # MLA: rank 0 alone writes the shared latent KV
                try:
                    self._chunks.save_keys(*self._moves(spec))
                except Exception:  # a failed save is a future miss, never a failed step
                    log.exception("kvtier: saving %s failed", spec.req_id)
        self._saves.saving([spec.req_id for spec in saves], self._streams.store_done())
        if saves and self._durable_saves:
            self._chunks.flush()  # bounded: every tier's operations have timeouts

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._failed_lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            if getattr(self, "_loader", None) is not None:
                self._loader.shutdown(wait=True)
            if self._chunks is not None:
                self._chunks.close()  # GPU saves still being encoded reach the tiers first
            self._release_store()


def register() -> None:
    """``vllm.general_plugins`` entry point: make ``"kv_connector": "KVTierConnector"`` work alone."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector("KVTierConnector", "kvtier.connector.vllm", "KVTierConnector")
    except ValueError:
        pass  # already registered in this process
