"""Shared folders: a disk tier folder another user could write or swap is refused, with one clear error.

Real folders in tmp_path with real modes and owners (the ownership case needs root to chown).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from kvtier.chunk_format.codec import encode_chunk
from kvtier.storage_backends.disk_backend import DiskBackend, UnsafeCacheFolder


def make_key(seed: object) -> str:
    return hashlib.sha256(repr(seed).encode()).hexdigest()


def make_chunk(key: str, payload_bytes: int) -> bytearray:
    return encode_chunk(key, "float16", (payload_bytes // 2,), "test-layout", "test-model", 16, bytes(payload_bytes))


def _refused(root: Path, *must_name: str) -> None:
    """Construction fails with one clear error naming the path, and reads or writes nothing there."""
    before = sorted(p.name for p in root.iterdir()) if root.is_dir() and not root.is_symlink() else None
    with pytest.raises(UnsafeCacheFolder) as info:
        DiskBackend(root, 1 << 20)
    assert isinstance(info.value, PermissionError)
    message = str(info.value)
    for part in (str(root), *must_name):
        assert part in message, f"{part!r} missing from: {message}"
    if before is not None:
        assert sorted(p.name for p in root.iterdir()) == before  # no .lock, nothing evicted or cleaned


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o730, 0o703, 0o1777])
def test_a_folder_group_or_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    root = tmp_path / "kv"
    root.mkdir()
    forged = make_key("forged")
    (root / forged[:2]).mkdir()
    (root / forged[:2] / f"{forged}.kvc").write_bytes(make_chunk(forged, 64))  # planted by someone else
    os.chmod(root, mode)
    _refused(root, f"{mode:04o}", "writable by group or others", "chmod 700")


def test_a_folder_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    root = tmp_path / "kv"
    root.mkdir(mode=0o700)
    os.chown(root, 65534, 65534)
    _refused(root, "owned by uid 65534", f"uid {os.geteuid()}", "chown")


def test_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    DiskBackend(real, 1 << 20).close()  # a good folder, but reached through a link
    link = tmp_path / "link"
    link.symlink_to(real)
    _refused(link, "symbolic link", str(real))


@pytest.mark.parametrize("parent_mode", [0o777, 0o775, 0o757])
def test_a_folder_under_a_parent_others_can_write_without_sticky_bit_is_refused(tmp_path: Path, parent_mode: int) -> None:
    for under in ("open", "open/deeper"):  # the parent, or any folder further up
        root = tmp_path / under / "kv"
        root.mkdir(parents=True, mode=0o700)
        os.chmod(tmp_path / "open", parent_mode)
        _refused(root, str(tmp_path / "open"), "sticky bit", "chmod go-w")
        _refused(tmp_path / under / "not-yet", "sticky bit")  # nor is a new folder made there
        assert not (tmp_path / under / "not-yet").exists()


def test_sticky_world_writable_parent_and_private_folder_are_fine(tmp_path: Path) -> None:
    shared = tmp_path / "tmp-like"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: others cannot rename or remove our folder
    disk = DiskBackend(shared / "kv", 1 << 20)  # created by kvtier: 0700, ours
    key = make_key("fine")
    assert disk.put([(key, make_chunk(key, 512))]) == 1
    disk.close()
    assert stat.S_IMODE((shared / "kv").stat().st_mode) == 0o700
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)  # an existing private folder of ours
    assert DiskBackend(mine, 1 << 20).put([(key, make_chunk(key, 512))]) == 1
    assert DiskBackend(shared / "kv", 1 << 20).contains([key]) == 1
