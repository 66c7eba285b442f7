"""Where the integrity key comes from: the file or environment variable the config names.

The MAC itself is part of the chunk format (``kvtier.chunk_format.integrity``); this module reads
the shared secret, checks that it is private and long enough, and turns every problem into one
:class:`ConfigError` that names the config key and the path or variable name, never the secret.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

from kvtier.chunk_format.integrity import MIN_SECRET_BYTES, IntegrityKey, blake3_available

from .config import ConfigError, KVTierConfig

MAX_KEY_FILE_BYTES = 64 * 1024


def load_integrity_key(config: KVTierConfig, environ: Mapping[str, str] | None = None) -> IntegrityKey | None:
    """The integrity key ``config`` names (None without one). Raises :class:`ConfigError` naming the
    config key and the path or variable name, never the secret."""
    if (config.integrity_key_file or config.integrity_key_env) and not blake3_available():
        raise ConfigError("invalid kvtier config: an integrity key needs the blake3 package (pip install blake3)")
    if config.integrity_key_file is not None:
        return IntegrityKey(_read_key_file(config.integrity_key_file),
                            f"integrity_key_file {config.integrity_key_file}")
    if config.integrity_key_env is not None:
        name = config.integrity_key_env
        value = (os.environ if environ is None else environ).get(name)
        where = f"invalid kvtier config: integrity_key_env = {name!r}"
        if value is None:
            raise ConfigError(f"{where}: the environment variable {name} is not set (it must hold the shared "
                              f"secret, at least {MIN_SECRET_BYTES} bytes)")
        return IntegrityKey(_checked_secret(os.fsencode(value), where, f"the environment variable {name}"),
                            f"integrity_key_env {name}")
    return None


def _read_key_file(path: str) -> bytes:
    """The secret in ``path``: a regular file that only its owner may read or write."""
    where = f"invalid kvtier config: integrity_key_file = {path!r}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file (it must hold the shared secret, at least "
                          f"{MIN_SECRET_BYTES} bytes, mode 0600)") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot open it ({exc.strerror})") from None
    try:
        info = os.fstat(fd)  # of what was opened: no race with a rename in between
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{where}: not a regular file")
        if info.st_mode & 0o066:
            raise ConfigError(f"{where}: readable or writable by group or others (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}); allowed: only its owner (chmod 600)")
        data = b""
        while len(data) <= MAX_KEY_FILE_BYTES:
            part = os.read(fd, MAX_KEY_FILE_BYTES + 1 - len(data))
            if not part:
                break
            data += part
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_KEY_FILE_BYTES} bytes: not a key file")
    return _checked_secret(data, where, "the file")


def _checked_secret(secret: bytes, where: str, what: str) -> bytes:
    """``secret`` without a trailing newline (``echo KEY > file`` and ``KEY`` in the environment
    are one key), refused if empty or shorter than ``MIN_SECRET_BYTES``."""
    secret = secret.rstrip(b"\r\n")
    if not secret:
        raise ConfigError(f"{where}: {what} is empty (it must hold the shared secret, at least "
                          f"{MIN_SECRET_BYTES} bytes)")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"{where}: the secret in {what} is shorter than {MIN_SECRET_BYTES} bytes (make one "
                          "with: head -c 32 /dev/urandom | base64)")
    return secret
