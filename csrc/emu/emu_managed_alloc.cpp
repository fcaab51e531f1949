// managed_alloc.cu compiled for the CPU emulation (qk_cuda_emu.h).
#include "../managed_alloc.cu"
