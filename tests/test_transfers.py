"""Layer-by-layer loads and save tracking (connector/transfers.py), on the CPU paths the engine uses
here and with the CUDA kernels emulated; the CUDA-stream half runs in the gpu tests."""

from __future__ import annotations

import torch
from kernel_emulator import EmulatedCopier
from test_copy_layer import _cache, _random_chunks, _slots

from kvtier.connector.transfers import ChunkLoad, CopyStreams, LayerwiseLoad, SaveTracker
from kvtier.cuda_ext import TorchCopier, reference_gather
from kvtier.cuda_ext.copier import CopyDone


class _Pending(CopyDone):
    """A copy that completes when the test says so (as a CUDA event would)."""

    def __init__(self) -> None:
        self.complete = False

    def query(self) -> bool:
        return self.complete


def test_layerwise_load_writes_each_layer_just_in_time() -> None:
    for copier in (TorchCopier(), EmulatedCopier()):
        paged, raw = _cache("vllm-hnd", torch.bfloat16, seed=None)
        cpu = CopyStreams(torch.device("cpu"))
        slots = [_slots(paged, 1, seed=s)[0] for s in (1, 2)]
        slots[1] = slots[1][~torch.isin(slots[1], slots[0])][:4]  # a shorter, disjoint second chunk
        payloads = [_random_chunks(paged, 1, seed=3)[0], _random_chunks(paged, 1, seed=4)[0][:, :, :4]]
        load = LayerwiseLoad(copier, paged, [ChunkLoad(payloads[:1], slots[:1]), ChunkLoad(payloads[1:], slots[1:])],
                             cpu)
        assert not load.empty and not raw.any()  # nothing copied before the first layer asks
        load.wait(0)
        got = [reference_gather(paged, s[None])[0] for s in slots]
        for p, g in zip(payloads, got):
            assert torch.equal(g[0].view(torch.int16), p[0].view(torch.int16))
            assert not g[1].view(torch.int16).any()  # layer 1 not yet
        load.wait(0)  # idempotent
        load.finish()
        for p, s in zip(payloads, slots):
            assert torch.equal(reference_gather(paged, s[None])[0].view(torch.int16), p.view(torch.int16))


def test_empty_layerwise_load_is_a_no_op() -> None:
    paged, raw = _cache("vllm-nhd", torch.float32, seed=None)
    load = LayerwiseLoad(TorchCopier(), paged, [], CopyStreams(torch.device("cpu")))
    assert load.empty
    load.wait(1)
    load.finish()
    assert not raw.any()


def test_save_tracker_reports_finished_requests_once_copied() -> None:
    tracker = SaveTracker()
    step1, step2 = _Pending(), _Pending()
    tracker.saving(["a", "b"], step1)
    tracker.saving(["b"], step2)  # b saved again later: its latest copy counts
    assert tracker.finished({"a", "b", "never-saved"}) == set()
    assert tracker.pending == 2
    step1.complete = True
    assert tracker.finished(set()) == {"a"}  # reported in a later step, once
    assert tracker.finished(set()) == set()
    step2.complete = True
    assert tracker.finished(set()) == {"b"} and tracker.pending == 0
    tracker.saving(["c"], CopyDone())  # CPU copies are complete when saved
    assert tracker.finished({"c"}) == {"c"}
