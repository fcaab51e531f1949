// Per-element math of every csrc kernel, shared by the device code and the host test program.
//
// Each function here is the exact fp32 arithmetic of qlora_kernels/reference.py (the spec): one
// IEEE operation per step, round-to-nearest-even, never fused. On the device the explicit
// __fmul_rn/__fadd_rn/__fdiv_rn/__frcp_rn intrinsics forbid nvcc from contracting a multiply
// and an add into an FMA (it does that by default) and keep division correctly rounded even if
// someone adds fast-math flags. On the host the test program is built with -ffp-contract=off.
//
// This header compiles with plain g++ (no CUDA): QK_HD expands to nothing there, so the host test
// program (csrc/tests/host_tests.cpp) runs exactly these functions against reference.py.
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__CUDACC__)
#define QK_HD __host__ __device__ __forceinline__
#else
#define QK_HD inline
#endif

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

// Quant types and dtypes of the C API (mirrored in qlora_kernels.h and backends/cuda/_lib.py).
#define QK_QUANT_NF4 0
#define QK_QUANT_FP4 1

// Size of the grid the 8-bit encoder looks values up in (formats.DYNAMIC_LUT_SIZE).
#define QK_DYNAMIC_LUT_SIZE 65536

// ------------------------------------------------------------------------------------------
// Bit casts and single, correctly rounded fp32 operations
// ------------------------------------------------------------------------------------------

QK_HD uint32_t qk_f32_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
#endif
}

QK_HD float qk_bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

QK_HD float qk_fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

QK_HD float qk_fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

QK_HD float qk_fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

// torch's `1.0 / t` on fp32 is a correctly rounded reciprocal.
QK_HD float qk_frcp(float a) {
#if defined(__CUDA_ARCH__)
    return __frcp_rn(a);
#else
    return 1.0f / a;
#endif
}

// torch.amax and torch.clamp propagate NaN; fmaxf/fminf would drop it.
QK_HD float qk_nanmax(float a, float b) { return (a > b || a != a) ? a : b; }

QK_HD float qk_clamp(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// ------------------------------------------------------------------------------------------
// Storage conversions (bf16 / fp16 <-> fp32), round to nearest even like torch's .to(dtype)
// ------------------------------------------------------------------------------------------

QK_HD float qk_bf16_to_f32(uint16_t h) { return qk_bits_f32((uint32_t)h << 16); }

// torch (c10::BFloat16) rounds this way and maps every NaN to 0x7FC0; the device uses the same
// integer code so a bf16 result is bit-identical to torch on the CPU.
QK_HD uint16_t qk_f32_to_bf16(float f) {
    if (f != f) return 0x7FC0;
    uint32_t u = qk_f32_bits(f);
    uint32_t bias = ((u >> 16) & 1u) + 0x7FFFu;
    return (uint16_t)((u + bias) >> 16);
}

QK_HD float qk_f16_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    if (exp == 0x1F) return qk_bits_f32(sign | 0x7F800000u | (man << 13));
    if (exp == 0) {
        // Subnormal (or zero): value = man * 2^-24, exact in fp32.
        float v = (float)man * qk_bits_f32(0x33800000u);  // 2^-24
        return qk_bits_f32(sign | qk_f32_bits(v));
    }
    return qk_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}

QK_HD uint16_t qk_f32_to_f16(float f) {
#if defined(__CUDA_ARCH__)
    return __half_as_ushort(__float2half_rn(f));
#else
    uint32_t u = qk_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    u &= 0x7FFFFFFFu;
    if (u >= 0x7F800000u) return sign | (u > 0x7F800000u ? 0x7E00u : 0x7C00u);
    if (u >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to inf
    if (u < 0x38800000u) {
        // Below the smallest normal half: adding 0.5f puts the half-subnormal ulp (2^-24) at the
        // fp32 ulp of 0.5, so the FPU's own round-to-nearest-even does the rounding.
        float t = qk_bits_f32(u) + 0.5f;
        return sign | (uint16_t)(qk_f32_bits(t) - 0x3F000000u);
    }
    uint32_t odd = (u >> 13) & 1u;
    u += 0xC8000000u + 0xFFFu + odd;  // rebias exponent (-112 << 23), round half to even
    return sign | (uint16_t)(u >> 13);
#endif
}

// ------------------------------------------------------------------------------------------
// 4-bit codes (formats.NF4_CODE_VALUES / FP4_CODE_VALUES, bit for bit)
// ------------------------------------------------------------------------------------------

// A switch rather than an array: device code cannot index a host constexpr array, and kernels
// copy the table to shared memory once per CTA anyway.
QK_HD float qk_nf4_code(int i) {
    switch (i & 15) {
        case 0: return -0x1.0p+0f;
        case 1: return -0x1.647362p-1f;
        case 2: return -0x1.0cd66p-1f;
        case 3: return -0x1.94654p-2f;
        case 4: return -0x1.23449ap-2f;
        case 5: return -0x1.7a6a7ep-3f;
        case 6: return -0x1.74f0e2p-4f;
        case 7: return 0.0f;
        case 8: return 0x1.45f5fep-4f;
        case 9: return 0x1.4995c6p-3f;
        case 10: return 0x1.f809bap-3f;
        case 11: return 0x1.5a0674p-2f;
        case 12: return 0x1.c3497p-2f;
        case 13: return 0x1.200f56p-1f;
        case 14: return 0x1.722766p-1f;
        default: return 0x1.0p+0f;
    }
}

// Index 8 ("sign=1, zero") is +0.0 as in bitsandbytes' table (formats.FP4_CODE_VALUES).
QK_HD float qk_fp4_code(int i) {
    switch (i & 15) {
        case 0: return 0.0f;
        case 1: return 0x1.555556p-8f;
        case 2: return 0x1.555556p-1f;
        case 3: return 0x1.0p+0f;
        case 4: return 0x1.555556p-2f;
        case 5: return 0x1.0p-1f;
        case 6: return 0x1.555556p-3f;
        case 7: return 0x1.0p-2f;
        case 8: return 0.0f;
        case 9: return -0x1.555556p-8f;
        case 10: return -0x1.555556p-1f;
        case 11: return -0x1.0p+0f;
        case 12: return -0x1.555556p-2f;
        case 13: return -0x1.0p-1f;
        case 14: return -0x1.555556p-3f;
        default: return -0x1.0p-2f;
    }
}

QK_HD float qk_code_4bit(int quant_type, int i) {
    return quant_type == QK_QUANT_FP4 ? qk_fp4_code(i) : qk_nf4_code(i);
}

// Rank of `s` among the sorted levels = the number of midpoints strictly below it (a value on a
// midpoint gets the lower level, reference.encode_4bit). Midpoints are (lo + hi) / 2 in fp32 of
// the sorted levels (reference.sorted_levels); a linear count of immediate compares needs no
// memory and gives NaN rank 0, like the reference's sum of false comparisons.
QK_HD int qk_rank_nf4(float s) {
    return (s > -0x1.b239bp-1f) + (s > -0x1.38a4ep-1f) + (s > -0x1.d709p-2f) + (s > -0x1.5bd4ecp-2f) +
           (s > -0x1.e079d8p-3f) + (s > -0x1.1a7178p-3f) + (s > -0x1.74f0e2p-5f) + (s > 0x1.45f5fep-5f) +
           (s > 0x1.ec90c4p-4f) + (s > 0x1.a0cfcp-3f) + (s > 0x1.2b05a8p-2f) + (s > 0x1.8ea7f2p-2f) +
           (s > 0x1.00da08p-1f) + (s > 0x1.491b5ep-1f) + (s > 0x1.b913b4p-1f);
}

QK_HD int qk_rank_fp4(float s) {
    return (s > -0x1.aaaaacp-1f) + (s > -0x1.2aaaacp-1f) + (s > -0x1.aaaaacp-2f) + (s > -0x1.2aaaacp-2f) +
           (s > -0x1.aaaaacp-3f) + (s > -0x1.6p-4f) + (s > -0x1.555556p-9f) + (s > 0.0f) +
           (s > 0x1.555556p-9f) + (s > 0x1.6p-4f) + (s > 0x1.aaaaacp-3f) + (s > 0x1.2aaaacp-2f) +
           (s > 0x1.aaaaacp-2f) + (s > 0x1.2aaaacp-1f) + (s > 0x1.aaaaacp-1f);
}

// FP4's levels sorted ascending (a stable sort: the zero of index 0 before that of index 8), as code
// indices, one nibble per rank: rank k -> (QK_FP4_ORDER >> 4k) & 15.
#define QK_FP4_ORDER 0x3254761809EFCDABull

// Code index (0..15) of the level nearest to a scaled value.
QK_HD int qk_encode_4bit(int quant_type, float s) {
    if (quant_type == QK_QUANT_FP4) return (int)((QK_FP4_ORDER >> (4 * qk_rank_fp4(s))) & 15u);
    return qk_rank_nf4(s);  // NF4 is sorted: rank == index
}

// ------------------------------------------------------------------------------------------
// 4-bit blockwise scaling (reference.quantize_4bit)
// ------------------------------------------------------------------------------------------

// The absmax clamp of the reference, `clamp(min=1e-38)` in fp32 (1e-38 rounds to a subnormal);
// NaN stays NaN as in torch.clamp.
QK_HD float qk_absmax_floor(float absmax) {
    const float lo = qk_bits_f32(0x006CE3EEu);  // fp32(1e-38)
    return absmax < lo ? lo : absmax;
}

// Full blocks multiply by a reciprocal computed once per block...
QK_HD float qk_inv_absmax_4bit(float absmax) { return qk_frcp(qk_absmax_floor(absmax)); }
QK_HD float qk_scale_full_4bit(float x, float inv) { return qk_clamp(qk_fmul(x, inv), -1.0f, 1.0f); }
// ...but the final partial block divides (bitsandbytes does; the results differ in the last ulp).
QK_HD float qk_scale_tail_4bit(float x, float absmax) {
    return qk_clamp(qk_fdiv(x, qk_absmax_floor(absmax)), -1.0f, 1.0f);
}

QK_HD uint8_t qk_pack_4bit(int first, int second) { return (uint8_t)((first << 4) | second); }

// Decode of one element: code[q] * absmax, one fp32 rounding.
QK_HD float qk_decode_scale(float code_value, float absmax) { return qk_fmul(code_value, absmax); }

// ------------------------------------------------------------------------------------------
// 8-bit dynamic map (reference.dynamic_map_lut, lut_index, quantize_blockwise)
// ------------------------------------------------------------------------------------------

// Grid value of LUT entry i: -1 + (2 i) / 65535, three fp32 roundings in this order.
QK_HD float qk_lut_grid(int i) {
    float t = qk_fmul(2.0f, (float)i);
    t = qk_fdiv(t, (float)(QK_DYNAMIC_LUT_SIZE - 1));
    return qk_fadd(-1.0f, t);
}

// Midpoint between neighbouring code entries: 0.5 * (c_j + c_{j+1}).
QK_HD float qk_code_midpoint(float lo, float hi) { return qk_fmul(0.5f, qk_fadd(lo, hi)); }

// Grid index of a normalised value: trunc((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5), each step
// rounded. NaN maps to 0 to keep the table read in bounds (the reference raises there).
QK_HD int qk_lut_index(float v) {
    float t = qk_clamp(v, -1.0f, 1.0f);
    t = qk_fadd(t, 1.0f);
    t = qk_fmul(t, 0.5f);
    t = qk_fmul(t, (float)(QK_DYNAMIC_LUT_SIZE - 1));
    t = qk_fadd(t, 0.5f);
    if (!(t >= 0.0f)) return 0;
    int i = (int)t;
    return i > QK_DYNAMIC_LUT_SIZE - 1 ? QK_DYNAMIC_LUT_SIZE - 1 : i;
}

// 8-bit blocks have no floor on absmax: an all-zero block is special-cased (stores index 0).
QK_HD float qk_inv_absmax_8bit(float absmax) { return qk_frcp(absmax); }
QK_HD float qk_normalize_8bit(float x, float inv) { return qk_fmul(x, inv); }

// ------------------------------------------------------------------------------------------
// Double quantization: absmax = code2[q] * absmax2[i / 256] + offset (two roundings, no FMA)
// ------------------------------------------------------------------------------------------

#define QK_NESTED_BLOCKSIZE 256
#define QK_NESTED_LOG2 8

QK_HD float qk_double_dequant(float code2_value, float absmax2, float offset) {
    return qk_fadd(qk_fmul(code2_value, absmax2), offset);
}

// ------------------------------------------------------------------------------------------
// AdamW, one element (reference.adamw_update): fp32, one rounding per operation, this order
// ------------------------------------------------------------------------------------------

QK_HD float qk_fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

// Correctly rounded like the reference's float64 sqrt rounded once to fp32 (sqrtf is IEEE on
// the host; __fsqrt_rn on the device stays exact even under -use_fast_math).
QK_HD float qk_fsqrt(float a) {
#if defined(__CUDA_ARCH__)
    return __fsqrt_rn(a);
#else
    return sqrtf(a);
#endif
}

// The eight fp32 constants of reference.adamw_scalars, exactly as Python rounded them.
struct QkAdamwScalars {
    float decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps;
};

QK_HD void qk_adamw_update(float& p, float g, float& m, float& v, const QkAdamwScalars& s) {
    p = qk_fmul(p, s.decay);
    m = qk_fadd(qk_fmul(m, s.beta1), qk_fmul(g, s.one_minus_beta1));
    v = qk_fadd(qk_fmul(v, s.beta2), qk_fmul(qk_fmul(g, g), s.one_minus_beta2));
    const float denom = qk_fadd(qk_fdiv(qk_fsqrt(v), s.bc2_sqrt), s.eps);
    p = qk_fsub(p, qk_fdiv(qk_fmul(s.step_size, m), denom));
}

// Requantization of an 8-bit state element given its block's fresh absmax (quantize_blockwise:
// an all-zero block stores index 0). `lut` is the code's dynamic_map_lut table.
QK_HD uint8_t qk_encode_8bit(float x, float absmax, float inv, const uint8_t* lut) {
    return absmax == 0.0f ? (uint8_t)0 : lut[qk_lut_index(qk_normalize_8bit(x, inv))];
}

// ------------------------------------------------------------------------------------------
// Small-M 4-bit GEMV: Y[m, n] = sum_k X[m, k] * W[n, k], W decoded from its FLAT index n*K + k
// ------------------------------------------------------------------------------------------
//
// The kernel walks W in 16-byte chunks of 32 nibbles aligned in the flat index, so a chunk lies
// in one quant block (blocksize >= 32) and may start before or end after its row (K % 32 != 0);
// its out-of-row elements are skipped. Chunks of row n: [qk_gemv_chunk_lo, qk_gemv_chunk_hi).
// Split s of S takes a contiguous run of a row's chunks; lane l of the row's warp takes every
// 32nd chunk of that run starting at l, accumulating one element at a time in flat order with
// an FMA (the result is a sum, held to a tolerance, so the FMA is allowed and is more accurate);
// the 32 lanes are then summed by an xor butterfly, the splits in order s = 0, 1, ... The host
// test program (csrc/tests/host_tests.cpp, host_gemv) runs this same order against a float64 sum.

#define QK_GEMV_CHUNK 32
#define QK_GEMV_LANES 32
#define QK_GEMV_MAX_M 16

QK_HD float qk_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return fmaf(a, b, c);
#endif
}

QK_HD int64_t qk_gemv_chunk_lo(int64_t n, int64_t K) { return (n * K) >> 5; }
QK_HD int64_t qk_gemv_chunk_hi(int64_t n, int64_t K) { return ((n + 1) * K + 31) >> 5; }
// Chunks per split, the same for every row: a row spans at most ceil(K/32) + 1 chunks.
QK_HD int64_t qk_gemv_chunks_per_split(int64_t K, int64_t splits) {
    return ((K + 31) / 32 + 1 + splits - 1) / splits;
}

// The LoRA down-projection T = X_lora A^T runs in the GEMV's first CTAs, one K chunk each: at least
// 256 columns, at most QK_GEMV_T_MAX_BLOCKS chunks (the last CTA sums every chunk's partial), and
// one chunk even when K == 0 (T = 0).
#define QK_GEMV_T_MAX_BLOCKS 32
QK_HD int64_t qk_gemv_t_chunk(int64_t K) {
    const int64_t c = ((K + QK_GEMV_T_MAX_BLOCKS - 1) / QK_GEMV_T_MAX_BLOCKS + 31) / 32 * 32;
    return c < 256 ? 256 : c;
}
QK_HD int64_t qk_gemv_t_blocks(int64_t K) { return K > 0 ? (K + qk_gemv_t_chunk(K) - 1) / qk_gemv_t_chunk(K) : 1; }

// One element: acc + x * (code[q] * scale); the weight is exactly the reference's fp32 decode.
QK_HD float qk_gemv_step(float acc, float x, float code_value, float scale) {
    return qk_fma(x, qk_decode_scale(code_value, scale), acc);
}
