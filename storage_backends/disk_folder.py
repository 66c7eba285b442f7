"""Where the disk tier may keep its chunks: checked (and created 0700) before anything is read.

A chunk's checksum detects damage, not forgery: anyone who can write into the cache folder can
plant a well-formed chunk under the key of a prompt they expect, and the engine would load that KV
(wrong or steered outputs), or read the chunks of other users' prompts. So the folder must be ours
alone:

- it is not a symbolic link (whoever controls the link decides where chunks are read and written);
- it is owned by the effective uid of this process (a folder somebody else made first, e.g. in
  ``/tmp``, may already hold forged chunks, and its owner can change its mode at any time);
- it is not writable by group or others;
- no folder above it is writable by group or others unless it has the sticky bit. Without the
  sticky bit such a user can rename our folder away and put one of their own in its place while
  the engine runs (it works on paths, so it would follow); with it (``/tmp``, ``/var/tmp``) they
  cannot, and the ownership check above catches a folder they created first. Every ancestor is
  checked, not only the parent, because renaming any of them swaps everything below. Owners of
  ancestors are not checked: bind mounts and volumes are routinely owned by other uids, and the
  owner of a folder above ours can replace it whatever we do.

A violation raises :class:`UnsafeCacheFolder` naming the path, the problem and the fix. A folder
that cannot be created (a read-only or missing mount, no permission on the parent) is a medium
failure, not a configuration error: :func:`prepare_folder` reports it and the tier serves misses.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_LOOSE = stat.S_IWGRP | stat.S_IWOTH
# mkdir errors that mean the path itself is wrong (a configuration error), not the medium.
_CONFIG_ERRNOS = {errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL}


class UnsafeCacheFolder(PermissionError):
    """The disk tier's folder could be written (or swapped) by another user; the message says how to fix it."""


def prepare_folder(root: Path) -> OSError | None:
    """Check ``root`` (creating it and missing parents 0700); the OSError if it cannot be created, else None.

    Raises :class:`UnsafeCacheFolder` for a folder another user could write or swap, and
    ``NotADirectoryError`` when ``root`` or a parent is not a folder.
    """
    _check_ancestors(root)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        failure = _create(root)
        if failure is not None:
            return failure
        _check_ancestors(root)  # a parent made by a racing process meanwhile
        st = os.lstat(root)
    _check_folder(root, st)
    return None


def _create(root: Path) -> OSError | None:
    """mkdir ``root`` and its missing parents, each 0700 whatever the umask."""
    missing = []
    for path in (root, *root.parents):
        if os.path.lexists(path):
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # made by a racing process: root is checked by the caller, parents by _check_ancestors
        except OSError as exc:
            if exc.errno in _CONFIG_ERRNOS:
                raise
            return exc
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
    return None


def _check_folder(root: Path, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeCacheFolder(
            f"disk tier folder {root} is a symbolic link (to {os.path.realpath(root)}): whoever controls the link "
            "decides where chunks are read and written; set the tier's path to the real folder")
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "disk tier path exists and is not a folder", str(root))
    euid = os.geteuid()
    if st.st_uid != euid:
        raise UnsafeCacheFolder(
            f"disk tier folder {root} is owned by uid {st.st_uid}, not by this process (uid {euid}): its owner "
            f"could plant chunks the engine would load; use a folder of your own (or `chown {euid} {root}` if you "
            "trust what it holds)")
    if st.st_mode & _LOOSE:
        raise UnsafeCacheFolder(
            f"disk tier folder {root} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): they "
            f"could plant chunks the engine would load or read cached prompts; run `chmod 700 {root}` (if you trust "
            "what it holds) or choose a folder only you can write")


def _check_ancestors(root: Path) -> None:
    """Every existing folder above ``root``, as written and with symlinks resolved (see the module doc)."""
    lexical = Path(os.path.abspath(root)).parent
    resolved = Path(os.path.realpath(lexical))
    seen: set[Path] = set()
    for start in (lexical, resolved):
        for path in (start, *start.parents):
            if path in seen:
                continue
            seen.add(path)
            try:
                st = os.stat(path)
            except OSError:
                continue  # missing (created 0700 later) or not searchable (creating root fails)
            if st.st_mode & _LOOSE and not st.st_mode & stat.S_ISVTX:
                raise UnsafeCacheFolder(
                    f"disk tier folder {root}: the folder above it, {path}, is writable by group or others without "
                    f"the sticky bit (mode {stat.S_IMODE(st.st_mode):04o}), so they could swap the cache folder "
                    f"for their own; run `chmod go-w {path}` (or `chmod +t {path}`) or choose a folder elsewhere, "
                    "e.g. under ~/.cache")
