"""Which chunks each request loads and saves, step by step: the scheduler's bookkeeping.

Engine-agnostic: an adapter feeds in what its scheduler decided (a request's :class:`PromptChain`,
blocks, how many tokens are computed) and gets plain :class:`TransferSpec` records to ship to the
workers. The chain is computed once per request, here in the scheduler (it may carry more than the
token ids: images, embeddings), and the workers receive the digests of the chunks they move, not
the tokens. Rules:

- A request may take from kvtier every prompt token it holds beyond the engine's own prefix hit,
  but never the last prompt token (the engine must compute at least one to sample from).
- A stored partial tail chunk counts only for a request with exactly those tokens, so a repeated
  prompt (or a decode instance) loads all but one token.
- Every chunk the store does not hold yet, and that the save policy admits (``admission``: all, or
  only chunks an earlier request shared), is saved once its tokens are computed; the partial tail
  once the whole prompt is.
- A finished request that had saves keeps its blocks until the workers report the saves copied
  (:meth:`RequestPlanner.finished` says so), so a copy still running on a side stream never
  reads blocks the engine has handed to another request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .admission import SaveAdmission, SaveAll
from .shards import PromptChain


@dataclass
class TransferSpec:
    """Chunks ``first_chunk .. first_chunk + num_chunks - 1`` of one request (plain data).

    ``chain`` holds those chunks' chain digests (each worker turns them into its own shard's keys);
    ``end_token`` is where the last chunk of the range ends (before a chunk boundary: it is the
    partial tail); ``block_ids`` are the request's blocks in token order; ``skip_tokens`` (loads)
    are leading tokens of the first chunk the engine already holds.
    """

    req_id: str
    chain: list[bytes]
    end_token: int
    block_ids: list[int]
    salt: str
    first_chunk: int
    num_chunks: int
    skip_tokens: int = 0

    def tokens_in(self, chunk_size: int) -> list[int]:
        """Tokens of each chunk of the range (the tail may be shorter)."""
        first = self.first_chunk
        return [min(chunk_size, self.end_token - (first + j) * chunk_size) for j in range(self.num_chunks)]


@dataclass
class StepPlan:
    """What the workers do for kvtier in one engine step.

    ``loads`` complete before the forward pass (layer by layer on GPU); ``async_loads`` run in the
    background for requests the engine parks until the worker reports them finished.
    ``preempted``: the engine freed the blocks of preempted requests this step, so copies still
    reading blocks must finish before the forward pass may overwrite them. ``step`` numbers the
    plans; ``timed``: the scheduler times this step (the workers report kvtier's time in it);
    ``recompute_s_per_token``: the engine's estimated prefill speed, below which loads stop
    (None: no estimate, load everything).
    """

    loads: list[TransferSpec] = field(default_factory=list)
    saves: list[TransferSpec] = field(default_factory=list)
    async_loads: list[TransferSpec] = field(default_factory=list)
    preempted: bool = False
    step: int = 0
    timed: bool = False
    recompute_s_per_token: float | None = None


@dataclass
class _Request:
    chain: PromptChain
    salt: str
    block_ids: list[int] = field(default_factory=list)
    saved_chunks: int = 0  # leading chunks the store holds or that were sent for saving
    admitted_chunks: int = 0  # leading chunks the save policy lets this request save
    load_tokens: int = 0  # external tokens granted at allocation, to load in the next step
    save_planned: bool = False  # a save was sent to the workers: its blocks wait for the copy at finish


class RequestPlanner:
    """Tracks requests between scheduler calls; ``lookup(chain, salt)`` = leading tokens held."""

    def __init__(self, chunk_size: int, lookup: Callable[[PromptChain, str], int], save: bool = True,
                 load: bool = True, async_loads: bool = False, admission: SaveAdmission | None = None) -> None:
        self.chunk_size = chunk_size
        self._lookup = lookup
        self._save = save
        self._admission = admission or SaveAll()
        self._load = load
        self.async_loads = async_loads
        self._requests: dict[str, _Request] = {}
        self._held: dict[str, tuple[int, int]] = {}  # req_id -> (tokens held, engine's own hit) at the last lookup
        self._pending_async: list[TransferSpec] = []

    def others_in_flight(self, req_id: str) -> bool:
        """Whether a request other than ``req_id`` has blocks allocated and is not finished."""
        return len(self._requests) > (req_id in self._requests)

    def chunks_of(self, num_tokens: int) -> int:
        """Chunks covering ``num_tokens`` tokens, the partial tail included."""
        return -(-num_tokens // self.chunk_size)

    def matched_tokens(self, req_id: str, chain: PromptChain, salt: str, num_computed: int) -> int:
        """Tokens to load beyond the ``num_computed`` the engine holds (no side effects but a cache).

        A save-only role looks up too, so it does not rewrite chunks the store already holds.
        """
        if chain.num_tokens < 2 or not (self._load or self._save):
            return 0
        held = self._lookup(chain, salt)
        self._held[req_id] = (held, num_computed)
        return max(0, min(held, chain.num_tokens - 1) - num_computed) if self._load else 0

    def allocated(self, req_id: str, chain: PromptChain, salt: str, num_external: int,
                  block_ids: Sequence[int] = (), background: bool | None = None) -> None:
        """The engine allocated blocks (``block_ids``, in token order) for a request;
        ``num_external`` tokens come from kvtier, in the background if ``background`` (None: as
        the planner's ``async_loads`` says)."""
        held, local = self._held.pop(req_id, (0, 0))
        req = self._requests.get(req_id)
        if req is None:  # once per request: a preempted one that resumes is not a second sighting
            req = self._requests[req_id] = _Request(chain, salt)
            if self._save:
                req.admitted_chunks = self._admission.admitted(chain.digests, salt)
        prompt = chain.num_tokens
        stored = held // self.chunk_size + (1 if held == prompt and held % self.chunk_size else 0)
        req.saved_chunks = max(req.saved_chunks, stored)
        if (self.async_loads if background is None else background) and num_external:  # parked: load next step
            req.block_ids = list(block_ids)
            self._pending_async.append(self._load_spec(req_id, req, local, local + num_external))
        else:
            req.load_tokens = num_external

    def take_async_loads(self, plan: StepPlan) -> None:
        """Move the loads of requests parked since the last step into ``plan``."""
        plan.async_loads.extend(self._pending_async)
        self._pending_async.clear()

    def scheduled(self, req_id: str, block_ids: Sequence[int], replace_blocks: bool, num_computed: int,
                  num_scheduled: int, plan: StepPlan) -> None:
        """A step runs ``num_scheduled`` tokens of a request after ``num_computed``: add its transfers.

        ``num_computed`` counts the external tokens granted for this step (as engines report it).
        """
        req = self._requests.get(req_id)
        if req is None:
            return
        req.block_ids = list(block_ids) if replace_blocks else req.block_ids + list(block_ids)
        if req.load_tokens:
            self._plan_load(req_id, req, num_computed, plan)
        if self._save:
            self._plan_save(req_id, req, num_computed + num_scheduled, plan)

    def finished(self, req_id: str) -> bool:
        """Forget a finished request; True if the workers were sent saves for it (then the engine
        must keep its blocks until a worker reports the request's saves finished)."""
        req = self._requests.pop(req_id, None)
        self._held.pop(req_id, None)
        return req is not None and req.save_planned

    def _plan_load(self, req_id: str, req: _Request, num_computed: int, plan: StepPlan) -> None:
        end = num_computed  # the engine counts granted tokens as computed
        plan.loads.append(self._load_spec(req_id, req, end - req.load_tokens, end))
        req.load_tokens = 0

    def _load_spec(self, req_id: str, req: _Request, start: int, end: int) -> TransferSpec:
        """Load tokens ``start .. end - 1``: the chunks that cover them, the held ones skipped."""
        first, last = start // self.chunk_size, (end - 1) // self.chunk_size
        end_token = min(req.chain.num_tokens, (last + 1) * self.chunk_size)
        return TransferSpec(req_id, list(req.chain.digests[first : last + 1]), end_token, list(req.block_ids),
                            req.salt, first, last - first + 1, skip_tokens=start - first * self.chunk_size)

    def _plan_save(self, req_id: str, req: _Request, computed: int, plan: StepPlan) -> None:
        prompt = req.chain.num_tokens
        done = min(computed, prompt)
        ready = self.chunks_of(done) if done == prompt else done // self.chunk_size
        ready = min(ready, req.admitted_chunks)
        if ready > req.saved_chunks:
            end = min(prompt, ready * self.chunk_size)
            plan.saves.append(TransferSpec(req_id, list(req.chain.digests[req.saved_chunks : ready]), end,
                                           list(req.block_ids), req.salt, req.saved_chunks,
                                           ready - req.saved_chunks))
            req.saved_chunks = ready
            req.save_planned = True


def chunk_slots(spec: TransferSpec, chunk_size: int, block_size: int, per_block: bool) -> list[torch.Tensor]:
    """Slots of each chunk of ``spec``: token slots (``block * block_size + offset``), or block ids
    for layouts stored as whole opaque blocks (``per_block``; a partial block is stored whole)."""
    blocks = torch.tensor(spec.block_ids, dtype=torch.int64)
    out = []
    for index in range(spec.first_chunk, spec.first_chunk + spec.num_chunks):
        start, end = index * chunk_size, min((index + 1) * chunk_size, spec.end_token)
        if per_block:
            out.append(blocks[start // block_size : -(-end // block_size)])
        else:
            positions = torch.arange(start, end)
            out.append(blocks[positions // block_size] * block_size + positions % block_size)
    return out
