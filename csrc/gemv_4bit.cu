// Small-M (decode) NF4/FP4 GEMV/GEMM in one launch: T = X_lora A^T and
// Y[M, N] = X[M, K] @ dequant(W[N, K])^T (+ s * T @ B^T) (+ bias), M <= 16 (spec:
// reference.qlora_linear_forward): the LoRA up-projection and the bias are added in the epilogue,
// before the one rounding. Chunking, split and summation order: qk_math.h ("Small-M 4-bit GEMV").
//
// At M <= 16 the packed weight is nearly all the bytes, and a decode step's kernels take a few
// microseconds, so a separate launch for T, for the split sums or for a cast would cost as much as
// the weight stream. The 1-D grid holds two kinds of CTAs:
//   T CTAs (the first qk_gemv_t_blocks(K)): the fp32 partial X_lora[:, chunk] A[:, chunk]^T of one
//     K chunk; the last to finish (counters[0]) sums the partials in chunk order into T, then sets
//     the "T ready" count counters[1] to N.
//   GEMV CTAs: W streamed once, in 16-byte loads (32 nibbles) of consecutive chunks by consecutive
//     lanes of a warp (512 contiguous bytes per warp instruction). One warp owns one output row n
//     at a time, for all M rows of X: X (at most 16 x K) stays in L1/L2 and is re-read per chunk.
//     Each chunk's weights are decoded once (one fp32 multiply, bit-identical to dequantize_4bit)
//     and reused for every row of X. When N alone cannot fill the GPU, each row's chunks are split
//     across CTAs; a split stores its fp32 partial and the last split of the row (counters[2 + n])
//     adds the partials in split order. The warp that finishes a row waits for T, writes the row,
//     and takes one off the "T ready" count.
// Every counter is zero again when the launch ends (the last T CTA and the last split reset theirs;
// N finished rows bring "T ready" back to 0). Only row finishers wait, for T CTAs, which never wait
// and have the lowest block indices, so they were dispatched first (the in-order dispatch CUB's
// single-pass scan relies on). Data written by other CTAs in this launch is read with __ldcg (L2),
// never through the read-only or L1 caches.
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
    int64_t row_ctas;     // GEMV CTAs per split
    const void* x_lora;   // [M, K] of the activation dtype
    const void* lora_a;   // [r, K] of lora_a_dtype, or NULL (no LoRA term)
    const void* lora_b;   // [N, r] of lora_b_dtype
    int lora_a_dtype, lora_b_dtype;
    int64_t lora_r;
    float lora_scale;
    float* lora_t;        // out: T [M, r] fp32
    int64_t t_chunk;      // K columns per T CTA
    int t_blocks;         // T CTAs (0 without LoRA)
    float* t_partial;     // [t_blocks, M, r] fp32
    const void* bias;     // [N] of bias_dtype, or NULL
    int bias_dtype;
    float* partial;       // [splits, M, N] fp32 when splits > 1
    int* counters;        // T CTAs done, "T ready" count, then split arrivals per row ([2 + N] when splits > 1)
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

// Element i of an fp32, bf16 or fp16 operand (LoRA A or B, the bias) as fp32.
__device__ __forceinline__ float operand_value(const void* p, int dtype, int64_t i) {
    switch (dtype) {
        case QK_DTYPE_BFLOAT16: return qk_bf16_to_f32(__ldg(static_cast<const uint16_t*>(p) + i));
        case QK_DTYPE_FLOAT16: return qk_f16_to_f32(__ldg(static_cast<const uint16_t*>(p) + i));
        default: return __ldg(static_cast<const float*>(p) + i);
    }
}

// The sum over the warp's 32 lanes, in every lane (xor butterfly: a fixed order).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v = qk_fadd(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// T CTA j: the fp32 partial T_j[m, q] = sum over the chunk's k of x_lora[m, k] * A[q, k] (per lane
// in k order, then warp_sum); the last T CTA to finish sums the partials in j order into T.
template <int DT, int MB>
__device__ void lora_down_cta(const GemvArgs& a, int64_t j, int* s_last) {
    using T = typename Dtype<DT>::T;
    const T* xl = static_cast<const T*>(a.x_lora);
    const int lane = threadIdx.x & 31;
    const int64_t K = a.K, r = a.lora_r;
    const int64_t k_lo = j * a.t_chunk;
    const int64_t k_hi = k_lo + a.t_chunk < K ? k_lo + a.t_chunk : K;
    for (int64_t q = threadIdx.x >> 5; q < r; q += kWarps) {
        float acc[MB];
#pragma unroll
        for (int m = 0; m < MB; ++m) acc[m] = 0.0f;
        for (int64_t k = k_lo + lane; k < k_hi; k += 32) {
            const float av = operand_value(a.lora_a, a.lora_a_dtype, q * K + k);
#pragma unroll
            for (int m = 0; m < MB; ++m) {
                if (m >= a.M) break;
                acc[m] = qk_fma(Dtype<DT>::load(xl[m * K + k]), av, acc[m]);
            }
        }
#pragma unroll
        for (int m = 0; m < MB; ++m) {
            acc[m] = warp_sum(acc[m]);
            if (m < a.M && lane == m) a.t_partial[(j * a.M + m) * r + q] = acc[m];
        }
    }
    __threadfence();  // this CTA's partial is visible before the count says so
    __syncthreads();
    if (threadIdx.x == 0) *s_last = atomicAdd(a.counters + 0, 1) == a.t_blocks - 1;
    __syncthreads();
    if (!*s_last) return;
    __threadfence();
    for (int64_t i = threadIdx.x; i < a.M * r; i += blockDim.x) {
        float v = __ldcg(a.t_partial + i);
        for (int64_t b = 1; b < a.t_blocks; ++b) v = qk_fadd(v, __ldcg(a.t_partial + b * a.M * r + i));
        a.lora_t[i] = v;
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        atomicExch(a.counters + 0, 0);
        atomicExch(a.counters + 1, (int)a.N);  // one per row that will read T
    }
}

// s * sum_j T[m, j] * B[n, j]: r FMAs in j order, then the scale. T was written in this launch.
__device__ __forceinline__ float lora_term(const GemvArgs& a, int m, int64_t n) {
    const float* t = a.lora_t + (int64_t)m * a.lora_r;
    float acc = 0.0f;
    for (int64_t j = 0; j < a.lora_r; ++j)
        acc = qk_fma(__ldcg(t + j), operand_value(a.lora_b, a.lora_b_dtype, n * a.lora_r + j), acc);
    return qk_fmul(acc, a.lora_scale);
}

template <int DT>
__device__ __forceinline__ float out_value(const GemvArgs& a, int m, int64_t n, float v) {
    if (a.lora_a) v = qk_fadd(v, lora_term(a, m, n));
    if (a.bias) v = qk_fadd(v, operand_value(a.bias, a.bias_dtype, n));
    return v;
}

// minBlocks: 1 for M > 1 (held to fewer registers, ptxas spilled those variants); 3 for M = 1, which
// keeps three CTAs (24 warps of loads in flight) per SM: the T CTA and row-finishing code had taken
// it from 80 to 87 registers, two CTAs per SM.
template <int DT, int MB>
__global__ void __launch_bounds__(kThreads, MB == 1 ? 3 : 1) gemv_4bit_kernel(const typename Dtype<DT>::T* __restrict__ x, GemvArgs a) {
    using T = typename Dtype<DT>::T;
    __shared__ float s_code[16];
    __shared__ float s_code2[256];
    __shared__ int s_last;
    if ((int64_t)blockIdx.x < a.t_blocks) {
        lora_down_cta<DT, MB>(a, blockIdx.x, &s_last);
        return;
    }
    const int64_t g = (int64_t)blockIdx.x - a.t_blocks;  // GEMV CTA g: rows from g % row_ctas, split g / row_ctas
    const bool nested = a.absmax_q != nullptr;
    if (threadIdx.x < 16) s_code[threadIdx.x] = qk_code_4bit(a.quant_type, threadIdx.x);
    if (nested)
        for (int k = threadIdx.x; k < 256; k += blockDim.x) s_code2[k] = a.code2[k];
    __syncthreads();
    const float offset = nested ? __ldg(a.offset) : 0.0f;
    const int lane = threadIdx.x & 31;
    const int64_t s = g / a.row_ctas;
    const int64_t K = a.K;

    for (int64_t n = (g % a.row_ctas) * kWarps + (threadIdx.x >> 5); n < a.N; n += a.row_ctas * kWarps) {
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
        for (int m = 0; m < MB; ++m) acc[m] = warp_sum(acc[m]);

        if (a.splits > 1) {
            // Lane m stores row m's partial (a static index into acc keeps it in registers).
#pragma unroll
            for (int m = 0; m < MB; ++m)
                if (m < a.M && lane == m) a.partial[(s * a.M + m) * a.N + n] = acc[m];
            __threadfence();  // every lane's partial is visible before lane 0's count
            __syncwarp();
            float last = 0.0f;
            if (lane == 0) last = atomicAdd(a.counters + 2 + n, 1) == a.splits - 1 ? 1.0f : 0.0f;
            if (warp_sum(last) == 0.0f) continue;  // another split finishes this row
            if (lane == 0) atomicExch(a.counters + 2 + n, 0);
            __threadfence();
#pragma unroll
            for (int m = 0; m < MB; ++m) {
                if (m >= a.M) break;
                float v = __ldcg(a.partial + m * a.N + n);
                for (int64_t p = 1; p < a.splits; ++p) v = qk_fadd(v, __ldcg(a.partial + (p * a.M + m) * a.N + n));
                acc[m] = v;
            }
        }
        if (a.lora_a) {  // wait until the T CTAs have published T
            if (lane == 0)
                while (*reinterpret_cast<volatile int*>(a.counters + 1) == 0) {
                }
            __syncwarp();
            __threadfence();
        }
#pragma unroll
        for (int m = 0; m < MB; ++m)
            if (m < a.M && lane == m) static_cast<T*>(a.y)[m * a.N + n] = Dtype<DT>::store(out_value<DT>(a, m, n, acc[m]));
        if (a.lora_a) {
            __syncwarp();
            if (lane == 0) atomicSub(a.counters + 1, 1);  // this row is done with T
        }
    }
}

template <int DT, int MB>
void launch_gemv(const void* x, GemvArgs a, cudaStream_t stream) {
    const int64_t row_ctas = qk::ceil_div(a.N, kWarps);
    const int64_t cap = (int64_t)qk::sm_count() * 16;
    a.row_ctas = row_ctas < cap ? row_ctas : cap;
    const int64_t ctas = a.t_blocks + a.row_ctas * a.splits;
    QK_LAUNCH(dim3((unsigned)ctas), kThreads, 0, stream, gemv_4bit_kernel<DT, MB>)(
        static_cast<const typename Dtype<DT>::T*>(x), a);
}

int64_t workspace_floats(int64_t m, int64_t n, int64_t k, int64_t lora_r, int64_t splits) {
    return (splits > 1 ? splits * m * n : 0) + (lora_r > 0 ? qk_gemv_t_blocks(k) * m * lora_r : 0);
}

}  // namespace

QK_API int64_t qk_gemv_4bit_workspace(int64_t m, int64_t n, int64_t k, int64_t lora_r, int64_t splits) {
    if (m < 1 || m > QK_GEMV_MAX_M || n < 0 || k < 0 || lora_r < 0 || splits < 1 || splits > 65535) return -1;
    return workspace_floats(m, n, k, lora_r, splits);
}

static bool operand_dtype_ok(int dtype) {
    return dtype == QK_DTYPE_FLOAT32 || dtype == QK_DTYPE_BFLOAT16 || dtype == QK_DTYPE_FLOAT16;
}

QK_API int qk_gemv_4bit(const void* x, int x_dtype, int64_t m, const uint8_t* packed, const void* absmax,
                        const float* nested_absmax, const float* nested_code, const float* offset, int64_t n,
                        int64_t k, int64_t blocksize, int quant_type, const void* x_lora, const void* lora_a,
                        const void* lora_b, int lora_a_dtype, int lora_b_dtype, int64_t lora_r, float lora_scale,
                        float* lora_t, const void* bias, int bias_dtype, int64_t splits, float* workspace,
                        int32_t* counters, void* y, cudaStream_t stream) {
    if (m < 1 || m > QK_GEMV_MAX_M)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: m must be in 1..%d, got %lld", QK_GEMV_MAX_M, (long long)m);
    if (n < 0 || k < 0) return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: n and k must be >= 0");
    if (n > INT32_MAX) return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: n must be <= INT32_MAX, got %lld", (long long)n);
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
    const bool has_lora = lora_a != nullptr;
    if (has_lora || lora_b || lora_t) {
        if (!lora_a || !lora_b || !lora_t || lora_r < 1)
            return qk::fail(QK_ERR_INVALID_ARGUMENT,
                            "qk_gemv_4bit: the LoRA term needs lora_a, lora_b, lora_t and lora_r >= 1 (got r = %lld)",
                            (long long)lora_r);
        if (!operand_dtype_ok(lora_a_dtype) || !operand_dtype_ok(lora_b_dtype))
            return qk::fail(QK_ERR_UNSUPPORTED_DTYPE, "qk_gemv_4bit: unsupported lora dtype codes %d (A), %d (B)",
                            lora_a_dtype, lora_b_dtype);
    }
    if (bias && !operand_dtype_ok(bias_dtype))
        return qk::fail(QK_ERR_UNSUPPORTED_DTYPE, "qk_gemv_4bit: unsupported bias dtype code %d", bias_dtype);
    if ((splits > 1 || has_lora) && !counters)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: splits > 1 or a LoRA term needs counters");
    if (workspace_floats(m, n, k, has_lora ? lora_r : 0, splits) > 0 && !workspace)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_gemv_4bit: these sizes need a workspace (qk_gemv_4bit_workspace)");
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
    a.row_ctas = 1;  // set by launch_gemv
    a.x_lora = x_lora ? x_lora : x;
    a.lora_a = lora_a;
    a.lora_b = lora_b;
    a.lora_a_dtype = lora_a_dtype;
    a.lora_b_dtype = lora_b_dtype;
    a.lora_r = has_lora ? lora_r : 0;
    a.lora_scale = lora_scale;
    a.lora_t = lora_t;
    a.t_chunk = qk_gemv_t_chunk(k);
    a.t_blocks = has_lora ? (int)qk_gemv_t_blocks(k) : 0;
    a.partial = workspace;
    a.t_partial = workspace ? workspace + (splits > 1 ? splits * m * n : 0) : nullptr;
    a.bias = bias;
    a.bias_dtype = bias_dtype;
    a.counters = counters;
    a.y = y;
    a.xvec = qk::aligned(x, 16) && k % 8 == 0;

    QK_DISPATCH_DTYPE(x_dtype, DT, {
        if (m == 1) launch_gemv<DT, 1>(x, a, stream);
        else if (m == 2) launch_gemv<DT, 2>(x, a, stream);
        else if (m <= 4) launch_gemv<DT, 4>(x, a, stream);
        else if (m <= 8) launch_gemv<DT, 8>(x, a, stream);
        else launch_gemv<DT, 16>(x, a, stream);
    });
    return qk::check_launch("qk_gemv_4bit");
}
