"""The disk tier's files: chunk names, folder scans, temp-file clean-up, whole-file reads, free space.

Plain functions over paths, shared by :class:`~kvtier.storage_backends.disk_backend.DiskBackend`
and the ``kvtier inspect`` summary; nothing here holds state or takes the lock.
"""

from __future__ import annotations

import errno
import os
import re
import time
from contextlib import suppress
from pathlib import Path

from kvtier.chunk_format.codec import MAX_HEAD_BYTES

from .summary import StoreSummary

KEY_RE = re.compile(r"[0-9a-f]{64}")
SUFFIX = ".kvc"
_STALE_TMP_SECONDS = 600.0
_SPARE_INODES = 3  # a write may need a subfolder and a temp file, plus one spare


def check_key(key: object) -> str:
    """Keys become file names: only 64 lowercase hex characters, so no key can leave the root."""
    if not isinstance(key, str) or KEY_RE.fullmatch(key) is None:
        raise ValueError(f"invalid chunk key {key!r}: expected 64 lowercase hex characters")
    return key


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:
        return True  # another user's live process
    except (OSError, OverflowError):
        return False
    return True


def scan_chunks(root: Path) -> list[tuple[int, str, int]]:
    """(mtime_ns, key, size) of every chunk file, oldest first; files vanishing meanwhile are skipped."""
    found: list[tuple[int, str, int]] = []
    with os.scandir(root) as subs:
        for sub in subs:
            if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
                continue
            with suppress(FileNotFoundError, NotADirectoryError), os.scandir(sub.path) as files:
                for f in files:
                    key = f.name[: -len(SUFFIX)]
                    if f.name.endswith(SUFFIX) and KEY_RE.fullmatch(key) and key[:2] == sub.name:
                        with suppress(FileNotFoundError):
                            st = f.stat(follow_symlinks=False)
                            found.append((st.st_mtime_ns, key, st.st_size))
    found.sort()
    return found


def remove_dead_temps(root: Path) -> None:
    """Delete temp files of writers that died (pid gone) or stalled (older than 10 minutes)."""
    now = time.time()
    for tmp in root.glob("[0-9a-f][0-9a-f]/.*.tmp"):
        pid = tmp.name[1:-4].split(".")[-2:-1]  # .<key>.<pid>.<token>.tmp
        alive = bool(pid) and pid[0].isdigit() and _pid_alive(int(pid[0]))
        with suppress(FileNotFoundError):
            if not alive or now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                tmp.unlink()


def read_whole(path: Path) -> bytes:
    """The whole file (one uninitialised allocation, no zero-fill); touches its mtime for LRU across restarts."""
    with open(path, "rb", buffering=0) as f:
        data = f.read()  # a short result (truncated under us) is rejected by the checksum above
        with suppress(OSError):  # a read-only medium loses recency, not the hit
            os.utime(f.fileno())
        return data


def round_up(nbytes: int, block: int) -> int:
    return -(-nbytes // block) * block


def space_shortfall(root: Path, size: int) -> tuple[int, int, int] | None:
    """(bytes, inodes, block size) the file system under ``root`` lacks for a ``size``-byte write plus
    as much headroom (<= 0: none lacking); None if it does not say (statvfs failed, no capacity)."""
    try:
        st = os.statvfs(root)
    except OSError:
        return None
    block = st.f_frsize or st.f_bsize or 4096
    if not st.f_blocks:
        return None
    short_bytes = 2 * round_up(size, block) - st.f_bavail * block
    short_inodes = _SPARE_INODES - st.f_favail if st.f_files else 0
    return short_bytes, short_inodes, block


def summarize_disk(path: str | os.PathLike[str]) -> StoreSummary:
    """Chunks, bytes, models and layouts of a disk tier folder, reading only each file's header.

    ``bytes`` sums every ``.kvc`` file (what counts against the cap); ``chunks`` and the
    model/layout counters cover files whose header parses and names their own key; the rest are
    ``unreadable``.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no kvtier disk tier folder here", str(root))
    summary = StoreSummary(location=str(root))
    for _, key, _ in scan_chunks(root):
        try:
            with open(root / key[:2] / f"{key}{SUFFIX}", "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(MAX_HEAD_BYTES)
        except FileNotFoundError:
            continue  # evicted while we walked
        except OSError:
            summary.unreadable += 1
            continue
        summary.count(key, head, size)
    return summary
