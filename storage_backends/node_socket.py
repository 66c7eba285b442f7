"""Where the node server listens: a Unix socket only this user can reach, and only one server per socket.

The socket's folder is created 0700 (and must be ours: a folder another user owns could hold a
socket of theirs that engines would talk to), the socket is 0600. A lock file beside the socket,
held while the server runs, keeps two servers from starting on one path at once; a socket file
that no server answers on (left by a killed server) is replaced, one that answers is a refusal.
The lock file is left in place at exit: unlinking it could let two later servers lock two files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
from collections.abc import Iterator

MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


class SocketInUse(OSError):
    """Another live server owns the socket path (or something that is not a socket sits there)."""


def prepare_socket(path: str) -> int:
    """Make the folder, take the path's lock and clear a stale socket; the lock's file descriptor.

    Raises :class:`SocketInUse` when a live server holds the path and ``OSError`` (naming the path)
    when it cannot be used."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise OSError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes (a Unix socket limit); "
                      "choose a shorter --socket")
    _prepare_folder(os.path.dirname(os.path.abspath(path)))
    lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise SocketInUse(f"another kvtier server is running on {path} (it holds {path}.lock)") from None
    try:
        _clear_stale(path)
    except BaseException:
        os.close(lock_fd)
        raise
    return lock_fd


def bind_socket(path: str) -> socket.socket:
    """A listening socket at ``path``, mode 0600 from the moment it exists (umask), not after a chmod."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _umask(0o177):
            sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def answers(path: str, timeout_s: float = 1.0) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout_s)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _prepare_folder(folder: str) -> None:
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise OSError(f"socket folder {folder} is not a real folder (a symbolic link or a file); choose another "
                      "--socket")
    if st.st_uid != os.geteuid():
        raise OSError(f"socket folder {folder} is owned by uid {st.st_uid}, not by this process (uid "
                      f"{os.geteuid()}); choose a folder of your own for --socket")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(folder, 0o700)


def _clear_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; remove it or choose another --socket")
    if answers(path):
        raise SocketInUse(f"another kvtier server is running on {path} (it answers there)")
    os.unlink(path)  # left by a server that was killed


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)
