// common.cu compiled for the CPU emulation (qk_cuda_emu.h).
#include "../common.cu"
