// Host tests of csrc/qk_math.h: the per-element math the CUDA kernels run, compiled for the CPU.
//
//   qk_host_tests               built-in sanity checks (no Python needed)
//   qk_host_tests CASES_FILE    checks every case of a file that csrc/tests/gen_host_cases.py wrote
//                               from qlora_kernels.reference (python_tests/test_csrc_host_math.py)
//
// The whole-tensor cases (q4, dq4, q8, dq8) run the kernels' per-block algorithm sequentially
// with the same qk_math.h calls in the same order, so every rounding step is checked; only the
// thread layout differs on the GPU (tests/test_cuda_backend.py covers that).
//
// The AdamW cases (adamw, adamw8) are bit for bit too; the GEMV case runs gemv_4bit_kernel's
// summation order and holds it to the standard error bound of that order against a float64 sum.
//
// Exit status: 0 all equal, 1 a mismatch, 2 an unreadable case file.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "qk_math.h"
#include "qlora_kernels.h"

namespace {

long long g_values = 0, g_mismatches = 0, g_records = 0;
int g_reported = 0;

void mismatch(const std::string& what, long long index, uint64_t got, uint64_t expected, const std::string& input = "") {
    ++g_mismatches;
    if (g_reported++ < 40)
        fprintf(stderr, "MISMATCH %s [%lld]%s%s: got 0x%llx, expected 0x%llx\n", what.c_str(), index,
                input.empty() ? "" : " input ", input.c_str(), (unsigned long long)got, (unsigned long long)expected);
}

void check(const std::string& what, long long index, uint64_t got, uint64_t expected, const std::string& input = "") {
    ++g_values;
    if (got != expected) mismatch(what, index, got, expected, input);
}

bool is_nan_bits(int dt, uint64_t b) {
    if (dt == QK_DTYPE_FLOAT32) return (b & 0x7FFFFFFFu) > 0x7F800000u;
    if (dt == QK_DTYPE_BFLOAT16) return (b & 0x7FFFu) > 0x7F80u;
    return (b & 0x7FFFu) > 0x7C00u;
}

// Float results: equal bits, or NaN on both sides (torch itself returns different NaN payloads
// on different code paths: 0x7FC0 or 0xFFFF for bf16).
void check_float(const std::string& what, long long index, int dt, uint64_t got, uint64_t expected,
                 const std::string& input = "") {
    ++g_values;
    if (got != expected && !(is_nan_bits(dt, got) && is_nan_bits(dt, expected))) mismatch(what, index, got, expected, input);
}

std::string hex32(uint32_t u) {
    char buf[32];
    snprintf(buf, sizeof buf, "0x%08x (%.9g)", u, (double)qk_bits_f32(u));
    return buf;
}

// --- case-file reading: whitespace-separated tokens, integers in C notation (0x.. for bits) ---

struct Reader {
    std::ifstream in;
    std::string where;
    bool ok = true;
    uint64_t u() {
        std::string tok;
        if (!(in >> tok)) {
            ok = false;
            return 0;
        }
        char* end = nullptr;
        uint64_t v = strtoull(tok.c_str(), &end, 0);
        if (*end) ok = false;
        return v;
    }
    std::vector<uint64_t> vec(long long n) {
        std::vector<uint64_t> v((size_t)n);
        for (auto& x : v) x = u();
        return v;
    }
};

float in_to_f32(int dt, uint64_t bits) {
    if (dt == QK_DTYPE_BFLOAT16) return qk_bf16_to_f32((uint16_t)bits);
    if (dt == QK_DTYPE_FLOAT16) return qk_f16_to_f32((uint16_t)bits);
    return qk_bits_f32((uint32_t)bits);
}

uint64_t f32_to_out(int dt, float f) {
    if (dt == QK_DTYPE_BFLOAT16) return qk_f32_to_bf16(f);
    if (dt == QK_DTYPE_FLOAT16) return qk_f32_to_f16(f);
    return qk_f32_bits(f);
}

long long nblocks(long long n, long long b) { return (n + b - 1) / b; }

// The 8-bit encoder's table, built exactly as dynamic_map_lut_kernel builds it.
std::vector<uint8_t> build_lut(const std::vector<float>& code) {
    std::vector<float> mids(code.size() - 1);
    for (size_t k = 0; k + 1 < code.size(); ++k) mids[k] = qk_code_midpoint(code[k], code[k + 1]);
    std::vector<uint8_t> lut(QK_DYNAMIC_LUT_SIZE);
    for (int i = 0; i < QK_DYNAMIC_LUT_SIZE; ++i) {
        const float g = qk_lut_grid(i);
        int count = 0;
        for (float m : mids) count += m < g;
        lut[i] = (uint8_t)count;
    }
    return lut;
}

std::vector<float> floats(const std::vector<uint64_t>& bits) {
    std::vector<float> f(bits.size());
    for (size_t i = 0; i < bits.size(); ++i) f[i] = qk_bits_f32((uint32_t)bits[i]);
    return f;
}

// quantize_4bit_kernel's algorithm, one block at a time.
void host_quantize_4bit(const std::vector<float>& x, long long B, int qt, std::vector<uint8_t>& packed,
                        std::vector<float>& absmax) {
    const long long n = (long long)x.size(), nb = nblocks(n, B), full = n / B;
    absmax.assign(nb, 0.0f);
    std::vector<int> q(n + 1, qk_encode_4bit(qt, 0.0f));
    for (long long b = 0; b < nb; ++b) {
        float m = 0.0f;
        for (long long i = b * B; i < n && i < (b + 1) * B; ++i) m = qk_nanmax(m, fabsf(x[i]));
        absmax[b] = m;
        const float inv = qk_inv_absmax_4bit(m);
        for (long long i = b * B; i < n && i < (b + 1) * B; ++i)
            q[i] = qk_encode_4bit(qt, b < full ? qk_scale_full_4bit(x[i], inv) : qk_scale_tail_4bit(x[i], m));
    }
    packed.assign((n + 1) / 2, 0);
    for (long long j = 0; j < (n + 1) / 2; ++j) packed[j] = qk_pack_4bit(q[2 * j], q[2 * j + 1]);
}

QkAdamwScalars read_scalars(Reader& r) {
    auto b = r.vec(8);
    return QkAdamwScalars{qk_bits_f32((uint32_t)b[0]), qk_bits_f32((uint32_t)b[1]), qk_bits_f32((uint32_t)b[2]),
                          qk_bits_f32((uint32_t)b[3]), qk_bits_f32((uint32_t)b[4]), qk_bits_f32((uint32_t)b[5]),
                          qk_bits_f32((uint32_t)b[6]), qk_bits_f32((uint32_t)b[7])};
}

// build_lut is 16M compares; the 8-bit AdamW records share two codes.
const std::vector<uint8_t>& cached_lut(const std::vector<float>& code) {
    static std::vector<std::pair<std::vector<float>, std::vector<uint8_t>>> cache;
    for (auto& e : cache)
        if (e.first.size() == code.size() && memcmp(e.first.data(), code.data(), code.size() * sizeof(float)) == 0)
            return e.second;
    cache.emplace_back(code, build_lut(code));
    return cache.back().second;
}

// gemv_4bit_kernel's summation order for one output row n of every X row: per split, per lane,
// chunks c = begin + lane, +32, ... and their elements in flat order (FMA), then the lanes' xor
// butterfly, then the splits in order. Returns y[m] (fp32, before the epilogue).
std::vector<float> host_gemv_row(const std::vector<float>& x, int M, int64_t K, int64_t n, const std::vector<uint8_t>& packed,
                                 const std::vector<float>& scale, int log2B, int qt, int64_t splits) {
    const int64_t lo = qk_gemv_chunk_lo(n, K), hi = qk_gemv_chunk_hi(n, K), cps = qk_gemv_chunks_per_split(K, splits);
    std::vector<float> y(M, 0.0f);
    for (int64_t s = 0; s < splits; ++s) {
        const int64_t begin = lo + s * cps, end = begin + cps < hi ? begin + cps : hi;
        std::vector<float> lane(QK_GEMV_LANES * M, 0.0f);
        for (int l = 0; l < QK_GEMV_LANES; ++l)
            for (int64_t c = begin + l; c < end; c += QK_GEMV_LANES) {
                const float sc = scale[(c * QK_GEMV_CHUNK) >> log2B];
                for (int j = 0; j < QK_GEMV_CHUNK; ++j) {
                    const int64_t i = c * QK_GEMV_CHUNK + j, k = i - n * K;
                    if (k < 0 || k >= K) continue;
                    const unsigned byte = packed[i >> 1];
                    const float w = qk_decode_scale(qk_code_4bit(qt, (i & 1) ? (byte & 15) : (byte >> 4)), sc);
                    for (int m = 0; m < M; ++m) lane[l * M + m] = qk_fma(x[m * K + k], w, lane[l * M + m]);
                }
            }
        for (int o = QK_GEMV_LANES / 2; o > 0; o >>= 1) {
            std::vector<float> next(lane.size());
            for (int l = 0; l < QK_GEMV_LANES; ++l)
                for (int m = 0; m < M; ++m) next[l * M + m] = qk_fadd(lane[l * M + m], lane[(l ^ o) * M + m]);
            lane.swap(next);
        }
        for (int m = 0; m < M; ++m) y[m] = s == 0 ? lane[m] : qk_fadd(y[m], lane[m]);
    }
    return y;
}

double bits_f64(uint64_t u) {
    double d;
    memcpy(&d, &u, 8);
    return d;
}

void run_case_file(const char* path) {
    Reader r;
    r.in.open(path);
    if (!r.in) {
        fprintf(stderr, "cannot open case file %s\n", path);
        exit(2);
    }
    std::string kind;
    while (r.in >> kind) {
        ++g_records;
        const std::string rec = kind + "#" + std::to_string(g_records);
        if (kind == "code4") {
            int qt = (int)r.u();
            auto exp = r.vec(16);
            for (int i = 0; i < 16; ++i) check(rec + " code", i, qk_f32_bits(qk_code_4bit(qt, i)), exp[i]);
        } else if (kind == "enc4") {
            int qt = (int)r.u();
            long long n = (long long)r.u();
            auto x = r.vec(n), exp = r.vec(n);
            for (long long i = 0; i < n; ++i)
                check(rec + " encode", i, (uint64_t)qk_encode_4bit(qt, qk_bits_f32((uint32_t)x[i])), exp[i], hex32((uint32_t)x[i]));
        } else if (kind == "lutidx") {
            long long n = (long long)r.u();
            auto x = r.vec(n), exp = r.vec(n);
            for (long long i = 0; i < n; ++i)
                check(rec + " lut_index", i, (uint64_t)qk_lut_index(qk_bits_f32((uint32_t)x[i])), exp[i], hex32((uint32_t)x[i]));
        } else if (kind == "lut") {
            long long nc = (long long)r.u();
            auto code = floats(r.vec(nc));
            auto exp = r.vec(QK_DYNAMIC_LUT_SIZE);
            auto lut = build_lut(code);
            for (int i = 0; i < QK_DYNAMIC_LUT_SIZE; ++i) check(rec + " lut", i, lut[i], exp[i]);
        } else if (kind == "bf16" || kind == "f16") {
            long long n = (long long)r.u();
            auto x = r.vec(n), exp = r.vec(n);
            for (long long i = 0; i < n; ++i) {
                float f = qk_bits_f32((uint32_t)x[i]);
                uint64_t got = kind == "bf16" ? qk_f32_to_bf16(f) : qk_f32_to_f16(f);
                check_float(rec + " to_" + kind, i, kind == "bf16" ? QK_DTYPE_BFLOAT16 : QK_DTYPE_FLOAT16, got, exp[i], hex32((uint32_t)x[i]));
            }
        } else if (kind == "bf16in" || kind == "f16in") {
            long long n = (long long)r.u();
            auto h = r.vec(n), exp = r.vec(n);
            for (long long i = 0; i < n; ++i) {
                float f = kind == "bf16in" ? qk_bf16_to_f32((uint16_t)h[i]) : qk_f16_to_f32((uint16_t)h[i]);
                check_float(rec + " from_" + kind, i, QK_DTYPE_FLOAT32, qk_f32_bits(f), exp[i]);
            }
        } else if (kind == "ddq") {
            long long n = (long long)r.u();
            auto q = r.vec(n);
            auto a2 = floats(r.vec(nblocks(n, QK_NESTED_BLOCKSIZE)));
            auto code2 = floats(r.vec(256));
            float offset = qk_bits_f32((uint32_t)r.u());
            auto exp = r.vec(n);
            for (long long i = 0; i < n; ++i)
                check_float(rec + " double_dequant", i, QK_DTYPE_FLOAT32, qk_f32_bits(qk_double_dequant(code2[q[i]], a2[i >> QK_NESTED_LOG2], offset)), exp[i]);
        } else if (kind == "q4") {
            int qt = (int)r.u();
            long long B = (long long)r.u();
            int dt = (int)r.u();
            long long n = (long long)r.u();
            auto xb = r.vec(n);
            auto exp_absmax = r.vec(nblocks(n, B));
            auto exp_packed = r.vec((n + 1) / 2);
            std::vector<float> x(n);
            for (long long i = 0; i < n; ++i) x[i] = in_to_f32(dt, xb[i]);
            std::vector<uint8_t> packed;
            std::vector<float> absmax;
            host_quantize_4bit(x, B, qt, packed, absmax);
            for (size_t b = 0; b < absmax.size(); ++b) check_float(rec + " q4 absmax", (long long)b, QK_DTYPE_FLOAT32, qk_f32_bits(absmax[b]), exp_absmax[b]);
            for (size_t j = 0; j < packed.size(); ++j)
                check(rec + " q4 packed", (long long)j, packed[j], exp_packed[j],
                      hex32(qk_f32_bits(x[2 * j])) + " " + (2 * j + 1 < (size_t)n ? hex32(qk_f32_bits(x[2 * j + 1])) : "-"));
        } else if (kind == "dq4") {
            int qt = (int)r.u();
            long long B = (long long)r.u();
            int dt = (int)r.u();
            long long n = (long long)r.u();
            int nested = (int)r.u();
            auto packed = r.vec((n + 1) / 2);
            const long long nb = nblocks(n, B);
            std::vector<float> scale(nb);
            if (nested) {
                auto aq = r.vec(nb);
                auto a2 = floats(r.vec(nblocks(nb, QK_NESTED_BLOCKSIZE)));
                auto code2 = floats(r.vec(256));
                float offset = qk_bits_f32((uint32_t)r.u());
                for (long long b = 0; b < nb; ++b) scale[b] = qk_double_dequant(code2[aq[b]], a2[b >> QK_NESTED_LOG2], offset);
            } else {
                scale = floats(r.vec(nb));
            }
            auto exp = r.vec(n);
            for (long long i = 0; i < n; ++i) {
                const unsigned byte = (unsigned)packed[i >> 1];
                const int nib = (i & 1) ? (byte & 15) : (byte >> 4);
                check_float(rec + " dq4", i, dt, f32_to_out(dt, qk_decode_scale(qk_code_4bit(qt, nib), scale[i / B])), exp[i]);
            }
        } else if (kind == "q8") {
            long long B = (long long)r.u();
            int dt = (int)r.u();
            long long n = (long long)r.u();
            auto xb = r.vec(n);
            auto code = floats(r.vec(256));
            auto exp_q = r.vec(n);
            auto exp_absmax = r.vec(nblocks(n, B));
            auto lut = build_lut(code);
            for (long long b = 0; b < nblocks(n, B); ++b) {
                float m = 0.0f;
                for (long long i = b * B; i < n && i < (b + 1) * B; ++i) m = qk_nanmax(m, fabsf(in_to_f32(dt, xb[i])));
                check_float(rec + " q8 absmax", b, QK_DTYPE_FLOAT32, qk_f32_bits(m), exp_absmax[b]);
                const float inv = qk_inv_absmax_8bit(m);
                for (long long i = b * B; i < n && i < (b + 1) * B; ++i) {
                    const float x = in_to_f32(dt, xb[i]);
                    const uint8_t q = m == 0.0f ? 0 : lut[qk_lut_index(qk_normalize_8bit(x, inv))];
                    check(rec + " q8", i, q, exp_q[i], hex32(qk_f32_bits(x)) + " absmax " + hex32(qk_f32_bits(m)));
                }
            }
        } else if (kind == "dq8") {
            long long B = (long long)r.u();
            int dt = (int)r.u();
            long long n = (long long)r.u();
            auto q = r.vec(n);
            auto absmax = floats(r.vec(nblocks(n, B)));
            auto code = floats(r.vec(256));
            auto exp = r.vec(n);
            for (long long i = 0; i < n; ++i)
                check_float(rec + " dq8", i, dt, f32_to_out(dt, qk_decode_scale(code[q[i]], absmax[i / B])), exp[i]);
        } else if (kind == "adamw") {
            int pdt = (int)r.u(), gdt = (int)r.u();
            const QkAdamwScalars sc = read_scalars(r);
            long long n = (long long)r.u();
            auto p = r.vec(n), g = r.vec(n), m = r.vec(n), v = r.vec(n);
            auto ep = r.vec(n), em = r.vec(n), ev = r.vec(n);
            for (long long i = 0; i < n && r.ok; ++i) {
                float pf = in_to_f32(pdt, p[i]), mf = qk_bits_f32((uint32_t)m[i]), vf = qk_bits_f32((uint32_t)v[i]);
                qk_adamw_update(pf, in_to_f32(gdt, g[i]), mf, vf, sc);
                const std::string in = "p " + hex32(qk_f32_bits(in_to_f32(pdt, p[i]))) + " g " + hex32(qk_f32_bits(in_to_f32(gdt, g[i])));
                check_float(rec + " adamw p", i, pdt, f32_to_out(pdt, pf), ep[i], in);
                check_float(rec + " adamw m", i, QK_DTYPE_FLOAT32, qk_f32_bits(mf), em[i], in);
                check_float(rec + " adamw v", i, QK_DTYPE_FLOAT32, qk_f32_bits(vf), ev[i], in);
            }
        } else if (kind == "adamw8") {
            // adamw_8bit_kernel's algorithm, one quant block at a time.
            int pdt = (int)r.u(), gdt = (int)r.u();
            long long B = (long long)r.u();
            const QkAdamwScalars sc = read_scalars(r);
            long long n = (long long)r.u();
            const long long nb = nblocks(n, B);
            auto code_m = floats(r.vec(256)), code_v = floats(r.vec(256));
            auto p = r.vec(n), g = r.vec(n), mq = r.vec(n);
            auto ma = floats(r.vec(nb));
            auto vq = r.vec(n);
            auto va = floats(r.vec(nb));
            auto ep = r.vec(n), emq = r.vec(n), ema = r.vec(nb), evq = r.vec(n), eva = r.vec(nb);
            if (!r.ok) {
                fprintf(stderr, "malformed record %lld (%s) in %s\n", g_records, kind.c_str(), path);
                exit(2);
            }
            const auto& lut_m = cached_lut(code_m);
            const auto& lut_v = cached_lut(code_v);
            for (long long b = 0; b < nb; ++b) {
                const long long i0 = b * B, i1 = (b + 1) * B < n ? (b + 1) * B : n;
                std::vector<float> pf(B), mf(B), vf(B);
                float mmax = 0.0f, vmax = 0.0f;
                for (long long i = i0; i < i1; ++i) {
                    float& pp = pf[i - i0];
                    float& mm = mf[i - i0];
                    float& vv = vf[i - i0];
                    pp = in_to_f32(pdt, p[i]);
                    mm = qk_decode_scale(code_m[mq[i]], ma[b]);
                    vv = qk_decode_scale(code_v[vq[i]], va[b]);
                    qk_adamw_update(pp, in_to_f32(gdt, g[i]), mm, vv, sc);
                    mmax = qk_nanmax(mmax, fabsf(mm));
                    vmax = qk_nanmax(vmax, fabsf(vv));
                }
                check_float(rec + " adamw8 m_absmax", b, QK_DTYPE_FLOAT32, qk_f32_bits(mmax), ema[b]);
                check_float(rec + " adamw8 v_absmax", b, QK_DTYPE_FLOAT32, qk_f32_bits(vmax), eva[b]);
                const float inv_m = qk_inv_absmax_8bit(mmax), inv_v = qk_inv_absmax_8bit(vmax);
                for (long long i = i0; i < i1; ++i) {
                    check_float(rec + " adamw8 p", i, pdt, f32_to_out(pdt, pf[i - i0]), ep[i]);
                    check(rec + " adamw8 m_q", i, qk_encode_8bit(mf[i - i0], mmax, inv_m, lut_m.data()), emq[i]);
                    check(rec + " adamw8 v_q", i, qk_encode_8bit(vf[i - i0], vmax, inv_v, lut_v.data()), evq[i]);
                }
            }
        } else if (kind == "gemv") {
            int M = (int)r.u();
            long long N = (long long)r.u(), K = (long long)r.u(), B = (long long)r.u();
            int qt = (int)r.u();
            long long splits = (long long)r.u();
            auto x = floats(r.vec(M * K));
            auto pk = r.vec((N * K + 1) / 2);
            auto scale = floats(r.vec(nblocks(N * K, B)));
            auto y64 = r.vec(M * N), absdot = r.vec(M * N);
            if (!r.ok) {
                fprintf(stderr, "malformed record %lld (%s) in %s\n", g_records, kind.c_str(), path);
                exit(2);
            }
            std::vector<uint8_t> packed(pk.begin(), pk.end());
            int log2B = 0;
            while ((1LL << log2B) < B) ++log2B;
            // Longest chain of roundings to one output: a lane's FMAs, the butterfly, the splits.
            const long long cps = qk_gemv_chunks_per_split(K, splits);
            const double depth = (double)((cps + QK_GEMV_LANES - 1) / QK_GEMV_LANES * QK_GEMV_CHUNK + 5 + splits);
            const double u = ldexp(1.0, -24), gamma = depth * u / (1.0 - depth * u);
            for (long long nn = 0; nn < N; ++nn) {
                auto y = host_gemv_row(x, M, K, nn, packed, scale, log2B, qt, splits);
                for (int m = 0; m < M; ++m) {
                    ++g_values;
                    const double exact = bits_f64(y64[m * N + nn]), bound = gamma * bits_f64(absdot[m * N + nn]) + 1e-300;
                    const double err = fabs((double)y[m] - exact);
                    if (!(err <= bound)) {
                        ++g_mismatches;
                        if (g_reported++ < 40)
                            fprintf(stderr, "MISMATCH %s gemv y[%d, %lld] = %.9g, float64 %.17g: error %.3g > bound %.3g\n",
                                    rec.c_str(), m, nn, (double)y[m], exact, err, bound);
                    }
                }
            }
        } else {
            fprintf(stderr, "unknown record kind '%s' (record %lld)\n", kind.c_str(), g_records);
            exit(2);
        }
        if (!r.ok) {
            fprintf(stderr, "malformed record %lld (%s) in %s\n", g_records, kind.c_str(), path);
            exit(2);
        }
    }
}

// Checks that need no reference data: enough to catch a broken build of the header.
void run_builtin() {
    for (int i = 0; i < 16; ++i) {
        check("builtin nf4 roundtrip", i, qk_encode_4bit(QK_QUANT_NF4, qk_nf4_code(i)), i);
        // FP4 has +0 and -0; a level must encode to an index of the same value.
        float v = qk_fp4_code(i);
        check("builtin fp4 roundtrip", i, qk_f32_bits(qk_fp4_code(qk_encode_4bit(QK_QUANT_FP4, v)) + 0.0f),
              qk_f32_bits(v + 0.0f));
    }
    check("builtin nf4 zero", 0, qk_encode_4bit(QK_QUANT_NF4, 0.0f), 7);
    check("builtin fp4 zero", 0, qk_encode_4bit(QK_QUANT_FP4, 0.0f), 0);
    check("builtin lut_index -1", 0, qk_lut_index(-1.0f), 0);
    check("builtin lut_index 0", 0, qk_lut_index(0.0f), 32768);
    check("builtin lut_index 1", 0, qk_lut_index(1.0f), 65535);
    check("builtin lut_index 2", 0, qk_lut_index(2.0f), 65535);
    check("builtin bf16 1", 0, qk_f32_to_bf16(1.0f), 0x3F80);
    check("builtin bf16 tie even", 0, qk_f32_to_bf16(qk_bits_f32(0x3F808000u)), 0x3F80);
    check("builtin bf16 tie odd", 0, qk_f32_to_bf16(qk_bits_f32(0x3F818000u)), 0x3F82);
    check("builtin f16 1", 0, qk_f32_to_f16(1.0f), 0x3C00);
    check("builtin f16 65520", 0, qk_f32_to_f16(65520.0f), 0x7C00);
    check("builtin f16 min subnormal", 0, qk_f32_to_f16(qk_bits_f32(0x33800000u)), 0x0001);
    check("builtin f16 in", 0, qk_f32_bits(qk_f16_to_f32(0x3C00)), 0x3F800000u);
    check("builtin dq", 0, qk_f32_bits(qk_double_dequant(0.5f, 2.0f, 0.25f)), qk_f32_bits(1.25f));
    {
        // A step from zero states with g = 1: m = 0.1, v = 0.001, p = 1 - lr * m_hat / (sqrt(v_hat) + eps).
        QkAdamwScalars s = {1.0f, 0.9f, 0.1f, 0.999f, 0.001f, 0.01f, 1.0f, 0.0f};
        float p = 1.0f, m = 0.0f, v = 0.0f;
        qk_adamw_update(p, 1.0f, m, v, s);
        check("builtin adamw m", 0, qk_f32_bits(m), qk_f32_bits(0.1f));
        check("builtin adamw v", 0, qk_f32_bits(v), qk_f32_bits(0.001f));
        check("builtin adamw p finite", 0, p > 0.9f && p < 1.0f, 1);
    }
    check("builtin gemv chunks", 0, (uint64_t)(qk_gemv_chunk_hi(2, 40) - qk_gemv_chunk_lo(2, 40)), 2);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc > 2) {
        fprintf(stderr, "usage: %s [CASES_FILE]\n", argv[0]);
        return 2;
    }
    run_builtin();
    if (argc == 2) run_case_file(argv[1]);
    printf("qk_host_tests: %lld records, %lld values checked, %lld mismatches\n", g_records, g_values, g_mismatches);
    return g_mismatches ? 1 : 0;
}
