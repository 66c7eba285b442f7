"""The cpu tier's host pool: allocated once, reused, never fragmented, never leaking; pinned with CUDA."""

from __future__ import annotations

import resource
import warnings

import numpy as np
import pytest
import torch

from kvtier.connector.config import CpuTier, KVTierConfig
from kvtier.connector.store_factory import build_store
from kvtier.storage_backends.cpu_backend import CpuBackend


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _cycles(backend: CpuBackend, cycles: int, sizes: tuple[int, ...]) -> None:
    """Store, load (zero-copy view), check and drop, over and over, with varying sizes and keys."""
    blobs = {n: np.full(n, n % 251, dtype=np.uint8) for n in sizes}
    for i in range(cycles):
        n = sizes[i % len(sizes)]
        key = f"k{i % 97}"
        assert backend.put([(key, blobs[n])]) == 1
        (view,) = backend.get([key])
        assert view is not None and len(view) == n and view[-1] == n % 251
        del view
        if i % 7 == 0:
            backend.delete([key])


def _cpu_store(pinned: str, max_bytes: int = 8 << 20):
    return build_store(KVTierConfig(tiers=[CpuTier(type="cpu", max_bytes=max_bytes, slot_bytes=1 << 20, pinned=pinned)]))


def _slot_accounting(backend: CpuBackend) -> tuple[int, int]:
    backend.delete(list(backend._entries))
    backend._make_room(len(backend._pool))  # returns quarantined slots whose readers are gone
    return len(backend._free), len(backend._pool)


def test_pool_reused_without_leak_or_fragmentation() -> None:
    backend = CpuBackend(64 * 4096, 4096)
    pool = backend._pool
    _cycles(backend, 20_000, (1000, 4096, 9000, 70_000))  # warm up the interpreter's own caches
    before = _rss_mib()
    _cycles(backend, 100_000, (1000, 4096, 9000, 70_000, 4097))
    grown = _rss_mib() - before
    assert backend._pool is pool  # never reallocated
    free, total = _slot_accounting(backend)
    assert free == total == 64  # every slot back: nothing leaked, nothing stuck in quarantine
    assert grown < 8, f"RSS grew by {grown:.1f} MiB over 100k store/load cycles"


def test_pinned_setting_on_a_machine_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the pinned pool is tested by the gpu test below")
    for setting in ("auto", "never"):
        store = _cpu_store(setting)
        assert store.tiers[0].put([("a", b"x" * 10)]) == 1
        store.close()
    with pytest.raises(RuntimeError, match="needs CUDA"):
        _cpu_store("always")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_pool_on_gpu_machine() -> None:
    """auto -> pinned and device-mapped; a million store/load cycles reuse it without growth."""
    store = _cpu_store("auto", 64 << 20)
    backend = store.tiers[0]
    assert backend.put([("a", np.arange(3 << 20, dtype=np.uint8))]) == 1
    (view,) = backend.get(["a"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.frombuffer(view, dtype=torch.uint8).is_pinned()
    on_gpu = torch.frombuffer(view, dtype=torch.uint8).cuda()
    assert torch.equal(on_gpu.cpu(), torch.from_numpy(np.arange(3 << 20, dtype=np.uint8)))
    del view
    pool = backend._pool
    _cycles(backend, 50_000, (4096, 1 << 20, (1 << 20) + 1))
    before = _rss_mib()
    _cycles(backend, 1_000_000, (4096, 1 << 20, (1 << 20) + 1, 3000))
    assert backend._pool is pool
    assert _slot_accounting(backend) == (64, 64)
    assert _rss_mib() - before < 8
    store.close()
