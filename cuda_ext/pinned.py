"""A page-locked (pinned) host pool for the cpu tier when CUDA is present.

Allocated once at start-up, at exactly the configured size (torch's pinned caching allocator would
round a 3 GiB request up to 4 GiB), and registered with CUDA as mapped memory: the copy kernels
read and write it directly (zero-copy) and DMAs from it need no bounce buffer. The cpu tier's
fixed slots never fragment, so the pool is never reallocated, whatever the number of store/load
cycles. The registration is dropped when the last view of the pool is gone.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

_REGISTER_FLAGS = 0x01 | 0x02  # cudaHostRegisterPortable | cudaHostRegisterMapped


def pinned_available() -> bool:
    return torch.cuda.is_available()


def pinned_pool(num_slots: int, slot_bytes: int) -> np.ndarray:
    """A C-contiguous uint8 ``[num_slots, slot_bytes]`` array in page-locked, device-mapped memory."""
    if not pinned_available():
        raise RuntimeError("a pinned host pool needs CUDA (no CUDA device is visible)")
    pool = np.empty((num_slots, slot_bytes), dtype=np.uint8)
    pool.fill(0)  # touch every page now, not in the middle of a store
    cudart = torch.cuda.cudart()
    ptr, size = pool.ctypes.data, pool.nbytes
    err = cudart.cudaHostRegister(ptr, size, _REGISTER_FLAGS)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {size} bytes failed ({err}); is the memlock limit too low?")
    weakref.finalize(pool, cudart.cudaHostUnregister, ptr)
    return pool
