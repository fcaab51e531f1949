// gemv_4bit.cu compiled for the CPU emulation (qk_cuda_emu.h).
#include "../gemv_4bit.cu"
