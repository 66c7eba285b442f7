// kvtier batched KV copy: one launch moves a whole batch of chunks between an engine's paged KV
// cache (every layer, any layout reducible to strided [block, token, head, dim] views) and
// canonical chunks [layers][K,V][tokens][heads][dim], wherever each chunk lies and however many
// tokens it has (a token-row table gives each token's place in its chunk).
//
// Compiled at run time by NVRTC through CuPy, so the file includes no headers. The same text is
// compiled by nvcc (a CI check) and by g++ through tests/cuda_shim.h, which runs these kernels on
// the CPU against the reference copier: the index arithmetic below is tested on every CI run.
//
// Work split: CUDA block b takes tokens b, b + gridDim.x, ... of the batch (grid-stride, so a capped
// grid -- the SM cap -- still covers every token); its threads stride over that token's rows
// (plane, head) and the WORD-sized pieces of each row, so consecutive threads touch consecutive
// words on both sides (coalesced). WORD is the widest of 16/8/4/2/1 bytes that every address,
// stride and row length allows (chosen on the host, kvtier/cuda_ext/kernel_plan.py).
// The chunk side may be device memory or pinned host memory mapped into the GPU's address space
// (zero-copy over PCIe): the kernel does not care.

typedef long long kvt_i64;

// One row of the plane table (host: PagedKV.planes() order, layer-major, K before V): the base
// address and the byte strides of a plane's block, token-in-block and head dimensions.
struct kvt_plane {
  kvt_i64 base;
  kvt_i64 block_stride;
  kvt_i64 token_stride;
  kvt_i64 head_stride;
};

template <typename Word, bool kToChunk>
__device__ __forceinline__ void kvt_copy(
    const kvt_plane* __restrict__ planes,  // [num_planes]
    const kvt_i64* __restrict__ slots,     // [num_tokens]: block_id * block_size + offset
    const kvt_i64* __restrict__ rows,      // [num_tokens][2]: address of the token's (plane 0,
                                           // head 0) row in its chunk; bytes between its planes
    kvt_i64 num_tokens,
    int plane_begin, int plane_end,        // the planes this launch moves (a layer range)
    int heads, int words_per_row, int block_size) {
  const int rows_per_token = (plane_end - plane_begin) * heads;
  const int words = rows_per_token * words_per_row;  // per token
  const kvt_i64 row_bytes = (kvt_i64)words_per_row * (kvt_i64)sizeof(Word);
  for (kvt_i64 tok = blockIdx.x; tok < num_tokens; tok += gridDim.x) {
    const kvt_i64 slot = slots[tok];
    const kvt_i64 block = slot / block_size;
    const kvt_i64 offset = slot - block * block_size;
    char* token_row = (char*)rows[2 * tok];
    const kvt_i64 plane_bytes = rows[2 * tok + 1];
    for (int w = threadIdx.x; w < words; w += blockDim.x) {
      const int row = w / words_per_row;
      const int word = w - row * words_per_row;
      const int plane_rel = row / heads;
      const int head = row - plane_rel * heads;
      const int p = plane_begin + plane_rel;
      const kvt_plane pl = planes[p];
      Word* cache = (Word*)((char*)pl.base + block * pl.block_stride + offset * pl.token_stride +
                            head * pl.head_stride) + word;
      Word* canon = (Word*)(token_row + p * plane_bytes + head * row_bytes) + word;
      if (kToChunk) {
        *canon = *cache;
      } else {
        *cache = *canon;
      }
    }
  }
}

#define KVT_KERNELS(SUFFIX, WORD)                                                              \
  extern "C" __global__ void kvt_gather_##SUFFIX(                                              \
      const kvt_plane* planes, const kvt_i64* slots, const kvt_i64* rows, kvt_i64 num_tokens,  \
      int plane_begin, int plane_end, int heads, int words_per_row, int block_size) {          \
    kvt_copy<WORD, true>(planes, slots, rows, num_tokens, plane_begin, plane_end, heads,       \
                         words_per_row, block_size);                                           \
  }                                                                                            \
  extern "C" __global__ void kvt_scatter_##SUFFIX(                                             \
      const kvt_plane* planes, const kvt_i64* slots, const kvt_i64* rows, kvt_i64 num_tokens,  \
      int plane_begin, int plane_end, int heads, int words_per_row, int block_size) {          \
    kvt_copy<WORD, false>(planes, slots, rows, num_tokens, plane_begin, plane_end, heads,      \
                          words_per_row, block_size);                                          \
  }

KVT_KERNELS(16, uint4)
KVT_KERNELS(8, uint2)
KVT_KERNELS(4, unsigned int)
KVT_KERNELS(2, unsigned short)
KVT_KERNELS(1, unsigned char)
