// Lets g++ compile cuda_ext/kernels/kv_copy.cu as plain C++: the CUDA qualifiers become nothing and
// the thread coordinates become globals that tests/kernel_emulator.cpp sets before each "thread".
// The kernels use no shared memory and no barriers, so running the threads one after another is
// an exact emulation of what they compute.
#pragma once
#define __global__
#define __device__
#define __forceinline__ inline
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct kvt_dim3 { unsigned int x, y, z; };
static kvt_dim3 blockIdx, threadIdx, blockDim, gridDim;
