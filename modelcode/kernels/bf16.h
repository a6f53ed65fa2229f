// bfloat16 <-> float32 for 16 values at a time, shared by cpu.cpp and attention.cpp.
#pragma once

#include <immintrin.h>
#include <torch/extension.h>

inline __m512 load_bf16(const at::BFloat16* p) {  // 16 bfloat16 -> 16 float32: the bits, shifted up
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

inline void store_bf16(at::BFloat16* y, __m512 v) {  // round to nearest even, as PyTorch's conversion
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh(v));
}
