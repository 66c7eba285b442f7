"""A node-tier client's view of the server's memory: the segment files mapped, and copies in and out.

The server names its segments and slot geometry in its hello answer; the client maps each file
(``MAP_SHARED``, so every process on the node sees the same bytes) and copies chunks between the
slots and its own buffers. Nothing the server says is trusted blindly: names must be segment names
of this user under ``/dev/shm`` with the announced sizes, and every slot list must be in range and
the right length for its byte count, or the copy is refused (:class:`~.node_protocol.ProtocolError`).

With CUDA present the mapping is page-locked (``cudaHostRegister``), best effort: copies between
GPU memory and these pages then need no bounce buffer. A mapping that is replaced (the server
restarted) stays mapped until the copies that use it finish, then is unregistered and unmapped (a
zero-copy view handed out by :meth:`SegmentMap.view` keeps its segment mapped until it is dropped).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from .node_protocol import SEGMENT_RE, SHM_DIR, ProtocolError

log = logging.getLogger(__name__)

_REGISTER_PORTABLE = 0x01  # cudaHostRegisterPortable


class SegmentMap:
    """One server's segments, mapped read-write. Thread-safe: copies touch disjoint slots."""

    def __init__(self, hello: dict[str, Any], pin: bool = False, shm_dir: str = SHM_DIR) -> None:
        self.server_id = str(hello.get("server_id"))
        self.slot_bytes, self.num_slots, self.slots_per_segment = _geometry(hello)
        segments = hello.get("segments")
        if not isinstance(segments, list) or not segments:
            raise ProtocolError("hello: no segments")
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._pinned: list[int] = []
        self._users = 0
        self._retired = False
        self._lock = threading.Lock()
        try:
            for segment in segments:
                self._map(segment, shm_dir)
            full = self.slots_per_segment * self.slot_bytes
            sizes = [len(v) for v in self._views]
            if sum(sizes) != self.num_slots * self.slot_bytes or any(n != full for n in sizes[:-1]) or sizes[-1] > full:
                raise ProtocolError("hello: segment sizes do not match the slot geometry")
        except BaseException:
            self._unmap()
            raise
        if pin:
            self._pin()

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def _map(self, segment: Any, shm_dir: str) -> None:
        if not (isinstance(segment, list) and len(segment) == 2 and isinstance(segment[0], str)
                and type(segment[1]) is int and segment[1] > 0 and segment[1] % self.slot_bytes == 0):
            raise ProtocolError("hello: a segment must be [name, size in whole slots]")
        name, nbytes = segment
        match = SEGMENT_RE.fullmatch(name)
        if match is None or int(match.group(1)) != os.getuid():
            raise ProtocolError("hello: a segment name that is not this user's kvtier segment")
        fd = os.open(os.path.join(shm_dir, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_size != nbytes:
                raise ProtocolError(f"segment {name}: owner or size differs from the server's hello")
            mapping = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._maps.append(mapping)
        self._views.append(memoryview(mapping))

    @contextmanager
    def use(self) -> Iterator[SegmentMap]:
        """Hold the mapping for a copy; a retired mapping is unmapped when its last user is done."""
        with self._lock:
            if self._retired:
                raise ProtocolError("segment mapping already retired")
            self._users += 1
        try:
            yield self
        finally:
            with self._lock:
                self._users -= 1
                last = self._retired and not self._users
            if last:
                self._unmap()

    def retire(self) -> None:
        """No new copies; unmapped now, or when the copies in progress finish. Idempotent."""
        with self._lock:
            if self._retired:
                return
            self._retired = True
            idle = not self._users
        if idle:
            self._unmap()

    def view(self, slots: Sequence[int], nbytes: int) -> memoryview | None:
        """A read-only view of the ``nbytes`` in ``slots`` when they are adjacent in one segment (the
        usual case), else None (read a copy). The view keeps the mapping alive after a retire."""
        self._check(slots, nbytes)
        segment, index = divmod(slots[0], self.slots_per_segment)
        if index + len(slots) > self.slots_per_segment or any(b != a + 1 for a, b in zip(slots, slots[1:])):
            return None
        start = index * self.slot_bytes
        return self._views[segment][start : start + nbytes].toreadonly()

    def read(self, slots: Sequence[int], nbytes: int) -> memoryview:
        """The ``nbytes`` held in ``slots``, copied into a private buffer: a byte view (it compares and
        slices like bytes) of an uninitialised array, since a zero-filled ``bytearray`` costs one more
        pass over the bytes, a third of the read's time."""
        self._check(slots, nbytes)
        view = memoryview(np.empty(nbytes, dtype=np.uint8))
        for i, slot in enumerate(slots):
            src, pos, n = self._place(slot, i, nbytes)
            view[pos : pos + n] = src[:n]
        return view

    def write(self, slots: Sequence[int], data: memoryview) -> None:
        """Copy ``data`` (bytes, format ``B``) into ``slots``."""
        self._check(slots, data.nbytes)
        for i, slot in enumerate(slots):
            dst, pos, n = self._place(slot, i, data.nbytes)
            dst[:n] = data[pos : pos + n]

    def _place(self, slot: int, i: int, nbytes: int) -> tuple[memoryview, int, int]:
        """The slot's view in its segment, and the offset and length of part ``i`` of a blob."""
        segment, index = divmod(slot, self.slots_per_segment)
        start = index * self.slot_bytes
        pos = i * self.slot_bytes
        return self._views[segment][start : start + self.slot_bytes], pos, min(self.slot_bytes, nbytes - pos)

    def _check(self, slots: Sequence[int], nbytes: int) -> None:
        if not isinstance(slots, list) or len(slots) != -(-nbytes // self.slot_bytes) or nbytes <= 0:
            raise ProtocolError("slot list does not fit the chunk size")
        if any(type(s) is not int or not 0 <= s < self.num_slots for s in slots):
            raise ProtocolError("slot out of range")

    def _pin(self) -> None:
        """Page-lock the mapping with CUDA, best effort (a low memlock limit must not stop the tier)."""
        try:
            import torch

            cudart = torch.cuda.cudart()
            for mapping in self._maps:
                address = _address(mapping)
                err = cudart.cudaHostRegister(address, len(mapping), _REGISTER_PORTABLE)
                if int(err) != 0:
                    raise RuntimeError(f"cudaHostRegister failed ({err}); is the memlock limit too low?")
                self._pinned.append(address)
            log.info("kvtier node tier: %d bytes of server memory page-locked for CUDA", self.capacity_bytes)
        except Exception as exc:
            log.warning("kvtier node tier: could not page-lock the server's memory for CUDA (%s); "
                        "copies go through pageable memory", exc)

    @property
    def pinned(self) -> bool:
        return bool(self._pinned) and len(self._pinned) == len(self._maps)

    def _unmap(self) -> None:
        if self._pinned:
            try:
                import torch

                cudart = torch.cuda.cudart()
                for address in self._pinned:
                    cudart.cudaHostUnregister(address)
            except Exception as exc:  # never fatal: the pages are unmapped below either way
                log.warning("kvtier node tier: cudaHostUnregister failed (%s)", exc)
            self._pinned.clear()
        for view in self._views:
            view.release()
        self._views.clear()
        for mapping in self._maps:
            try:
                mapping.close()
            except BufferError:
                pass  # a zero-copy view still reads it: unmapped when the last one is dropped
        self._maps.clear()


def _geometry(hello: dict[str, Any]) -> tuple[int, int, int]:
    values = tuple(hello.get(k) for k in ("slot_bytes", "num_slots", "slots_per_segment"))
    if any(type(v) is not int or v <= 0 for v in values):
        raise ProtocolError("hello: slot_bytes, num_slots and slots_per_segment must be positive integers")
    return values  # type: ignore[return-value]


def _address(mapping: mmap.mmap) -> int:
    """The mapping's address; the ctypes object that exports it is dropped at once (an export
    would keep the mapping from being closed)."""
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor
