// The matmul operations that each build of the kernels provides (cpu.cpp with AVX-512, cpu_avx2.cpp with AVX2),
// in the weight layouts of cpu.cpp; checked and registered with PyTorch once, in ops.cpp.
#pragma once

#include <immintrin.h>
#include <torch/extension.h>

constexpr int64_t kBlocks = 4;  // blocks of 16 outputs per 64-output block of every layout

// x (M, K) bfloat16, w (N/64, K/2, 4, 16, 2) bfloat16 -> (M, N) bfloat16.
torch::Tensor bf16_mm(const torch::Tensor& x, const torch::Tensor& w);
// x (M, K) bfloat16, w (N/64, K/4, 4, 16, 4) uint8 (128 + q), scales (N,) bfloat16 -> (M, N) bfloat16.
torch::Tensor int8_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales);
// x (M, K) bfloat16, w (N/64, K/8, 4, 64) uint8, sz (N/64, K/gs, 2, 64) bfloat16 -> (M, N) bfloat16.
torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz, int64_t group_size);
// Whether bf16_mm runs batches and prompts on AMX (amx.cpp); never in the AVX2 build.
bool amx_ready();

// The hardware prefetcher alone leaves the loads waiting on memory (but see cpu.cpp's kBf16Prefetch); asking ahead
// keeps them in flight. The int8 and int4 kernels spend longer on each line, so they ask further ahead (int8 on one
// thread: +20-30%).
constexpr int64_t kQuantizedPrefetchBytes = 8192;
// ... as non-temporal data on AMD's cores: weights read once per step, kept out of the outer caches, no longer evict
// what the rest of the decoding step runs on (Zen 5, compiled llama-1b int8 and int4: ~1.05-1.1x faster per step).
// On Intel's server cores a non-temporal line skips L2 and the stream runs at half speed (llama-1b's int8 shapes:
// 10 against 22 GB/s), so there they are asked for into every level. cpu.py chooses by the CPU's vendor, through
// MODELCODE_QUANTIZED_PREFETCH ("nta" or "t0"), read once when the library loads (ops.cpp).
extern const bool kQuantizedNonTemporal;
inline void prefetch_quantized(const void* p) {
  if (kQuantizedNonTemporal) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_NTA);
  else _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

// The operations' argument checks, shared by both builds.
void check_bf16_mm(const torch::Tensor& x, const torch::Tensor& w);
void check_int8_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales);
void check_int4_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz, int64_t group_size);
