// NF4/FP4 blockwise quantize and dequantize (reference.quantize_4bit / dequantize_4bit, with
// reference.double_dequantize fused into the dequantize pass). Per-element math: qk_math.h.
#include "qk_common.cuh"

namespace {

using qk::Dtype;

// One thread owns 8 consecutive elements (16 bytes of bf16/fp16, 32 of fp32) and writes their 4
// packed bytes as one 32-bit store; the G = blocksize/8 threads of a quant block reduce its absmax
// together. CTA = max(256, G) threads, so a quant block never spans CTAs.
template <int DT>
__global__ void __launch_bounds__(512) quantize_4bit_kernel(const typename Dtype<DT>::T* __restrict__ in, int64_t n,
                                                            int log2B, int quant_type, uint8_t* __restrict__ packed,
                                                            float* __restrict__ absmax, bool vec) {
    __shared__ float smem[32];
    const int G = 1 << (log2B - 3);
    const int64_t tile = (int64_t)blockDim.x * 8;
    const int64_t ntiles = (n + tile - 1) / tile;
    const int64_t nbytes = (n + 1) >> 1;
    const int64_t full_blocks = n >> log2B;
    for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
        const int64_t i0 = t * tile + (int64_t)threadIdx.x * 8;
        float v[8];
        qk::load8<DT>(in, i0, n, vec, v);
        float m = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) m = qk_nanmax(m, fabsf(v[k]));
        m = qk::group_max(m, G, smem);
        const int64_t b = i0 >> log2B;
        if ((threadIdx.x & (G - 1)) == 0 && i0 < n) absmax[b] = m;
        if (i0 >= n) continue;  // after the reduction: every thread takes part in it

        int q[8];
        if (b < full_blocks) {
            const float inv = qk_inv_absmax_4bit(m);
#pragma unroll
            for (int k = 0; k < 8; ++k) q[k] = qk_encode_4bit(quant_type, qk_scale_full_4bit(v[k], inv));
        } else {
            // The partial last block; positions past n encode 0.0 (the odd last nibble).
#pragma unroll
            for (int k = 0; k < 8; ++k)
                q[k] = qk_encode_4bit(quant_type, (i0 + k < n) ? qk_scale_tail_4bit(v[k], m) : 0.0f);
        }
        uint32_t word = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) word |= (uint32_t)qk_pack_4bit(q[2 * j], q[2 * j + 1]) << (8 * j);
        const int64_t p0 = i0 >> 1;
        if (p0 + 4 <= nbytes) {
            *reinterpret_cast<uint32_t*>(packed + p0) = word;
        } else {
            for (int j = 0; j < 4; ++j)
                if (p0 + j < nbytes) packed[p0 + j] = (uint8_t)(word >> (8 * j));
        }
    }
}

// Writes are 4-8x the bytes read, so they set the pattern: one unit = the elements of one
// 16-byte store (4 fp32 or 8 bf16/fp16), read as one 2- or 4-byte load of packed nibbles. Unit u
// of a warp sits next to unit u+1, so every warp-wide load and store is contiguous. Each thread
// keeps kUnroll units in flight to cover memory latency. Units never cross a quant block
// (blocksize >= 32 > 8 elements), so the scale is decoded once per unit.
constexpr int kUnroll = 4;

template <int DT, bool NESTED>
__global__ void __launch_bounds__(256) dequantize_4bit_kernel(
    const uint8_t* __restrict__ packed, const float* __restrict__ absmax_f32, const uint8_t* __restrict__ absmax_q,
    const float* __restrict__ absmax2, const float* __restrict__ code2, const float* __restrict__ offset_ptr, int64_t n,
    int log2B, int quant_type, typename Dtype<DT>::T* __restrict__ out, int64_t vec_units) {
    constexpr int E = qk::vec_elems<DT>();
    constexpr int W = E / 2;
    __shared__ float s_code[16];
    __shared__ float s_code2[NESTED ? 256 : 1];
    if (threadIdx.x < 16) s_code[threadIdx.x] = qk_code_4bit(quant_type, threadIdx.x);
    if constexpr (NESTED)
        for (int k = threadIdx.x; k < 256; k += blockDim.x) s_code2[k] = code2[k];
    __syncthreads();
    const float offset = NESTED ? __ldg(offset_ptr) : 0.0f;
    auto scale_of = [&](int64_t b) -> float {
        if constexpr (NESTED) return qk_double_dequant(s_code2[__ldg(absmax_q + b)], __ldg(absmax2 + (b >> QK_NESTED_LOG2)), offset);
        else return __ldg(absmax_f32 + b);
    };

    const int64_t gtid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t gstride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t u0 = gtid; u0 < vec_units; u0 += kUnroll * gstride) {
        // All loads (packed words and scales) first, so their latencies overlap.
        uint32_t w[kUnroll];
        float sc[kUnroll];
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
            const int64_t u = u0 + j * gstride;
            w[j] = 0;
            sc[j] = 0.0f;
            if (u < vec_units) {
                if constexpr (W == 4) w[j] = __ldg(reinterpret_cast<const uint32_t*>(packed) + u);
                else w[j] = __ldg(reinterpret_cast<const uint16_t*>(packed) + u);
                sc[j] = scale_of((u * E) >> log2B);
            }
        }
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
            const int64_t u = u0 + j * gstride;
            if (u >= vec_units) break;
            const int64_t i0 = u * E;
            const float scale = sc[j];
            float v[E];
#pragma unroll
            for (int k = 0; k < E; ++k) {
                const uint32_t byte = (w[j] >> (8 * (k >> 1))) & 0xFFu;
                const uint32_t nib = (k & 1) ? (byte & 15u) : (byte >> 4);
                v[k] = qk_decode_scale(s_code[nib], scale);
            }
            *reinterpret_cast<uint4*>(out + i0) = qk::pack16<DT>(v);
        }
    }
    // The ragged end (fewer than E elements), or everything when pointers were not aligned.
    for (int64_t i = vec_units * E + gtid; i < n; i += gstride) {
        const uint32_t byte = packed[i >> 1];
        const uint32_t nib = (i & 1) ? (byte & 15u) : (byte >> 4);
        out[i] = Dtype<DT>::store(qk_decode_scale(s_code[nib], scale_of(i >> log2B)));
    }
}

int check_4bit_args(int64_t n, int64_t blocksize, int quant_type) {
    if (n < 0) return qk::fail(QK_ERR_INVALID_ARGUMENT, "n must be >= 0, got %lld", (long long)n);
    if (!qk::is_pow2(blocksize) || blocksize < 32 || blocksize > 4096)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "blocksize must be a power of two in 32..4096, got %lld",
                        (long long)blocksize);
    if (quant_type != QK_QUANT_NF4 && quant_type != QK_QUANT_FP4)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "quant_type must be QK_QUANT_NF4 or QK_QUANT_FP4, got %d", quant_type);
    return QK_OK;
}

}  // namespace

QK_API int qk_quantize_4bit(const void* input, int input_dtype, int64_t n, int64_t blocksize, int quant_type,
                            uint8_t* packed, float* absmax, cudaStream_t stream) {
    if (int s = check_4bit_args(n, blocksize, quant_type)) return s;
    if (n == 0) return QK_OK;
    if (!input || !packed || !absmax) return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_quantize_4bit: null pointer");
    if (!qk::aligned(packed, 4)) return qk::fail(QK_ERR_MISALIGNED, "qk_quantize_4bit: packed must be 4-byte aligned");
    const int log2B = qk::log2i(blocksize);
    const int G = (int)(blocksize / 8);
    const int threads = G > 256 ? G : 256;
    const int grid = qk::grid_for(qk::ceil_div(n, 8), threads, 2048 / threads);
    const bool vec = qk::aligned(input, 16);
    QK_DISPATCH_DTYPE(input_dtype, DT,
                      QK_LAUNCH(grid, threads, 0, stream, quantize_4bit_kernel<DT>)(
                          static_cast<const typename Dtype<DT>::T*>(input), n, log2B, quant_type, packed, absmax, vec));
    return qk::check_launch("qk_quantize_4bit");
}

QK_API int qk_dequantize_4bit(const uint8_t* packed, const void* absmax, const float* nested_absmax,
                              const float* nested_code, const float* offset, int64_t n, int64_t blocksize,
                              int quant_type, void* out, int out_dtype, cudaStream_t stream) {
    if (int s = check_4bit_args(n, blocksize, quant_type)) return s;
    if (n == 0) return QK_OK;
    if (!packed || !absmax || !out) return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_dequantize_4bit: null pointer");
    const bool nested = nested_absmax != nullptr;
    if (nested && (!nested_code || !offset))
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_dequantize_4bit: nested_absmax needs nested_code and offset");
    if (!qk::aligned(out, 16)) return qk::fail(QK_ERR_MISALIGNED, "qk_dequantize_4bit: out must be 16-byte aligned");
    const int log2B = qk::log2i(blocksize);
    const int threads = 256;
    QK_DISPATCH_DTYPE(out_dtype, DT, {
        constexpr int E = qk::vec_elems<DT>();
        const int64_t vec_units = qk::aligned(packed, E / 2) ? n / E : 0;
        const int64_t work = vec_units > 0 ? qk::ceil_div(vec_units, kUnroll) : n;
        const int grid = qk::grid_for(work, threads);
        auto* o = static_cast<typename Dtype<DT>::T*>(out);
        if (nested)
            QK_LAUNCH(grid, threads, 0, stream, dequantize_4bit_kernel<DT, true>)(
                packed, nullptr, static_cast<const uint8_t*>(absmax), nested_absmax, nested_code, offset, n, log2B,
                quant_type, o, vec_units);
        else
            QK_LAUNCH(grid, threads, 0, stream, dequantize_4bit_kernel<DT, false>)(
                packed, static_cast<const float*>(absmax), nullptr, nullptr, nullptr, nullptr, n, log2B, quant_type, o,
                vec_units);
    });
    return qk::check_launch("qk_dequantize_4bit");
}
