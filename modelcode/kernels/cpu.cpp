// Matmul kernels for decoding on CPUs with AVX512-BF16 and VNNI (cpu_avx2.cpp: the same for AVX2): bfloat16
// weights (`bf16_mm`), int8 weights (`int8_mm`) and int4 weights (`int4_mm`), times bfloat16 activations: any
// number of rows for bfloat16, a few for int8 and int4.
//
// bfloat16: decoding multiplies one row of activations by every weight once, so the weights must stream
// from memory at full speed. Laid out so that each thread reads its weights front to back, 64 bytes per
// `vdpbf16ps` (16 outputs x a pair of inputs), with the next ones requested ahead, they stream as fast as
// a plain sum over memory does (llama-1b's shapes: 30-56 GB/s where the one-row F.linear reads 15-24; see
// BENCHMARKS.md). With more rows (a batch), each weight line loaded serves 4 rows at once, and a block's weights,
// read from memory once, 32 KB at a time, are read from cache by every further group of 4 rows while the next
// 32 KB stream in, so a batch costs little more than one row. From 5 rows on, a CPU with AMX does the same matmul
// on its tile unit instead (amx.cpp), several times faster once the rows make it bound by arithmetic.
//
// int8: converting int8 codes to floating point costs two instructions per 16 of them, more than two cores can do
// at memory speed; so instead the activations become integers, once per call, and `vpdpbusd` multiplies 64 codes by
// 64 activation bytes per instruction, each 4 of them summed into an int32 lane. A row x (bfloat16: 8 significant
// bits) is scaled by the power of two 2^e that brings its largest |x_k| to [2^21, 2^22) and rounded: exact for
// every input within 2^14 of the largest, the others rounded at 2^-22 of it, far below bfloat16's rounding of the
// output. Such an integer is three signed bytes d_j (x 2^e = sum_j 2^(8j) d_j), and the instruction wants its other
// operand unsigned: the codes, stored offset to 128 + q (their top bit flipped when packed, so that the loop does no
// more than load and multiply: on an Intel Xeon one xor per line made it ~1.1x slower). So
//
//   sum_k x_k q_nk = 2^-e * (sum_j 2^(8j) sum_k d_jk (128 + q_nk)  -  128 sum_k x_k 2^e)
//
// is computed exactly (three `vpdpbusd` per 64 codes, the rest in float64), then times the row's scale.
// The weight is laid out with 16 outputs in the lanes (below), so each lane sums one output and no vector is ever
// reduced across its lanes. PyTorch's `_weight_int8pack_mm` converts each code to float instead, and streams the
// weights about half as fast (see BENCHMARKS.md).
//
// int4: the arithmetic must keep up with memory too. PyTorch's int4 CPU kernel converts every weight to
// float and spends two multiply-adds on it, and reads its scales with a stride of a whole row of outputs;
// on a 2-core machine it streams 12-16 GB/s of a ~27 GB/s memory. Here one `vdpbf16ps` does 32
// multiply-adds straight on the codes (bfloat16 pairs summed into float32 lanes), a group's scale and zero
// are applied once per group, and weights, scales and zeros are each read front to back:
//
//   sum_k x_k w_nk = s_ng * sum_k x_k (q_nk - 8) + z_ng * sum_k x_k          (k in group g)
//
// with w = (q - 8) * s + z, the format of linear.py. A 4-bit code q becomes the bfloat16 number 128 + q by
// or-ing it into the bits of 128.0 (bfloat16 has 8 significant bits, so 128..143 are exact), hence the
// 136 = 128 + 8 subtracted per group. The products are exact and summed in float32, as a bfloat16 matmul on
// the dequantized weight would be, up to the order of the additions.
//
// Layouts (written by `pack_bf16`, `pack_int8` and `pack_int4` in cpu.py), per 64 outputs (4 blocks of 16), front
// to back:
//   bf16_mm: weights (N/64, K/2, 4, 16, 2) bfloat16: for each pair of inputs and each block, 16 outputs'
//     values of both inputs, the pairs `vdpbf16ps` multiplies with a broadcast pair of activations.
// int4_mm:
//   weights (N/64, K/8, 4, 64) uint8: for each run of 8 inputs k = 8c..8c+7 and each block, 64 bytes. Read as
//     32 16-bit words, word 2i+p's four nibbles h = 0..3 hold output i's codes of inputs 8c+2h+p. So nibble
//     h of every word, or-ed into 128.0 (see above), is 16 lanes of (input 8c+2h, 8c+2h+1) pairs: the pairs
//     `vdpbf16ps` multiplies with a broadcast pair of activations, four of them per 64-byte load.
//   scales and zeros (N/64, K/gs, 2, 64) bfloat16.
// int8_mm: weights (N/64, K/4, 4, 16, 4) uint8, 128 + q: for each run of 4 inputs and each block, 64 bytes: output i's codes
//   of those 4 inputs in lane i, what `vpdpbusd` multiplies with 4 activation bytes broadcast to every lane.

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <torch/extension.h>

#include "amx.h"
#include "bf16.h"
#include "ops.h"

namespace {

// bfloat16 asks a run ahead into L2 (T1), except on AMD's Zen 4, whose hardware prefetcher alone streams faster
// (see BENCHMARKS.md): cpu.py chooses by the CPU,
// through MODELCODE_BF16_PREFETCH ("t1" or "none"), read once when the library loads.
const bool kBf16Prefetch = [] {
  const char* v = std::getenv("MODELCODE_BF16_PREFETCH");
  return !(v && std::string(v) == "none");
}();

constexpr int64_t kPrefetchBytes = kRunPairs * 4 * 64;  // bfloat16 asks a run ahead (see kRunPairs, ops.h)
// From this many rows on, AMX (amx.cpp) where the CPU has it: fewer rows are bound by reading the weights, which
// the vector kernel below does as fast.
constexpr int64_t kAmxMinRows = 5;

// bfloat16: R rows of x (R, K) times the 64 outputs whose weights start at w, over the input pairs c0..c1:
// sums (R, 64) float32 carry the dot products from one run of pairs to the next (from zero at c0 = 0), and
// the last run writes them to y (R, 64, rows ldy apart) instead, rounded to bfloat16. Each weight line,
// once loaded, serves all R rows. A row's sums are added in the same order whatever R and the runs (pair
// after pair, one float32 sum per output), so an output does not depend on what else is in the batch.
template <int R>
void dot_64_bf16(const at::BFloat16* x, int64_t K, const uint8_t* w, int64_t c0, int64_t c1, float* sums,
                 at::BFloat16* y, int64_t ldy) {
  __m512 acc[R][kBlocks];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < kBlocks; ++b) acc[r][b] = c0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(sums + 64 * r + 16 * b);
  for (int64_t c = c0; c < c1; ++c) {  // pair c: 256 bytes, 4 lines
    const uint8_t* wc = w + c * 64 * kBlocks;
    for (int line = 0; kBf16Prefetch && line < kBlocks; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(wc + kPrefetchBytes + 64 * line), _MM_HINT_T1);
    }
    __m512bh pair[R];  // inputs 2c, 2c+1 of each row, broadcast to every lane
    for (int r = 0; r < R; ++r) pair[r] = (__m512bh)_mm512_set1_epi32(reinterpret_cast<const int32_t*>(x + r * K)[c]);
    for (int b = 0; b < kBlocks; ++b) {
      const __m512bh v = (__m512bh)_mm512_loadu_si512(wc + 64 * b);
      for (int r = 0; r < R; ++r) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], pair[r], v);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < kBlocks; ++b) {
      if (y) store_bf16(y + r * ldy + 16 * b, acc[r][b]);
      else _mm512_storeu_ps(sums + 64 * r + 16 * b, acc[r][b]);
    }
  }
}

// int8: one row's activations as three signed bytes per input (`digits`, see int8_digits) against the 64 outputs
// whose weights start at w, with their scales s: y (64,). `vpdpbusd` multiplies the 64 bytes of a line of weights,
// 128 + q, by 4 bytes of one digit of the activations broadcast to every lane: so a line takes 3 `vpdpbusd`, one per
// digit, each into its own int32 sums of 16 outputs.
void dot_64_int8(const int8_t* digits, int64_t digit_sum, double unit, const uint8_t* w, int64_t K,
                 const at::BFloat16* s, at::BFloat16* y) {
  __m512i acc[kBlocks][3];  // [block][digit]: 12 sums in flight
  for (int b = 0; b < kBlocks; ++b)
    for (int j = 0; j < 3; ++j) acc[b][j] = _mm512_setzero_si512();
  for (int64_t c = 0; c < K / 4; ++c) {  // inputs 4c .. 4c+3: 4 lines
    const uint8_t* wc = w + c * 64 * kBlocks;
    for (int line = 0; line < kBlocks; ++line) {
      prefetch_quantized(kInt8Prefetch, wc + 64 * line);
    }
    const int8_t* d = digits + 3 * (c / 16 * 64) + c % 16 * 4;  // see int8_digits for the layout
    __m512i digit[3];
    for (int j = 0; j < 3; ++j) digit[j] = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(d + 64 * j));
    for (int b = 0; b < kBlocks; ++b) {
      const __m512i v = _mm512_loadu_si512(wc + 64 * b);  // 128 + q, unsigned
      for (int j = 0; j < 3; ++j) acc[b][j] = _mm512_dpbusd_epi32(acc[b][j], v, digit[j]);
    }
  }
  // sum_j 2^(8j) acc_j - 128 sum_k x_k 2^e, exactly in float64 (below 2^53), times 2^-e, then the scale
  const __m512d offset = _mm512_set1_pd(-128.0 * static_cast<double>(digit_sum)), down = _mm512_set1_pd(unit);
  for (int b = 0; b < kBlocks; ++b) {
    __m256 half[2];
    for (int h = 0; h < 2; ++h) {  // 8 outputs at a time
      __m512d t = offset;
      for (int j = 0; j < 3; ++j) {
        const __m256i part = h ? _mm512_extracti64x4_epi64(acc[b][j], 1) : _mm512_castsi512_si256(acc[b][j]);
        t = _mm512_fmadd_pd(_mm512_cvtepi32_pd(part), _mm512_set1_pd(static_cast<double>(1 << (8 * j))), t);
      }
      half[h] = _mm512_cvtpd_ps(_mm512_mul_pd(t, down));
    }
    const __m512 v = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(half[0])),
                                                         _mm256_castps_pd(half[1]), 1));
    store_bf16(y + 16 * b, _mm512_mul_ps(v, load_bf16(s + 16 * b)));
  }
}

// One row of activations x (K,) as integers: x_k 2^e rounded, 2^e the power of two that puts max |x_k| in
// [2^21, 2^22), so that every input within 2^14 of the largest is exact (bfloat16 has 8 significant bits) and
// the rest is rounded at 2^-22 of the largest, far below bfloat16's rounding of the output. Each integer is
// written as three signed bytes, d0 + 2^8 d1 + 2^16 d2 (d0, d1 in -128..127, d2 in -64..64): digits (3K,) holds,
// per 64 inputs, their 64 d0, then the d1, then the d2. Returns 2^-e (NaN if x holds a NaN or an infinity), and
// the sum of the integers in `sum`.
double int8_digits(const at::BFloat16* x, int8_t* digits, int64_t K, int64_t* sum) {
  *sum = 0;
  __m512 amax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 v = load_bf16(x + k);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  const float largest = _mm512_reduce_max_ps(amax);
  if (nan || !std::isfinite(largest)) return std::nan("");  // the outputs too: NaN in, NaN out
  int e2 = 0;
  std::frexp(largest, &e2);  // largest in [2^(e2-1), 2^e2)
  const int e = 22 - std::max(e2, -100);  // a row of tiny values (below 2^-100) counts as zeros
  const __m512 up = _mm512_set1_ps(std::ldexp(1.0f, e));  // exact: a power of two
  __m512i totals[3] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};  // per digit
  for (int64_t k = 0; k < K; k += 16) {
    __m512i d[3];
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load_bf16(x + k), up));  // rounded to nearest
    d[0] = _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24);  // the low byte, sign-extended
    const __m512i rest = _mm512_srai_epi32(_mm512_sub_epi32(v, d[0]), 8);
    d[1] = _mm512_srai_epi32(_mm512_slli_epi32(rest, 24), 24);
    d[2] = _mm512_srai_epi32(_mm512_sub_epi32(rest, d[1]), 8);
    int8_t* p = digits + 3 * (k / 64 * 64) + k % 64;
    for (int j = 0; j < 3; ++j) {
      totals[j] = _mm512_add_epi32(totals[j], d[j]);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 64 * j), _mm512_cvtepi32_epi8(d[j]));
    }
  }
  for (int j = 0; j < 3; ++j) *sum += static_cast<int64_t>(_mm512_reduce_add_epi32(totals[j])) << (8 * j);
  return std::ldexp(1.0, -e);
}

// int4: a 64-byte line of codes as the 4 vectors of bfloat16 pairs `vdpbf16ps` takes: nibble h of every word,
// or-ed into 128.0 (see the layout above).
inline void int4_pairs(__m512i v, __m512bh p[4]) {
  const __m512i low = _mm512_set1_epi16(0x0F), bf16_128 = _mm512_set1_epi16(0x4300);
  p[0] = (__m512bh)_mm512_or_si512(_mm512_and_si512(v, low), bf16_128);
  p[1] = (__m512bh)_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), bf16_128);
  p[2] = (__m512bh)_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 8), low), bf16_128);
  p[3] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 12), bf16_128);
}

// int4: 16 outputs so far plus one group's: its sums of x_k (128 + q_k) over the even and odd pairs, its scales
// and zeros, and the group's sum of activations.
inline __m512 add_group(__m512 acc, __m512 lo_sum, __m512 hi_sum, const at::BFloat16* scales,
                        const at::BFloat16* zeros, float xsum) {
  const __m512 centered = _mm512_sub_ps(_mm512_add_ps(lo_sum, hi_sum), _mm512_set1_ps(136.0f * xsum));  // x (q - 8)
  acc = _mm512_fmadd_ps(load_bf16(scales), centered, acc);
  return _mm512_fmadd_ps(load_bf16(zeros), _mm512_set1_ps(xsum), acc);
}

// int4: one row x (K,) against the 64 outputs whose weights start at w and scales at sz: y (64,).
void dot_64(const at::BFloat16* x, const float* xsum, const uint8_t* w, const at::BFloat16* sz, at::BFloat16* y,
            int64_t K, int64_t gs) {
  const int32_t* pairs = reinterpret_cast<const int32_t*>(x);  // bfloat16 inputs, two at a time
  __m512 acc[kBlocks];
  for (int b = 0; b < kBlocks; ++b) acc[b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / gs; ++g) {
    __m512 lo_sum[kBlocks], hi_sum[kBlocks];
    for (int b = 0; b < kBlocks; ++b) lo_sum[b] = hi_sum[b] = _mm512_setzero_ps();
    for (int64_t c = g * gs / 8; c < (g + 1) * gs / 8; ++c) {  // runs of 8 inputs: 64 bytes per block
      __m512bh xh[4];
      for (int h = 0; h < 4; ++h) xh[h] = (__m512bh)_mm512_set1_epi32(pairs[4 * c + h]);  // inputs 8c+2h, +1
      const uint8_t* wc = w + c * 64 * kBlocks;
      for (int line = 0; line < kBlocks; ++line) {
        prefetch_quantized(kInt4Prefetch, wc + 64 * line);
      }
      for (int b = 0; b < kBlocks; ++b) {
        __m512bh p[4];
        int4_pairs(_mm512_loadu_si512(wc + 64 * b), p);
        lo_sum[b] = _mm512_dpbf16_ps(lo_sum[b], xh[0], p[0]);
        hi_sum[b] = _mm512_dpbf16_ps(hi_sum[b], xh[1], p[1]);
        lo_sum[b] = _mm512_dpbf16_ps(lo_sum[b], xh[2], p[2]);
        hi_sum[b] = _mm512_dpbf16_ps(hi_sum[b], xh[3], p[3]);
      }
    }
    for (int b = 0; b < kBlocks; ++b) {
      acc[b] = add_group(acc[b], lo_sum[b], hi_sum[b], sz + 128 * g + 16 * b, sz + 128 * g + 64 + 16 * b, xsum[g]);
    }
  }
  for (int b = 0; b < kBlocks; ++b) store_bf16(y + 16 * b, acc[b]);
}

// int4, 4 rows at once (a batch), against half of a 64-output block (its blocks 2 half and 2 half + 1): each line of
// codes is unpacked once for all 4 rows, where `dot_64` unpacks it again for every row. Each row's sums are added in
// the order `dot_64` adds them, so its outputs are the same bits (llama-1b's matmuls at 4-16 rows: ~1.25x faster
// than one row at a time).
constexpr int kRowsAtOnce = 4;
void dot_32_rows(const at::BFloat16* const* x, const float* const* xsum, const uint8_t* w, const at::BFloat16* sz,
                 at::BFloat16* const* y, int64_t K, int64_t gs, int half) {
  constexpr int R = kRowsAtOnce;
  float acc[R][32] = {};  // the rows' outputs so far, updated once per group (registers hold the group's sums)
  for (int64_t g = 0; g < K / gs; ++g) {
    __m512 lo_sum[R][2], hi_sum[R][2];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < 2; ++b) lo_sum[r][b] = hi_sum[r][b] = _mm512_setzero_ps();
    for (int64_t c = g * gs / 8; c < (g + 1) * gs / 8; ++c) {  // runs of 8 inputs: 64 bytes per block
      const uint8_t* wc = w + c * 64 * kBlocks + 128 * half;
      for (int line = 0; line < 2; ++line) {
        prefetch_quantized(kInt4Prefetch, wc + 64 * line);
      }
      for (int b = 0; b < 2; ++b) {
        __m512bh p[4];
        int4_pairs(_mm512_loadu_si512(wc + 64 * b), p);
        for (int r = 0; r < R; ++r) {
          const int32_t* pairs = reinterpret_cast<const int32_t*>(x[r]) + 4 * c;  // inputs 8c+2h, +1
          lo_sum[r][b] = _mm512_dpbf16_ps(lo_sum[r][b], (__m512bh)_mm512_set1_epi32(pairs[0]), p[0]);
          hi_sum[r][b] = _mm512_dpbf16_ps(hi_sum[r][b], (__m512bh)_mm512_set1_epi32(pairs[1]), p[1]);
          lo_sum[r][b] = _mm512_dpbf16_ps(lo_sum[r][b], (__m512bh)_mm512_set1_epi32(pairs[2]), p[2]);
          hi_sum[r][b] = _mm512_dpbf16_ps(hi_sum[r][b], (__m512bh)_mm512_set1_epi32(pairs[3]), p[3]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int b = 0; b < 2; ++b) {
        const at::BFloat16* s = sz + 128 * g + 16 * (2 * half + b);
        const __m512 a = add_group(_mm512_loadu_ps(acc[r] + 16 * b), lo_sum[r][b], hi_sum[r][b], s, s + 64, xsum[r][g]);
        _mm512_storeu_ps(acc[r] + 16 * b, a);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < 2; ++b) store_bf16(y[r] + 32 * half + 16 * b, _mm512_loadu_ps(acc[r] + 16 * b));
  }
}

// The two bfloat16 halves of each 32-bit lane: lo in the low 16 bits, hi in the high (an input pair of bf16_mm's).
inline __m512i bf16_pairs(__m512 lo, __m512 hi) {
  const __m512i low = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i high = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
  return _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
}

// int8, many rows: one block of 64 outputs' weights (codes wb, scales s) as bfloat16 in `bf16_mm`'s layout, at out
// (K/2, 4, 16, 2): a line of codes is 16 outputs x 4 inputs, the layout's 64 bytes of two input pairs for that block.
// Each code q becomes q s, rounded to bfloat16 as dequantize_int8 rounds it.
void dequantize_int8_block(const uint8_t* wb, const at::BFloat16* s, int64_t K, uint8_t* out) {
  const __m512i flip = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));  // 128 + q -> q, signed
  __m512 scale[kBlocks];
  for (int b = 0; b < kBlocks; ++b) scale[b] = load_bf16(s + 16 * b);
  for (int64_t c = 0; c < K / 4; ++c) {  // inputs 4c .. 4c+3
    for (int b = 0; b < kBlocks; ++b) {
      const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(wb + (c * kBlocks + b) * 64), flip);
      __m512 w[4];  // byte j of each lane, input 4c + j, times the output's scale
      for (int j = 0; j < 4; ++j) {
        w[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * j), 24)), scale[b]);
      }
      for (int h = 0; h < 2; ++h) {
        _mm512_storeu_si512(out + ((2 * c + h) * kBlocks + b) * 64, bf16_pairs(w[2 * h], w[2 * h + 1]));
      }
    }
  }
}

// int4, many rows: one block of 64 outputs' weights (wb, scales and zeros sb) as bfloat16 in `bf16_mm`'s layout, at
// out (K/2, 4, 16, 2): each pair vector of `int4_pairs` is already 16 outputs x an input pair, the layout's 64 bytes
// for that pair and block; its codes become (q - 8) s + z, rounded to bfloat16 as int4_dequantize rounds them.
void dequantize_int4_block(const uint8_t* wb, const at::BFloat16* sb, int64_t K, int64_t gs, uint8_t* out) {
  const __m512 offset = _mm512_set1_ps(136.0f);  // 128 + 8 (see int4_pairs)
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t g = 0; g < K / gs; ++g) {
    __m512 s[kBlocks], z[kBlocks];
    for (int b = 0; b < kBlocks; ++b) s[b] = load_bf16(sb + 128 * g + 16 * b), z[b] = load_bf16(sb + 128 * g + 64 + 16 * b);
    for (int64_t c = g * gs / 8; c < (g + 1) * gs / 8; ++c) {
      for (int b = 0; b < kBlocks; ++b) {
        __m512bh p[4];
        int4_pairs(_mm512_loadu_si512(wb + c * 64 * kBlocks + 64 * b), p);
        for (int h = 0; h < 4; ++h) {  // input pair 4c + h: 128 + q of its even input in each low half, odd in high
          const __m512i v = (__m512i)p[h];
          const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
          const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));
          _mm512_storeu_si512(out + ((4 * c + h) * kBlocks + b) * 64,
                              bf16_pairs(_mm512_fmadd_ps(_mm512_sub_ps(even, offset), s[b], z[b]),
                                         _mm512_fmadd_ps(_mm512_sub_ps(odd, offset), s[b], z[b])));
        }
      }
    }
  }
}

// bfloat16: whether M rows of K inputs go to AMX (amx.cpp) rather than the vector kernel.
bool amx_takes(int64_t M, int64_t K) { return M >= kAmxMinRows && K % 32 == 0 && amx_ready(); }

// bfloat16 on the vector kernel: up to 4 of the `rows` rows from xm at once (each weight line, once loaded, serves
// them all), as `dot_64_bf16` takes them; returns how many it took.
int64_t dot_64_bf16_rows(const at::BFloat16* xm, int64_t rows, int64_t K, const uint8_t* wb, int64_t c0, int64_t c1,
                         float* sums, at::BFloat16* ym, int64_t ldy) {
  switch (std::min<int64_t>(4, rows)) {
    case 1: dot_64_bf16<1>(xm, K, wb, c0, c1, sums, ym, ldy); return 1;
    case 2: dot_64_bf16<2>(xm, K, wb, c0, c1, sums, ym, ldy); return 2;
    case 3: dot_64_bf16<3>(xm, K, wb, c0, c1, sums, ym, ldy); return 3;
    default: dot_64_bf16<4>(xm, K, wb, c0, c1, sums, ym, ldy); return 4;
  }
}

// bfloat16, every row of x (M, K) times one block's weights wb in bf16_mm's layout: y (M, 64), rows ldy apart, as
// bf16_mm computes them (AMX or the vector kernel); on the calling thread.
void bf16_block_all_rows(const at::BFloat16* x, const uint8_t* wb, at::BFloat16* y, int64_t M, int64_t K,
                         int64_t ldy) {
  if (amx_takes(M, K)) {
    amx_bf16_block(x, wb, y, M, K, ldy);
    return;
  }
  for (int64_t m = 0; m < M;) {  // the whole of K in one run (the weights are in cache): no carried sums
    m += dot_64_bf16_rows(x + m * K, M - m, K, wb, 0, K / 2, nullptr, y + m * ldy, ldy);
  }
}

}  // namespace

torch::Tensor bf16_mm(const torch::Tensor& x, const torch::Tensor& w) {
  check_bf16_mm(x, w);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * 64;
  const torch::Tensor xc = x.contiguous();
  torch::Tensor y = torch::empty({M, N}, x.options());
  const auto* xp = xc.data_ptr<at::BFloat16>();
  const auto* wp = reinterpret_cast<const uint8_t*>(w.data_ptr<at::BFloat16>());
  auto* yp = y.data_ptr<at::BFloat16>();
  if (amx_takes(M, K)) {
    amx_bf16_mm(xp, wp, yp, M, K, N);
    return y;
  }
  bf16_runs(xp, wp, yp, M, K, N, [&](const at::BFloat16* xm, int64_t rows, const uint8_t* wb, int64_t c0, int64_t c1,
                                     float* sums, at::BFloat16* ym) {
    return dot_64_bf16_rows(xm, rows, K, wb, c0, c1, sums, ym, N);
  });
  return y;
}

torch::Tensor int8_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales) {
  check_int8_mm(x, w, scales);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * 64;
  const torch::Tensor xc = x.contiguous();
  std::vector<int8_t> digits(M * 3 * K);
  std::vector<double> units(M);
  std::vector<int64_t> sums(M);
  for (int64_t m = 0; m < M; ++m) {
    units[m] = int8_digits(xc.data_ptr<at::BFloat16>() + m * K, &digits[m * 3 * K], K, &sums[m]);
  }
  torch::Tensor y = torch::empty({M, N}, x.options());
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = scales.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  blocks_by_rows(N, M, [&](int64_t nb, int64_t m) {
    dot_64_int8(&digits[m * 3 * K], sums[m], units[m], wp + nb * 64 * K, K, sp + nb * 64, yp + m * N + nb * 64);
  });
  return y;
}

torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz, int64_t group_size) {
  check_int4_mm(x, w, sz, group_size);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * 64;
  const int64_t groups = K / group_size;
  const torch::Tensor xc = x.contiguous();
  const auto* xp = xc.data_ptr<at::BFloat16>();
  std::vector<float> xsum(M * groups);  // each group's sum of activations, for its zero
  for (int64_t i = 0; i < M * groups; ++i) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t k = 0; k < group_size; k += 16) s = _mm512_add_ps(s, load_bf16(xp + i * group_size + k));
    xsum[i] = _mm512_reduce_add_ps(s);
  }
  torch::Tensor y = torch::empty({M, N}, x.options());
  const float* xsp = xsum.data();
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = sz.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, N / 64, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {  // the block's weights are read from memory once, then from cache
      const uint8_t* wb = wp + nb * 32 * K;
      const at::BFloat16* sb = sp + nb * 128 * groups;
      int64_t m = 0;
      for (; m + kRowsAtOnce <= M; m += kRowsAtOnce) {
        const at::BFloat16* xr[kRowsAtOnce];
        const float* sr[kRowsAtOnce];
        at::BFloat16* yr[kRowsAtOnce];
        for (int r = 0; r < kRowsAtOnce; ++r) {
          xr[r] = xp + (m + r) * K, sr[r] = xsp + (m + r) * groups, yr[r] = yp + (m + r) * N + nb * 64;
        }
        for (int half = 0; half < 2; ++half) dot_32_rows(xr, sr, wb, sb, yr, K, group_size, half);
      }
      for (; m < M; ++m) dot_64(xp + m * K, xsp + m * groups, wb, sb, yp + m * N + nb * 64, K, group_size);
    }
  });
  return y;
}

// int8 and int4, many rows (a prompt): arithmetic, not reading the weights, bounds it, and the vector kernels, which
// unpack every code again for each row or 4 rows, lose to bfloat16's. So each thread takes a 64-output block at a
// time, dequantizes its weights to bfloat16 in bf16_mm's layout (`dequantize(nb, out)`: 64 x K, 256 KB at K = 2048,
// which stays in L2), and multiplies every row by them as bf16_mm does (AMX where the CPU has it): the weights are
// read once, and never written out whole.
template <class Dequantize>
torch::Tensor by_dequantized_blocks(const torch::Tensor& x, int64_t N, Dequantize dequantize) {
  const int64_t M = x.size(0), K = x.size(1);
  const torch::Tensor xc = x.contiguous();
  torch::Tensor y = torch::empty({M, N}, x.options());
  const auto* xp = xc.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, N / 64, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> block(128 * K);  // one block's weights as bfloat16
    for (int64_t nb = begin; nb < end; ++nb) {
      dequantize(nb, block.data());
      bf16_block_all_rows(xp, block.data(), yp + nb * 64, M, K, N);
    }
  });
  return y;
}

torch::Tensor int8_prefill_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales) {
  check_int8_mm(x, w, scales);
  const int64_t K = x.size(1), N = w.size(0) * 64;
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = scales.data_ptr<at::BFloat16>();
  return by_dequantized_blocks(x, N, [&](int64_t nb, uint8_t* out) {
    dequantize_int8_block(wp + nb * 64 * K, sp + nb * 64, K, out);
  });
}

torch::Tensor int4_prefill_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz,
                              int64_t group_size) {
  check_int4_mm(x, w, sz, group_size);
  const int64_t K = x.size(1), N = w.size(0) * 64, groups = K / group_size;
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = sz.data_ptr<at::BFloat16>();
  return by_dequantized_blocks(x, N, [&](int64_t nb, uint8_t* out) {
    dequantize_int4_block(wp + nb * 32 * K, sp + nb * 128 * groups, K, group_size, out);
  });
}
