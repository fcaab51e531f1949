// Small-M (decode) NF4/FP4 GEMV/GEMM: Y[M, N] = X[M, K] @ dequant(W[N, K])^T (+ s * T @ B^T) (+ bias),
// M <= 16 (spec: reference.qlora_linear_forward, given the LoRA down-projection T = X_lora A^T):
// the LoRA up-projection and the bias are added in the epilogue, before the one rounding.
// Chunking, split and summation order: qk_math.h ("Small-M 4-bit GEMV").
//
// At M <= 16 the packed weight is nearly all the bytes, so W is streamed once, in 16-byte loads
// (32 nibbles) of consecutive chunks by consecutive lanes of a warp (512 contiguous bytes per warp
// instruction). One warp owns one output row n at a time, for all M rows of X: X (at most 16 x K)
// stays in L1/L2 and is re-read per chunk, which the decode needs anyway. Each chunk's weights are
// decoded once (one fp32 multiply, bit-identical to dequantize_4bit) and reused for every row of
// X. When N alone cannot fill the GPU, blockIdx.y splits each row's chunks; the splits write fp32
// partial sums that gemv_reduce_kernel adds in a fixed order (deterministic, unlike atomics).
#include "qk_common.cuh"

namespace {

using qk::Dtype;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 4;  // chunks in flight per lane: 64 bytes of W per lane to cover latency

struct GemvArgs {
    const uint8_t* packed;
    int64_t nbytes;
    const float* absmax_f32;
    const uint8_t* absmax_q;  // non-NULL: double-quantized scales
    const float* absmax2;
    const float* code2;
    const float* offset;
    int64_t N, K, cps;
    int M, log2B, quant_type, splits;
    const float* lora_t;  // [M, r] fp32 or NULL (no LoRA term)
    const void* lora_b;   // [N, r] of lora_b_dtype
    int lora_b_dtype;
    int64_t lora_r;
    float lora_scale;
    const float* bias;    // [N] fp32 or NULL
    float* partial;       // [splits, M, N] fp32 when splits > 1
    void* y;              // [M, N] of the activation dtype
    bool xvec;            // x 16-byte aligned and K % 8 == 0: full chunks load X 16 bytes at a time
};

// Chunk c (16 bytes at byte 16c); the very last chunk of W may run past the buffer.
__device__ __forceinline__ uint4 load_chunk(const uint8_t* __restrict__ packed, int64_t nbytes, int64_t c) {
    if (c * 16 + 16 <= nbytes) return __ldg(reinterpret_cast<const uint4*>(packed) + c);
    uint32_t w[4] = {0u, 0u, 0u, 0u};
    for (int b = 0; b < 16; ++b)
        if (c * 16 + b < nbytes) w[b >> 2] |= (uint32_t)packed[c * 16 + b] << (8 * (b & 3));
    return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ float lora_b_value(const GemvArgs& a, int64_t i) {
    switch (a.lora_b_dtype) {
        case QK_DTYPE_BFLOAT16: return qk_bf16_to_f32(__ldg(static_cast<const uint16_t*>(a.lora_b) + i));
        case QK_DTYPE_FLOAT16: return qk_f16_to_f32(__ldg(static_cast<const uint16_t*>(a.lora_b) + i));
        default: return __ldg(static_cast<const float*>(a.lora_b) + i);
    }
}

// s * sum_j T[m, j] * B[n, j]: r FMAs in j order, then the scale (r is small: at decode sizes this
// replaces two extra launches and an [M, N] fp32 round trip through memory).
__device__ __forceinline__ float lora_term(const GemvArgs& a, int m, int64_t n) {
    const float* t = a.lora_t + (int64_t)m * a.lora_r;
    float acc = 0.0f;
    for (int64_t j = 0; j < a.lora_r; ++j) acc = qk_fma(__ldg(t + j), lora_b_value(a, n * a.lora_r + j), acc);
    return qk_fmul(acc, a.lora_scale);
}

template <int DT>
__device__ __forceinline__ float out_value(const GemvArgs& a, int m, int64_t n, float v) {
    if (a.lora_t) v = qk_fadd(v, lora_term(a, m, n));
    if (a.bias) v = qk_fadd(v, __ldg(a.bias + n));
    return v;
}

// minBlocks 1: without it ptxas held the M > 1 variants to 64-128 registers and spilled; the
// M = 1 variant still fits three CTAs per SM.
template <int DT, int MB>
__global__ void __launch_bounds__(kThreads, 1) gemv_4bit_kernel(const typename Dtype<DT>::T* __restrict__ x, GemvArgs a) {
    using T = typename Dtype<DT>::T;
    __shared__ float s_code[16];
    __shared__ float s_code2[256];
    const bool nested = a.absmax_q != nullptr;
    if (threadIdx.x < 16) s_code[threadIdx.x] = qk_code_4bit(a.quant_type, threadIdx.x);
    if (nested)
        for (int k = threadIdx.x; k < 256; k += blockDim.x) s_code2[k] = a.code2[k];
    __syncthreads();
    const float offset = nested ? __ldg(a.offset) : 0.0f;
    const int lane = threadIdx.x & 31;
    const int64_t s = blockIdx.y;
    const int64_t K = a.K;

    for (int64_t n = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5); n < a.N; n += (int64_t)gridDim.x * kWarps) {
        const int64_t row0 = n * K;
        const int64_t c_begin = qk_gemv_chunk_lo(n, K) + s * a.cps;
        const int64_t hi = qk_gemv_chunk_hi(n, K);
        const int64_t c_end = c_begin + a.cps < hi ? c_begin + a.cps : hi;
        float acc[MB];
#pragma unroll
        for (int m = 0; m < MB; ++m) acc[m] = 0.0f;

        for (int64_t c0 = c_begin + lane; c0 < c_end; c0 += kUnroll * 32) {
            uint4 w[kUnroll];
            float sc[kUnroll];
            // Every load of this round first (W and scales), so their latencies overlap.
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int64_t c = c0 + u * 32;
                w[u] = make_uint4(0u, 0u, 0u, 0u);
                sc[u] = 0.0f;
                if (c < c_end) {
                    w[u] = load_chunk(a.packed, a.nbytes, c);
                    const int64_t b = (c * QK_GEMV_CHUNK) >> a.log2B;
                    sc[u] = nested ? qk_double_dequant(s_code2[__ldg(a.absmax_q + b)],
                                                       __ldg(a.absmax2 + (b >> QK_NESTED_LOG2)), offset)
                                   : __ldg(a.absmax_f32 + b);
                }
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int64_t c = c0 + u * 32;
                if (c >= c_end) break;
                const uint32_t words[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
                const int64_t k0 = c * QK_GEMV_CHUNK - row0;  // k of the chunk's first nibble (< 0: previous row)
                const bool full = k0 >= 0 && k0 + QK_GEMV_CHUNK <= K;
                // Eight nibbles (one 32-bit word) at a time: their weights are decoded once and
                // used for every row of X; per accumulator the order stays element by element.
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    float wq[8];
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        const uint32_t byte = (words[q] >> (8 * (e >> 1))) & 0xFFu;
                        wq[e] = qk_decode_scale(s_code[(e & 1) ? (byte & 15u) : (byte >> 4)], sc[u]);
                    }
#pragma unroll
                    for (int m = 0; m < MB; ++m) {
                        if (m >= a.M) break;
                        const T* xr = x + m * K + k0 + 8 * q;
                        if (full) {
                            float xv[8];
                            qk::load8<DT>(xr, 0, 8, a.xvec, xv);
#pragma unroll
                            for (int e = 0; e < 8; ++e) acc[m] = qk_fma(xv[e], wq[e], acc[m]);
                        } else {
                            // A chunk shared with the previous or next row: its own elements only.
                            const int64_t kq = k0 + 8 * q;
#pragma unroll
                            for (int e = 0; e < 8; ++e)
                                if (kq + e >= 0 && kq + e < K) acc[m] = qk_fma(Dtype<DT>::load(xr[e]), wq[e], acc[m]);
                        }
                    }
                }
            }
        }

#pragma unroll
        for (int m = 0; m < MB; ++m)
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[m] = qk_fadd(acc[m], __shfl_xor_sync(0xffffffffu, acc[m], o));

        // Lane m stores row m (a static index into acc keeps it in registers).
#pragma unroll
        for (int m = 0; m < MB; ++m) {
            if (m >= a.M || lane != m) continue;
            if (a.splits > 1)
                a.partial[(s * a.M + m) * a.N + n] = acc[m];
            else
                static_cast<T*>(a.y)[m * a.N + n] = Dtype<DT>::store(out_value<DT>(a, m, n, acc[m]));
        }
    }
}

// Split partial sums added in split order, then the epilogue.
template <int DT>
__global__ void __launch_bounds__(256) gemv_reduce_kernel(GemvArgs a) {
    using T = typename Dtype<DT>::T;
    const int64_t mn = (int64_t)a.M * a.N;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < mn; i += (int64_t)gridDim.x * blockDim.x) {
        float v = a.partial[i];
        for (int s = 1; s < a.splits; ++s) v = qk_fadd(v, a.partial[s * mn + i]);
        const int m = (int)(i / a.N);
        static_cast<T*>(a.y)[i] = Dtype<DT>::store(out_value<DT>(a, m, i - (int64_t)m * a.N, v));
    }
}

template <int DT, int MB>
void launch_gemv(const void* x, const GemvArgs& a, cudaStream_t stream) {
    const int64_t row_ctas = qk::ceil_div(a.N, kWarps);
    const int64_t cap = (int64_t)qk::sm_count() * 16;
    const dim3 grid((unsigned)(row_ctas < cap ? row_ctas : cap), (unsigned)a.splits);
    QK_LAUNCH(grid, kThreads, 0, stream, gemv_4bit_kernel<DT, MB>)(static_cast<const typename Dtype<DT>::T*>(x), a);
}

}  // namespace

QK_API int qk_gemv_4bit(const void* x, int x_dtype, int64_t m, const uint8_t* packed, const void* absmax,
                        const float* nested_absmax, const float* nested_code, const float* offset, int64_t n,
                        int64_t k, int64_t blocksize, int quant_type, const float* lora_t, const void* lora_b,
                        int lora_b_dtype, int64_t lora_r, float lora_scale, const float* bias, int64_t splits,
                        float* workspace, void* y, cudaStream_t stream) {
    if (m < 1 || m > QK_GEMV_MAX_M)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: m must be in 1..%d, got %lld", QK_GEMV_MAX_M, (long long)m);
    if (n < 0 || k < 0) return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: n and k must be >= 0");
    if (!qk::is_pow2(blocksize) || blocksize < 32 || blocksize > 4096)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: blocksize must be a power of two in 32..4096, got %lld",
                        (long long)blocksize);
    if (quant_type != QK_QUANT_NF4 && quant_type != QK_QUANT_FP4)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: quant_type must be QK_QUANT_NF4 or QK_QUANT_FP4, got %d", quant_type);
    if (splits < 1 || splits > 65535)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: splits must be in 1..65535, got %lld", (long long)splits);
    if (n == 0) return QK_OK;
    if (!y || (k > 0 && (!x || !packed || !absmax)))
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: null pointer");
    if (splits > 1 && !workspace) return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: splits > 1 needs a workspace");
    if (lora_t) {
        if (!lora_b || lora_r < 1)
            return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: lora_t needs lora_b and lora_r >= 1 (got r = %lld)",
                            (long long)lora_r);
        if (lora_b_dtype != QK_DTYPE_FLOAT32 && lora_b_dtype != QK_DTYPE_BFLOAT16 && lora_b_dtype != QK_DTYPE_FLOAT16)
            return qk::fail(QK_ERR_UNSUPPORTED_DTYPE, "qk_gemv_4bit: unsupported lora_b dtype code %d", lora_b_dtype);
    }
    const bool nested = nested_absmax != nullptr;
    if (nested && (!nested_code || !offset))
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: nested_absmax needs nested_code and offset");
    if (!qk::aligned(packed, 16)) return qk::fail(QK_ERR_MISALIGNED, "qk_gemv_4bit: packed must be 16-byte aligned");
    if (n > INT64_MAX / (k > 0 ? k : 1) / 2)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: n * k overflows");

    GemvArgs a;
    a.packed = packed;
    a.nbytes = (n * k + 1) / 2;
    a.absmax_f32 = nested ? nullptr : static_cast<const float*>(absmax);
    a.absmax_q = nested ? static_cast<const uint8_t*>(absmax) : nullptr;
    a.absmax2 = nested_absmax;
    a.code2 = nested_code;
    a.offset = offset;
    a.N = n;
    a.K = k;
    a.cps = qk_gemv_chunks_per_split(k, splits);
    a.M = (int)m;
    a.log2B = qk::log2i(blocksize);
    a.quant_type = quant_type;
    a.splits = (int)splits;
    a.lora_t = lora_t;
    a.lora_b = lora_b;
    a.lora_b_dtype = lora_b_dtype;
    a.lora_r = lora_r;
    a.lora_scale = lora_scale;
    a.bias = bias;
    a.partial = workspace;
    a.y = y;
    a.xvec = qk::aligned(x, 16) && k % 8 == 0;

    QK_DISPATCH_DTYPE(x_dtype, DT, {
        if (m == 1) launch_gemv<DT, 1>(x, a, stream);
        else if (m == 2) launch_gemv<DT, 2>(x, a, stream);
        else if (m <= 4) launch_gemv<DT, 4>(x, a, stream);
        else if (m <= 8) launch_gemv<DT, 8>(x, a, stream);
        else launch_gemv<DT, 16>(x, a, stream);
        if (splits > 1) {
            if (int st = qk::check_launch("qk_gemv_4bit")) return st;
            QK_LAUNCH(qk::grid_for(m * n, 256), 256, 0, stream, gemv_reduce_kernel<DT>)(a);
        }
    });
    return qk::check_launch("qk_gemv_4bit");
}
