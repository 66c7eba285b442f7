"""Which copier a device gets: the CUDA kernels through CuPy when it can, torch otherwise.

Apart from :mod:`.copier` (the interface both implementations import), so that the interface
never imports its implementations.
"""

from __future__ import annotations

import logging

import torch

from .copier import KVCopier

log = logging.getLogger(__name__)


def make_copier(device: torch.device | str | None = None, *, max_sms: int | None = None,
                host_access: str = "direct") -> KVCopier:
    """The copier for ``device``: the CUDA kernels (through CuPy) on a CUDA device when CuPy is
    installed, else torch. ``max_sms`` and ``host_access`` tune the kernels (see CupyCopier)."""
    from .torch_copier import TorchCopier  # lazily, as CuPy is optional

    dev = torch.device(device) if device is not None else None  # rejects a malformed string early
    if dev is not None and dev.type == "cuda":
        from .cupy_copier import CupyCopier, cupy_available

        if cupy_available():
            return CupyCopier(dev, max_sms=max_sms, host_access=host_access)
        log.warning("kvtier: CuPy is not installed (pip install kvtier[cuda]); using the slower torch copier")
    return TorchCopier()
