"""The worker side of kvtier's vLLM connector: moving a shard's KV between its cache and the tiers.

Each worker process (one per tensor rank and pipeline stage) holds one shard of the KV and stores
it under its own shard's keys (:func:`namespace`); it receives the scheduler's :class:`StepPlan`
each step and turns each :class:`TransferSpec`'s chain digests into those keys.

Loads are fetched and checked before the forward pass and copied into the cache layer by layer
(on GPU on a side stream, each layer awaited just before its attention: :class:`LayerwiseLoad`),
or with ``load_mode: async`` run on a loader thread while vLLM parks the request and keeps serving
others (worth it when a tier is slow); :meth:`KVTierWorker.get_finished` reports them done. Saves
are gathered after the forward pass (on GPU on a side stream; a finished request's blocks are kept
until its gathers are done, :class:`SaveTracker`) and written to the tiers by background threads;
a ``kv_producer`` (the prefill side of a disaggregated deployment) waits until they have reached
every tier, so the decoder finds them. MLA: the latent cache is the same on every TP rank, so only
the writer rank stores it. Anything that goes wrong becomes a miss or a recompute: the blocks of
chunks that failed to load are reported to vLLM, which recomputes them.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from kvtier.cuda_ext import PagedKV, make_copier

from .chunk_store import ChunkStore
from .engine_setup import EngineSetup, StoreLease, writes_chunks
from .load_cost import LoadReport, StepReport
from .planner import StepPlan, TransferSpec, chunk_slots
from .transfers import ChunkLoad, CopyStreams, LayerwiseLoad, SaveTracker
from .vllm_layout import CacheShape, EngineLayout, namespace, worker_layers, worker_ranks

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from kvtier.storage_backends.tiered import TieredStore

log = logging.getLogger(__name__)

Moves = tuple[list[str], PagedKV, list[torch.Tensor], list[int]]


class KVTierWorker:
    """kvtier in one vLLM worker: this shard's loads and saves, overlapped with the forward pass."""

    def __init__(self, vllm_config: VllmConfig, setup: EngineSetup, shape: CacheShape, layout: EngineLayout,
                 active: bool) -> None:
        tp_rank, pp_rank = worker_ranks()
        layers = worker_layers(shape, layout, pp_rank)
        self._namespace = namespace(setup, shape, layout, tp_rank, pp_rank, layers)
        self._config = setup.config
        self._shape = shape
        self._writer = writes_chunks(shape.mla, tp_rank)  # MLA: ranks hold the same latent KV
        # A prefill instance's answer tells the router the KV is ready: its saves must have reached
        # every tier (the decoder may read any of them) before the step returns.
        self._durable_saves = vllm_config.kv_transfer_config.kv_role == "kv_producer"
        self._chunks: ChunkStore | None = None  # from register_kv_caches on
        self._paged: PagedKV | None = None
        self._streams: CopyStreams | None = None
        self._layer_index: dict[str, int] = {}
        self._layer_load: LayerwiseLoad | None = None
        self._retired_loads: list[LayerwiseLoad] = []
        self._loader: ThreadPoolExecutor | None = None  # async loads, started on first use
        self._loading: dict[str, Future] = {}
        self._failed_lock = threading.Lock()
        self._failed_blocks: set[int] = set()
        self._saves = SaveTracker()
        self._report_lock = threading.Lock()
        self._loads_report = LoadReport()  # reads since the last step report (the loader thread adds too)
        self._step_s = 0.0  # kvtier's time on this step's path so far
        self._step: tuple[int, bool] | None = None  # (plan number, timed) of the step to report
        self._closed = False
        self._lease: StoreLease | None = None
        if active:
            offset = layout.metrics_offset(tp_rank + layout.tp_size * pp_rank)
            self._lease = setup.lease_store(metrics_port_offset=offset)
        self._store: TieredStore | None = None if self._lease is None else self._lease.store

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """View vLLM's cache tensors as one :class:`PagedKV` (never a copy) and set up the copies."""
        layers = [kv_caches[name] for name in self._shape.layer_names]
        if self._shape.per_block:
            self._paged = PagedKV.from_opaque_blocks(layers, self._shape.opaque_backend)
        else:  # vLLM hands standardized [B, H, N, C] views whatever the physical layout
            self._paged = PagedKV.from_vllm(layers, "HND", self._shape.head_size, mla=self._shape.mla)
        device = layers[0].device
        gpu = self._config.gpu
        copier = make_copier(device, max_sms=gpu.copy_sms, host_access=gpu.host_access)
        self._chunks = ChunkStore(self._store, self._namespace, copier)
        self._streams = CopyStreams(device)
        self._layer_index = {name: i for i, name in enumerate(self._shape.layer_names)}

    def handle_preemptions(self, plan: StepPlan) -> None:
        """Before the step's forward pass: preempted requests' blocks are free again, so no gather may
        still read them."""
        if plan.preempted:
            self._streams.finish_stores()

    def start_load_kv(self, plan: StepPlan) -> None:
        """Fetch this step's synchronous loads (copied layer by layer) and start its async ones."""
        started = time.perf_counter()
        self._step_s = 0.0
        self._finish_layer_load()
        fetched = [(spec, load) for spec in plan.loads
                   if (load := self._fetch(spec, plan.recompute_s_per_token)) is not None]
        try:
            self._layer_load = LayerwiseLoad(self._chunks.copier, self._paged, [ld for _, ld in fetched], self._streams)
        except Exception:  # nothing was copied: vLLM recomputes these requests
            log.exception("kvtier: starting this step's loads failed; vLLM recomputes them")
            for spec, _ in fetched:
                self._check_loaded(spec, 0)
        for spec in plan.async_loads:  # parked requests: vLLM waits for get_finished to name them
            if self._loader is None:
                self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-load")
            self._loading[spec.req_id] = self._loader.submit(self._load, spec, plan.recompute_s_per_token)
        self._step_s += time.perf_counter() - started

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Just before a layer's attention: its loaded chunks are in the cache."""
        if self._layer_load is not None:
            started = time.perf_counter()
            self._layer_load.wait(self._layer_index.get(layer_name, len(self._layer_index) - 1))
            self._step_s += time.perf_counter() - started

    def wait_for_save(self, plan: StepPlan | None) -> None:
        """After the forward pass: finish the loads, gather the step's saves (all layers at once) and
        hand them to the tiers; a producer waits until they have reached every tier."""
        started = time.perf_counter()
        try:
            self._finish_layer_load()
            if plan is not None:
                self._save(plan)
        finally:
            self._step_s += time.perf_counter() - started
        if plan is not None:
            self._step = (plan.step, plan.timed)

    def step_report(self) -> StepReport | None:
        """After a step: kvtier's time on its path (if the scheduler times it) and the reads since
        the last report; None when there is nothing to tell."""
        step, self._step = self._step, None
        with self._report_lock:
            loads, self._loads_report = self._loads_report, LoadReport()
        timed = step is not None and step[1]
        if not timed and not loads.tiers:
            return None
        return StepReport(step[0] if step is not None else 0, timed, self._step_s, loads)

    def _save(self, plan: StepPlan) -> None:
        """Gather the step's saves on the store stream and hand them to the tiers."""
        with self._streams.storing():
            for spec in plan.saves if self._writer else ():  # MLA: rank 0 alone writes the shared latent KV
                try:
                    self._chunks.save_keys(*self._moves(spec))
                except Exception:  # a failed save is a future miss, never a failed step
                    log.exception("kvtier: saving %s failed", spec.req_id)
        self._saves.saving([spec.req_id for spec in plan.saves], self._streams.store_done())
        if plan.saves and self._durable_saves:
            self._chunks.flush()  # bounded: every tier's operations have timeouts

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Finished requests whose saves are copied out (vLLM frees their blocks now), and async
        loads that completed; their failed blocks were recorded before completion, so
        :meth:`get_block_ids_with_load_errors` reports them in this same pass."""
        sent = self._saves.finished(finished_req_ids)
        done = {req_id for req_id, future in self._loading.items() if future.done()}
        for req_id in done:
            del self._loading[req_id]
        return sent or None, done or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """The blocks of chunks that failed to load since the last call: vLLM recomputes them."""
        with self._failed_lock:
            failed = self._failed_blocks
            self._failed_blocks = set()
        return failed

    def shutdown(self) -> None:
        """Finish the async loads and the saves being encoded (they reach the tiers), then give the
        store back; once."""
        if self._closed:
            return
        self._closed = True
        if self._loader is not None:
            self._loader.shutdown(wait=True)
        if self._chunks is not None:
            self._chunks.close()  # GPU saves still being encoded reach the tiers first
        if self._lease is not None:
            self._lease.release()

    # -- helpers -----------------------------------------------------------------------------------

    def _moves(self, spec: TransferSpec) -> Moves:
        """(keys, paged cache, slots, tokens per chunk) of a spec's chunks, for this worker's shard."""
        size = self._config.chunk_size
        keys = self._chunks.keys_for_digests(spec.chain, spec.salt)
        slots = chunk_slots(spec, size, self._shape.block_size, self._shape.per_block)
        return keys, self._paged, slots, spec.tokens_in(size)

    def _skip_units(self, spec: TransferSpec) -> int:
        """The leading tokens the engine holds, in the slots' units (blocks for opaque layouts)."""
        return spec.skip_tokens // self._shape.block_size if self._shape.per_block else spec.skip_tokens

    def _fetch(self, spec: TransferSpec, recompute_s_per_token: float | None) -> ChunkLoad | None:
        """A synchronous load's chunks, read and checked now; copied into the cache layer by layer."""
        report = LoadReport()
        try:
            load = self._chunks.fetch_keys(*self._moves(spec), self._skip_units(spec), recompute_s_per_token, report)
        except Exception:
            log.exception("kvtier: loading %s failed; vLLM recomputes it", spec.req_id)
            load = ChunkLoad([], [])
        self._reported(report)
        self._check_loaded(spec, len(load.payloads))
        return load if load.payloads else None

    def _load(self, spec: TransferSpec, recompute_s_per_token: float | None) -> None:
        """An async load: fetch and copy at once, on the loader thread."""
        report = LoadReport()
        try:
            loaded = self._chunks.load_keys(*self._moves(spec), self._skip_units(spec), recompute_s_per_token, report)
        except Exception:
            log.exception("kvtier: loading %s failed; vLLM recomputes it", spec.req_id)
            loaded = 0
        self._reported(report)
        self._check_loaded(spec, loaded)

    def _reported(self, report: LoadReport) -> None:
        with self._report_lock:
            self._loads_report.merge(report)

    def _check_loaded(self, spec: TransferSpec, loaded: int) -> None:
        """Record the blocks from the first chunk not loaded on (vLLM recomputes from there)."""
        size, block = self._config.chunk_size, self._shape.block_size
        if loaded < spec.num_chunks:
            first_bad = max((spec.first_chunk + loaded) * size, spec.first_chunk * size + spec.skip_tokens)
            with self._failed_lock:
                self._failed_blocks.update(spec.block_ids[first_bad // block : -(-spec.end_token // block)])
            log.warning("kvtier: %s: loaded %d of %d chunks; recomputing from token %d",
                        spec.req_id, loaded, spec.num_chunks, first_bad)

    def _finish_layer_load(self) -> None:
        """End the step's layerwise load: copy the layers the forward pass did not ask for."""
        if self._layer_load is None:
            return
        self._layer_load.finish()
        # Kept until its copies are done: they read tier buffers (pinned views of the cpu tier)
        # that must not be reused under them.
        self._retired_loads = [ld for ld in self._retired_loads if not ld.copies_done()]
        if not self._layer_load.copies_done():
            self._retired_loads.append(self._layer_load)
        self._layer_load = None
