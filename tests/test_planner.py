"""The scheduler's bookkeeping, without an engine: what each step loads and saves."""

from __future__ import annotations

import torch

from kvtier.connector.planner import RequestPlanner, StepPlan, TransferSpec, chunk_slots
from kvtier.connector.shards import PromptChain

CHUNK = 8


def _planner(held: dict[tuple, int], **kw) -> RequestPlanner:
    return RequestPlanner(CHUNK, lambda chain, salt: held.get((chain.num_tokens, salt), 0), **kw)


def _chain(tokens: list[int]) -> PromptChain:
    return PromptChain.of(tokens, CHUNK)


def test_all_but_the_last_token_is_taken_and_loaded_in_one_step() -> None:
    planner = _planner({(20, ""): 20})  # two full chunks and a 4-token tail are stored
    tokens = list(range(20))
    assert planner.matched_tokens("r", _chain(tokens), "", 0) == 19
    planner.allocated("r", _chain(tokens), "", 19)
    plan = StepPlan()
    planner.scheduled("r", [5, 6, 7, 8, 9], True, 19, 1, plan)
    assert plan.loads == [TransferSpec("r", list(_chain(tokens).digests), 20, [5, 6, 7, 8, 9], "", 0, 3, 0)]
    assert plan.saves == []  # everything is stored already


def test_engine_prefix_hit_is_skipped_and_never_counted_twice() -> None:
    planner = _planner({(24, ""): 16})
    tokens = list(range(24))
    assert planner.matched_tokens("r", _chain(tokens), "", 4) == 12  # the engine holds 4 tokens itself
    assert planner.matched_tokens("r", _chain(tokens), "", 16) == 0
    planner.allocated("r", _chain(tokens), "", 12)
    plan = StepPlan()
    planner.scheduled("r", list(range(6)), True, 16, 8, plan)
    load = plan.loads[0]
    assert (load.first_chunk, load.num_chunks, load.skip_tokens) == (0, 2, 4)
    assert [(s.first_chunk, s.num_chunks, s.end_token) for s in plan.saves] == [(2, 1, 24)]


def test_saves_follow_chunked_prefill_and_end_with_the_tail() -> None:
    planner = _planner({})
    tokens = list(range(21))
    assert planner.matched_tokens("r", _chain(tokens), "", 0) == 0
    planner.allocated("r", _chain(tokens), "", 0)
    steps = [(0, 10), (10, 10), (20, 1), (21, 1)]  # chunked prefill of 10, then the tail, then decode
    saved = []
    for computed, scheduled in steps:
        plan = StepPlan()
        planner.scheduled("r", [computed // 4], computed == 0, computed, scheduled, plan)
        saved.append([(s.first_chunk, s.num_chunks, s.end_token) for s in plan.saves])
    assert saved == [[(0, 1, 8)], [(1, 1, 16)], [(2, 1, 21)], []]


def test_roles_and_short_prompts() -> None:
    consumer = _planner({(16, ""): 16}, save=False)
    producer = _planner({(16, ""): 16}, load=False)
    tokens = list(range(16))
    assert producer.matched_tokens("r", _chain(tokens), "", 0) == 0
    producer.allocated("r", _chain(tokens), "", 0)
    plan = StepPlan()
    producer.scheduled("r", [1, 2, 3, 4], True, 0, 16, plan)
    assert plan.saves == []  # the producer looked up: both chunks are stored already
    assert consumer.matched_tokens("r", _chain(tokens), "", 0) == 15
    consumer.allocated("r", _chain(tokens), "", 0)
    plan = StepPlan()
    consumer.scheduled("r", [1, 2, 3, 4], True, 0, 16, plan)
    assert plan.saves == [] and plan.loads == []
    assert consumer.matched_tokens("r", _chain([1]), "", 0) == 0


def test_salt_reaches_the_lookup_and_the_specs() -> None:
    planner = _planner({(16, "lora=a"): 16})
    assert planner.matched_tokens("r", _chain(list(range(16))), "", 0) == 0
    assert planner.matched_tokens("r", _chain(list(range(16))), "lora=a", 0) == 15


def test_unknown_and_finished_requests_are_ignored() -> None:
    planner = _planner({})
    plan = StepPlan()
    planner.scheduled("ghost", [1], True, 0, 4, plan)
    planner.allocated("r", _chain(list(range(8))), "", 0)
    assert planner.finished("r") is False  # no save was sent: the engine frees its blocks at once
    planner.scheduled("r", [1, 2], True, 0, 8, plan)
    assert plan.loads == plan.saves == []
    assert planner.finished("ghost") is False


def test_finished_request_with_saves_keeps_its_blocks() -> None:
    """Saves may still be copying on a side stream: the engine must wait for the workers."""
    planner = _planner({})
    planner.allocated("r", _chain(list(range(8))), "", 0)
    planner.scheduled("r", [1], True, 0, 4, StepPlan())  # half a chunk computed: nothing saved yet
    planner.allocated("s", _chain(list(range(8))), "", 0)
    planner.scheduled("s", [1, 2], True, 0, 8, plan := StepPlan())
    assert [spec.req_id for spec in plan.saves] == ["s"]
    assert planner.finished("r") is False
    assert planner.finished("s") is True
    assert planner.finished("s") is False  # forgotten after the first answer


def test_chunk_slots_for_token_and_block_layouts() -> None:
    spec = TransferSpec("r", list(_chain(list(range(21))).digests[1:]), 21, [7, 3, 9, 4, 2, 8], "", 1, 2)
    tokens = chunk_slots(spec, CHUNK, 4, per_block=False)
    assert tokens[0].tolist() == [9 * 4 + i for i in range(4)] + [4 * 4 + i for i in range(4)]
    assert tokens[1].tolist() == [2 * 4 + i for i in range(4)] + [8 * 4]  # 5 tokens of the tail
    blocks = chunk_slots(spec, CHUNK, 4, per_block=True)
    assert [b.tolist() for b in blocks] == [[9, 4], [2, 8]]  # the tail's partial block is stored whole
    assert all(t.dtype == torch.int64 for t in tokens + blocks)


def test_async_loads_are_planned_at_allocation_for_the_parked_request() -> None:
    planner = _planner({(20, ""): 20}, async_loads=True)
    tokens = list(range(20))
    assert planner.matched_tokens("r", _chain(tokens), "", 4) == 15  # the engine holds 4 tokens itself
    planner.allocated("r", _chain(tokens), "", 15, block_ids=[5, 6, 7, 8, 9])
    plan = StepPlan()
    planner.take_async_loads(plan)
    assert plan.async_loads == [TransferSpec("r", list(_chain(tokens).digests), 20, [5, 6, 7, 8, 9], "", 0, 3,
                                             skip_tokens=4)]
    assert plan.loads == []
    later = StepPlan()  # once loaded, vLLM schedules it with the tokens computed: no second load
    planner.take_async_loads(later)
    planner.allocated("r", _chain(tokens), "", 0)
    planner.scheduled("r", [5, 6, 7, 8, 9], True, 19, 1, later)
    assert later.async_loads == later.loads == later.saves == []


# -- save_policy: on_reuse ------------------------------------------------------------------------


def _saved_chunks(planner: RequestPlanner, req_id: str, tokens: list[int], salt: str = "") -> int:
    """Run a request whose prompt is computed in one step; the chunks it sends for saving."""
    chain = _chain(tokens)
    planner.matched_tokens(req_id, chain, salt, 0)
    planner.allocated(req_id, chain, salt, 0)
    plan = StepPlan()
    planner.scheduled(req_id, list(range(8)), True, 0, len(tokens), plan)
    planner.finished(req_id)
    return sum(save.num_chunks for save in plan.saves)


def test_on_reuse_saves_a_chunk_from_its_second_sighting_on() -> None:
    from kvtier.connector.admission import SaveOnReuse

    planner = _planner({}, admission=SaveOnReuse(1000))
    prompt = list(range(20))  # two full chunks and a 4-token tail
    assert _saved_chunks(planner, "a", prompt) == 0  # a one-off prompt is not stored
    assert _saved_chunks(planner, "b", prompt) == 3  # seen before: all of it, the tail included
    other_tail = prompt[:16] + [99, 98, 97, 96]
    assert _saved_chunks(planner, "c", other_tail) == 2  # the shared chunks only
    diverging = prompt[:8] + list(range(50, 62))
    assert _saved_chunks(planner, "d", diverging) == 1  # what follows the first difference is new
    assert _saved_chunks(planner, "e", prompt, salt="tenant-2") == 0  # another tenant's sighting does not count


def test_on_reuse_counts_a_request_once_and_forgets_the_oldest() -> None:
    from kvtier.connector.admission import SaveOnReuse

    planner = _planner({}, admission=SaveOnReuse(2))
    prompt = list(range(16))
    chain = _chain(prompt)
    planner.allocated("p", chain, "", 0)
    planner.allocated("p", chain, "", 0)  # a preempted request allocated again: not a second sighting
    plan = StepPlan()
    planner.scheduled("p", [0, 1], True, 0, 16, plan)
    assert plan.saves == []
    planner.finished("p")
    assert _saved_chunks(planner, "q", list(range(100, 116))) == 0  # two new digests push the prompt's out
    assert _saved_chunks(planner, "r", prompt) == 0
    assert _saved_chunks(planner, "s", prompt) == 2


def test_save_all_and_bad_capacity() -> None:
    import pytest

    from kvtier.connector.admission import SaveAll, SaveOnReuse

    assert _saved_chunks(_planner({}, admission=SaveAll()), "a", list(range(20))) == 3
    with pytest.raises(ValueError, match="at least 1"):
        SaveOnReuse(0)


def test_a_load_goes_to_the_background_only_when_asked_and_others_know_it() -> None:
    planner = _planner({(20, ""): 20, (30, ""): 24})
    first, second = _chain(list(range(20))), _chain(list(range(100, 130)))
    assert not planner.others_in_flight("a")
    planner.matched_tokens("a", first, "", 0)
    planner.allocated("a", first, "", 19, [1, 2, 3], background=False)
    assert planner.others_in_flight("b") and not planner.others_in_flight("a")
    planner.matched_tokens("b", second, "", 0)
    planner.allocated("b", second, "", 24, [4, 5, 6, 7], background=True)  # parked: loaded in the next plan
    plan = StepPlan()
    planner.take_async_loads(plan)
    assert [spec.req_id for spec in plan.async_loads] == ["b"] and plan.loads == []
    planner.scheduled("a", [1, 2, 3], True, 19, 1, plan)
    assert [spec.req_id for spec in plan.loads] == ["a"]
    planner.finished("a")
    planner.finished("b")
    assert not planner.others_in_flight("c")
