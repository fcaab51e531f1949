// AdamW steps with fp32 states and with blockwise 8-bit states (reference.adamw_step_32bit /
// adamw_step_8bit). Per-element math: qk_math.h (qk_adamw_update, qk_encode_8bit), so the host
// test program checks exactly what runs here. One pass: every byte of param, grad and states is
// read once and written once.
#include "qk_common.cuh"

namespace {

using qk::Dtype;

// Four consecutive elements as fp32; one 8- or 16-byte load when `vec` (the caller checked
// alignment) and the four are in bounds.
template <int DT>
__device__ __forceinline__ void load4(const typename Dtype<DT>::T* __restrict__ in, int64_t i, int64_t n, bool vec,
                                      float v[4]) {
    if (vec && i + 4 <= n) {
        if constexpr (DT == QK_DTYPE_FLOAT32) {
            const float4 a = __ldg(reinterpret_cast<const float4*>(in + i));
            v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        } else {
            const uint2 a = __ldg(reinterpret_cast<const uint2*>(in + i));
            v[0] = Dtype<DT>::load((uint16_t)(a.x & 0xFFFFu));
            v[1] = Dtype<DT>::load((uint16_t)(a.x >> 16));
            v[2] = Dtype<DT>::load((uint16_t)(a.y & 0xFFFFu));
            v[3] = Dtype<DT>::load((uint16_t)(a.y >> 16));
        }
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) v[k] = (i + k < n) ? Dtype<DT>::load(in[i + k]) : 0.0f;
    }
}

template <int DT>
__device__ __forceinline__ void store4(typename Dtype<DT>::T* __restrict__ out, int64_t i, int64_t n, bool vec,
                                       const float v[4]) {
    if (vec && i + 4 <= n) {
        if constexpr (DT == QK_DTYPE_FLOAT32) {
            *reinterpret_cast<float4*>(out + i) = make_float4(v[0], v[1], v[2], v[3]);
        } else {
            uint2 a;
            a.x = (uint32_t)Dtype<DT>::store(v[0]) | ((uint32_t)Dtype<DT>::store(v[1]) << 16);
            a.y = (uint32_t)Dtype<DT>::store(v[2]) | ((uint32_t)Dtype<DT>::store(v[3]) << 16);
            *reinterpret_cast<uint2*>(out + i) = a;
        }
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k)
            if (i + k < n) out[i + k] = Dtype<DT>::store(v[k]);
    }
}

template <int PDT, int GDT>
__global__ void __launch_bounds__(256) adamw_32bit_kernel(typename Dtype<PDT>::T* __restrict__ p,
                                                          const typename Dtype<GDT>::T* __restrict__ g,
                                                          float* __restrict__ m, float* __restrict__ v, int64_t n,
                                                          QkAdamwScalars s, bool vec) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x * 4;
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 4; i < n; i += stride) {
        float pv[4], gv[4], mv[4], vv[4];
        load4<PDT>(p, i, n, vec, pv);
        load4<GDT>(g, i, n, vec, gv);
        load4<QK_DTYPE_FLOAT32>(m, i, n, vec, mv);
        load4<QK_DTYPE_FLOAT32>(v, i, n, vec, vv);
#pragma unroll
        for (int k = 0; k < 4; ++k) qk_adamw_update(pv[k], gv[k], mv[k], vv[k], s);
        store4<QK_DTYPE_FLOAT32>(m, i, n, vec, mv);
        store4<QK_DTYPE_FLOAT32>(v, i, n, vec, vv);
        store4<PDT>(p, i, n, vec, pv);
    }
}

// Eight consecutive codes (0 past n); one 8-byte load when aligned and in bounds.
__device__ __forceinline__ void load_codes8(const uint8_t* __restrict__ q, int64_t i0, int64_t n, bool vec,
                                            uint8_t b[8]) {
    if (vec && i0 + 8 <= n) {
        const uint2 w = __ldg(reinterpret_cast<const uint2*>(q + i0));
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            b[k] = (uint8_t)(w.x >> (8 * k));
            b[4 + k] = (uint8_t)(w.y >> (8 * k));
        }
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) b[k] = (i0 + k < n) ? q[i0 + k] : (uint8_t)0;
    }
}

__device__ __forceinline__ void store_codes8(uint8_t* __restrict__ q, int64_t i0, int64_t n, bool vec, const uint8_t b[8]) {
    if (vec && i0 + 8 <= n) {
        uint2 w;
        w.x = (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
        w.y = (uint32_t)b[4] | ((uint32_t)b[5] << 8) | ((uint32_t)b[6] << 16) | ((uint32_t)b[7] << 24);
        *reinterpret_cast<uint2*>(q + i0) = w;
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k)
            if (i0 + k < n) q[i0 + k] = b[k];
    }
}

// As quantize_blockwise_kernel: each thread owns 8 consecutive elements, the G = blocksize/8
// threads of a quant block reduce its two new absmax together, CTA = max(256, G) threads so a
// block never spans CTAs. Dequantize, update, requantize all in registers; the parameter gets the
// fresh fp32 m and v, as in the reference.
template <int PDT, int GDT>
__global__ void __launch_bounds__(512) adamw_8bit_kernel(typename Dtype<PDT>::T* __restrict__ p,
                                                         const typename Dtype<GDT>::T* __restrict__ g,
                                                         uint8_t* __restrict__ mq, float* __restrict__ m_absmax,
                                                         uint8_t* __restrict__ vq, float* __restrict__ v_absmax,
                                                         int64_t n, int log2B, const float* __restrict__ code_m,
                                                         const float* __restrict__ code_v,
                                                         const uint8_t* __restrict__ lut_m,
                                                         const uint8_t* __restrict__ lut_v, QkAdamwScalars s,
                                                         bool vec_p, bool vec_g, bool vec_q) {
    __shared__ float smem[32];
    __shared__ float s_code_m[256], s_code_v[256];
    for (int k = threadIdx.x; k < 256; k += blockDim.x) {
        s_code_m[k] = code_m[k];
        s_code_v[k] = code_v[k];
    }
    __syncthreads();
    const int G = 1 << (log2B - 3);
    const int64_t tile = (int64_t)blockDim.x * 8;
    const int64_t ntiles = (n + tile - 1) / tile;
    for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
        const int64_t i0 = t * tile + (int64_t)threadIdx.x * 8;
        const int64_t b = i0 >> log2B;
        float pv[8], gv[8], mv[8], vv[8];
        qk::load8<PDT>(p, i0, n, vec_p, pv);
        qk::load8<GDT>(g, i0, n, vec_g, gv);
        uint8_t qm[8], qv[8];
        load_codes8(mq, i0, n, vec_q, qm);
        load_codes8(vq, i0, n, vec_q, qv);
        const float am = i0 < n ? m_absmax[b] : 0.0f;
        const float av = i0 < n ? v_absmax[b] : 0.0f;
        float mmax = 0.0f, vmax = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            if (i0 + k < n) {
                mv[k] = qk_decode_scale(s_code_m[qm[k]], am);
                vv[k] = qk_decode_scale(s_code_v[qv[k]], av);
                qk_adamw_update(pv[k], gv[k], mv[k], vv[k], s);
            } else {
                mv[k] = vv[k] = 0.0f;  // the reference pads a partial block with zeros
            }
            mmax = qk_nanmax(mmax, fabsf(mv[k]));
            vmax = qk_nanmax(vmax, fabsf(vv[k]));
        }
        mmax = qk::group_max(mmax, G, smem);  // every thread takes part (it may __syncthreads)
        vmax = qk::group_max(vmax, G, smem);
        if (i0 >= n) continue;
        if ((threadIdx.x & (G - 1)) == 0) {
            m_absmax[b] = mmax;
            v_absmax[b] = vmax;
        }
        const float inv_m = qk_inv_absmax_8bit(mmax), inv_v = qk_inv_absmax_8bit(vmax);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            qm[k] = qk_encode_8bit(mv[k], mmax, inv_m, lut_m);
            qv[k] = qk_encode_8bit(vv[k], vmax, inv_v, lut_v);
        }
        store_codes8(mq, i0, n, vec_q, qm);
        store_codes8(vq, i0, n, vec_q, qv);
        store4<PDT>(p, i0, n, vec_p, pv);
        store4<PDT>(p, i0 + 4, n, vec_p, pv + 4);
    }
}

int check_adamw_dtypes(int p_dtype, int g_dtype) {
    for (int dt : {p_dtype, g_dtype})
        if (dt != QK_DTYPE_FLOAT32 && dt != QK_DTYPE_BFLOAT16 && dt != QK_DTYPE_FLOAT16)
            return qk::fail(QK_ERR_UNSUPPORTED_DTYPE, "unsupported dtype code %d", dt);
    return QK_OK;
}

}  // namespace

// Two-level dispatch on the runtime dtype codes (both already checked).
#define QK_DISPATCH_PG(pdt, gdt, PDT, GDT, ...)                                                   \
    QK_DISPATCH_DTYPE(pdt, PDT, { QK_DISPATCH_DTYPE(gdt, GDT, __VA_ARGS__); })

QK_API int qk_adamw_step_32bit(void* p, int p_dtype, const void* g, int g_dtype, float* m, float* v, int64_t n,
                               float decay, float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
                               float step_size, float bc2_sqrt, float eps, cudaStream_t stream) {
    if (n < 0) return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_adamw_step_32bit: n must be >= 0, got %lld", (long long)n);
    if (int st = check_adamw_dtypes(p_dtype, g_dtype)) return st;
    if (n == 0) return QK_OK;
    if (!p || !g || !m || !v) return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_adamw_step_32bit: null pointer");
    const QkAdamwScalars s = {decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps};
    // The vector path needs every pointer aligned to its 4-element load (16 bytes is enough for all).
    const bool vec = qk::aligned(p, 16) && qk::aligned(g, 16) && qk::aligned(m, 16) && qk::aligned(v, 16);
    const int grid = qk::grid_for(qk::ceil_div(n, 4), 256);
    QK_DISPATCH_PG(p_dtype, g_dtype, PDT, GDT,
                   QK_LAUNCH(grid, 256, 0, stream, adamw_32bit_kernel<PDT, GDT>)(
                       static_cast<typename Dtype<PDT>::T*>(p), static_cast<const typename Dtype<GDT>::T*>(g), m, v,
                       n, s, vec));
    return qk::check_launch("qk_adamw_step_32bit");
}

QK_API int qk_adamw_step_8bit(void* p, int p_dtype, const void* g, int g_dtype, uint8_t* m_q, float* m_absmax,
                              uint8_t* v_q, float* v_absmax, int64_t n, int64_t blocksize, const float* code_m,
                              const float* code_v, const uint8_t* lut_m, const uint8_t* lut_v, float decay,
                              float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
                              float step_size, float bc2_sqrt, float eps, cudaStream_t stream) {
    if (n < 0) return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_adamw_step_8bit: n must be >= 0, got %lld", (long long)n);
    if (!qk::is_pow2(blocksize) || blocksize < 8 || blocksize > 4096)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_adamw_step_8bit: blocksize must be a power of two in 8..4096, got %lld",
                        (long long)blocksize);
    if (int st = check_adamw_dtypes(p_dtype, g_dtype)) return st;
    if (n == 0) return QK_OK;
    if (!p || !g || !m_q || !m_absmax || !v_q || !v_absmax || !code_m || !code_v || !lut_m || !lut_v)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_adamw_step_8bit: null pointer");
    const QkAdamwScalars s = {decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps};
    const int log2B = qk::log2i(blocksize);
    const int G = (int)(blocksize / 8);
    const int threads = G > 256 ? G : 256;
    const int grid = qk::grid_for(qk::ceil_div(n, 8), threads, 2048 / threads);
    const bool vec_p = qk::aligned(p, 16);
    const bool vec_g = qk::aligned(g, 16);
    const bool vec_q = qk::aligned(m_q, 8) && qk::aligned(v_q, 8);
    QK_DISPATCH_PG(p_dtype, g_dtype, PDT, GDT,
                   QK_LAUNCH(grid, threads, 0, stream, adamw_8bit_kernel<PDT, GDT>)(
                       static_cast<typename Dtype<PDT>::T*>(p), static_cast<const typename Dtype<GDT>::T*>(g), m_q,
                       m_absmax, v_q, v_absmax, n, log2B, code_m, code_v, lut_m, lut_v, s, vec_p, vec_g, vec_q));
    return qk::check_launch("qk_adamw_step_8bit");
}
