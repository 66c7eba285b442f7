"""kvtier as a vLLM KV connector (vLLM >= 0.30, v1 engine).

Enable it with ``--kv-transfer-config '{"kv_connector":"KVTierConnector",
"kv_connector_module_path":"kvtier.connector.vllm","kv_role":"kv_both",
"kv_connector_extra_config":{"config":"kvtier.yaml"}}'`` (other extra-config keys override the
YAML, e.g. ``"redis.url"``), or the same dict as ``LLM(kv_transfer_config=...)``. With kvtier
installed, its ``vllm.general_plugins`` entry point registers the bare name ``KVTierConnector``.

vLLM builds one connector per role, usually in different processes: one in the scheduler (which
decides, per request, how many prompt tokens come from the tiers) and one in each worker (which
moves the KV between its cache and the tiers, overlapped with the forward pass). So, as vLLM's own
OffloadingConnector, :class:`KVTierConnector` holds the start-up both roles share and delegates
every hook to a :class:`KVTierScheduler` (:mod:`.vllm_scheduler`: lookups over every shard, the
plan of each step) or a :class:`KVTierWorker` (:mod:`.vllm_worker`: loads, saves, copy streams);
the step's plan travels from one to the other as :class:`KVTierConnectorMetadata`.

This package only translates vLLM's objects: the start-up both engines share (config, store,
namespace inputs) is :mod:`.engine_setup`, planning is :class:`RequestPlanner`, moving bytes is
:class:`ChunkStore` and the copy layer, overlapping them with the forward pass is
:mod:`.transfers`; what the engine's config says (cache shape, shards, settings) is
:mod:`.vllm_layout`, what names a request's KV (salt, images, embeddings) is :mod:`.vllm_inputs`.
Anything that goes wrong becomes a miss or a recompute: kvtier sets ``kv_load_failure_policy`` to
``"recompute"``, because a cache must never fail a request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from kvtier.connector.store_factory import is_process_local

from .engine_setup import EngineSetup, engine_config
from .load_cost import StepReport
from .planner import StepPlan
from .vllm_layout import CacheShape, EngineLayout, model_settings
from .vllm_scheduler import KVTierScheduler
from .vllm_worker import KVTierWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["KVTierConnector", "KVTierConnectorMetadata", "KVTierScheduler", "KVTierWorker", "KVTierWorkerMetadata",
           "register"]

log = logging.getLogger(__name__)


def _log_like_vllm() -> None:
    """Show kvtier's log lines (from every module) where and as vLLM shows its own: vLLM configures
    only its ``vllm`` logger, so kvtier's INFO lines would otherwise be dropped."""
    ours = logging.getLogger("kvtier")
    theirs = logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level or logging.INFO)
    ours.propagate = False


@dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    """What the scheduler sends the workers each step: the step's plan."""

    plan: StepPlan


@dataclass
class KVTierWorkerMetadata(KVConnectorWorkerMetadata):
    """What the workers send the scheduler after a step: their reads and kvtier's time in the step
    (vLLM merges every worker's with :meth:`aggregate`)."""

    report: StepReport

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVTierWorkerMetadata):
            self.report.merge(other.report)
        return self


def _usable(setup: EngineSetup, layout: EngineLayout, announce: bool) -> bool:
    """Whether kvtier can do anything in this engine; the scheduler says (once, at start-up) which
    tiers it looks up in when the workers run in processes of their own."""
    if setup.settings.kv_scales == "calculated":  # scales from the first batch: no chunk is right for another instance
        if announce:
            log.warning("kvtier: KV-cache scales are calculated at run time (calculate_kv_scales), so the KV "
                        "differs per instance; kvtier neither loads nor saves")
        return False
    if not layout.workers_apart:
        return True
    tiers = setup.config.tiers
    shared = [t.name for t in tiers if not is_process_local(t)]
    local = [t.name for t in tiers if is_process_local(t)]
    shape = f"tensor_parallel_size={layout.tp_size}, pipeline_parallel_size={layout.pp_size}"
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


class KVTierConnector(KVConnectorBase_V1):
    """Tiered prefix cache and prefill->decode transfer for vLLM: one role's object behind vLLM's hooks."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _log_like_vllm()
        config = engine_config(self._kv_transfer_config.kv_connector_extra_config)
        shape = CacheShape.of(vllm_config, kv_cache_config)
        if config.chunk_size % shape.block_size:
            raise ValueError(f"kvtier chunk_size {config.chunk_size} must be a multiple of vLLM's block size "
                             f"{shape.block_size}")
        layout = EngineLayout.of(vllm_config)
        setup = EngineSetup.of(config, vllm_config.model_config.model, model_settings(vllm_config))
        is_scheduler = role == KVConnectorRole.SCHEDULER
        active = _usable(setup, layout, announce=is_scheduler)
        self._scheduler: KVTierScheduler | None = None
        self._worker: KVTierWorker | None = None
        if is_scheduler:
            self._scheduler = KVTierScheduler(vllm_config, setup, shape, layout, active)
        else:
            self._worker = KVTierWorker(vllm_config, setup, shape, layout, active)

    @property
    def scheduler(self) -> KVTierScheduler:
        """The scheduler-side object; only a scheduler-role connector has one."""
        if self._scheduler is None:
            raise RuntimeError(f"kvtier: a scheduler hook was called on a {self.role.name} connector")
        return self._scheduler

    @property
    def worker(self) -> KVTierWorker:
        """The worker-side object; only a worker-role connector has one."""
        if self._worker is None:
            raise RuntimeError(f"kvtier: a worker hook was called on a {self.role.name} connector")
        return self._worker

    def _plan(self) -> StepPlan:
        return self._get_connector_metadata().plan

    # -- scheduler side ---------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return KVTierConnectorMetadata(self.scheduler.build_plan(scheduler_output))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, KVTierWorkerMetadata):
            self.scheduler.report(meta.report)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request), None

    # -- worker side ------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        self.worker.handle_preemptions(kv_connector_metadata.plan)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker.start_load_kv(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # chunks are gathered for all layers at once in wait_for_save

    def wait_for_save(self) -> None:
        self.worker.wait_for_save(self._plan() if self.has_connector_metadata() else None)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        report = self.worker.step_report()
        return None if report is None else KVTierWorkerMetadata(report)

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown()
        if self._worker is not None:
            self._worker.shutdown()


def register() -> None:
    """``vllm.general_plugins`` entry point: make ``"kv_connector": "KVTierConnector"`` work alone."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector("KVTierConnector", "kvtier.connector.vllm", "KVTierConnector")
    except ValueError:
        pass  # already registered in this process
