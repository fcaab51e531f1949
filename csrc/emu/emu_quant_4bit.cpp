// quant_4bit.cu compiled for the CPU emulation (qk_cuda_emu.h).
#include "../quant_4bit.cu"
