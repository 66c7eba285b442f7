"""kvtier's CUDA copy kernels run on the CPU: the kernel source compiled by g++ (tests/cuda_shim.h)
and launched thread by thread, behind the same host-side planning (kernel_plan) as the CuPy copier.

So every CI run checks the kernels' index arithmetic and the launch arguments against the
reference copier, for every layout and dtype, without a GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch

from kvtier.cuda_ext.copier import CopyDone, KVCopier, ScatterBatch
from kvtier.cuda_ext.kernel_plan import batch_rows, kernel_names, kernel_source, list_rows, plan_copy, plane_table
from kvtier.cuda_ext.paged_kv import PagedKV

HERE = Path(__file__).parent
KERNEL = HERE.parent / "cuda_ext" / "kernels" / "kv_copy.cu"


def _private_build_dir() -> Path:
    """A folder only this user can write (the library is loaded into the test process: a shared
    place like /tmp would let another local user plant one); a fresh temp folder otherwise."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvtier-tests"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.lstat()
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022:
            return folder
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="kvtier-kernel-emulator-"))


def build_emulator() -> ctypes.CDLL:
    """Compile (once per source version) and load the emulation library."""
    cxx = shutil.which("g++")
    if cxx is None:
        raise RuntimeError("g++ is needed to emulate the CUDA kernels on the CPU")
    sources = [HERE / "kernel_emulator.cpp", HERE / "cuda_shim.h", KERNEL]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    lib = _private_build_dir() / f"kvtier-kernel-emulator-{digest}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{digest}.tmp")
        subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o", str(tmp),
                        str(HERE / "kernel_emulator.cpp")], check=True, capture_output=True, text=True)
        tmp.replace(lib)
    dll = ctypes.CDLL(str(lib))
    i64, i32 = ctypes.c_int64, ctypes.c_int
    dll.kvt_emulate.argtypes = [i32, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                i64, i32, i32, i32, i32, i32]
    dll.kvt_emulate.restype = i32
    return dll


class EmulatedCopier(KVCopier):
    """A :class:`KVCopier` whose copies are the CUDA kernels emulated on the CPU.

    ``max_blocks`` is the grid cap: small values exercise the kernels' grid-stride loop.
    """

    def __init__(self, max_blocks: int = 7) -> None:
        assert KERNEL.read_text() == kernel_source(), "the installed kernel source differs from the checkout"
        self._dll = build_emulator()
        self._names = kernel_names()
        self.max_blocks = max_blocks
        self.launches: list[str] = []  # kernel names, for tests that check the chosen word size

    def _gather(self, paged: PagedKV, slots: torch.Tensor, out: torch.Tensor, planes: range) -> CopyDone:
        self._run("gather", paged, slots, out, planes)
        return CopyDone()

    def _scatter(self, chunks: torch.Tensor, paged: PagedKV, slots: torch.Tensor, planes: range) -> CopyDone:
        chunks = chunks.contiguous()
        self._run("scatter", paged, slots, chunks, planes)
        return CopyDone()

    def _scatter_batch(self, batch: ScatterBatch, planes: range) -> CopyDone:
        """One launch for all chunks of the batch, as the CuPy copier does."""
        chunks = [c.contiguous() for c in batch.chunks]
        ptrs, rows = list_rows(batch.paged, chunks)
        self._launch("scatter", batch.paged, torch.cat(batch.slots), rows, ptrs, planes)
        return CopyDone()

    def _run(self, op: str, paged: PagedKV, slots: torch.Tensor, chunks: torch.Tensor, planes: range) -> None:
        ptrs, rows = batch_rows(paged, chunks)
        self._launch(op, paged, slots.reshape(-1).contiguous(), rows, ptrs, planes)

    def _launch(self, op: str, paged: PagedKV, slots: torch.Tensor, rows: torch.Tensor, ptrs: list[int],
                planes: range) -> None:
        table = plane_table(paged)
        launch = plan_copy(op, paged, table, slots, rows, ptrs, planes, self.max_blocks)
        self.launches.append(launch.kernel)
        rc = self._dll.kvt_emulate(self._names.index(launch.kernel), launch.grid, launch.block, *launch.args())
        assert rc == 0, f"emulation of {launch.kernel} failed"
