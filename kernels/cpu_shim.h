// CPU shim for the CUDA kernels in this folder: lets g++ compile a .cu file unchanged and run its kernels
// one thread after another, so the tests can check the very source the GPU runs without a GPU.
//
// Supported subset: __global__/__device__/__forceinline__/__restrict__, threadIdx/blockIdx/blockDim/gridDim
// (x only), atomicAdd (a plain add: threads run sequentially), and the C math functions. Not supported:
// __syncthreads, shared memory, warp intrinsics; the kernels here use none of them, and the launcher runs
// every thread to completion before the next, which is a valid schedule for such kernels.
//
// CPU_EXPORT(kernel) defines `extern "C" void kernel_cpu(unsigned grid, unsigned block, void** args)`, with
// args laid out as for cuLaunchKernel: args[i] points at the value of the kernel's i-th parameter.
#pragma once
#include <cmath>
#include <cstddef>
#include <type_traits>
#include <utility>

using std::floor;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict

struct msda_dim3 { unsigned x = 0, y = 0, z = 0; };
static thread_local msda_dim3 threadIdx, blockIdx, blockDim, gridDim;

template <typename T> inline T atomicAdd(T* address, T val) { T old = *address; *address = old + val; return old; }

template <typename... Args, std::size_t... I>
inline void cpu_call(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_reference_t<Args>*>(args[I])...);
}

template <typename... Args>
inline void cpu_launch(void (*kernel)(Args...), unsigned grid, unsigned block, void** args) {
  gridDim.x = grid; blockDim.x = block; gridDim.y = gridDim.z = blockDim.y = blockDim.z = 1;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b;
    for (unsigned t = 0; t < block; ++t) {
      threadIdx.x = t;
      cpu_call(kernel, args, std::index_sequence_for<Args...>{});
    }
  }
}

#define CPU_EXPORT(kernel) \
  extern "C" void kernel##_cpu(unsigned grid, unsigned block, void** args) { cpu_launch(kernel, grid, block, args); }
