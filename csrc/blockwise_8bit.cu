// 8-bit blockwise quantization with a 256-entry code (reference.dynamic_map_lut,
// quantize_blockwise, dequantize_blockwise). Per-element math: qk_math.h.
#include "qk_common.cuh"

namespace {

using qk::Dtype;

// One thread per grid entry; the <= 255 midpoints sit in shared memory. 65536 x 255 compares:
// microseconds, cheaper than caching tables keyed on code contents.
__global__ void __launch_bounds__(256) dynamic_map_lut_kernel(const float* __restrict__ code, int ncode,
                                                              uint8_t* __restrict__ lut) {
    __shared__ float mids[255];
    for (int k = threadIdx.x; k < ncode - 1; k += blockDim.x) mids[k] = qk_code_midpoint(code[k], code[k + 1]);
    __syncthreads();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= QK_DYNAMIC_LUT_SIZE) return;
    const float g = qk_lut_grid(i);
    int count = 0;
    for (int k = 0; k < ncode - 1; ++k) count += mids[k] < g;
    lut[i] = (uint8_t)count;
}

__device__ __forceinline__ uint8_t encode_8bit(float x, float absmax, float inv, const uint8_t* __restrict__ lut) {
    return absmax == 0.0f ? (uint8_t)0 : __ldg(lut + qk_lut_index(qk_normalize_8bit(x, inv)));
}

__device__ __forceinline__ void store8(uint8_t* __restrict__ q, int64_t i0, int64_t n, const uint8_t (&b)[8]) {
    if (i0 + 8 <= n) {
        uint2 w;
        w.x = (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
        w.y = (uint32_t)b[4] | ((uint32_t)b[5] << 8) | ((uint32_t)b[6] << 16) | ((uint32_t)b[7] << 24);
        *reinterpret_cast<uint2*>(q + i0) = w;
    } else {
        for (int k = 0; k < 8; ++k)
            if (i0 + k < n) q[i0 + k] = b[k];
    }
}

// Blocksize 2..4096: as quantize_4bit_kernel, 8 elements per thread, G = blocksize/8 threads per
// quant block; with blocksize 2 or 4 one thread's 8 elements hold several quant blocks.
// TINY = log2(blocksize) for blocksizes 2 and 4 (a compile-time size keeps v[] in registers),
// 0 for the group path.
template <int DT, int TINY>
__global__ void __launch_bounds__(512) quantize_blockwise_kernel(const typename Dtype<DT>::T* __restrict__ in, int64_t n,
                                                                 int log2B, const uint8_t* __restrict__ lut,
                                                                 uint8_t* __restrict__ q, float* __restrict__ absmax,
                                                                 bool vec) {
    __shared__ float smem[32];
    const int64_t tile = (int64_t)blockDim.x * 8;
    const int64_t ntiles = (n + tile - 1) / tile;
    for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
        const int64_t i0 = t * tile + (int64_t)threadIdx.x * 8;
        float v[8];
        qk::load8<DT>(in, i0, n, vec, v);
        uint8_t out[8];
        if constexpr (TINY == 0) {
            const int G = 1 << (log2B - 3);
            float m = 0.0f;
#pragma unroll
            for (int k = 0; k < 8; ++k) m = qk_nanmax(m, fabsf(v[k]));
            m = qk::group_max(m, G, smem);
            if ((threadIdx.x & (G - 1)) == 0 && i0 < n) absmax[i0 >> log2B] = m;
            if (i0 >= n) continue;
            const float inv = qk_inv_absmax_8bit(m);
#pragma unroll
            for (int k = 0; k < 8; ++k) out[k] = encode_8bit(v[k], m, inv, lut);
        } else {
            if (i0 >= n) continue;  // no cross-thread work in this branch
            constexpr int B = 1 << TINY;
#pragma unroll
            for (int r = 0; r < 8; r += B) {
                float m = 0.0f;
#pragma unroll
                for (int k = r; k < r + B; ++k) m = qk_nanmax(m, fabsf(v[k]));
                if (i0 + r < n) absmax[(i0 + r) >> TINY] = m;
                const float inv = qk_inv_absmax_8bit(m);
#pragma unroll
                for (int k = r; k < r + B; ++k) out[k] = encode_8bit(v[k], m, inv, lut);
            }
        }
        store8(q, i0, n, out);
    }
}

// Blocksizes above 4096 (the optimizer may use them): one CTA per quant block, two passes over it
// (the second pass re-reads from L2).
template <int DT>
__global__ void __launch_bounds__(256) quantize_blockwise_large_kernel(const typename Dtype<DT>::T* __restrict__ in,
                                                                       int64_t n, int log2B,
                                                                       const uint8_t* __restrict__ lut,
                                                                       uint8_t* __restrict__ q,
                                                                       float* __restrict__ absmax, bool vec) {
    __shared__ float smem[32];
    const int64_t B = int64_t{1} << log2B;
    const int64_t nb = (n + B - 1) >> log2B;
    const int64_t step = (int64_t)blockDim.x * 8;
    for (int64_t b = blockIdx.x; b < nb; b += gridDim.x) {
        const int64_t start = b << log2B;
        const int64_t end = start + B < n ? start + B : n;
        float m = 0.0f;
        for (int64_t i = start + threadIdx.x * 8; i < end; i += step) {
            float v[8];
            qk::load8<DT>(in, i, n, vec, v);
#pragma unroll
            for (int k = 0; k < 8; ++k) m = qk_nanmax(m, fabsf(v[k]));
        }
        m = qk::group_max(m, blockDim.x, smem);
        if (threadIdx.x == 0) absmax[b] = m;
        const float inv = qk_inv_absmax_8bit(m);
        for (int64_t i = start + threadIdx.x * 8; i < end; i += step) {
            float v[8];
            qk::load8<DT>(in, i, n, vec, v);
            uint8_t out[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) out[k] = encode_8bit(v[k], m, inv, lut);
            store8(q, i, n, out);
        }
    }
}

// As dequantize_4bit_kernel: one 16-byte store per unit of E outputs, fed by one E-byte load.
// Blocksizes below E put several quant blocks into a unit, so the scale is read per element then.
constexpr int kUnroll = 4;

template <int DT>
__global__ void __launch_bounds__(256) dequantize_blockwise_kernel(const uint8_t* __restrict__ q,
                                                                   const float* __restrict__ absmax,
                                                                   const float* __restrict__ code, int64_t n, int log2B,
                                                                   typename Dtype<DT>::T* __restrict__ out,
                                                                   int64_t vec_units) {
    constexpr int E = qk::vec_elems<DT>();
    __shared__ float s_code[256];
    for (int k = threadIdx.x; k < 256; k += blockDim.x) s_code[k] = code[k];
    __syncthreads();
    const bool one_scale = log2B >= (E == 4 ? 2 : 3);
    const int64_t gtid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t gstride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t u0 = gtid; u0 < vec_units; u0 += kUnroll * gstride) {
        uint32_t w[kUnroll][E / 4];
        float s0[kUnroll];  // loaded with the indices so the latencies overlap
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
            const int64_t u = u0 + j * gstride;
            s0[j] = u < vec_units ? __ldg(absmax + ((u * E) >> log2B)) : 0.0f;
            if constexpr (E == 4) {
                w[j][0] = u < vec_units ? __ldg(reinterpret_cast<const uint32_t*>(q) + u) : 0u;
            } else {
                uint2 a = make_uint2(0u, 0u);
                if (u < vec_units) a = __ldg(reinterpret_cast<const uint2*>(q) + u);
                w[j][0] = a.x;
                w[j][1] = a.y;
            }
        }
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
            const int64_t u = u0 + j * gstride;
            if (u >= vec_units) break;
            const int64_t i0 = u * E;
            float v[E];
#pragma unroll
            for (int k = 0; k < E; ++k) {
                const uint32_t idx = (w[j][k >> 2] >> (8 * (k & 3))) & 0xFFu;
                const float s = one_scale ? s0[j] : __ldg(absmax + ((i0 + k) >> log2B));
                v[k] = qk_decode_scale(s_code[idx], s);
            }
            *reinterpret_cast<uint4*>(out + i0) = qk::pack16<DT>(v);
        }
    }
    for (int64_t i = vec_units * E + gtid; i < n; i += gstride)
        out[i] = Dtype<DT>::store(qk_decode_scale(s_code[q[i]], __ldg(absmax + (i >> log2B))));
}

int check_8bit_args(int64_t n, int64_t blocksize) {
    if (n < 0) return qk::fail(QK_ERR_INVALID_ARGUMENT, "n must be >= 0, got %lld", (long long)n);
    if (!qk::is_pow2(blocksize) || blocksize < 2)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "blocksize must be a power of two >= 2, got %lld", (long long)blocksize);
    return QK_OK;
}

}  // namespace

QK_API int qk_dynamic_map_lut(const float* code, int64_t ncode, uint8_t* lut, cudaStream_t stream) {
    if (!code || !lut) return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_dynamic_map_lut: null pointer");
    if (ncode < 2 || ncode > 256)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_dynamic_map_lut: ncode must be in 2..256, got %lld", (long long)ncode);
    QK_LAUNCH(QK_DYNAMIC_LUT_SIZE / 256, 256, 0, stream, dynamic_map_lut_kernel)(code, (int)ncode, lut);
    return qk::check_launch("qk_dynamic_map_lut");
}

QK_API int qk_quantize_blockwise(const void* input, int input_dtype, int64_t n, int64_t blocksize, const uint8_t* lut,
                                 uint8_t* q, float* absmax, cudaStream_t stream) {
    if (int s = check_8bit_args(n, blocksize)) return s;
    if (n == 0) return QK_OK;
    if (!input || !lut || !q || !absmax) return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_quantize_blockwise: null pointer");
    if (!qk::aligned(q, 8)) return qk::fail(QK_ERR_MISALIGNED, "qk_quantize_blockwise: q must be 8-byte aligned");
    const int log2B = qk::log2i(blocksize);
    const bool vec = qk::aligned(input, 16);
    if (blocksize <= 4096) {
        const int G = blocksize >= 8 ? (int)(blocksize / 8) : 1;
        const int threads = G > 256 ? G : 256;
        const int grid = qk::grid_for(qk::ceil_div(n, 8), threads, 2048 / threads);
        QK_DISPATCH_DTYPE(input_dtype, DT, {
            const auto* in = static_cast<const typename Dtype<DT>::T*>(input);
            if (log2B == 1)
                QK_LAUNCH(grid, threads, 0, stream, quantize_blockwise_kernel<DT, 1>)(in, n, log2B, lut, q, absmax, vec);
            else if (log2B == 2)
                QK_LAUNCH(grid, threads, 0, stream, quantize_blockwise_kernel<DT, 2>)(in, n, log2B, lut, q, absmax, vec);
            else
                QK_LAUNCH(grid, threads, 0, stream, quantize_blockwise_kernel<DT, 0>)(in, n, log2B, lut, q, absmax, vec);
        });
    } else {
        const int64_t nb = qk::ceil_div(n, blocksize);
        const int cap = qk::sm_count() * 8;
        const int grid = (int)(nb < cap ? nb : cap);
        QK_DISPATCH_DTYPE(input_dtype, DT,
                          QK_LAUNCH(grid, 256, 0, stream, quantize_blockwise_large_kernel<DT>)(
                              static_cast<const typename Dtype<DT>::T*>(input), n, log2B, lut, q, absmax, vec));
    }
    return qk::check_launch("qk_quantize_blockwise");
}

QK_API int qk_dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                                   int64_t blocksize, void* out, int out_dtype, cudaStream_t stream) {
    if (int s = check_8bit_args(n, blocksize)) return s;
    if (n == 0) return QK_OK;
    if (!q || !absmax || !code || !out) return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_dequantize_blockwise: null pointer");
    if (!qk::aligned(out, 16)) return qk::fail(QK_ERR_MISALIGNED, "qk_dequantize_blockwise: out must be 16-byte aligned");
    const int log2B = qk::log2i(blocksize);
    QK_DISPATCH_DTYPE(out_dtype, DT, {
        constexpr int E = qk::vec_elems<DT>();
        const int64_t vec_units = qk::aligned(q, E) ? n / E : 0;
        const int64_t work = vec_units > 0 ? qk::ceil_div(vec_units, kUnroll) : n;
        const int grid = qk::grid_for(work, 256);
        QK_LAUNCH(grid, 256, 0, stream, dequantize_blockwise_kernel<DT>)(q, absmax, code, n, log2B,
                                                                  static_cast<typename Dtype<DT>::T*>(out), vec_units);
    });
    return qk::check_launch("qk_dequantize_blockwise");
}
