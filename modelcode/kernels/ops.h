// The matmul operations that each build of the kernels provides (cpu.cpp with AVX-512, cpu_avx2.cpp with AVX2),
// in the weight layouts of cpu.cpp; checked and registered with PyTorch once, in ops.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

constexpr int64_t kBlocks = 4;  // blocks of 16 outputs per 64-output block of every layout

// bfloat16 with several rows: a 64-output block's weights are taken a run of this many input pairs at a time
// (32 KB), which each group of rows then reads from cache; the first group asks for the next run as it goes,
// so that it streams in from memory while the later groups compute. Much longer runs leave the memory idle
// during those groups (256 KB runs: llama-1b's matmuls at 16 rows ~1.2x slower).
constexpr int64_t kRunPairs = 128;
// Many rows (a long prompt) go this many at a time, so that the rows' activations that each block of weights
// meets stay in cache too (one llama-1b layer's matmuls at 2048 rows: ~1.1x faster than in one tile).
constexpr int64_t kTileRows = 128;

// bfloat16: the loop of both builds over rows, blocks and runs. `dot(xm, rows, wb, c0, c1, sums, ym)` takes as
// many of the `rows` rows from xm as it does at once, over the block's input pairs c0..c1: their sums (rows, 64)
// float32 carried from one run to the next (from zero at c0 = 0), the last run writing them to ym (rows N apart,
// null before) rounded to bfloat16; it returns how many rows it took.
template <class Dot>
void bf16_runs(const at::BFloat16* xp, const uint8_t* wp, at::BFloat16* yp, int64_t M, int64_t K, int64_t N,
               Dot dot) {
  for (int64_t t0 = 0; t0 < M; t0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, M - t0);
    at::parallel_for(0, N / 64, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> sums(rows * 64);
      for (int64_t nb = begin; nb < end; ++nb) {
        const uint8_t* wb = wp + nb * 128 * K;  // read from memory once, a run at a time, then from cache
        for (int64_t c0 = 0; c0 < K / 2; c0 += kRunPairs) {
          const int64_t c1 = std::min(K / 2, c0 + kRunPairs);
          for (int64_t m = t0; m < t0 + rows;) {
            at::BFloat16* ym = c1 == K / 2 ? yp + m * N + nb * 64 : nullptr;
            const int64_t took = dot(xp + m * K, t0 + rows - m, wb, c0, c1, sums.data() + (m - t0) * 64, ym);
            m += took;
          }
        }
      }
    });
  }
}

// int8 and int4 with a few rows: f(nb, m) for every 64-output block nb and row m, the blocks split among the
// threads, each block's weights read from memory for its first row and from cache for the others.
template <class F>
void blocks_by_rows(int64_t N, int64_t M, F f) {
  at::parallel_for(0, N / 64, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb)
      for (int64_t m = 0; m < M; ++m) f(nb, m);
  });
}

// x (M, K) bfloat16, w (N/64, K/2, 4, 16, 2) bfloat16 -> (M, N) bfloat16.
torch::Tensor bf16_mm(const torch::Tensor& x, const torch::Tensor& w);
// x (M, K) bfloat16, w (N/64, K/4, 4, 16, 4) uint8 (128 + q), scales (N,) bfloat16 -> (M, N) bfloat16.
torch::Tensor int8_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales);
// x (M, K) bfloat16, w (N/64, K/8, 4, 64) uint8, sz (N/64, K/gs, 2, 64) bfloat16 -> (M, N) bfloat16.
torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz, int64_t group_size);
// The same int8 and int4 products for many rows (a prompt), by way of bfloat16 weights (see cpu.cpp).
torch::Tensor int8_prefill_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales);
torch::Tensor int4_prefill_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz,
                              int64_t group_size);
// w and sz as int4_mm takes them -> the (N, K) weight they hold, in sz's dtype (ops.cpp).
torch::Tensor int4_dequantize(const torch::Tensor& w, const torch::Tensor& sz, int64_t group_size);
// Whether bf16_mm runs batches and prompts on AMX (amx.cpp); never in the AVX2 build.
bool amx_ready();

// The hardware prefetcher alone leaves the loads waiting on memory (but see cpu.cpp's kBf16Prefetch); asking ahead
// keeps them in flight. How, and how far ahead, suits each family of cores differently (see BENCHMARKS.md):
// - AMD's Zen: 8 KB ahead, as non-temporal data: weights read once per step, kept out of the outer caches, no longer
//   evict what the rest of the decoding step runs on (Zen 5, compiled llama-1b int8 and int4: ~1.05-1.1x faster
//   per step than into every level).
// - Intel's server cores: there a non-temporal line skips L2 and the stream runs at about half speed, and a core
//   has few lines to L1 in flight, so the int4 kernel asks 2 KB ahead into L1 and the int8 kernel, which spends
//   less time on each line, 4 KB ahead into L2 (compiled llama-1b on an Intel Xeon: int4 1.2x and int8 1.23x the
//   speed of both 8 KB into L1).
// cpu.py chooses by the CPU, through MODELCODE_INT8_PREFETCH and MODELCODE_INT4_PREFETCH ("nta:8192",
// "t0:2048", ...: the hint and the bytes ahead), read once when the library loads (ops.cpp).
struct Prefetch {
  int hint;       // _MM_HINT_NTA, _MM_HINT_T0 or _MM_HINT_T1
  int64_t bytes;  // how far ahead of the line being read
};
extern const Prefetch kInt8Prefetch, kInt4Prefetch;
inline void prefetch_quantized(const Prefetch& how, const uint8_t* line) {
  const char* p = reinterpret_cast<const char*>(line + how.bytes);
  if (how.hint == _MM_HINT_NTA) _mm_prefetch(p, _MM_HINT_NTA);
  else if (how.hint == _MM_HINT_T0) _mm_prefetch(p, _MM_HINT_T0);
  else _mm_prefetch(p, _MM_HINT_T1);
}

// The operations' argument checks, shared by both builds.
void check_bf16_mm(const torch::Tensor& x, const torch::Tensor& w);
void check_int8_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales);
void check_int4_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz, int64_t group_size);
