// blockwise_8bit.cu compiled for the CPU emulation (qk_cuda_emu.h).
#include "../blockwise_8bit.cu"
