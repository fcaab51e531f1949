/* The whole C API of libqlora_kernels.so.
 *
 * Conventions (DESIGN.md section 5):
 *   - extern "C", raw device pointers, element counts and sizes as int64_t (size_t where the
 *     signature is dictated by torch.cuda.memory.CUDAPluggableAllocator).
 *   - Every launch takes the cudaStream_t to run on (Python passes
 *     torch.cuda.current_stream().cuda_stream) and runs on the current CUDA device; nothing is
 *     launched on an implicit default stream, nothing synchronizes.
 *   - Every function that can fail returns an int status: QK_OK (0) or one of the QK_ERR_* codes
 *     below; qk_last_error_message() then describes the failure (per thread).
 *   - Formats are those of qlora_kernels/reference.py, bit for bit.
 *
 * backends/cuda/_lib.py holds the ctypes signature table of these functions;
 * python_tests/test_csrc_signatures.py fails when the two disagree. Keep one declaration per
 * function, each starting with QK_API.
 */
#ifndef QLORA_KERNELS_H
#define QLORA_KERNELS_H

#include <stddef.h>
#include <stdint.h>
/* The CUDA headers when they are around; otherwise the one CUDA type the API names, declared
 * exactly as driver_types.h does, so the host test program and C users build without CUDA. */
#if defined(__has_include) && !defined(QK_CUDA_EMULATION)
#if __has_include(<cuda_runtime_api.h>)
#include <cuda_runtime_api.h>
#define QK_HAVE_CUDA_HEADERS 1
#endif
#endif
#ifndef QK_HAVE_CUDA_HEADERS
typedef struct CUstream_st* cudaStream_t;
#endif

#ifdef __cplusplus
#define QK_EXTERN_C extern "C"
#else
#define QK_EXTERN_C
#endif
#define QK_API QK_EXTERN_C __attribute__((visibility("default")))

/* Bumped when a signature changes; Python refuses a library of another version. */
#define QK_ABI_VERSION 5

/* Status codes. */
#define QK_OK 0
#define QK_ERR_INVALID_ARGUMENT 1 /* bad size, blocksize, null pointer, enum value */
#define QK_ERR_UNSUPPORTED_DTYPE 2 /* dtype code not in QK_DTYPE_* */
#define QK_ERR_MISALIGNED 3        /* an output pointer lacks the alignment documented below */
#define QK_ERR_CUDA 4              /* a CUDA runtime call or kernel launch failed */

/* Element types of float inputs and outputs. */
#define QK_DTYPE_FLOAT32 0
#define QK_DTYPE_BFLOAT16 1
#define QK_DTYPE_FLOAT16 2

/* 4-bit quant types (code tables: qk_math.h, formats.py). */
#define QK_QUANT_NF4 0
#define QK_QUANT_FP4 1

/* ABI version of the loaded library (QK_ABI_VERSION it was built with). */
QK_API int qk_abi_version(void);

/* Text of the last failure on this host thread ("" if none). Valid until the next call. */
QK_API const char* qk_last_error_message(void);

/* QK_OK when kernels of this library can run on `device` (driver new enough, an image for its
 * architecture present); otherwise an error with a message. Makes a tiny launch-free probe. */
QK_API int qk_check_device(int device);

/* 4-bit blockwise quantization (reference.quantize_4bit).
 *   input   [n] of input_dtype (QK_DTYPE_*), any alignment (16-byte aligned is faster)
 *   packed  [ceil(n/2)] bytes, 4-byte aligned: byte j = (q[2j] << 4) | q[2j+1]
 *   absmax  [ceil(n/blocksize)] fp32
 * blocksize: power of two in 32..4096. quant_type: QK_QUANT_NF4 or QK_QUANT_FP4. */
QK_API int qk_quantize_4bit(const void* input, int input_dtype, int64_t n, int64_t blocksize,
                            int quant_type, uint8_t* packed, float* absmax, cudaStream_t stream);

/* 4-bit blockwise dequantization (reference.dequantize_4bit, with reference.double_dequantize
 * of the scales fused into the same pass when nested_absmax is not NULL).
 *   packed   [>= ceil(n/2)] bytes, any alignment (2/4-byte aligned is faster)
 *   absmax   nested_absmax == NULL: fp32 [ceil(n/blocksize)]
 *            else uint8 [ceil(n/blocksize)] indices into nested_code, decoded as
 *            nested_code[q] * nested_absmax[b / 256] + *offset (fp32, two roundings)
 *   nested_absmax fp32 [ceil(nblocks/256)] or NULL; nested_code fp32 [256]; offset: a DEVICE
 *            pointer to one fp32 (ignored, may be NULL, when nested_absmax is NULL)
 *   out      [n] of out_dtype, 16-byte aligned */
QK_API int qk_dequantize_4bit(const uint8_t* packed, const void* absmax, const float* nested_absmax,
                              const float* nested_code, const float* offset, int64_t n,
                              int64_t blocksize, int quant_type, void* out, int out_dtype,
                              cudaStream_t stream);

/* The 8-bit encoder's lookup table of a sorted code (reference.dynamic_map_lut): lut[i] = the
 * number of code midpoints below the grid value -1 + 2i/65535.
 *   code [ncode] fp32 sorted ascending, 2 <= ncode <= 256;  lut [65536] uint8 */
QK_API int qk_dynamic_map_lut(const float* code, int64_t ncode, uint8_t* lut, cudaStream_t stream);

/* 8-bit blockwise quantization (reference.quantize_blockwise).
 *   input  [n] of input_dtype, any alignment
 *   lut    [65536] uint8 from qk_dynamic_map_lut of the code
 *   q      [n] uint8, 8-byte aligned;  absmax [ceil(n/blocksize)] fp32
 * blocksize: a power of two >= 2. An all-zero block stores index 0. */
QK_API int qk_quantize_blockwise(const void* input, int input_dtype, int64_t n, int64_t blocksize,
                                 const uint8_t* lut, uint8_t* q, float* absmax, cudaStream_t stream);

/* 8-bit blockwise dequantization (reference.dequantize_blockwise): out[i] = code[q[i]] *
 * absmax[i / blocksize] in fp32, cast to out_dtype.
 *   q [n] uint8, any alignment;  absmax fp32 [ceil(n/blocksize)];  code fp32 [256]
 *   out [n] of out_dtype, 16-byte aligned. blocksize: a power of two >= 2. */
QK_API int qk_dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                                   int64_t blocksize, void* out, int out_dtype, cudaStream_t stream);

/* Small-M 4-bit GEMV/GEMM for decode (reference.qlora_linear_forward), in ONE launch:
 *   t[m, j]  = sum_k x_lora[m, k] * a[j, k]                       (when lora_a is given)
 *   y[m, n]  = sum_k x[m, k] * dequant(W)[n, k]  (+ s * sum_j t[m, j] * b[n, j])  (+ bias[n])
 * accumulated in fp32 (FMA; the LoRA sum in j order, then times s), the additions in this
 * order, rounded once to x_dtype. The same grid computes T (its first CTAs, over K chunks, summed
 * in chunk order by the last of them) and Y; the splits of a row are summed in split order by the
 * last split to finish it, so the result is deterministic for a given splits.
 *   x        [m, k] of x_dtype, row-major contiguous, any alignment (16-byte aligned with k % 8 == 0
 *            is faster); 1 <= m <= 16
 *   packed, absmax, nested_absmax, nested_code, offset: the 4-bit weight W [n, k] exactly as
 *            qk_dequantize_4bit takes it (blocks of the flat index n*k: a block may cross rows);
 *            packed must be 16-byte aligned
 *   x_lora   [m, k] of x_dtype, row-major contiguous (LoRA's input after dropout), or NULL: x
 *   lora_a   [r, k] of lora_a_dtype and lora_b [n, r] of lora_b_dtype, row-major (LoRA A and B;
 *            each fp32, bf16 or fp16), or both NULL for no LoRA term; r >= 1, lora_scale s
 *            (alpha / r); lora_t [m, r] fp32 receives T
 *   bias     [n] of bias_dtype (fp32, bf16 or fp16), or NULL
 *   splits   1..65535: each row's K range is cut into this many parts run by separate CTAs
 *            (parallelism when n is small)
 *   workspace fp32 [qk_gemv_4bit_workspace(m, n, k, r, splits)] (NULL when that is 0): partial sums
 *   counters int32 all zero: [2 + n] when splits > 1, [2] when splits == 1 (only the LoRA term's
 *            two counts), NULL when splits == 1 and there is no LoRA term. The launch leaves them
 *            zero, so a stream can reuse one buffer for all its launches; launches that may run at
 *            the same time (other streams, graph replays) need their own.
 *   y        [m, n] of x_dtype, row-major contiguous
 * blocksize: power of two in 32..4096. quant_type: QK_QUANT_NF4 or QK_QUANT_FP4. n <= INT32_MAX. */
QK_API int qk_gemv_4bit(const void* x, int x_dtype, int64_t m, const uint8_t* packed, const void* absmax,
                        const float* nested_absmax, const float* nested_code, const float* offset, int64_t n,
                        int64_t k, int64_t blocksize, int quant_type, const void* x_lora, const void* lora_a,
                        const void* lora_b, int lora_a_dtype, int lora_b_dtype, int64_t lora_r, float lora_scale,
                        float* lora_t, const void* bias, int bias_dtype, int64_t splits, float* workspace,
                        int32_t* counters, void* y, cudaStream_t stream);

/* Rows of W one warp of qk_gemv_4bit works on at a time for these arguments, when x is 16-byte
 * aligned: 16 where the tensor-core kernel runs (x bf16/fp16, k a multiple of 128 and of blocksize,
 * m * max(1, 128 / blocksize) <= 32, an sm_80+ device), else 1; -1 if the arguments are invalid.
 * Callers size splits with it (a launch needs enough warps to fill the GPU). */
QK_API int64_t qk_gemv_4bit_tile_rows(int x_dtype, int64_t m, int64_t k, int64_t blocksize);

/* Floats of workspace qk_gemv_4bit needs for these sizes (lora_r 0: no LoRA term); -1 if invalid. */
QK_API int64_t qk_gemv_4bit_workspace(int64_t m, int64_t n, int64_t k, int64_t lora_r, int64_t splits);

/* One AdamW step in place (reference.adamw_step_32bit): p [n] of p_dtype, g [n] of g_dtype, m, v
 * fp32 [n]; any alignment (16-byte aligned is faster). The eight floats are the float32 constants
 * of reference.adamw_scalars, in that order. */
QK_API int qk_adamw_step_32bit(void* p, int p_dtype, const void* g, int g_dtype, float* m, float* v, int64_t n,
                               float decay, float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
                               float step_size, float bc2_sqrt, float eps, cudaStream_t stream);

/* One AdamW step in place with blockwise 8-bit states (reference.adamw_step_8bit):
 *   m_q, v_q [n] uint8 codes of code_m (signed dynamic map) and code_v (unsigned), fp32 [256] each;
 *   m_absmax, v_absmax fp32 [ceil(n/blocksize)]; lut_m, lut_v [65536] uint8 from
 *   qk_dynamic_map_lut of code_m / code_v (the encoder of qk_quantize_blockwise).
 * blocksize: power of two in 8..4096. Scalars as for qk_adamw_step_32bit. */
QK_API int qk_adamw_step_8bit(void* p, int p_dtype, const void* g, int g_dtype, uint8_t* m_q, float* m_absmax,
                              uint8_t* v_q, float* v_absmax, int64_t n, int64_t blocksize, const float* code_m,
                              const float* code_v, const uint8_t* lut_m, const uint8_t* lut_v, float decay,
                              float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
                              float step_size, float bc2_sqrt, float eps, cudaStream_t stream);

/* Unified memory with the signatures torch.cuda.memory.CUDAPluggableAllocator calls:
 * cudaMallocManaged on `device` (the current device is restored), NULL on failure (torch then
 * raises OutOfMemoryError). qk_managed_free is cudaFree, which waits for pending work on the
 * memory. `stream` is unused: managed memory is not stream-ordered. */
QK_API void* qk_managed_alloc(size_t size, int device, cudaStream_t stream);
QK_API void qk_managed_free(void* ptr, size_t size, int device, cudaStream_t stream);

/* Migrate `bytes` of managed memory at `ptr` to `device` (-1: to host memory), ordered on
 * `stream` (cudaMemPrefetchAsync). */
QK_API int qk_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream);

#endif /* QLORA_KERNELS_H */
