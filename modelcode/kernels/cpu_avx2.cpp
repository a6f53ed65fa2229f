// The matmul kernels of cpu.cpp for x86 CPUs with AVX2 and FMA but no AVX-512 (AMD's Zen 1-3, Intel's cores
// without AVX-512): the same operations on the same weight layouts (explained in cpu.cpp), each 64-byte line of
// weights taken as two 32-byte halves of 8 outputs, without AVX512-BF16's `vdpbf16ps` and VNNI's `vpdpbusd`.
//
// bfloat16: a bfloat16 is the top half of a float32, so a 32-bit word of the layout (one output's pair of inputs)
// gives the odd input's weight by masking off its low half and the even one's by shifting it up: two `vfmadd`
// per word, against a float32 broadcast of each activation.
//
// int8 and int4: as in cpu.cpp, the activations become integers, exactly where it matters, and the codes are
// multiplied by them in integers, 16 outputs' worth of codes per 64-byte line:
//   int8: each 32 inputs scaled on their own to [2^12, 2^13) and written as two 7-bit digits, and `vpmaddubsw`
//     multiplies 32 codes (128 + q) by 32 digit bytes and adds pairs of products into 16 bits (2 x 255 x 64 < 2^15:
//     no saturation), which `vpmaddwd` by ones adds into 32 bits, one lane per output.
//   int4: each 32 inputs scaled on their own to [2^13, 2^14) and written as two signed byte digits, and
//     `vpmaddubsw` multiplies 32 code bytes' low (or high) nibbles by 32 digit bytes and adds pairs of products
//     into 16 bits (no more than 2 x 15 x 128 each, so 8 of them add up in 16 bits: a group of 32 inputs), which
//     `vpmaddwd` by ones adds in pairs into 32 bits, so a 32-bit lane sums the 8 codes it holds, all of one output.
// Scaled per 32 inputs, an input within 2^5 (int8) or 2^6 (int4) of its 32's largest is exact (bfloat16 has 8
// significant bits), the rest is rounded at 2^-13 or 2^-14 of it, and an outlier costs the precision of its 31
// neighbours only. Both kernels read their weights from memory once and ask for them ahead as cpu.cpp's do; the
// products are exact, and outputs do not depend on what else is in the batch.

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ops.h"

namespace {


inline __m256 load_bf16x8(const at::BFloat16* p) {  // 8 bfloat16 -> 8 float32: the bits, shifted up
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline void store_bf16x8(at::BFloat16* y, __m256 v) {  // rounded to nearest even, NaN kept, as PyTorch's conversion
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // words 0..7 in the low half
  _mm_storeu_si128(reinterpret_cast<__m128i*>(y), _mm256_castsi256_si128(packed));
}

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline int64_t sum_i32(__m256i v) {  // in 64 bits: 8 lanes of up to 2^29
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  int64_t s = 0;
  for (int32_t l : lanes) s += l;
  return s;
}

inline float sum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// bfloat16: R rows of x against NB of a 64-output block's 4 blocks of 16 outputs, from block b0, over the input
// pairs c0..c1, with sums (R, 64) carried between runs as cpu.cpp's dot_64_bf16 does. Every output's sum is added
// in the same order (pair after pair, even input then odd) whatever R, NB and the runs, so an output does not
// depend on what else is in the batch.
template <int R, int NB>
void dot_bf16(const at::BFloat16* x, int64_t K, const uint8_t* w, int b0, int64_t c0, int64_t c1, float* sums,
              at::BFloat16* y, int64_t ldy) {
  __m256 acc[R][NB][2];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b)
      for (int h = 0; h < 2; ++h) {
        acc[r][b][h] = c0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(sums + 64 * r + 16 * (b0 + b) + 8 * h);
      }
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t c = c0; c < c1; ++c) {  // pair c: 256 bytes, 4 lines
    const uint8_t* wc = w + c * 64 * kBlocks + 64 * b0;
    __m256 even[R], odd[R];  // inputs 2c and 2c+1 of each row, broadcast
    for (int r = 0; r < R; ++r) {
      const int32_t pair = load_i32(x + r * K + 2 * c);
      even[r] = _mm256_castsi256_ps(_mm256_set1_epi32(pair << 16));
      odd[r] = _mm256_castsi256_ps(_mm256_set1_epi32(pair & static_cast<int32_t>(0xFFFF0000u)));
    }
    for (int b = 0; b < NB; ++b) {
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + 64 * b + 32 * h));
        const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        for (int r = 0; r < R; ++r) {
          acc[r][b][h] = _mm256_fmadd_ps(wo, odd[r], _mm256_fmadd_ps(we, even[r], acc[r][b][h]));
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b)
      for (int h = 0; h < 2; ++h) {
        const int64_t at = 16 * (b0 + b) + 8 * h;
        if (y) store_bf16x8(y + r * ldy + at, acc[r][b][h]);
        else _mm256_storeu_ps(sums + 64 * r + at, acc[r][b][h]);
      }
}

// The power of two 2^-e such that 2^e puts max |x_k| of n values (n % 8 == 0) in [2^(top-1), 2^top); NaN where x
// holds a NaN or an infinity (then so do the outputs).
float unit_for(const at::BFloat16* x, int64_t n, int top) {
  __m256 amax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t k = 0; k < n; k += 8) {
    const __m256 v = load_bf16x8(x + k);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, amax);
  float largest = 0;
  for (float l : lanes) largest = std::max(largest, l);
  if (_mm256_movemask_ps(nan) || !std::isfinite(largest)) return std::nanf("");
  int e2 = 0;
  std::frexp(largest, &e2);  // largest in [2^(e2-1), 2^e2)
  return std::ldexp(1.0f, std::max(e2, -100) - top);  // a row of tiny values (below 2^-100) counts as zeros
}

// 8 int32 -> 8 int16 (in range)
inline __m128i to_int16(__m256i v) {
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packs_epi32(v, v), 0x08));
}

// The activations as the int8 and int4 kernels take them: each 32 inputs of a row x (K,) as integers v_k = x_k 2^e
// rounded to nearest, 2^e putting their largest |x_k| in [2^(bits+5), 2^(bits+6)), each written as two signed
// digits of `bits` bits, v = d0 + 2^bits d1 (|d1| <= 64): an input within 2^(bits-2) of its 32's largest is exact
// (bfloat16 has 8 significant bits), the rest rounded at 2^-(bits+6) of it, so an outlier costs the precision of
// its 31 neighbours only. Within each 8 inputs, digit position p holds input order[p].
struct Digits {
  int64_t K;
  std::vector<int8_t> digits;         // per row: the K d0, then the K d1
  std::vector<float> units32;         // per 32 inputs: 2^-e (NaN if they hold a NaN or an infinity)
  std::vector<int32_t> sums32;        // per 32 inputs: the sum of the integers (0 where the unit is NaN)
  std::vector<float> xsum32;          // per 32 inputs: the sum of x

  struct Row {
    const int8_t* digits;
    const float* units32;
    const int32_t* sums32;
    const float* xsum32;
  };
  Row row(int64_t m) const {
    const int64_t r = m * K / 32;
    return {digits.data() + m * 2 * K, units32.data() + r, sums32.data() + r, xsum32.data() + r};
  }
};

Digits to_digits(const torch::Tensor& x, int bits, __m256i order) {
  const int64_t M = x.size(0), K = x.size(1);
  Digits out{K, std::vector<int8_t>(M * 2 * K), std::vector<float>(M * K / 32), std::vector<int32_t>(M * K / 32),
             std::vector<float>(M * K / 32)};
  const auto* xp = x.data_ptr<at::BFloat16>();
  const int shift = 32 - bits;
  for (int64_t m = 0; m < M; ++m) {
    int8_t* digits = out.digits.data() + m * 2 * K;
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
      const int64_t i = (m * K + k0) / 32;
      const float unit = out.units32[i] = unit_for(xp + m * K + k0, 32, bits + 6);
      const __m256 up = _mm256_set1_ps(std::isnan(unit) ? 0.0f : 1.0f / unit);  // exact: a power of two
      __m256i vsum = _mm256_setzero_si256();
      __m256 xs = _mm256_setzero_ps();
      for (int64_t k = k0; k < k0 + 32; k += 8) {
        const __m256 xv = load_bf16x8(xp + m * K + k);
        xs = _mm256_add_ps(xs, xv);
        const __m256i v = _mm256_permutevar8x32_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(xv, up)), order);
        vsum = _mm256_add_epi32(vsum, v);
        const __m256i d0 = _mm256_srai_epi32(_mm256_slli_epi32(v, shift), shift);  // the low digit, sign-extended
        const __m256i d1 = _mm256_srai_epi32(_mm256_sub_epi32(v, d0), bits);
        for (int j = 0; j < 2; ++j) {  // 8 int32 -> 8 bytes
          const __m128i w16 = to_int16(j ? d1 : d0);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(digits + j * K + k), _mm_packs_epi16(w16, w16));
        }
      }
      out.sums32[i] = std::isnan(unit) ? 0 : static_cast<int32_t>(sum_i32(vsum));  // < 2^19
      out.xsum32[i] = sum_ps(xs);
    }
  }
  return out;
}

// int8: one row's digits against the 64 outputs whose weights start at w, with their scales s: y (64,). A run of 4
// inputs is a line of 16 outputs' 64 codes per block; `vpmaddubsw` multiplies a half line's 32 codes by 4 bytes of
// a digit broadcast, `vpmaddwd` by ones sums the products into 32-bit lanes, one per output. The two digits' sums
// of one 64-output block would need 16 registers, so per 32 inputs (2 KB of weights) the digits take turns, the
// second reading them from L1, and each run asks for two lines 8 KB ahead. Per 32 inputs the exact sum
//   sum_k v_k q_nk = sum_k d0_k (128 + q_nk) + 2^7 sum_k d1_k (128 + q_nk) - 128 sum_k v_k      (|.| < 2^26)
// is taken to float32 and times 2^-e; the total, times the scale, is the output.
void dot_64_int8(const Digits::Row& a, const uint8_t* w, int64_t K, const at::BFloat16* s, at::BFloat16* y) {
  alignas(32) float total[64] = {};
  alignas(32) int32_t low[64];  // the first digit's sums of a span
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    const uint8_t* ws = w + k0 * 64;
    for (int j = 0; j < 2; ++j) {
      __m256i acc[kBlocks][2];
      for (auto& a : acc) a[0] = a[1] = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {  // inputs k0 + 4c .. +3: 4 lines
        const __m256i digit = _mm256_set1_epi32(load_i32(a.digits + j * K + k0 + 4 * c));
        const uint8_t* wc = ws + c * 64 * kBlocks;
        const uint8_t* ahead = ws + 128 * (8 * j + c);  // the span's 32 lines, 2 a run, asked ahead
        prefetch_quantized(kInt8Prefetch, ahead);
        prefetch_quantized(kInt8Prefetch, ahead + 64);
        for (int b = 0; b < kBlocks; ++b)
          for (int h = 0; h < 2; ++h) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + 64 * b + 32 * h));
            acc[b][h] = _mm256_add_epi32(acc[b][h], _mm256_madd_epi16(_mm256_maddubs_epi16(v, digit), ones));
          }
      }
      const __m256i offset = _mm256_set1_epi32(-128 * a.sums32[k0 / 32]);
      const __m256 unit = _mm256_set1_ps(a.units32[k0 / 32]);
      for (int b = 0; b < kBlocks; ++b)
        for (int h = 0; h < 2; ++h) {
          __m256i* first = reinterpret_cast<__m256i*>(low + 16 * b + 8 * h);
          if (j == 0) {
            _mm256_store_si256(first, _mm256_add_epi32(acc[b][h], offset));
            continue;
          }
          const __m256i sum = _mm256_add_epi32(_mm256_load_si256(first), _mm256_slli_epi32(acc[b][h], 7));
          float* t = total + 16 * b + 8 * h;
          _mm256_store_ps(t, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), unit, _mm256_load_ps(t)));
        }
    }
  }
  for (int n = 0; n < 64; n += 8) store_bf16x8(y + n, _mm256_mul_ps(_mm256_load_ps(total + n), load_bf16x8(s + n)));
}

// int4: digits of 8 bits, in the order the layout's nibbles hold their inputs: a 32-bit lane of a line holds one
// output's 8 codes of inputs 8c..8c+7 (cpu.cpp), its bytes' low nibbles those of inputs 8c, 8c+4, 8c+1, 8c+5 and
// their high nibbles 8c+2, 8c+6, 8c+3, 8c+7, so 4 bytes of digits broadcast meet the low nibbles and the next 4
// the high ones. int8: digits of 7 bits (2 x 255 x 64 < 2^15: no saturation), in input order.
Digits int4_digits(const torch::Tensor& x) { return to_digits(x, 8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); }
Digits int8_digits(const torch::Tensor& x) { return to_digits(x, 7, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }

// int4: one row's digits against the 64 outputs whose weights start at w and scales and zeros at sz: y (64,).
// Per 32 inputs and 8 outputs, the two digits' 16-bit sums are widened and joined exactly in 32 bits (`vpmaddwd`
// by 1 and by 2^8), sum_k v_k q_nk = sum_j 2^(8j) sum_k d_jk q_nk (< 2^23), then times the 32's 2^-e; the codes'
// offset, 8 sum_k x_k, is the same for all outputs, so it is taken off once per group. Per group, times the
// scale, plus the zero times the group's sum of x, as cpu.cpp's add_group.
void dot_64_int4(const Digits::Row& a, const uint8_t* w, const at::BFloat16* sz, at::BFloat16* y, int64_t K,
                 int64_t gs) {
  constexpr int D = 2;
  alignas(32) float acc[64] = {}, sums[64];
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), radix = _mm256_set1_epi16(256);
  for (int64_t g = 0; g < K / gs; ++g) {
    std::memset(sums, 0, sizeof(sums));
    float xsum = 0, offset = 0;
    for (int64_t k0 = g * gs; k0 < (g + 1) * gs; k0 += 32) {
      xsum += a.xsum32[k0 / 32];
      offset += 8.0f * a.sums32[k0 / 32] * a.units32[k0 / 32];
      __m256i d[D][4][2];  // [digit][run][low, high nibbles]: the span's 4 runs of 8 inputs, 4 bytes broadcast
      for (int j = 0; j < D; ++j)
        for (int c = 0; c < 4; ++c)
          for (int n = 0; n < 2; ++n) d[j][c][n] = _mm256_set1_epi32(load_i32(a.digits + j * K + k0 + 8 * c + 4 * n));
      const __m256 unit = _mm256_set1_ps(a.units32[k0 / 32]);
      const uint8_t* ws = w + k0 / 8 * 64 * kBlocks;
      for (int b = 0; b < kBlocks; ++b)
        for (int h = 0; h < 2; ++h) {
          for (int line = 0; line < 2; ++line) {
            prefetch_quantized(kInt4Prefetch, ws + 64 * (4 * b + 2 * h + line));
          }
          __m256i part[D] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
          for (int c = 0; c < 4; ++c) {
            const uint8_t* half = ws + c * 64 * kBlocks + 64 * b + 32 * h;
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half));
            const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            for (int j = 0; j < D; ++j) {
              part[j] = _mm256_add_epi16(part[j], _mm256_add_epi16(_mm256_maddubs_epi16(lo, d[j][c][0]),
                                                                   _mm256_maddubs_epi16(hi, d[j][c][1])));
            }
          }
          const __m256i t = _mm256_add_epi32(_mm256_madd_epi16(part[0], ones), _mm256_madd_epi16(part[1], radix));
          float* sn = sums + 16 * b + 8 * h;
          _mm256_store_ps(sn, _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), unit, _mm256_load_ps(sn)));
        }
    }
    const at::BFloat16* scales = sz + 128 * g;
    const __m256 xs = _mm256_set1_ps(xsum), offsets = _mm256_set1_ps(offset);
    for (int n = 0; n < 64; n += 8) {
      const __m256 centered = _mm256_sub_ps(_mm256_load_ps(sums + n), offsets);
      const __m256 a = _mm256_fmadd_ps(load_bf16x8(scales + n), centered, _mm256_load_ps(acc + n));
      _mm256_store_ps(acc + n, _mm256_fmadd_ps(load_bf16x8(scales + 64 + n), xs, a));
    }
  }
  for (int n = 0; n < 64; n += 8) store_bf16x8(y + n, _mm256_load_ps(acc + n));
}

}  // namespace

bool amx_ready() { return false; }

torch::Tensor bf16_mm(const torch::Tensor& x, const torch::Tensor& w) {
  check_bf16_mm(x, w);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * 64;
  const torch::Tensor xc = x.contiguous();
  torch::Tensor y = torch::empty({M, N}, x.options());
  const auto* xp = xc.data_ptr<at::BFloat16>();
  const auto* wp = reinterpret_cast<const uint8_t*>(w.data_ptr<at::BFloat16>());
  auto* yp = y.data_ptr<at::BFloat16>();
  bf16_runs(xp, wp, yp, M, K, N, [&](const at::BFloat16* xm, int64_t rows, const uint8_t* wb, int64_t c0, int64_t c1,
                                     float* sums, at::BFloat16* ym) -> int64_t {
    if (rows >= 2) {  // two rows at once, half the blocks at a time: 8 sums in registers
      dot_bf16<2, 2>(xm, K, wb, 0, c0, c1, sums, ym, N);
      dot_bf16<2, 2>(xm, K, wb, 2, c0, c1, sums, ym, N);
      return 2;
    }
    dot_bf16<1, 4>(xm, K, wb, 0, c0, c1, sums, ym, N);
    return 1;
  });
  return y;
}

torch::Tensor int8_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales) {
  check_int8_mm(x, w, scales);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * 64;
  const Digits a = int8_digits(x.contiguous());
  torch::Tensor y = torch::empty({M, N}, x.options());
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = scales.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  blocks_by_rows(N, M, [&](int64_t nb, int64_t m) {
    dot_64_int8(a.row(m), wp + nb * 64 * K, K, sp + nb * 64, yp + m * N + nb * 64);
  });
  return y;
}

torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz, int64_t group_size) {
  check_int4_mm(x, w, sz, group_size);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * 64, groups = K / group_size;
  const Digits a = int4_digits(x.contiguous());
  torch::Tensor y = torch::empty({M, N}, x.options());
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = sz.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  blocks_by_rows(N, M, [&](int64_t nb, int64_t m) {
    dot_64_int4(a.row(m), wp + nb * 32 * K, sp + nb * 128 * groups, yp + m * N + nb * 64, K, group_size);
  });
  return y;
}

// Many rows (a prompt): the weight dequantized whole (as `unpack_int8` and `dequantize_int8` in Python do) for
// PyTorch's matmul.
torch::Tensor int8_prefill_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales) {
  check_int8_mm(x, w, scales);
  const int64_t K = x.size(1), N = w.size(0) * 64;
  const torch::Tensor q = w.permute({0, 2, 3, 1, 4}).reshape({N, K}).bitwise_xor(128).view(at::kChar);
  return at::linear(x, q.to(at::kBFloat16) * scales.unsqueeze(1));
}

torch::Tensor int4_prefill_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz,
                              int64_t group_size) {
  check_int4_mm(x, w, sz, group_size);
  return at::linear(x, int4_dequantize(w, sz, group_size));
}
