"""The node server's bookkeeping: which slots hold which chunk, who reads or writes them, what to evict.

Only numbers live here; the bytes are in the shared-memory segments that clients copy to and from
(``node_protocol``). The pool works like the cpu tier's (``cpu_backend``): fixed-size slots, a chunk
takes ``ceil(nbytes / slot_bytes)`` of them (adjacent ones when a run is free, which lets clients
read it in place; else any), LRU order within the cap,
and a put never evicts for nothing: it first checks that free slots and readerless entries add up
to what it needs.

Clients in other processes copy bytes out of slots after the server answered, so a slot must not
be reused while a client may still be reading it: ``get`` hands out a *lease* on the entries it
found, and an entry under a lease is never evicted; deleted or replaced meanwhile, its slots are
freed at the last release. Everything a connection holds (its leases and the slots it reserved
but never committed) is dropped when the connection closes, so a client that dies frees it all at
once; a plain lease also expires after ``lease_timeout_s``.

A *hold* is a lease without expiry, for a client that reads in place (zero-copy views into the
segments that live as long as its caller keeps them), and reservations do not expire either: an
expiry could free slots under a live view, or hand a stopped writer's slots to another writer and
let the first, resumed, overwrite a published chunk. With both bound to their connection, the
bytes of a published chunk change only if a process writes outside the slots it reserved; readers
of the node tier rely on that (``node_backend``). A hung client keeps what it holds until it dies.

Thread-safe: one lock around everything; no call does I/O.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

_FREE, _USED = b"\x01", b"\x00"
MAX_LEASES_PER_OWNER = 65536  # a client that never releases is refused new leases, not given memory


@dataclass(eq=False)
class Entry:
    """A chunk's slots; ``readers`` counts live leases, ``detached`` means it left the index meanwhile."""

    slots: list[int]
    nbytes: int
    readers: int = 0
    detached: bool = False


@dataclass(eq=False)
class Lease:
    owner: int
    entries: list[Entry]
    expires: float


@dataclass
class PoolCounters:
    """Monotonic counters for ``stats``."""

    evicted_chunks: int = 0
    evicted_bytes: int = 0
    expired_leases: int = 0
    dropped_leases: int = 0
    dropped_reservations: int = 0
    skipped_reserves: int = 0
    commits: int = 0


@dataclass
class NodePool:
    """Slots ``0..num_slots-1`` of ``slot_bytes`` each; ``owner`` ids name connections."""

    num_slots: int
    slot_bytes: int
    lease_timeout_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    counters: PoolCounters = field(default_factory=PoolCounters)
    slots_per_segment: int = 0  # a run of slots never crosses a segment's end; 0: one segment

    def __post_init__(self) -> None:
        if self.num_slots <= 0 or self.slot_bytes <= 0 or self.lease_timeout_s <= 0:
            raise ValueError("num_slots, slot_bytes and lease_timeout_s must be positive")
        self._lock = threading.Lock()
        self._free_map = bytearray(_FREE) * self.num_slots  # _FREE or _USED per slot
        self._free_count = self.num_slots
        self._segment_slots = self.slots_per_segment or self.num_slots
        self._index: OrderedDict[str, Entry] = OrderedDict()  # oldest first
        self._leases: dict[int, Lease] = {}  # in creation order, so in expiry order
        self._holds: dict[int, Lease] = {}  # leases that never expire (see the module docstring)
        self._lease_counts: dict[int, int] = {}
        self._reserved: dict[tuple[int, str], Entry] = {}  # (owner, key): slots being written
        self._ids = itertools.count(1)
        self._used_bytes = 0

    # -- requests --------------------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[str]) -> int:
        with self._lock:
            for count, key in enumerate(keys):
                if key not in self._index:
                    return count
            return len(keys)

    def get(self, owner: int, keys: Sequence[str],
            hold: bool = False) -> tuple[int | None, list[tuple[list[int], int] | None]]:
        """The slots and size of each key (None: a miss) and the lease that holds them (None: no hit);
        with ``hold``, a lease that does not expire."""
        with self._lock:
            self._expire()
            if self._lease_counts.get(owner, 0) >= MAX_LEASES_PER_OWNER:
                return None, [None] * len(keys)
            found: list[Entry] = []
            out: list[tuple[list[int], int] | None] = []
            for key in keys:
                entry = self._index.get(key)
                if entry is None:
                    out.append(None)
                    continue
                self._index.move_to_end(key)
                entry.readers += 1
                found.append(entry)
                out.append((entry.slots, entry.nbytes))
            if not found:
                return None, out
            lease_id = next(self._ids)
            if hold:
                self._holds[lease_id] = Lease(owner, found, math.inf)
            else:
                self._leases[lease_id] = Lease(owner, found, self.clock() + self.lease_timeout_s)
            self._lease_counts[owner] = self._lease_counts.get(owner, 0) + 1
            return lease_id, out

    def release(self, owner: int, lease_ids: Sequence[int]) -> None:
        """Hand leases back; ids that are unknown, expired or another owner's are ignored."""
        with self._lock:
            for lease_id in lease_ids:
                lease = self._leases.get(lease_id) or self._holds.get(lease_id)
                if lease is not None and lease.owner == owner:
                    self._end_lease(lease_id)

    def reserve(self, owner: int, items: Sequence[tuple[str, int]]) -> list[list[int] | None]:
        """Slots for each (key, nbytes), or None where they cannot be had without evicting a read entry."""
        out: list[list[int] | None] = []
        with self._lock:
            self._expire()
            for key, nbytes in items:
                need = -(-nbytes // self.slot_bytes)
                old = self._reserved.pop((owner, key), None)  # the same key reserved again: the old one is void
                if old is not None:
                    self._free_slots(old)
                if need > self.num_slots or not self._make_room(need, replacing=key):
                    self.counters.skipped_reserves += 1
                    out.append(None)
                    continue
                entry = Entry(self._take(need), nbytes)
                self._reserved[(owner, key)] = entry
                out.append(entry.slots)
        return out

    def commit(self, owner: int, keys: Sequence[str]) -> int:
        """Publish the owner's reservations of ``keys`` (replacing older entries); how many were committed."""
        committed = 0
        with self._lock:
            self._expire()
            for key in keys:
                entry = self._reserved.pop((owner, key), None)
                if entry is None:
                    continue  # never reserved, or committed already
                self._remove(key)
                self._index[key] = entry
                self._used_bytes += entry.nbytes
                committed += 1
            self.counters.commits += committed
        return committed

    def delete(self, keys: Sequence[str]) -> int:
        with self._lock:
            return sum(self._remove(key) for key in keys)

    def drop_owner(self, owner: int) -> tuple[int, int]:
        """Everything a closed connection held: (leases released, reservations freed)."""
        with self._lock:
            leases = [lease_id for lease_id, lease in [*self._leases.items(), *self._holds.items()]
                      if lease.owner == owner]
            for lease_id in leases:
                self._end_lease(lease_id)
            reserved = [slot_key for slot_key in self._reserved if slot_key[0] == owner]
            for slot_key in reserved:
                self._free_slots(self._reserved.pop(slot_key))
            self.counters.dropped_leases += len(leases)
            self.counters.dropped_reservations += len(reserved)
            return len(leases), len(reserved)

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._expire()
            reserved_slots = sum(len(entry.slots) for entry in self._reserved.values())
            return {
                "num_slots": self.num_slots,
                "slot_bytes": self.slot_bytes,
                "capacity_bytes": self.num_slots * self.slot_bytes,
                "free_slots": self._free_count,
                "used_bytes": self._used_bytes,
                "used_slots": sum(len(e.slots) for e in self._index.values()),
                "entries": len(self._index),
                "leases": len(self._leases) + len(self._holds),
                "holds": len(self._holds),
                "reservations": len(self._reserved),
                "reserved_slots": reserved_slots,
                **vars(self.counters),
            }

    # -- internals (lock held) -------------------------------------------------------------------------------------

    def _expire(self) -> None:
        """End plain leases past their time (the dict is in expiry order)."""
        now = self.clock()
        while self._leases:
            lease_id, lease = next(iter(self._leases.items()))
            if lease.expires > now:
                break
            self._end_lease(lease_id)
            self.counters.expired_leases += 1

    def _end_lease(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id, None) or self._holds.pop(lease_id)
        left = self._lease_counts[lease.owner] - 1
        if left:
            self._lease_counts[lease.owner] = left
        else:
            del self._lease_counts[lease.owner]
        for entry in lease.entries:
            entry.readers -= 1
            if entry.detached and not entry.readers:
                self._free_slots(entry)

    def _remove(self, key: str) -> bool:
        entry = self._index.pop(key, None)
        if entry is None:
            return False
        self._used_bytes -= entry.nbytes
        if entry.readers:
            entry.detached = True  # freed at the last release
        else:
            self._free_slots(entry)
        return True

    def _free_slots(self, entry: Entry) -> None:
        for slot in entry.slots:
            self._free_map[slot] = _FREE[0]
        self._free_count += len(entry.slots)

    def _take(self, need: int) -> list[int]:
        """``need`` free slots (there are enough): the lowest run of adjacent ones inside one segment
        if there is one, since a client reads such a chunk in place (zero-copy), else the lowest
        free ones. The searches run in C (``bytearray.find``)."""
        run = _FREE * need
        start = 0
        while (first := self._free_map.find(run, start)) >= 0:
            segment_end = (first // self._segment_slots + 1) * self._segment_slots
            if first + need <= segment_end:
                slots = list(range(first, first + need))
                break
            start = segment_end
        else:
            slots = []
            position = 0
            while len(slots) < need:
                position = self._free_map.index(_FREE, position)
                slots.append(position)
                position += 1
        for slot in slots:
            self._free_map[slot] = _USED[0]
        self._free_count -= need
        return slots

    def _make_room(self, need: int, replacing: str) -> bool:
        """Make ``need`` slots free by evicting readerless entries (the old copy of ``replacing``
        first, then oldest first), or change nothing and return False."""
        if self._free_count >= need:
            return True
        freed = self._free_count
        victims: list[str] = []
        old = self._index.get(replacing)
        candidates = itertools.chain([replacing] if old is not None else [],
                                     (k for k in self._index if k != replacing))
        for key in candidates:
            if freed >= need:
                break
            entry = self._index[key]
            if not entry.readers:
                victims.append(key)
                freed += len(entry.slots)
        if freed < need:
            return False
        for key in victims:
            entry = self._index[key]
            self._remove(key)
            if key != replacing:
                self.counters.evicted_chunks += 1
                self.counters.evicted_bytes += entry.nbytes
        return True
