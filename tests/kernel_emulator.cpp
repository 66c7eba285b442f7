// Runs kvtier's CUDA copy kernels on the CPU: the kernel file itself, compiled by g++ through
// cuda_shim.h, launched thread by thread. Loaded by tests/kernel_emulator.py with ctypes.
#include "cuda_shim.h"
#include "../cuda_ext/kernels/kv_copy.cu"

typedef void (*kvt_kernel)(const kvt_plane*, const kvt_i64*, const kvt_i64*, kvt_i64, int, int, int,
                           int, int);

// Same order as kernel_names() in cuda_ext/kernel_plan.py.
static const kvt_kernel kKernels[] = {
    kvt_gather_16, kvt_scatter_16, kvt_gather_8, kvt_scatter_8, kvt_gather_4,
    kvt_scatter_4, kvt_gather_2,   kvt_scatter_2, kvt_gather_1, kvt_scatter_1,
};

extern "C" int kvt_emulate(int kernel, unsigned grid, unsigned block, const kvt_plane* planes,
                           const kvt_i64* slots, const kvt_i64* rows, kvt_i64 num_tokens,
                           int plane_begin, int plane_end, int heads, int words_per_row,
                           int block_size) {
  if (kernel < 0 || kernel >= (int)(sizeof(kKernels) / sizeof(kKernels[0]))) return -1;
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    for (unsigned t = 0; t < block; ++t) {
      blockIdx = {b, 0, 0};
      threadIdx = {t, 0, 0};
      kKernels[kernel](planes, slots, rows, num_tokens, plane_begin, plane_end, heads,
                       words_per_row, block_size);
    }
  }
  return 0;
}
