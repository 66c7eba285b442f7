"""The batched copy layer: engine paged KV caches <-> contiguous canonical chunks.

:class:`PagedKV` reduces every engine layout (vLLM's in ``layouts``, SGLang's host pools in
``host_layouts``) to per-layer strided views; a :class:`KVCopier` moves a whole batch of chunks per
call (the CUDA kernels through CuPy, or torch indexing, behind one interface); :func:`make_copier`
picks the implementation for a device. Engine-agnostic and storage-agnostic: it imports neither
the tiers nor the core, only the chunk format, so the core is where copies meet tiers.
"""

from .copier import KVCopier, check_slots
from .copier_factory import make_copier
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
