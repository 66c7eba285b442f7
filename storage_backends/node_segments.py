"""The node server's memory: shared-memory segment files under ``/dev/shm`` that clients map.

Each file is at most ``SEGMENT_MAX_BYTES`` (whole slots), mode 0600 (only this user's processes
may map it) and named ``kvtier-node-<uid>-<pid>-<tag>-<index>``. Its pages are allocated when it is
made (``posix_fallocate``): a tmpfs that runs full later would hit the *client* that touches an
unbacked page with SIGBUS, which kills an engine, so a server that cannot have its memory must fail
at start instead. The server never maps the files itself (its own memory stays small); clients copy.

A server killed with SIGKILL leaves its files behind, holding memory until someone unlinks them.
Every live server holds an exclusive ``flock`` on each of its files, so a file nobody locks belongs
to a dead server and the next server removes it at start. The lock, not the pid in the name, is
the test: pids are reused, and a server in another pid namespace (a container sharing ``/dev/shm``)
may have a pid that looks dead here. A file is created under a temporary name, locked, allocated
and only then renamed into place, so a server starting meanwhile never sees an unlocked live file.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field

from .node_protocol import SEGMENT_MAX_BYTES, SEGMENT_RE, SHM_DIR, segment_name

log = logging.getLogger(__name__)

_TMP_RE = re.compile(r"\.(" + SEGMENT_RE.pattern + r")\.tmp")
_TMP_GRACE_S = 60.0


@dataclass(frozen=True)
class Segment:
    name: str
    nbytes: int


@dataclass
class SegmentSet:
    """A server's segment files, held locked until :meth:`remove`."""

    slot_bytes: int
    slots_per_segment: int
    segments: list[Segment]
    tag: str
    shm_dir: str = SHM_DIR
    _fds: list[int] = field(default_factory=list, repr=False)

    @property
    def num_slots(self) -> int:
        return sum(s.nbytes for s in self.segments) // self.slot_bytes

    def remove(self) -> None:
        """Unlink every file and drop the locks. Idempotent. Clients that map them keep their pages
        until they unmap (the memory is freed when the last one does)."""
        for segment in self.segments:
            try:
                os.unlink(os.path.join(self.shm_dir, segment.name))
            except FileNotFoundError:
                pass
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def slots_per_segment(slot_bytes: int) -> int:
    if slot_bytes > SEGMENT_MAX_BYTES:
        raise ValueError(f"slot size {slot_bytes} exceeds the segment size {SEGMENT_MAX_BYTES}")
    return SEGMENT_MAX_BYTES // slot_bytes


def create_segments(num_slots: int, slot_bytes: int, shm_dir: str = SHM_DIR) -> SegmentSet:
    """Allocate ``num_slots`` slots in as few files as the segment size allows.

    Raises ``OSError`` naming the folder when it cannot hold them (full or too small a tmpfs)."""
    per_segment = slots_per_segment(slot_bytes)
    uid, pid, tag = os.getuid(), os.getpid(), secrets.token_hex(4)
    made = SegmentSet(slot_bytes, per_segment, [], tag, shm_dir)
    try:
        for index, first in enumerate(range(0, num_slots, per_segment)):
            nbytes = min(per_segment, num_slots - first) * slot_bytes
            name = segment_name(uid, pid, tag, index)
            made._fds.append(_create_one(shm_dir, name, nbytes))
            made.segments.append(Segment(name, nbytes))
    except BaseException:
        made.remove()
        raise
    return made


def _create_one(shm_dir: str, name: str, nbytes: int) -> int:
    final = os.path.join(shm_dir, name)
    tmp = os.path.join(shm_dir, f".{name}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fchmod(fd, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise OSError(exc.errno, f"cannot allocate {nbytes} bytes of shared memory in {shm_dir} "
                                         f"(is it full or too small? see `df -h {shm_dir}`)") from None
            raise
        os.rename(tmp, final)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return fd


def remove_stale_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink this user's segment files that no live server holds locked; the names removed."""
    uid = os.getuid()
    removed = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        temporary = _TMP_RE.fullmatch(name)
        match = SEGMENT_RE.fullmatch(temporary.group(1) if temporary else name)
        if match is None or int(match.group(1)) != uid:
            continue
        if _is_stale(os.path.join(shm_dir, name), uid, min_age_s=_TMP_GRACE_S if temporary else 0.0):
            removed.append(name)
    if removed:
        log.info("kvtier server: removed %d shared-memory segment(s) of dead servers from %s", len(removed), shm_dir)
    return removed


def _is_stale(path: str, uid: int, min_age_s: float) -> bool:
    """Unlink ``path`` if it is ours, unlocked and at least ``min_age_s`` old; whether it was.

    A temporary file gets a grace time: a starting server creates it a moment before it locks it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if st.st_uid != uid or time.time() - st.st_mtime < min_age_s:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live server holds it
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
