// The fiber scheduler and runtime stubs of the CUDA emulation (see qk_cuda_emu.h).
#include "qk_cuda_emu.h"

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <ucontext.h>

#include <vector>

namespace qk_emu {
namespace {

enum State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

// A fiber starts once through makecontext/setcontext (its own stack) and from then on switches
// with _setjmp/_longjmp, which, unlike swapcontext, make no system call (swapcontext saves and
// restores the signal mask every time: most of the emulation's time went there).
struct Fiber {
    ucontext_t start;
    jmp_buf resume;
    State state;
    bool started;
};

constexpr size_t kStackBytes = 64 * 1024;
constexpr int kWarp = 32;

// One launch at a time (the library is called from Python's thread; a nested or concurrent launch
// aborts below rather than corrupting the scheduler).
jmp_buf g_scheduler;
ucontext_t g_template;
bool g_have_template = false;
std::vector<Fiber> g_fibers;
std::vector<std::vector<char>> g_stacks;
std::vector<uint32_t> g_slots;
std::vector<uint32_t> g_gather;  // kGatherWords per thread: warp_gather's slots
unsigned char* g_dynamic = nullptr;  // the launch's dynamic shared memory (32 KB-aligned)
size_t g_dynamic_bytes = 0;
const std::function<void()>* g_body = nullptr;
dim3 g_grid, g_block, g_block_idx;
int g_current = -1;
bool g_running = false;

[[noreturn]] void die(const char* what) {
    fprintf(stderr, "qk_cuda_emu: %s\n", what);
    abort();
}

[[noreturn]] void fiber_main() {
    (*g_body)();
    g_fibers[g_current].state = kDone;
    _longjmp(g_scheduler, 1);
}

void wait(State s) {
    if (g_current < 0) die("barrier outside a kernel");
    Fiber& f = g_fibers[g_current];
    f.state = s;
    if (_setjmp(f.resume) == 0) _longjmp(g_scheduler, 1);
}

void resume(int t) {
    Fiber& f = g_fibers[t];
    g_current = t;
    if (_setjmp(g_scheduler) == 0) {
        if (!f.started) {
            f.started = true;
            setcontext(&f.start);
            die("setcontext failed");
        }
        _longjmp(f.resume, 1);
    }
    g_current = -1;
}

// Releases the barrier every live thread of a group has reached; false when none can be released
// (a deadlock: threads wait at different barriers, which is undefined behaviour on a GPU too).
bool release(int n) {
    bool released = false;
    for (int w0 = 0; w0 < n; w0 += kWarp) {
        int live = 0, waiting = 0;
        for (int t = w0; t < n && t < w0 + kWarp; ++t) {
            if (g_fibers[t].state != kDone) ++live;
            if (g_fibers[t].state == kAtWarpBarrier) ++waiting;
        }
        if (live > 0 && waiting == live) {
            for (int t = w0; t < n && t < w0 + kWarp; ++t)
                if (g_fibers[t].state == kAtWarpBarrier) g_fibers[t].state = kRunnable;
            released = true;
        }
    }
    if (released) return true;
    int live = 0, waiting = 0;
    for (int t = 0; t < n; ++t) {
        if (g_fibers[t].state != kDone) ++live;
        if (g_fibers[t].state == kAtBlockBarrier) ++waiting;
    }
    if (live > 0 && waiting == live) {
        for (int t = 0; t < n; ++t)
            if (g_fibers[t].state == kAtBlockBarrier) g_fibers[t].state = kRunnable;
        return true;
    }
    return false;
}

void run_block(int n) {
    if (!g_have_template) {
        if (getcontext(&g_template) != 0) die("getcontext failed");
        g_have_template = true;
    }
    for (int t = 0; t < n; ++t) {
        Fiber& f = g_fibers[t];
        f.start = g_template;
        f.start.uc_stack.ss_sp = g_stacks[t].data();
        f.start.uc_stack.ss_size = g_stacks[t].size();
        f.start.uc_link = nullptr;  // fiber_main never returns: it jumps back to the scheduler
        makecontext(&f.start, (void (*)())fiber_main, 0);
        f.state = kRunnable;
        f.started = false;
    }
    for (;;) {
        bool any_live = false;
        for (int t = 0; t < n; ++t)
            if (g_fibers[t].state == kRunnable) resume(t);
        for (int t = 0; t < n; ++t) any_live |= g_fibers[t].state != kDone;
        if (!any_live) return;
        if (!release(n)) die("deadlock: the threads of a block wait at different barriers");
    }
}

}  // namespace

dim3 thread_idx() {
    const unsigned t = (unsigned)g_current;
    return dim3(t % g_block.x, (t / g_block.x) % g_block.y, t / (g_block.x * g_block.y));
}
dim3 block_idx() { return g_block_idx; }
dim3 block_dim() { return g_block; }
dim3 grid_dim() { return g_grid; }

void sync_block() { wait(kAtBlockBarrier); }

uint32_t exchange_xor(uint32_t bits, int lane_mask) {
    const int t = g_current;
    g_slots[t] = bits;
    wait(kAtWarpBarrier);  // every live lane has written its value
    const int lane = t % kWarp, partner = (t - lane) + ((lane ^ lane_mask) % kWarp);
    const uint32_t got = g_slots[partner];
    wait(kAtWarpBarrier);  // every live lane has read before the slots are reused
    return got;
}

void warp_gather(const uint32_t* mine, int n, uint32_t* all) {
    if (n < 0 || n > kGatherWords) die("warp_gather: too many words");
    const int t = g_current;
    const int w0 = t - t % kWarp;
    if ((long)w0 + kWarp > (long)g_block.x * g_block.y * g_block.z) die("warp_gather: needs a full warp");
    memcpy(&g_gather[(size_t)t * kGatherWords], mine, (size_t)n * 4);
    wait(kAtWarpBarrier);  // every lane of the warp has written its words
    for (int l = 0; l < kWarp; ++l) memcpy(all + (size_t)l * n, &g_gather[(size_t)(w0 + l) * kGatherWords], (size_t)n * 4);
    wait(kAtWarpBarrier);  // every lane has read before the slots are reused
}

unsigned char* dynamic_shared() {
    if (g_dynamic == nullptr) die("dynamic_shared: the launch asked for no dynamic shared memory");
    return g_dynamic;
}

void run(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
    if (g_running) die("nested or concurrent launch");
    const long n = (long)block.x * block.y * block.z;
    if (n < 1 || n > 1024) die("block size out of range (1..1024 threads)");
    if ((long)grid.x * grid.y * grid.z < 1) die("empty grid");
    g_running = true;
    g_body = &body;
    g_grid = grid;
    g_block = block;
    if ((long)g_fibers.size() < n) {
        g_fibers.resize(n);
        g_stacks.resize(n, std::vector<char>(kStackBytes));
        g_slots.resize(n);
        g_gather.resize((size_t)n * kGatherWords);
    }
    const size_t align = 32768;
    g_dynamic_bytes = dynamic_smem;
    g_dynamic = dynamic_smem ? static_cast<unsigned char*>(aligned_alloc(align, (dynamic_smem + align - 1) / align * align))
                             : nullptr;
    if (dynamic_smem && !g_dynamic) die("dynamic shared memory: allocation failed");
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                g_block_idx = dim3(x, y, z);
                if (g_dynamic) memset(g_dynamic, 0xFF, g_dynamic_bytes);
                run_block((int)n);
            }
    free(g_dynamic);
    g_dynamic = nullptr;
    g_dynamic_bytes = 0;
    g_body = nullptr;
    g_running = false;
}

}  // namespace qk_emu

// --- runtime stubs: one device, host memory -------------------------------------------------

cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulated"; }
cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaGetDeviceCount(int* count) {
    *count = 1;
    return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* version) {
    *version = CUDART_VERSION;
    return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
    switch (attr) {
        case cudaDevAttrMultiProcessorCount: *value = qk_emu::kSmCount; break;
        case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
        case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
        default: *value = 0;
    }
    return cudaSuccess;
}
cudaError_t cudaMallocManaged(void** ptr, size_t size, unsigned) {
    *ptr = aligned_alloc(256, (size + 255) / 256 * 256);
    return *ptr ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* ptr) {
    free(ptr);
    return cudaSuccess;
}
cudaError_t cudaMemPrefetchAsync(const void*, size_t, cudaMemLocation, unsigned, cudaStream_t) { return cudaSuccess; }
