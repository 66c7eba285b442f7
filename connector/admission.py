"""Which computed chunks are worth saving (``save_policy``): every one, or those seen before.

Saving a chunk costs the engine: a gather out of the KV cache, a copy into each tier and, for the
disk, the page cache's writeback, all on cores (and memory bandwidth) that the forward pass uses.
On traffic that never repeats, that is pure cost: BENCHMARKS.md's serve benchmark measured it. With
``on_reuse`` the scheduler saves a chunk only when the engine has seen that chunk before, in an
earlier request. A chunk's chain digest names its whole prefix, so "seen before" means an earlier
prompt began with the same tokens up to the chunk's end: a shared system prompt is stored from its
second request on, the previous turn of a conversation when the next turn arrives, and a one-off
prompt never. The memory of digests seen is in-process and bounded (least recently seen forgotten
first), so a restart starts it afresh; what the store already holds is loaded either way.

``always`` is the default because ``on_reuse`` gives up what a restart or another instance would
find of prompts seen once: serve_bench's restart workload replays one run's prompts on a fresh
server. A prefill instance of a disaggregated deployment (``kv_producer``) saves everything: its
decode instance needs every prompt's KV.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence


class SaveAdmission(ABC):
    """Decides, once per request, how many of its leading chunks may be saved."""

    @abstractmethod
    def admitted(self, digests: Sequence[bytes], salt: str = "") -> int:
        """Leading chunks of a request (its chain ``digests``, under cache salt ``salt``) to save."""


class SaveAll(SaveAdmission):
    """``save_policy: always``: every chunk the store does not hold yet."""

    def admitted(self, digests: Sequence[bytes], salt: str = "") -> int:
        return len(digests)


class SaveOnReuse(SaveAdmission):
    """``save_policy: on_reuse``: the leading chunks some earlier request shared, remembering the
    last ``capacity`` digests seen (about 100 bytes each)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity {capacity}: must be at least 1")
        self.capacity = capacity
        self._seen: OrderedDict[tuple[str, bytes], None] = OrderedDict()

    def admitted(self, digests: Sequence[bytes], salt: str = "") -> int:
        leading = 0
        shared = True
        for digest in digests:
            key = (salt, digest)  # tenants apart: one's prompts never decide what another's saves
            if key in self._seen:
                self._seen.move_to_end(key)
                leading += shared
            else:
                shared = False
                self._seen[key] = None
                if len(self._seen) > self.capacity:
                    self._seen.popitem(last=False)
        return leading
