"""kvtier's CUDA copy kernels against the per-token oracle.

On every machine: the kernel source compiles with nvcc and with NVRTC (what CuPy runs), and the
kernels themselves run on the CPU through g++ emulation (tests/kernel_emulator.py) with the same
launch planning as the CuPy copier. On a CUDA machine (``-m gpu``): the real kernels through CuPy.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from kernel_emulator import KERNEL, EmulatedCopier
from test_copy_layer import DTYPES, LAYOUTS, T, _cache, _random_chunks, _same_bytes, _slots

from kvtier.cuda_ext import PagedKV, TorchCopier, reference_gather, reference_scatter
from kvtier.cuda_ext.cupy_copier import NVRTC_OPTIONS
from kvtier.cuda_ext.kernel_plan import batch_rows, kernel_names, plan_copy, plane_table, token_rows

BATCHES = (1, 5, 64)
dtype_ids = {"ids": lambda d: str(d).removeprefix("torch.")}


def _check_copier(copier, layout: str, dtype: torch.dtype, batches=BATCHES, device: str = "cpu",
                  out_kind: str = "device") -> None:
    """gather == oracle; scatter writes exactly the oracle's bytes and nothing else."""
    cpu_src, src_raw = _cache(layout, dtype, seed=21)
    shape, build, _ = LAYOUTS[layout]
    src = build(src_raw.to(device).view(dtype).view(shape))
    zero_raw = torch.zeros_like(src_raw, device=device)
    zeroed = build(zero_raw.view(dtype).view(shape))
    oracle, oracle_raw = _cache(layout, dtype, seed=None)
    for n in batches:
        slots = _slots(cpu_src, n, seed=30 + n)
        out = _out(src, n, out_kind)
        got = copier.gather(src, slots, out=out)
        assert _same_bytes(got.cpu(), reference_gather(cpu_src, slots)), f"gather of {n} chunks"
        chunks = _random_chunks(cpu_src, n, seed=40 + n)
        copier.scatter(_out_like(chunks, out_kind, device), zeroed, slots)
        reference_scatter(chunks, oracle, slots)
        assert torch.equal(zero_raw.cpu(), oracle_raw), f"scatter of {n} chunks"
        zero_raw.zero_()
        oracle_raw.zero_()


def _out(paged: PagedKV, n: int, kind: str) -> torch.Tensor | None:
    shape = (n, *paged.chunk_shape(T))
    if kind == "device":
        return None
    out = torch.empty(shape, dtype=paged.dtype)
    return out.pin_memory() if kind == "pinned" else out


def _out_like(chunks: torch.Tensor, kind: str, device: str) -> torch.Tensor:
    if kind == "device":
        return chunks.to(device)
    return chunks.pin_memory() if kind == "pinned" else chunks


# -- the kernels, emulated on the CPU -------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, **dtype_ids)
def test_emulated_kernels_against_oracle(layout: str, dtype: torch.dtype) -> None:
    _check_copier(EmulatedCopier(max_blocks=7), layout, dtype)


@pytest.mark.parametrize("max_blocks", [1, 3, 10_000])
def test_emulated_grid_covers_every_token(max_blocks: int) -> None:
    """A grid capped below the token count (the SM cap) and one above it copy the same bytes."""
    _check_copier(EmulatedCopier(max_blocks=max_blocks), "vllm-hnd", torch.bfloat16, batches=(1, 9))


@pytest.mark.parametrize("layout", ["vllm-nhd", "sglang-pf", "vllm-mla", "opaque"])
def test_emulated_layer_range_touches_only_those_layers(layout: str) -> None:
    copier = EmulatedCopier()
    paged, _ = _cache(layout, torch.float16, seed=50)
    zeroed, zero_raw = _cache(layout, torch.float16, seed=None)
    slots = _slots(paged, 4, seed=51)
    full = reference_gather(paged, slots)
    out = torch.zeros_like(full)
    copier.gather(paged, slots, out=out, layers=range(1, 2))
    assert _same_bytes(out[:, 1], full[:, 1]) and not out[:, :1].view(torch.uint8).any()
    copier.scatter(full, zeroed, slots, layers=range(0, 1))
    back = reference_gather(zeroed, slots)
    assert _same_bytes(back[:, 0], full[:, 0]) and not back[:, 1:].view(torch.uint8).any()
    copier.scatter(full, zeroed, slots, layers=range(1, 1))  # an empty range copies nothing
    assert zero_raw.count_nonzero() == back.view(torch.uint8).count_nonzero()


def test_word_size_follows_alignment() -> None:
    """16-byte accesses when every address and stride allows; narrower ones when not."""
    copier = EmulatedCopier()
    paged, _ = _cache("vllm-nhd", torch.float32, seed=60)  # rows of 4 fp32 = 16 bytes
    slots = _slots(paged, 2, seed=61)
    copier.gather(paged, slots)
    numel = torch.Size(paged.chunk_shape(T)).numel()
    pool = torch.zeros(2 * numel + 1, dtype=torch.float32)
    odd = pool[1 : 1 + 2 * numel].view(2, *paged.chunk_shape(T))  # 4-byte aligned only
    copier.gather(paged, slots, out=odd)
    assert _same_bytes(odd, reference_gather(paged, slots))
    half, _ = _cache("vllm-nhd", torch.float16, seed=62)  # rows of 4 fp16 = 8 bytes
    copier.gather(half, slots)
    assert copier.launches == ["kvt_gather_16", "kvt_gather_4", "kvt_gather_8"]


def test_plan_rejects_bad_plane_ranges() -> None:
    paged, _ = _cache("vllm-nhd", torch.float32, seed=63)
    slots = _slots(paged, 1, seed=64).reshape(-1)
    out = torch.empty(1, *paged.chunk_shape(T))
    ptrs, rows = batch_rows(paged, out)
    assert paged.row_bytes == paged.dim * 4
    args = (paged, plane_table(paged), slots, rows, ptrs)
    for bad in (range(0, 0), range(0, 5), range(-1, 1), range(0, 4, 2)):
        with pytest.raises(ValueError, match="plane range"):
            plan_copy("gather", *args, bad, 4)
    with pytest.raises(ValueError, match="op must be"):
        plan_copy("copy", *args, range(0, 4), 4)
    with pytest.raises(ValueError, match="token rows"):
        plan_copy("gather", paged, plane_table(paged), slots[:-1], rows, ptrs, range(0, 4), 4)
    strided = PagedKV(tuple(t.transpose(2, 3) for t in paged.keys), None, "custom")
    with pytest.raises(ValueError, match="unit-stride"):
        plane_table(strided)


def test_token_rows_place_every_token_of_scattered_chunks() -> None:
    rows = token_rows([1000, 5000], [3, 2], heads=2, row_bytes=16)
    assert rows.tolist() == [[1000, 96], [1032, 96], [1064, 96], [5000, 64], [5032, 64]]


@pytest.mark.parametrize("copier_kind", ["emulated", "torch"])
@pytest.mark.parametrize("layout", ["vllm-hnd", "sglang-pf", "vllm-mla", "opaque"])
def test_scatter_batch_of_scattered_chunks_layer_by_layer(copier_kind: str, layout: str) -> None:
    """Chunks in separate buffers with different token counts (a skipped head, a partial tail):
    one prepared batch, one launch per layer, equal to the oracle."""
    copier = EmulatedCopier() if copier_kind == "emulated" else TorchCopier()
    zeroed, zero_raw = _cache(layout, torch.bfloat16, seed=None)
    oracle, oracle_raw = _cache(layout, torch.bfloat16, seed=None)
    slots = _slots(zeroed, 3, seed=65)
    lengths = (T - 2, T, 3)
    chunk_slots = [slots[0, 2:], slots[1], slots[2, :3]]
    chunks = [_random_chunks(zeroed, 1, seed=66 + i)[0][:, :, : lengths[i]].clone() for i in range(3)]
    batch = copier.prepare_scatter(chunks, zeroed, chunk_slots)
    for layer in range(zeroed.num_layers):
        copier.scatter_batch_async(batch, layers=range(layer, layer + 1)).synchronize()
    for chunk, s in zip(chunks, chunk_slots):
        reference_scatter(chunk[None], oracle, s[None])
    assert torch.equal(zero_raw, oracle_raw)
    if copier_kind == "emulated":
        assert copier.launches == [copier.launches[0]] * zeroed.num_layers  # one launch per layer
    with pytest.raises(ValueError, match="2 chunks but 3 slot lists"):
        copier.prepare_scatter(chunks[:2], zeroed, chunk_slots)
    with pytest.raises(ValueError, match=r"chunks\[1\] shape"):
        copier.prepare_scatter(chunks, zeroed, [chunk_slots[0], chunk_slots[2], chunk_slots[2]])


# -- the kernel source compiles with the real CUDA compilers ------------------------------------


def test_kernel_source_compiles_with_nvcc(tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        pytest.skip("nvcc is not installed on this machine")
    for arch in ("sm_80", "sm_90"):
        cubin = tmp_path / f"kv_copy_{arch}.cubin"
        run = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-Werror", "all-warnings", "-x", "cu",
                              "-o", str(cubin), str(KERNEL)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        symbols = cubin.read_bytes()
        for name in kernel_names():
            assert name.encode() in symbols


def _nvrtc() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
    paths = [p for root in (spec.submodule_search_locations or []) for p in glob.glob(f"{root}/lib/libnvrtc.so.*")] if spec else []
    for path in sorted(paths):
        if "alt" not in path and "builtins" not in path:
            return ctypes.CDLL(path)
    return None


def test_kernel_source_compiles_with_nvrtc() -> None:
    """The run-time path: NVRTC, as CuPy's RawModule calls it (same options, no headers)."""
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("NVRTC (the nvidia-cuda-nvrtc-cu12 wheel, in the dev extra) is not installed")
    prog = ctypes.c_void_p()
    src = KERNEL.read_bytes()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"kv_copy.cu", 0, None, None) == 0
    options = [o.encode() for o in (*NVRTC_OPTIONS, "-arch=compute_90", "--device-as-default-execution-space")]
    argv = (ctypes.c_char_p * len(options))(*options)
    rc = nvrtc.nvrtcCompileProgram(prog, len(options), argv)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode()
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    for name in kernel_names():
        assert f".entry {name}(".encode() in ptx.value


# -- the real kernels on a GPU ------------------------------------------------------------------

def needs_cuda(test):
    """``gpu``-marked; skipped, with the reason, where there is no CUDA device or no CuPy."""
    missing = ("a CUDA device" if not torch.cuda.is_available()
               else "CuPy (pip install kvtier[cuda])" if importlib.util.find_spec("cupy") is None else None)
    return pytest.mark.gpu(pytest.mark.skipif(missing is not None, reason=f"needs {missing}")(test))


def _cupy_copier(**kw):
    from kvtier.cuda_ext.cupy_copier import CupyCopier

    return CupyCopier("cuda", **kw)


@needs_cuda
@pytest.mark.parametrize("host_access", ["direct", "staged"])
@pytest.mark.parametrize("out_kind", ["pinned", "device", "pageable"])
def test_cupy_kernels_against_oracle(host_access: str, out_kind: str) -> None:
    """Every layout and dtype, batches of 1, 7 and 64 chunks, chunks in pinned host memory (the
    zero-copy path), on the device, or in pageable host memory (always staged)."""
    copier = _cupy_copier(host_access=host_access)
    for layout in LAYOUTS:
        for dtype in DTYPES:
            _check_copier(copier, layout, dtype, batches=(1, 7, 64), device="cuda", out_kind=out_kind)


@needs_cuda
def test_cupy_layerwise_async_and_sm_cap() -> None:
    """Layer-by-layer scatters on a side stream, each awaited on the compute stream by its event;
    one SM (a tiny grid) still copies every token."""
    copier = _cupy_copier(max_sms=1)
    cpu_paged, raw = _cache("vllm-hnd", torch.bfloat16, seed=70)
    shape, build, _ = LAYOUTS["vllm-hnd"]
    zero = torch.zeros_like(raw, device="cuda")
    paged = build(zero.view(torch.bfloat16).view(shape))
    slots = _slots(cpu_paged, 64, seed=71)
    chunks = reference_gather(cpu_paged, slots).pin_memory()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        done = [copier.scatter_async(chunks, paged, slots, layers=range(i, i + 1)) for i in range(paged.num_layers)]
    for i, d in enumerate(done):
        d.wait_on_current_stream()  # the compute stream waits on the GPU, the host does not
        layer = copier.gather(paged, slots, layers=range(i, i + 1))
        assert _same_bytes(layer[:, i].cpu(), chunks[:, i])
    assert all(d.query() for d in done)
    assert _same_bytes(copier.gather(paged, slots).cpu(), chunks)



@needs_cuda
@pytest.mark.parametrize("host_access", ["direct", "staged"])
def test_cupy_scatter_batch_of_scattered_host_chunks(host_access: str) -> None:
    """The layer-by-layer load path: chunks in separate host buffers (pinned and pageable), one
    launch per layer on a side stream, equal to the oracle."""
    copier = _cupy_copier(host_access=host_access)
    for layout in LAYOUTS:
        cpu_zero, _ = _cache(layout, torch.bfloat16, seed=None)
        oracle, oracle_raw = _cache(layout, torch.bfloat16, seed=None)
        shape, build, _ = LAYOUTS[layout]
        gpu_raw = torch.zeros_like(oracle_raw, device="cuda")
        paged = build(gpu_raw.view(torch.bfloat16).view(shape))
        slots = _slots(cpu_zero, 3, seed=80)
        chunk_slots = [slots[0, 2:], slots[1], slots[2, :3]]
        chunks = [_random_chunks(cpu_zero, 1, seed=81 + i)[0][:, :, : len(s)].clone() for i, s in enumerate(chunk_slots)]
        chunks[1] = chunks[1].pin_memory()
        batch = copier.prepare_scatter(chunks, paged, chunk_slots)
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            done = [copier.scatter_batch_async(batch, layers=range(i, i + 1)) for i in range(paged.num_layers)]
        for d in done:
            d.wait_on_current_stream()
        for chunk, s in zip(chunks, chunk_slots):
            reference_scatter(chunk[None], oracle, s[None])
        assert torch.equal(gpu_raw.cpu(), oracle_raw), layout
