// Unified (managed) memory for the paged optimizer: an allocator pair with the signatures
// torch.cuda.memory.CUDAPluggableAllocator calls, and a stream-ordered prefetch.
#include "qk_common.cuh"

namespace {

// Runs `fn` with `device` current and restores the caller's device: torch keeps its own notion
// of the current device and does not expect a library call to change it.
template <typename Fn>
cudaError_t on_device(int device, Fn fn) {
    int prev = 0;
    cudaError_t e = cudaGetDevice(&prev);
    if (e != cudaSuccess) return e;
    if (prev != device && (e = cudaSetDevice(device)) != cudaSuccess) return e;
    cudaError_t r = fn();
    if (prev != device) cudaSetDevice(prev);
    return r;
}

}  // namespace

QK_API void* qk_managed_alloc(size_t size, int device, cudaStream_t stream) {
    (void)stream;
    void* ptr = nullptr;
    if (size == 0) return nullptr;
    cudaError_t e = on_device(device, [&] { return cudaMallocManaged(&ptr, size, cudaMemAttachGlobal); });
    if (e != cudaSuccess) {
        cudaGetLastError();  // an allocation failure must not poison the next launch's status
        qk::fail(QK_ERR_CUDA, "cudaMallocManaged(%zu bytes) on device %d: %s", size, device, cudaGetErrorString(e));
        return nullptr;
    }
    return ptr;
}

QK_API void qk_managed_free(void* ptr, size_t size, int device, cudaStream_t stream) {
    (void)size;
    (void)stream;
    if (!ptr) return;
    cudaError_t e = on_device(device, [&] { return cudaFree(ptr); });
    if (e != cudaSuccess) {
        cudaGetLastError();
        qk::fail(QK_ERR_CUDA, "cudaFree(%p) on device %d: %s", ptr, device, cudaGetErrorString(e));
    }
}

QK_API int qk_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream) {
    if (!ptr) return qk::fail(QK_ERR_INVALID_ARGUMENT, "qk_prefetch: null pointer");
    if (bytes == 0) return QK_OK;
    cudaError_t e;
#if CUDART_VERSION >= 13000
    // CUDA 13 replaced the destination device ordinal by a cudaMemLocation (plus flags).
    cudaMemLocation loc;
    loc.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
    loc.id = device < 0 ? 0 : device;
    e = cudaMemPrefetchAsync(ptr, bytes, loc, 0, stream);
#else
    e = cudaMemPrefetchAsync(ptr, bytes, device < 0 ? cudaCpuDeviceId : device, stream);
#endif
    if (e != cudaSuccess) {
        cudaGetLastError();
        return qk::fail(QK_ERR_CUDA, "cudaMemPrefetchAsync(%zu bytes to %s %d): %s", bytes, device < 0 ? "host" : "device",
                        device, cudaGetErrorString(e));
    }
    return QK_OK;
}
