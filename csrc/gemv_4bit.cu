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

// Called by a warp after it stored its split's partials of the rows counted at counters[2 + c]:
// true in every lane when this split is the last to arrive (the count is reset to 0, and every
// split's partials are visible to the warp's reads), false when another split finishes the rows.
__device__ __forceinline__ bool last_split(const GemvArgs& a, int lane, int64_t c) {
    __threadfence();  // every lane's partials are visible before lane 0's count
    __syncwarp();
    float last = 0.0f;
    if (lane == 0) last = atomicAdd(a.counters + 2 + c, 1) == a.splits - 1 ? 1.0f : 0.0f;
    if (warp_sum(last) == 0.0f) return false;
    if (lane == 0) atomicExch(a.counters + 2 + c, 0);
    __threadfence();
    return true;
}

// Output (m, n) as the sum of the splits' partials in split order; they were written in this
// launch, so they are read at L2 (__ldcg), never from L1.
__device__ __forceinline__ float split_sum(const GemvArgs& a, int m, int64_t n) {
    float v = __ldcg(a.partial + m * a.N + n);
    for (int64_t p = 1; p < a.splits; ++p) v = qk_fadd(v, __ldcg(a.partial + (p * a.M + m) * a.N + n));
    return v;
}

// A warp that finishes rows waits (lane 0 spins, the warp follows) until the T CTAs have
// published T: "T ready" (counters[1]) is nonzero from then until every row is done with it.
__device__ __forceinline__ void wait_for_t(const GemvArgs& a, int lane) {
    if (!a.lora_a) return;
    if (lane == 0)
        while (*reinterpret_cast<volatile int*>(a.counters + 1) == 0) {
        }
    __syncwarp();
    __threadfence();
}

// The warp has stored `rows` finished rows and reads T no more: their share of "T ready" goes.
__device__ __forceinline__ void done_with_t(const GemvArgs& a, int lane, int rows) {
    if (!a.lora_a) return;
    __syncwarp();
    if (lane == 0) atomicSub(a.counters + 1, rows);
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
            if (!last_split(a, lane, n)) continue;  // another split finishes this row
#pragma unroll
            for (int m = 0; m < MB; ++m) {
                if (m >= a.M) break;
                acc[m] = split_sum(a, m, n);
            }
        }
        wait_for_t(a, lane);
#pragma unroll
        for (int m = 0; m < MB; ++m)
            if (m < a.M && lane == m) static_cast<T*>(a.y)[m * a.N + n] = Dtype<DT>::store(out_value<DT>(a, m, n, acc[m]));
        done_with_t(a, lane, 1);
    }
}

// ------------------------------------------------------------------------------------------
// Tensor-core variant (bf16/fp16 X): the same one-launch protocol (T CTAs first, splits summed by
// the last one to arrive, "T ready" count), with the weights fed to mma.sync instead of FMAs.
//
// Why: at M = 1 every weight is used once, and an H100 SXM can issue at most about 5.0 instructions
// per weight while streaming W at its full HBM bandwidth (an H200, with more bandwidth per SM, 3.5;
// both at the boost clock: bench/sass_budget.py). The FMA kernel above spends at least five on each
// weight (nibble extraction, code lookup, decode multiply, X conversion, FMA) before any loop
// overhead, so issue caps it at about full bandwidth on an H100 and 70% on an H200, whatever its
// memory access. Here one lookup in a 256-entry table turns a packed byte into the two 16-bit codes
// of an mma operand register, X goes to the tensor cores as it is stored, and the block scale
// multiplies the tensor cores' fp32 sum once per (row, block). ptxas's count for the span loop:
// 2.77 instructions per weight on sm_90 with double-quantized scales at blocksize 64, 2.25 with
// fp32 scales.
//
// Layout: a warp takes a tile of 16 rows (A rows g and g + 8 are rows n0 + g and n0 + g + 8) and
// walks its split's K range in spans of 128: lane t of group g loads the span's 16-byte chunk t of
// both its rows (k = 32t .. 32t + 31). The k order inside an mma is free as long as A and B use the
// same one, so mma j (0..7) takes from lane t the k's 32t + 4j .. 32t + 4j + 3: bytes 2j (A columns
// 2t, 2t+1) and 2j + 1 (columns 2t+8, 2t+9) of each chunk, and X words 2j and 2j + 1 of the lane's
// 32 X elements. The 8 B columns are (X row, block in the span) pairs: column c is X row c / NB and
// the span's block c % NB (NB = 128 / blocksize blocks per span, at least 1); lane (g, t) supplies
// X only where its k's lie in column g's block, zeros elsewhere, so C[row][c] is the span's sum over
// one block and one X row, which its lane scales by that block's absmax. One mma thus serves 8 / NB
// X rows; CG column groups (1, 2 or 4 mmas on the same A registers, group q taking columns 8q ..
// 8q + 7, X rows from 8q / NB on) serve M * NB <= 8 CG. The costly part, the code lookups, is shared
// by the groups; a group costs its X loads, 8 mmas and 4 scalings per span.
//
// Numerics: the codes enter the tensor cores rounded to bf16/fp16 and are multiplied by the fp32
// scale after the sum over the block, where the FMA kernel rounds nothing and scales each weight.
// Both stay within DESIGN.md section 6's rule (tests: test_cuda_backend.py).
constexpr int kSpan = 128;

template <int DT>
__device__ __forceinline__ uint32_t code_pair(int quant_type, int e) {
    return (uint32_t)Dtype<DT>::store(qk_code_4bit(quant_type, e >> 4)) |
           ((uint32_t)Dtype<DT>::store(qk_code_4bit(quant_type, e & 15)) << 16);
}

// Dynamic shared memory of the tensor-core GEMV: the pair table (entry e holds the codes of byte
// e's two nibbles as one mma operand register, high nibble (the element with the even k) in the low
// half; stored once per lane, entry e of lane l at word 32 e + l, so a warp's 32 lookups hit 32
// different banks whatever the bytes) at the first 32 KB-aligned shared address, then the nested
// code table and a flag. The alignment makes the table address's bits disjoint from the lookup
// offsets', so the lookup merges them with an or (sm_90 reserves the first 1 KB of a CTA's shared
// window, so no static placement is aligned, and the table alone is 32 KB: dynamic it is).
constexpr int kPairTableBytes = 256 * 32 * 4;
constexpr int kMmaSharedBytes = (kPairTableBytes - 1) + kPairTableBytes + 256 * 4 + 16;

struct MmaShared {
    uint32_t* pairs;
    float* code2;
    int* last;
    uint32_t table;  // the pair table's shared address (0 under the emulation)
};

__device__ __forceinline__ MmaShared mma_shared() {
    unsigned char* dyn = qk::dynamic_shared();
#if defined(QK_CUDA_EMULATION)
    const uint32_t addr = (uint32_t)(reinterpret_cast<uintptr_t>(dyn) & 0x7FFFu);  // 0: the emulation aligns it
#else
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(dyn);
#endif
    const uint32_t pad = (0u - addr) & (uint32_t)(kPairTableBytes - 1);
    MmaShared m;
    m.pairs = reinterpret_cast<uint32_t*>(dyn + pad);
    m.code2 = reinterpret_cast<float*>(dyn + pad + kPairTableBytes);
    m.last = reinterpret_cast<int*>(m.code2 + 256);
#if defined(QK_CUDA_EMULATION)
    m.table = 0;
#else
    m.table = addr + pad;
#endif
    return m;
}

// The pair-table entry of the byte at bit sh of u for this lane: lane_base is the table's shared
// address (a multiple of 32 KB, as mma_shared places it) or-ed with 4 * lane, and the entry's byte
// offset byte * 128 + 4 * lane merges with it in one and-or after one shift. The load is PTX on the
// 32-bit shared address: through a C++ pointer nvcc re-derives the CTA's shared window per load on
// sm_90 and adds it.
__device__ __forceinline__ uint32_t code_pair_at(uint32_t lane_base, uint32_t u, int sh) {
    const uint32_t addr = ((sh >= 7 ? (u >> (sh - 7)) : (u << (7 - sh))) & 0x7F80u) | lane_base;
#if defined(__CUDA_ARCH__)
    uint32_t v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
#else
    // The emulation's table address is 0: addr is the offset in its (32 KB-aligned) dynamic shared memory.
    return *reinterpret_cast<const uint32_t*>(qk::dynamic_shared() + addr);
#endif
}

// The scales of blocks b and b + 1 (PAIR; b is even there) or of block b alone (both outputs).
template <bool NESTED, bool PAIR>
__device__ __forceinline__ void block_scales(const GemvArgs& a, const float* s_code2, float offset, int64_t b,
                                             float& s0, float& s1) {
    if constexpr (NESTED) {
        // b and b + 1 share their nested block (256 blocks, b even).
        const float a2 = __ldg(a.absmax2 + (b >> QK_NESTED_LOG2));
        if constexpr (PAIR) {
            const uint32_t q = __ldg(reinterpret_cast<const uint16_t*>(a.absmax_q + b));
            s0 = qk_double_dequant(s_code2[q & 0xFFu], a2, offset);
            s1 = qk_double_dequant(s_code2[q >> 8], a2, offset);
        } else {
            s0 = s1 = qk_double_dequant(s_code2[__ldg(a.absmax_q + b)], a2, offset);
        }
    } else if constexpr (PAIR) {
        const float2 v = __ldg(reinterpret_cast<const float2*>(a.absmax_f32 + b));
        s0 = v.x;
        s1 = v.y;
    } else {
        s0 = s1 = __ldg(a.absmax_f32 + b);
    }
}

// Adds one span (128 k) of rows r0 and r1 to acc (per column group, the lane's four C entries, each
// scaled by its block): w0/w1 the lane's chunks of the two rows; px[q] the lane's 32 X elements
// of the span in group q's X row (8 pairs of words, one pair per mma), or 64 zero bytes where the
// lane has none there; blk0/blk1 the index of each row's first block in the span plus the block of
// the lane's column 2t. Up to two groups (kPreloadX) take their X from xw instead, the span's 16
// words per group loaded by the caller in 16-byte loads (fewer instructions: at one group 2.25-2.77
// per weight on sm_90 against 2.39-2.95 loading per mma); four groups load X per mma, as a span's X
// for all of them (64 registers) made ptxas spill at the 128 registers that keep two CTAs on an SM.
// For the same reason only one group unrolls its span loop twice (kSpanUnroll). ptxas's counts on
// sm_90 (bench/sass_budget.py): 2.25-2.77 instructions per weight at one group, 2.66-3.31 at two,
// 3.97-4.62 at four; the FMA kernel spends an FMA per weight and X row on top of its decode (over
// 16 per weight at M = 16).
template <int CG>
constexpr bool kPreloadX = CG <= 2;
template <int CG>
constexpr int kSpanUnroll = CG == 1 ? 2 : 1;

// 64 zero bytes, one lane's X of a span: lanes without X for a column group read them per mma (a
// load of zeros costs what a predicated load costs, and a predicated load needs its registers
// zeroed first, per load).
__device__ uint4 g_zero_x[4];

template <int DT, int NB_LOG2, bool NESTED, int CG>
__device__ __forceinline__ void mma_span(const GemvArgs& a, const float* s_code2, float offset, uint32_t lane_base,
                                         int64_t blk0, int64_t blk1, const uint4& w0, const uint4& w1,
                                         const uint32_t (&xw)[kPreloadX<CG> ? CG : 1][16], const uint2* const (&px)[CG],
                                         float (&acc)[CG][4]) {
    const uint32_t u0[4] = {w0.x, w0.y, w0.z, w0.w}, u1[4] = {w1.x, w1.y, w1.z, w1.w};
    float c[CG][4];
#pragma unroll
    for (int q = 0; q < CG; ++q) c[q][0] = c[q][1] = c[q][2] = c[q][3] = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int sh = 16 * (j & 1);  // byte 2j of the chunk: word j / 2, bit 16 (j % 2)
        const uint32_t af[4] = {code_pair_at(lane_base, u0[j >> 1], sh), code_pair_at(lane_base, u1[j >> 1], sh),
                                code_pair_at(lane_base, u0[j >> 1], sh + 8), code_pair_at(lane_base, u1[j >> 1], sh + 8)};
#pragma unroll
        for (int q = 0; q < CG; ++q) {
            uint32_t bf[2];
            if constexpr (kPreloadX<CG>) {
                bf[0] = xw[q][2 * j];
                bf[1] = xw[q][2 * j + 1];
            } else {
                const uint2 xv = __ldg(px[q] + j);
                bf[0] = xv.x;
                bf[1] = xv.y;
            }
            qk::mma_16816<DT>(c[q], af, bf);
        }
    }
    // C entry i: row r0 (i < 2) or r1, column 2t + i % 2 of its group, so (NB > 1) block 2t % NB or
    // the next, the same in every group (a group's 8 columns start at a multiple of NB).
    float s00, s01, s10, s11;
    block_scales<NESTED, (NB_LOG2 > 0)>(a, s_code2, offset, blk0, s00, s01);
    block_scales<NESTED, (NB_LOG2 > 0)>(a, s_code2, offset, blk1, s10, s11);
#pragma unroll
    for (int q = 0; q < CG; ++q) {
        acc[q][0] = qk_fma(c[q][0], s00, acc[q][0]);
        acc[q][1] = qk_fma(c[q][1], s01, acc[q][1]);
        acc[q][2] = qk_fma(c[q][2], s10, acc[q][2]);
        acc[q][3] = qk_fma(c[q][3], s11, acc[q][3]);
    }
}

// Stores one finished output (X row m, W row n) and, with splits, nothing else: v is the full sum.
template <int DT>
__device__ __forceinline__ void store_out(const GemvArgs& a, int m, int64_t n, float v) {
    static_cast<typename Dtype<DT>::T*>(a.y)[m * a.N + n] = Dtype<DT>::store(out_value<DT>(a, m, n, v));
}

// The GEMV CTA's work after its tables are ready: every (split, 8-tile group) unit of the grid-
// stride loop. lane_base: the pair table's address or-ed with 4 * lane (code_pair_at).
template <int DT, int NB_LOG2, bool NESTED, int CG>
__device__ __forceinline__ void gemv_mma_units(const typename Dtype<DT>::T* __restrict__ x, const GemvArgs& a,
                                               const float* s_code2, uint32_t lane_base) {
    constexpr int NB = 1 << NB_LOG2;
    const float offset = NESTED ? __ldg(a.offset) : 0.0f;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int64_t K = a.K, N = a.N;
    const int64_t tiles = (N + 15) / 16;
    const int spans = (int)(K / kSpan), sps = (int)a.cps;
    // B column 8q + g: X row (8q + g) / NB, block g % NB of the span; lane t's k's lie in block
    // (32 t) / blocksize. Group q's X rows follow group 0's by 8q / NB.
    constexpr int kGroupRows = 8 >> NB_LOG2;
    const int x_row = g >> NB_LOG2;
    const bool x_block = NB == 1 || ((t >> (a.log2B - 5)) == (g & (NB - 1)));
    bool x_lane[CG];
#pragma unroll
    for (int q = 0; q < CG; ++q) x_lane[q] = x_block && x_row + q * kGroupRows < a.M;
    // The block of the lane's C column 2t within a span (its column 2t + 1 has the next one).
    const int col_blk = NB == 1 ? 0 : (2 * t) & (NB - 1);
    const int blk_log2 = a.log2B;

    // Work unit of a CTA: split s of 8 consecutive tiles, one per warp. Everything that steers the
    // span loop depends on the CTA alone (uniform control flow: ptxas keeps the per-span block and
    // pointer arithmetic out of the loop, which it recomputed there per warp-dependent bounds).
    const int64_t groups = (tiles + kWarps - 1) / kWarps;
    for (int64_t unit = (int64_t)blockIdx.x - a.t_blocks; unit < groups * a.splits; unit += (int64_t)gridDim.x - a.t_blocks) {
        const int64_t s = unit / groups;
        const int64_t tile = (unit % groups) * kWarps + (threadIdx.x >> 5);
        const bool tile_ok = tile < tiles;  // the last group's spare warps compute on tile 0, store nothing
        const int64_t n0 = tile_ok ? tile * 16 : 0;
        const int64_t r0 = tile_ok ? n0 + g : N, r1 = tile_ok ? r0 + 8 : N;
        // Rows past N read row 0 (valid memory); their C rows are never stored.
        const int64_t r0c = r0 < N ? r0 : 0, r1c = r1 < N ? r1 : 0;
        const int sp_lo = (int)(s * sps), sp_hi = sp_lo + sps < spans ? sp_lo + sps : spans;
        // Chunk t of span sp of row r: 16 bytes at r K / 2 + 64 sp + 16 t (K % 128 == 0: aligned).
        const uint4* p0 = reinterpret_cast<const uint4*>(a.packed + r0c * (K / 2)) + t + 4 * (int64_t)sp_lo;
        const uint4* p1 = reinterpret_cast<const uint4*>(a.packed + r1c * (K / 2)) + t + 4 * (int64_t)sp_lo;
        // The lane's 32 X elements of span sp in group q's X row: 64 bytes at 2 ((x_row + q 8 / NB) K +
        // 128 sp + 32 t), one pointer per group (the offset of each mma's pair then folds into its load).
        // Where this lane has no X for a group: kPreloadX skips the loads (the registers keep their
        // zeros; the pointer, at row 0, is never read), else the lane reads g_zero_x and stays there.
        const uint2* px[CG];
        bool px_moves[CG];
#pragma unroll
        for (int q = 0; q < CG; ++q) {
            px_moves[q] = kPreloadX<CG> || x_lane[q];
            px[q] = px_moves[q] ? reinterpret_cast<const uint2*>(x + (int64_t)(x_lane[q] ? x_row + q * kGroupRows : 0) * K) +
                                      8 * t + 32 * (int64_t)sp_lo
                                : reinterpret_cast<const uint2*>(g_zero_x);
        }
        // The blocks of the lane's column 2t in span sp_lo of each row (K % blocksize == 0: rows start
        // blocks), carried from span to span rather than recomputed.
        int64_t blk0 = ((r0c * K) >> blk_log2) + col_blk + ((sp_lo * kSpan) >> blk_log2);
        int64_t blk1 = ((r1c * K) >> blk_log2) + col_blk + ((sp_lo * kSpan) >> blk_log2);
        float acc[CG][4];
#pragma unroll
        for (int q = 0; q < CG; ++q) acc[q][0] = acc[q][1] = acc[q][2] = acc[q][3] = 0.0f;
        // kPreloadX: the span's X words; lanes without X keep these zeros (their loads never run).
        uint32_t xw[kPreloadX<CG> ? CG : 1][16];
#pragma unroll
        for (int q = 0; q < (kPreloadX<CG> ? CG : 1); ++q)
#pragma unroll
            for (int i = 0; i < 16; ++i) xw[q][i] = 0u;
        // W one span ahead: the next span's 32 bytes per lane are in flight while this one's mmas run.
        const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
        uint4 w0_next = sp_lo < sp_hi ? __ldg(p0) : zero, w1_next = sp_lo < sp_hi ? __ldg(p1) : zero;
#pragma unroll (kSpanUnroll<CG>)
        for (int sp = sp_lo; sp < sp_hi; ++sp) {
            const uint4 w0 = w0_next, w1 = w1_next;
            if (sp + 1 < sp_hi) {
                w0_next = __ldg(p0 + 4);
                w1_next = __ldg(p1 + 4);
            }
            if constexpr (kPreloadX<CG>) {
#pragma unroll
                for (int q = 0; q < CG; ++q) {
                    if (!x_lane[q]) continue;
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const uint4 v = __ldg(reinterpret_cast<const uint4*>(px[q]) + i);
                        xw[q][4 * i] = v.x; xw[q][4 * i + 1] = v.y; xw[q][4 * i + 2] = v.z; xw[q][4 * i + 3] = v.w;
                    }
                }
            }
            mma_span<DT, NB_LOG2, NESTED, CG>(a, s_code2, offset, lane_base, blk0, blk1, w0, w1, xw, px, acc);
            p0 += 4;
            p1 += 4;
#pragma unroll
            for (int q = 0; q < CG; ++q) px[q] += px_moves[q] ? 32 : 0;
            const int next_blocks = (((sp + 1) * kSpan) >> blk_log2) - ((sp * kSpan) >> blk_log2);
            blk0 += next_blocks;
            blk1 += next_blocks;
        }

        if (!tile_ok) continue;  // a spare warp of the last group: nothing to store or count

        // The lane's sums per (X row, W row): column 8q + 2t + i % 2 of group q is X row
        // (8q + 2t + i % 2) / NB and C row i < 2 ? g : g + 8 the tile's W row of that offset. With
        // NB > 1 the NB blocks of one X row are added first, into acc[q][0] and acc[q][1] (NB = 4:
        // across lanes t and t ^ 1, whose columns continue; the even lane keeps the sums). Outputs
        // are stored as they are formed: arrays of them for four groups made ptxas spill.
        const int64_t rows_left = N - n0;  // W rows of this tile: offsets below it exist
        if constexpr (NB > 1) {
#pragma unroll
            for (int q = 0; q < CG; ++q) {
                float v0 = qk_fadd(acc[q][0], acc[q][1]), v1 = qk_fadd(acc[q][2], acc[q][3]);
                if constexpr (NB == 4) {
                    v0 = qk_fadd(v0, __shfl_xor_sync(0xffffffffu, v0, 1));
                    v1 = qk_fadd(v1, __shfl_xor_sync(0xffffffffu, v1, 1));
                }
                acc[q][0] = v0;
                acc[q][1] = v1;
            }
        }
        // Entry i of group q: its X row (a.M when the lane holds none there) and W row offset.
        auto entry_m = [&](int q, int i) {
            if constexpr (NB == 1) return 8 * q + 2 * t + (i & 1);
            return (i >= 2 || (NB == 4 && (t & 1))) ? a.M : (8 * q + 2 * t) >> NB_LOG2;
        };
        auto entry_r = [&](int i) { return NB == 1 ? (i < 2 ? g : g + 8) : (i == 0 ? g : g + 8); };

        if (a.splits > 1) {
#pragma unroll
            for (int q = 0; q < CG; ++q)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int m = entry_m(q, i), r = entry_r(i);
                    if (m < a.M && r < rows_left) a.partial[(s * a.M + m) * N + n0 + r] = acc[q][i];
                }
            if (!last_split(a, lane, n0)) continue;  // another split finishes this tile
            // The tile's 16 x M sums, in split order: entry e = lane + 32 i is (X row e / 16, W row
            // offset e % 16); 16 M <= 32 x 4 CG.
            wait_for_t(a, lane);
#pragma unroll
            for (int i = 0; i < 4 * CG; ++i) {
                const int e = lane + 32 * i, m = e >> 4, r = e & 15;
                if (m < a.M && r < rows_left) store_out<DT>(a, m, n0 + r, split_sum(a, m, n0 + r));
            }
        } else {
            wait_for_t(a, lane);
#pragma unroll
            for (int q = 0; q < CG; ++q)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int m = entry_m(q, i), r = entry_r(i);
                    if (m < a.M && r < rows_left) store_out<DT>(a, m, n0 + r, acc[q][i]);
                }
        }
        done_with_t(a, lane, (int)(rows_left < 16 ? rows_left : 16));
    }
}

template <int DT, int NB_LOG2, bool NESTED, int CG>
__global__ void __launch_bounds__(kThreads, 2) gemv_4bit_mma_kernel(const typename Dtype<DT>::T* __restrict__ x, GemvArgs a) {
    const MmaShared sh = mma_shared();
    if ((int64_t)blockIdx.x < a.t_blocks) {
        lora_down_cta<DT, (8 * CG < QK_GEMV_MAX_M ? 8 * CG : QK_GEMV_MAX_M)>(a, blockIdx.x, sh.last);
        return;
    }
    for (int e = threadIdx.x; e < 256; e += blockDim.x) {
        const uint32_t v = code_pair<DT>(a.quant_type, e);
        uint4* dst = reinterpret_cast<uint4*>(sh.pairs + e * 32);
#pragma unroll
        for (int q = 0; q < 8; ++q) dst[q] = make_uint4(v, v, v, v);
        if (NESTED) sh.code2[e] = a.code2[e];
    }
    __syncthreads();
    gemv_mma_units<DT, NB_LOG2, NESTED, CG>(x, a, sh.code2, sh.table | ((threadIdx.x & 31u) * 4u));
}

// Which tensor-core kernel runs, for bf16/fp16 X with K a multiple of 128 and of the blocksize
// (spans and blocks inside rows) and at most kMaxColumnGroups * 8 (X row, block) columns: its
// NB_LOG2 and CG (the fewest column groups that hold the columns); cg 0: the FMA kernel. The
// callers add the other conditions: x 16-byte aligned, an sm_80+ device.
constexpr int kMaxColumnGroups = 4;
struct MmaVariant {
    int nb_log2 = 0;
    int cg = 0;
};
static MmaVariant mma_variant(int x_dtype, int64_t m, int64_t k, int log2B) {
    MmaVariant v;
    if (x_dtype != QK_DTYPE_BFLOAT16 && x_dtype != QK_DTYPE_FLOAT16) return v;
    // K < 2^30: the kernel's per-row span arithmetic is 32-bit.
    if (k <= 0 || k >= (int64_t{1} << 30) || k % kSpan != 0 || log2B < 5 || k % (int64_t{1} << log2B) != 0) return v;
    v.nb_log2 = log2B < 7 ? 7 - log2B : 0;
    const int64_t columns = m << v.nb_log2;
    for (int cg = 1; cg <= kMaxColumnGroups; cg *= 2)
        if (columns <= 8 * cg) {
            v.cg = cg;
            break;
        }
    return v;
}

// false when the kernel cannot get its dynamic shared memory here (the FMA kernel runs instead).
// The limit is raised once per device: `raised` is this kernel's own (a benign race, as sm_count's
// cache: every thread stores true).
template <int DT, int NB_LOG2, bool NESTED, int CG>
bool launch_gemv_mma_kernel(dim3 grid, const typename Dtype<DT>::T* x, const GemvArgs& a, cudaStream_t stream) {
    constexpr int kDevices = 64;
    static bool raised[kDevices] = {};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) {
        cudaGetLastError();
        return false;
    }
    if (dev >= kDevices || !raised[dev]) {
        if (cudaFuncSetAttribute(gemv_4bit_mma_kernel<DT, NB_LOG2, NESTED, CG>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 kMmaSharedBytes) != cudaSuccess) {
            cudaGetLastError();
            return false;
        }
        if (dev < kDevices) raised[dev] = true;
    }
    QK_LAUNCH(grid, kThreads, kMmaSharedBytes, stream, gemv_4bit_mma_kernel<DT, NB_LOG2, NESTED, CG>)(x, a);
    return true;
}

template <int DT, int NB_LOG2, int CG>
bool launch_gemv_mma(const void* x, GemvArgs a, cudaStream_t stream) {
    const int64_t units = qk::ceil_div(qk::ceil_div(a.N, 16), kWarps) * a.splits;
    const dim3 grid((unsigned)(a.t_blocks + units));
    const auto* xt = static_cast<const typename Dtype<DT>::T*>(x);
    return a.absmax_q ? launch_gemv_mma_kernel<DT, NB_LOG2, true, CG>(grid, xt, a, stream)
                      : launch_gemv_mma_kernel<DT, NB_LOG2, false, CG>(grid, xt, a, stream);
}

template <int DT, int NB_LOG2>
bool launch_gemv_mma_groups(int cg, const void* x, const GemvArgs& a, cudaStream_t stream) {
    if (cg == 1) return launch_gemv_mma<DT, NB_LOG2, 1>(x, a, stream);
    // One block a span: QK_GEMV_MAX_M columns at most, two groups (no four-group kernel to build).
    if constexpr ((QK_GEMV_MAX_M << NB_LOG2) > 16) {
        if (cg == 4) return launch_gemv_mma<DT, NB_LOG2, 4>(x, a, stream);
    }
    return launch_gemv_mma<DT, NB_LOG2, 2>(x, a, stream);
}

template <int DT>
bool launch_gemv_mma_variant(MmaVariant v, const void* x, const GemvArgs& a, cudaStream_t stream) {
    return v.nb_log2 == 0   ? launch_gemv_mma_groups<DT, 0>(v.cg, x, a, stream)
           : v.nb_log2 == 1 ? launch_gemv_mma_groups<DT, 1>(v.cg, x, a, stream)
                            : launch_gemv_mma_groups<DT, 2>(v.cg, x, a, stream);
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

QK_API int64_t qk_gemv_4bit_tile_rows(int x_dtype, int64_t m, int64_t k, int64_t blocksize) {
    if (m < 1 || m > QK_GEMV_MAX_M || k < 0 || !qk::is_pow2(blocksize) || blocksize < 32 || blocksize > 4096) return -1;
    if (x_dtype != QK_DTYPE_FLOAT32 && x_dtype != QK_DTYPE_BFLOAT16 && x_dtype != QK_DTYPE_FLOAT16) return -1;
    return qk::cc_major() >= 8 && mma_variant(x_dtype, m, k, qk::log2i(blocksize)).cg ? 16 : 1;
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

    // absmax 8-byte aligned: the tensor-core kernel reads two blocks' scales per load.
    const MmaVariant mma = a.xvec && qk::aligned(absmax, 8) && qk::cc_major() >= 8 ? mma_variant(x_dtype, m, k, a.log2B)
                                                                                     : MmaVariant{};
    if (mma.cg) {
        GemvArgs am = a;
        am.cps = qk::ceil_div(k / kSpan, splits);  // spans of 128 per split
        const bool launched = x_dtype == QK_DTYPE_BFLOAT16 ? launch_gemv_mma_variant<QK_DTYPE_BFLOAT16>(mma, x, am, stream)
                                                           : launch_gemv_mma_variant<QK_DTYPE_FLOAT16>(mma, x, am, stream);
        if (launched) return qk::check_launch("qk_gemv_4bit");
    }
    QK_DISPATCH_DTYPE(x_dtype, DT, {
        if (m == 1) launch_gemv<DT, 1>(x, a, stream);
        else if (m == 2) launch_gemv<DT, 2>(x, a, stream);
        else if (m <= 4) launch_gemv<DT, 4>(x, a, stream);
        else if (m <= 8) launch_gemv<DT, 8>(x, a, stream);
        else launch_gemv<DT, 16>(x, a, stream);
    });
    return qk::check_launch("qk_gemv_4bit");
}
