// CUDA emulation on the CPU: the csrc kernels compiled by the host C++ compiler and run with every
// CUDA thread as a fiber (ucontext), so the kernels' own index arithmetic, vector loads, tails,
// shared memory and barriers execute on a machine without a GPU (CI). Included in place of
// <cuda_runtime.h> by qk_common.cuh when QK_CUDA_EMULATION is defined (CMake target
// qlora_kernels_emu); the real library never sees this file.
//
// Model: a launch runs its blocks one after another; within a block every thread is a fiber that
// runs until it reaches __syncthreads() (all live threads of the block must arrive),
// __shfl_xor_sync (all live threads of the warp must arrive) or its end. Shared memory is a static
// array per kernel instantiation, reused by each block in turn. What it cannot show: timing, data
// races between threads (fibers never interleave between barriers), device memory errors (all
// pointers are host memory). What it does show: every element each kernel writes, for any shape.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <functional>

#define QK_CUDA_EMULATION_ACTIVE 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define CUDART_VERSION 13000

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// --- the runtime API the library calls, answered for one pretend device ----------------------
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
enum cudaDeviceAttr {
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76,
};
enum cudaMemLocationType { cudaMemLocationTypeDevice = 1, cudaMemLocationTypeHost = 2 };
struct cudaMemLocation { cudaMemLocationType type; int id; };
struct cudaFuncAttributes { int maxThreadsPerBlock; };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
#define cudaMemAttachGlobal 0x01
#define cudaCpuDeviceId (-1)

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaDriverGetVersion(int* version);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMallocManaged(void** ptr, size_t size, unsigned flags);
cudaError_t cudaFree(void* ptr);
cudaError_t cudaMemPrefetchAsync(const void* ptr, size_t bytes, cudaMemLocation loc, unsigned flags,
                                 cudaStream_t stream);
template <class F>
cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) {
    return cudaSuccess;
}
template <class F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F*) {
    attr->maxThreadsPerBlock = 1024;
    return cudaSuccess;
}

// --- threads, barriers, launches --------------------------------------------------------------
namespace qk_emu {

// The pretend device's SM count: small, so grid-stride loops take several turns in tests.
constexpr int kSmCount = 2;

dim3 thread_idx();
dim3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void sync_block();
uint32_t exchange_xor(uint32_t bits, int lane_mask);
// Warp-collective: every lane contributes n (<= kGatherWords) words and receives all 32 lanes'
// words, lane l's at all[l * n .. l * n + n). Every lane of the warp must call it (mma.sync needs
// a full warp on the GPU too); the tensor-core emulation (qk_common.cuh: qk::mma_16816) uses it.
constexpr int kGatherWords = 8;
void warp_gather(const uint32_t* mine, int n, uint32_t* all);
// Runs `body` for every thread of every block; each block gets `dynamic_smem` bytes of dynamic
// shared memory (dynamic_shared(), 32 KB-aligned, filled with 0xFF before each block: a GPU's is not
// zeroed either, so a kernel that reads what it did not write shows).
void run(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);
unsigned char* dynamic_shared();

template <class... P>
struct Launcher {
    dim3 grid, block;
    size_t smem;
    void (*kernel)(P...);
    template <class... A>
    void operator()(A&&... args) const {
        run(grid, block, smem, [&] { kernel(static_cast<P>(args)...); });
    }
};
template <class... P>
Launcher<P...> launch(dim3 grid, dim3 block, size_t smem, void (*kernel)(P...)) {
    return {grid, block, smem, kernel};
}

}  // namespace qk_emu

#define threadIdx (::qk_emu::thread_idx())
#define blockIdx (::qk_emu::block_idx())
#define blockDim (::qk_emu::block_dim())
#define gridDim (::qk_emu::grid_dim())

inline void __syncthreads() { ::qk_emu::sync_block(); }

template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldcg(const T* p) { return *p; }

// Atomics and fences: fibers never interleave between barriers, so a plain read-modify-write is
// atomic here and memory is always coherent. A launch's blocks run in index order, so a block
// that waits for lower-indexed blocks (the GEMV's T CTAs) finds their work done.
template <class T>
inline T atomicAdd(T* p, T v) {
    const T old = *p;
    *p = old + v;
    return old;
}
template <class T>
inline T atomicSub(T* p, T v) {
    const T old = *p;
    *p = old - v;
    return old;
}
template <class T>
inline T atomicExch(T* p, T v) {
    const T old = *p;
    *p = v;
    return old;
}
inline void __threadfence() {}
// A warp barrier: every live lane of the warp arrives (an exchange with itself).
inline void __syncwarp(unsigned = 0xffffffffu) { (void)::qk_emu::exchange_xor(0u, 0); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
    static_assert(sizeof(T) == 4, "the emulation exchanges 32-bit values");
    uint32_t bits;
    memcpy(&bits, &v, 4);
    bits = ::qk_emu::exchange_xor(bits, lane_mask);
    memcpy(&v, &bits, 4);
    return v;
}

#define QK_EMU_LAUNCH(grid, block, smem, ...) ::qk_emu::launch(dim3(grid), dim3(block), (size_t)(smem), __VA_ARGS__)
