"""Overlapping kvtier's copies with the engine's forward pass: side streams, layer-by-layer loads,
and knowing when a request's saves have been copied out. Engine-agnostic; no-ops on CPU.

* Loads: all of a step's chunks are fetched and checked before the forward pass (a miss must be
  known then); the scatters are then queued on a load stream, one launch per layer, and the
  forward pass waits on the GPU (never the host) for layer ``i`` just before layer ``i``'s
  attention, so computing layer ``i`` overlaps loading layer ``i + 1``.
* Saves: gathers run on a store stream that first waits for the step's forward pass; the host
  never waits for them. Blocks a gather still reads stay the request's until :class:`SaveTracker`
  reports the copy done (the engine delays freeing them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvtier.cuda_ext import KVCopier, PagedKV
from kvtier.cuda_ext.copier import CopyDone, CudaCopyDone


@dataclass
class ChunkLoad:
    """Validated chunk payloads ``[layers, planes, tokens, heads, dim]`` (host memory, read only) and
    the slots each one goes to."""

    payloads: list[torch.Tensor]
    slots: list[torch.Tensor]


class CopyStreams:
    """The load and store streams of one CUDA device; on CPU every method is a no-op."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._device = device
        if self.cuda:
            self.load = torch.cuda.Stream(device)
            self.store = torch.cuda.Stream(device)

    @contextmanager
    def loading(self) -> Iterator[None]:
        """Run the block's copies on the load stream, after everything already queued for the
        forward pass (the engine may just have written the blocks being refilled)."""
        with self._side(self.load if self.cuda else None):
            yield

    @contextmanager
    def storing(self) -> Iterator[None]:
        """Run the block's copies on the store stream, after the forward pass that computed the KV."""
        with self._side(self.store if self.cuda else None):
            yield

    def store_done(self) -> CopyDone:
        """Completion of everything queued on the store stream so far."""
        if not self.cuda:
            return CopyDone()
        event = torch.cuda.Event()
        event.record(self.store)
        return CudaCopyDone(event)

    def finish_stores(self) -> None:
        """Block the host until queued stores are done (before preempted blocks are reused)."""
        if self.cuda:
            self.store.synchronize()

    @contextmanager
    def _side(self, stream: torch.cuda.Stream | None) -> Iterator[None]:
        if stream is None:
            yield
            return
        stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(stream):
            yield


class LayerwiseLoad:
    """Scatter fetched chunks into the cache one layer at a time.

    With side streams every layer's scatter is queued at once and :meth:`wait` makes the current
    (forward) stream wait for that layer on the GPU. Without (CPU), :meth:`wait` copies the layers
    up to the one asked for, so layer ``i`` is written just before it is read either way.
    """

    def __init__(self, copier: KVCopier, paged: PagedKV, loads: Sequence[ChunkLoad], streams: CopyStreams) -> None:
        self._copier = copier
        self._paged = paged
        payloads = [p for load in loads for p in load.payloads]
        slots = [s for load in loads for s in load.slots]
        self._batch = copier.prepare_scatter(payloads, paged, slots) if payloads else None
        self._next = 0  # first layer not yet copied (CPU) or not yet awaited (GPU)
        self._done: list[CopyDone] = []
        if streams.cuda and self._batch is not None:
            with streams.loading():
                self._done = [self._scatter(layer) for layer in range(paged.num_layers)]

    @property
    def empty(self) -> bool:
        return self._batch is None

    def wait(self, layer: int) -> None:
        """Layer ``layer`` (and every layer before it) is in the cache for whatever runs next."""
        while self._next <= min(layer, self._paged.num_layers - 1) and self._batch is not None:
            if self._done:
                self._done[self._next].wait_on_current_stream()
            else:
                self._scatter(self._next)
            self._next += 1

    def finish(self) -> None:
        """Every layer is in the cache (for the layers the forward pass did not ask for)."""
        self.wait(self._paged.num_layers - 1)

    def copies_done(self) -> bool:
        """The copies no longer read the payloads (tier buffers may be reused once this is dropped)."""
        return all(done.query() for done in self._done)

    def _scatter(self, layer: int) -> CopyDone:
        return self._copier.scatter_batch_async(self._batch, layers=range(layer, layer + 1))  # one launch on GPU


class SaveTracker:
    """Which finished requests' saves are copied out, so the engine may free their blocks.

    :meth:`saving` records the requests that had saves in a step, with the completion of that
    step's copies; :meth:`finished` takes the engine's finished requests and answers those whose
    copies are done (now or in a later step).
    """

    def __init__(self) -> None:
        self._last_copy: dict[str, CopyDone] = {}
        self._finishing: set[str] = set()

    def saving(self, req_ids: Sequence[str], done: CopyDone) -> None:
        for req_id in req_ids:
            self._last_copy[req_id] = done  # copies run in order: the latest completion covers all

    def finished(self, finished_req_ids: set[str]) -> set[str]:
        self._finishing.update(r for r in finished_req_ids if r in self._last_copy)
        ready = {r for r in self._finishing if self._last_copy[r].query()}
        for req_id in ready:
            self._finishing.discard(req_id)
            del self._last_copy[req_id]
        return ready

    @property
    def pending(self) -> int:
        return len(self._finishing)
