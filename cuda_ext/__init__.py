"""The batched copy layer: engine paged KV caches <-> contiguous canonical chunks.

:class:`PagedKV` reduces every engine layout to per-layer strided views; a :class:`KVCopier`
moves a whole batch of chunks per call (torch indexing now, CUDA kernels behind the same
interface later); :func:`make_copier` picks the implementation for a device.
"""

from .copier import KVCopier, check_slots, make_copier
from .paged_kv import PagedKV, as_int_view
from .reference import reference_gather, reference_scatter
from .torch_copier import TorchCopier

__all__ = [
    "KVCopier",
    "PagedKV",
    "TorchCopier",
    "as_int_view",
    "check_slots",
    "make_copier",
    "reference_gather",
    "reference_scatter",
]
