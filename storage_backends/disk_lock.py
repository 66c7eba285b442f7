"""The disk tier's cross-process lock: ``flock`` on ``<root>/.lock``, never waited on without a deadline.

A plain ``flock(LOCK_EX)`` waits as long as another process holds the lock: a peer stopped in a
debugger, stuck on a dead NFS server or frozen by the OOM killer would then hang every writer, and
with them the engine's loads (a corrupt chunk is deleted), a producer's save wait and shutdown.
So the lock is only ever taken with ``LOCK_NB``, polled with short sleeps until a deadline, and a
caller that runs out of time skips its work instead of waiting.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import suppress
from pathlib import Path

_FIRST_SLEEP_S = 0.001
_LAST_SLEEP_S = 0.01


def open_private(path: Path, flags: int) -> int:
    """Open ``path``, creating it 0600 (whatever the umask) if it does not exist yet."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return os.open(path, flags | os.O_CLOEXEC)
    os.fchmod(fd, 0o600)
    return fd


class FolderLock:
    """An exclusive ``flock`` on one file, taken within a timeout. Not thread-safe: callers serialise.

    The file is opened on first use and reopened after a fork (a child shares the parent's open
    file description, hence its lock) or when the file was replaced or removed under us (a lock on
    an unlinked inode excludes nobody).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = 0

    def open(self) -> None:
        """Open (create 0600) the lock file read-write; raises the OSError of a read-only or missing folder."""
        fd = self._fd
        if fd is not None and self._pid == os.getpid() and self._same_file(fd):
            return
        self.close()
        self._fd = open_private(self.path, os.O_RDWR)
        self._pid = os.getpid()

    def _same_file(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)

    def acquire(self, timeout: float) -> bool:
        """Take the lock within ``timeout`` seconds (polling, 1 ms sleeps growing to 10 ms); False if it
        is still held by someone else then. Raises OSError when the lock file cannot be opened."""
        self.open()
        fd = self._fd
        assert fd is not None
        deadline = time.monotonic() + timeout
        pause = _FIRST_SLEEP_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, _LAST_SLEEP_S)

    def release(self) -> None:
        fd = self._fd
        if fd is not None:
            with suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with suppress(OSError):
                os.close(fd)
