// Library-wide pieces: error reporting, device probing, SM count cache.
#include <stdarg.h>
#include <stdio.h>

#include "qk_common.cuh"

namespace {

// Per host thread, so concurrent callers (data-loader threads, several streams) do not read one
// another's messages.
thread_local char g_last_error[512] = "";

__global__ void qk_probe_kernel(int* unused) {
    if (unused) *unused = 0;
}

constexpr int kMaxDevices = 64;
int g_sm_count[kMaxDevices] = {0};
int g_cc_major[kMaxDevices] = {0};

}  // namespace

namespace qk {

int fail(int status, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_last_error, sizeof(g_last_error), fmt, ap);
    va_end(ap);
    return status;
}

int check_launch(const char* what) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return fail(QK_ERR_CUDA, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
    return QK_OK;
}

// SMs of device `dev`, or 108 when the runtime cannot say. A failed query's error is cleared, so
// that the next check_launch does not report it as a launch failure.
static int query_sm_count(int dev) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
        cudaGetLastError();
        return 108;
    }
    return n > 0 ? n : 108;
}

int sm_count() {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) {
        cudaGetLastError();
        return 108;
    }
    if (dev >= kMaxDevices) return query_sm_count(dev);
    if (g_sm_count[dev] == 0) g_sm_count[dev] = query_sm_count(dev);  // a benign race: all store the same
    return g_sm_count[dev];
}

// Compute capability major of device `dev`, or 0 when the runtime cannot say (error cleared).
static int query_cc_major(int dev) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return v;
}

int cc_major() {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) {
        cudaGetLastError();
        return 0;
    }
    if (dev >= kMaxDevices) return query_cc_major(dev);
    if (g_cc_major[dev] == 0) g_cc_major[dev] = query_cc_major(dev);
    return g_cc_major[dev];
}

}  // namespace qk

QK_API int qk_abi_version(void) { return QK_ABI_VERSION; }

QK_API const char* qk_last_error_message(void) { return g_last_error; }

QK_API int qk_check_device(int device) {
    g_last_error[0] = '\0';
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        int driver = 0;
        cudaDriverGetVersion(&driver);
        if (driver == 0) return qk::fail(QK_ERR_CUDA, "no CUDA driver: %s", cudaGetErrorString(e));
        return qk::fail(QK_ERR_CUDA,
                        "CUDA runtime %d.%d of libqlora_kernels cannot start (driver supports %d.%d): %s",
                        CUDART_VERSION / 1000, (CUDART_VERSION % 1000) / 10, driver / 1000, (driver % 1000) / 10,
                        cudaGetErrorString(e));
    }
    if (device < 0 || device >= count)
        return qk::fail(QK_ERR_INVALID_ARGUMENT, "device %d out of range (%d CUDA devices)", device, count);
    int prev = 0;
    if ((e = cudaGetDevice(&prev)) != cudaSuccess) return qk::fail(QK_ERR_CUDA, "cudaGetDevice: %s", cudaGetErrorString(e));
    if (prev != device && (e = cudaSetDevice(device)) != cudaSuccess)
        return qk::fail(QK_ERR_CUDA, "cudaSetDevice(%d): %s", device, cudaGetErrorString(e));
    cudaFuncAttributes attr;
    e = cudaFuncGetAttributes(&attr, qk_probe_kernel);
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (prev != device) cudaSetDevice(prev);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return qk::fail(QK_ERR_CUDA, "no kernel image of libqlora_kernels runs on device %d (sm_%d%d): %s; rebuild with -DQLORA_CUDA_ARCHS=%d%d",
                        device, major, minor, cudaGetErrorString(e), major, minor);
    }
    return QK_OK;
}
