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

// Attribute `attr` of device `dev`, or `fallback` when the runtime cannot say (or says <= 0). A
// failed query's error is cleared, so that the next check_launch does not report it as a launch
// failure.
static int query_attribute(int dev, cudaDeviceAttr attr, int fallback) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, attr, dev) != cudaSuccess) {
        cudaGetLastError();
        return fallback;
    }
    return v > 0 ? v : fallback;
}

// Attribute `attr` of the current device, cached per device in `cache` (kMaxDevices entries, 0 =
// not asked yet; a benign race: every thread stores the same value).
static int current_device_attribute(int* cache, cudaDeviceAttr attr, int fallback) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) {
        cudaGetLastError();
        return fallback;
    }
    if (dev >= kMaxDevices) return query_attribute(dev, attr, fallback);
    if (cache[dev] == 0) cache[dev] = query_attribute(dev, attr, fallback);
    return cache[dev];
}

int sm_count() { return current_device_attribute(g_sm_count, cudaDevAttrMultiProcessorCount, 108); }

// 0 when unknown: callers then take the kernels that need nothing newer than the library's archs.
int cc_major() { return current_device_attribute(g_cc_major, cudaDevAttrComputeCapabilityMajor, 0); }

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
