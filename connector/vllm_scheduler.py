"""The scheduler side of kvtier's vLLM connector: which tokens a request takes from the tiers.

vLLM asks the scheduler-side connector, per waiting request and step, how many prompt tokens it
can load beyond the engine's own prefix hit (:meth:`KVTierScheduler.get_num_new_matched_tokens`),
tells it which blocks it allocated for them, and ships what :meth:`KVTierScheduler.build_plan`
returns (a :class:`StepPlan` of loads and saves) to the workers. The bookkeeping is
:class:`RequestPlanner`'s; this class feeds it vLLM's objects and answers its lookups.

An engine may run as several processes (tensor ranks, pipeline stages): each worker stores its own
shard's chunks, and the scheduler, which sees only the tiers shared between processes (its store
is ``shared_only`` when the workers run apart), promises a chunk only when every shard holds it
(:class:`ShardSet`). How much of a hit to load, and whether in the background, is
:class:`LoadCosts`' choice (``load_policy``, ``load_mode``): it weighs each tier's measured read
speed against the engine's measured prefill speed; the workers report their reads and kvtier's time
in each step back (vLLM's worker metadata, :meth:`KVTierScheduler.update_connector_output`). A
background load parks the request in WAITING_FOR_REMOTE_KVS until the workers report it done, and
the engine serves others meanwhile. A finished request with saves keeps its blocks until the workers report the gathers
done. A failed lookup is a miss, and kvtier sets ``kv_load_failure_policy`` to ``"recompute"``
so that a chunk the workers fail to load is recomputed: a cache must never fail a request.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .admission import SaveAdmission, SaveAll, SaveOnReuse
from .engine_setup import EngineSetup, StoreLease
from .load_cost import LoadCosts, StepReport, StepTimer
from .planner import RequestPlanner, StepPlan
from .shards import PromptChain, ShardSet
from .vllm_inputs import request_chain, request_salt
from .vllm_layout import CacheShape, EngineLayout, all_shards

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from kvtier.storage_backends.tiered import TieredStore

log = logging.getLogger(__name__)


def save_admission(setup: EngineSetup, role: str | None, active: bool) -> SaveAdmission:
    """The configured save policy; a prefill instance (``kv_producer``) saves everything."""
    if setup.config.save_policy == "always" or role == "kv_producer":
        return SaveAll()
    if active:
        log.info("kvtier: save_policy on_reuse: a chunk is stored once an earlier request shared it (a one-off "
                 "prompt is never stored); set save_policy: always to store every prompt at once")
    return SaveOnReuse(setup.config.reuse_memory_chunks)


class KVTierScheduler:
    """kvtier in vLLM's scheduler process: lookups over every shard, the plan of each step."""

    def __init__(self, vllm_config: VllmConfig, setup: EngineSetup, shape: CacheShape, layout: EngineLayout,
                 active: bool) -> None:
        transfer = vllm_config.kv_transfer_config
        self._chunk_size = setup.config.chunk_size
        self._shards = ShardSet(all_shards(setup, shape, layout))
        if transfer.kv_load_failure_policy != "recompute":
            log.info("kvtier: setting kv_load_failure_policy=recompute (a cache miss must not fail a request)")
            transfer.kv_load_failure_policy = "recompute"
        self._chains: dict[str, PromptChain] = {}
        config = setup.config
        self._costs = LoadCosts(config.load_policy, config.load_mode, config.async_load_above_s)
        self._timer = StepTimer(self._costs)
        self._step = 0
        self._held_runs: list[tuple[str, int]] = []  # the last lookup's (tier, tokens) runs
        self._background: dict[str, bool] = {}  # req_id -> load in the background (the choice at lookup)
        self._planner = RequestPlanner(self._chunk_size, self._lookup, save=transfer.is_kv_producer and active,
                                       load=transfer.is_kv_consumer and active and config.load_policy != "never",
                                       async_loads=config.load_mode == "async",
                                       admission=save_admission(setup, transfer.kv_role, active))
        # A scheduler whose workers run in processes of their own sees only the tiers shared between processes.
        self._lease: StoreLease | None = None
        if active:
            self._lease = setup.lease_store(shared_only=layout.workers_apart,
                                            metrics_port_offset=layout.metrics_offset(None))
        self._store: TieredStore | None = None if self._lease is None else self._lease.store

    def _lookup(self, chain: PromptChain, salt: str) -> int:
        try:
            self._held_runs = self._shards.held_runs(self._store, chain, salt, self._costs.observe_lookup)
        except Exception:  # a lookup must never fail the scheduler
            log.exception("kvtier: lookup failed; treating as a miss")
            self._held_runs = []
        return sum(tokens for _, tokens in self._held_runs)

    def _chain(self, request: Request) -> PromptChain:
        """The request's chunk chain, computed once (a waiting request is asked about every step)."""
        chain = self._chains.get(request.request_id)
        if chain is None:
            chain = request_chain(request, self._chunk_size)
            self._chains[request.request_id] = chain
        return chain

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens the tiers hold beyond ``num_computed_tokens``, and whether they load asynchronously."""
        matched = self._planner.matched_tokens(request.request_id, self._chain(request), request_salt(request),
                                               num_computed_tokens)
        if not matched:
            return 0, False
        choice = self._costs.choose(self._held_runs, num_computed_tokens, num_computed_tokens + matched,
                                    self._planner.others_in_flight(request.request_id))
        if choice.tokens < matched:
            log.debug("kvtier: %s: loading %d of the %d tokens held (the rest is cheaper to recompute)",
                      request.request_id, choice.tokens, matched)
        self._background[request.request_id] = choice.background
        return choice.tokens, choice.background

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """The blocks vLLM allocated for a request; the ``num_external_tokens`` in them are to be loaded."""
        if request.num_prompt_tokens:
            block_ids = blocks.get_block_ids()[0] if num_external_tokens else ()
            self._planner.allocated(request.request_id, self._chain(request), request_salt(request),
                                    num_external_tokens, block_ids, self._background.pop(request.request_id, None))

    def build_plan(self, scheduler_output: SchedulerOutput) -> StepPlan:
        """What the workers load and save in this step (the connector metadata's content)."""
        self._step += 1
        plan = StepPlan(step=self._step, recompute_s_per_token=self._costs.recompute_s_per_token
                        if self._costs.policy == "auto" else None)
        plan.timed = self._timer.planned(self._step, scheduler_output.total_num_scheduled_tokens, time.perf_counter())
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
        return plan

    def report(self, report: StepReport) -> None:
        """The workers' report of a step (vLLM's worker metadata): fold it into the estimates."""
        self._timer.reported(report, time.perf_counter())

    def request_finished(self, request: Request) -> bool:
        """Whether vLLM must keep the request's blocks until a worker names it in ``get_finished``:
        a request with saves keeps them until its gathers are done, so a copy on a side stream never
        reads blocks handed to another request."""
        self._chains.pop(request.request_id, None)
        self._background.pop(request.request_id, None)
        return self._planner.finished(request.request_id)

    def shutdown(self) -> None:
        """Give the store back (once)."""
        if self._lease is not None:
            self._lease.release()
