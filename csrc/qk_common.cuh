// Internal helpers of the .cu files: status/error reporting, launch sizing, dtype traits and the
// vectorized loads/stores. Not part of the C API.
#pragma once

#if defined(QK_CUDA_EMULATION)
#include "emu/qk_cuda_emu.h"  // the kernels on the CPU, for tests (CMake target qlora_kernels_emu)
#else
#include <cuda_runtime.h>
#endif
#include <stdint.h>
#include <stdio.h>

#include "qk_math.h"
#include "qlora_kernels.h"

namespace qk {

// Records a failure for qk_last_error_message() and returns its status, so call sites read
// `return fail(QK_ERR_..., "...")`.
int fail(int status, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// QK_OK, or QK_ERR_CUDA with the error text, for the result of a launch (cudaGetLastError also
// clears a non-sticky launch error, so the next call starts clean).
int check_launch(const char* what);

// Number of SMs of the current device (cached per device): grids are sized to fill it a few
// times over and loop (grid-stride), rather than one CTA per tile.
int sm_count();

// Compute capability major of the current device (cached per device; 0 when unknown): kernels that
// need sm_80 instructions (mma_16816) are chosen only where it is >= 8.
int cc_major();

inline bool is_pow2(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }
inline int log2i(int64_t x) {
    int l = 0;
    while ((int64_t{1} << l) < x) ++l;
    return l;
}
inline bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int grid_for(int64_t work_items, int threads_per_cta, int ctas_per_sm = 8) {
    int64_t need = ceil_div(work_items, threads_per_cta);
    int64_t cap = (int64_t)sm_count() * ctas_per_sm;
    if (need < 1) need = 1;
    return (int)(need < cap ? need : cap);
}

// Element storage and its fp32 conversions (exactly torch's rounding, qk_math.h).
template <int DT> struct Dtype;
template <> struct Dtype<QK_DTYPE_FLOAT32> {
    using T = float;
    static __device__ __forceinline__ float load(T v) { return v; }
    static __device__ __forceinline__ T store(float f) { return f; }
};
template <> struct Dtype<QK_DTYPE_BFLOAT16> {
    using T = uint16_t;
    static __device__ __forceinline__ float load(T v) { return qk_bf16_to_f32(v); }
    static __device__ __forceinline__ T store(float f) { return qk_f32_to_bf16(f); }
};
template <> struct Dtype<QK_DTYPE_FLOAT16> {
    using T = uint16_t;
    static __device__ __forceinline__ float load(T v) { return qk_f16_to_f32(v); }
    static __device__ __forceinline__ T store(float f) { return qk_f32_to_f16(f); }
};

// Eight consecutive inputs from index i as fp32 (0.0 past n): one 16-byte load for 16-bit types,
// two for fp32, when the whole run is in bounds and the base pointer is 16-byte aligned.
template <int DT>
__device__ __forceinline__ void load8(const typename Dtype<DT>::T* __restrict__ in, int64_t i, int64_t n,
                                      bool vec, float v[8]) {
    using T = typename Dtype<DT>::T;
    if (vec && i + 8 <= n) {
        if constexpr (sizeof(T) == 4) {
            const float4* p = reinterpret_cast<const float4*>(in + i);
            float4 a = __ldg(p), b = __ldg(p + 1);
            v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
            v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        } else {
            uint4 a = __ldg(reinterpret_cast<const uint4*>(in + i));
            uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                v[2 * k] = Dtype<DT>::load((T)(w[k] & 0xFFFFu));
                v[2 * k + 1] = Dtype<DT>::load((T)(w[k] >> 16));
            }
        }
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = (i + k < n) ? Dtype<DT>::load(in[i + k]) : 0.0f;
    }
}

// Elements of one 16-byte output vector: 4 fp32 or 8 bf16/fp16.
template <int DT> constexpr int vec_elems() { return 16 / (int)sizeof(typename Dtype<DT>::T); }

// Converts vec_elems<DT>() fp32 values and packs them for one uint4 store.
template <int DT>
__device__ __forceinline__ uint4 pack16(const float* v) {
    uint4 r;
    if constexpr (DT == QK_DTYPE_FLOAT32) {
        r.x = qk_f32_bits(v[0]);
        r.y = qk_f32_bits(v[1]);
        r.z = qk_f32_bits(v[2]);
        r.w = qk_f32_bits(v[3]);
    } else {
        uint32_t w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k)
            w[k] = (uint32_t)Dtype<DT>::store(v[2 * k]) | ((uint32_t)Dtype<DT>::store(v[2 * k + 1]) << 16);
        r.x = w[0]; r.y = w[1]; r.z = w[2]; r.w = w[3];
    }
    return r;
}

// D = A B + C on the tensor cores, one warp: mma.sync m16n8k16 with bf16 (DT = QK_DTYPE_BFLOAT16)
// or fp16 (QK_DTYPE_FLOAT16) operands and fp32 accumulators (sm_80+). Fragments as the PTX ISA lays
// them out, with g = lane / 4 and t = lane % 4: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1],
// a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]; b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g];
// c[i] = C[g + 8 (i / 2)][2t + i % 2]; each 32-bit register holds its lower-indexed element in the
// low half. Every lane of the warp must call it. The CPU emulation computes each D element as C plus
// the 16 exact products added in k order in fp32 (the tensor cores' order and rounding of that sum
// are not specified, so callers' tests hold the result to a tolerance).
template <int DT>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    static_assert(DT == QK_DTYPE_BFLOAT16 || DT == QK_DTYPE_FLOAT16, "mma_16816 takes bf16 or fp16 operands");
#if defined(QK_CUDA_EMULATION)
    const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    uint32_t all[32 * 6];
    ::qk_emu::warp_gather(mine, 6, all);
    const int lane = (int)(threadIdx.x & 31), g = lane >> 2, t = lane & 3;
    auto elem = [&](int l, int reg, int k) {
        const uint32_t w = all[l * 6 + reg];
        return Dtype<DT>::load((uint16_t)((k & 1) ? (w >> 16) : (w & 0xFFFFu)));
    };
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        float s = c[i];
        for (int k = 0; k < 16; ++k) {
            const float av = elem((row & 7) * 4 + ((k & 7) >> 1), (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0), k);
            const float bv = elem(col * 4 + ((k & 7) >> 1), 4 + (k >= 8 ? 1 : 0), k);
            s += av * bv;  // exact: a product of two 16-bit floats fits fp32
        }
        c[i] = s;
    }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (DT == QK_DTYPE_BFLOAT16) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#elif defined(__CUDA_ARCH__)
    __trap();  // built for an arch below sm_80: the host never launches a caller there (cc_major())
#endif
}

// The launch's dynamic shared memory (QK_LAUNCH's smem bytes); 16-byte aligned on the GPU.
__device__ __forceinline__ unsigned char* dynamic_shared() {
#if defined(QK_CUDA_EMULATION)
    return ::qk_emu::dynamic_shared();
#else
    extern __shared__ __align__(16) unsigned char qk_dynamic_smem[];
    return qk_dynamic_smem;
#endif
}

// Max of |x| over a group of G consecutive threads (G a power of two, groups aligned to G, the
// same G in the whole CTA); every thread of the group gets the result. smem: 32 floats. Contains
// __syncthreads() when G > 32, so all threads of the CTA must call it.
__device__ __forceinline__ float group_max(float m, int G, float* smem) {
    const int lanes = G < 32 ? G : 32;
    for (int o = lanes >> 1; o > 0; o >>= 1) m = qk_nanmax(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (G > 32) {
        const int warp = threadIdx.x >> 5;
        if ((threadIdx.x & 31) == 0) smem[warp] = m;
        __syncthreads();
        const int per_group = G >> 5;
        const int first = warp & ~(per_group - 1);
        m = smem[first];
        for (int w = 1; w < per_group; ++w) m = qk_nanmax(m, smem[first + w]);
        __syncthreads();  // smem is rewritten by the next call
    }
    return m;
}

}  // namespace qk

// Every kernel launch: QK_LAUNCH(grid, block, smem, stream, kernel)(args...). The kernel comes last
// so a template argument list's commas need no parentheses; under the CPU emulation the launch
// runs the kernel's threads as fibers (emu/qk_cuda_emu.h).
#if defined(QK_CUDA_EMULATION)
#define QK_LAUNCH(grid, block, smem, stream, ...) ((void)(stream), QK_EMU_LAUNCH(grid, block, smem, __VA_ARGS__))
#else
#define QK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

// Dispatch a runtime dtype code to a template argument; unknown codes return an error.
#define QK_DISPATCH_DTYPE(dt, DT, ...)                                                   \
    switch (dt) {                                                                        \
        case QK_DTYPE_FLOAT32: { constexpr int DT = QK_DTYPE_FLOAT32; __VA_ARGS__; break; }  \
        case QK_DTYPE_BFLOAT16: { constexpr int DT = QK_DTYPE_BFLOAT16; __VA_ARGS__; break; } \
        case QK_DTYPE_FLOAT16: { constexpr int DT = QK_DTYPE_FLOAT16; __VA_ARGS__; break; }  \
        default: return qk::fail(QK_ERR_UNSUPPORTED_DTYPE, "unsupported dtype code %d", (int)(dt)); \
    }
