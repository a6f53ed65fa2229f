// bfloat16 matmuls on Intel's AMX tile unit, for `bf16_mm` (cpu.cpp) where the CPU and the OS allow it.
#pragma once

#include <torch/extension.h>

// Whether this process may run AMX's bfloat16 instructions: the CPU has them and the kernel granted the
// process the tile state (Linux asks each process to request it, once), unless MODELCODE_NO_AMX=1.
bool amx_ready();

// y (M, N) = x (M, K) times the weight in `bf16_mm`'s layout (N/64, K/2, 4, 16, 2), for K a multiple of 32.
void amx_bf16_mm(const at::BFloat16* x, const uint8_t* w, at::BFloat16* y, int64_t M, int64_t K, int64_t N);
// The same for one block of 64 outputs, its weights (K/2, 4, 16, 2) at wb: y (M, 64), rows ldy apart. On the
// calling thread.
void amx_bf16_block(const at::BFloat16* x, const uint8_t* wb, at::BFloat16* y, int64_t M, int64_t K, int64_t ldy);
