// Attention for decoding on CPU: one query per sequence against its cached keys and values, read where they
// lie (bfloat16 or float32), computed in float32.
//
// Decoding's attention is small (llama-1b at batch 16 over 160 cached positions: ~10 M multiply-adds a layer),
// yet written as PyTorch ops it costs far more than that: inductor converts the cache to float32 copies, then
// runs the two batched products as many tiny micro-GEMMs per step with a softmax between them. Here one pass
// over each sequence's keys and one over its values do it all, and the heads that share a key/value head (grouped-query
// attention) share each row of it as it is loaded:
//
//   scores_hs = (q_h . k_s) / sqrt(hd)  for the keys s the mask lets the query see
//   p_hs = exp(scores_hs - max_s scores_hs) / sum_s exp(...)
//   out_h = sum_s p_hs v_s
//
// The exponential is a polynomial (see exp_ps) whose truncation error is below float32's rounding.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "bf16.h"

namespace {

// float32 and bfloat16 alike, for the templates below
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) { return load_bf16(p); }
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) { store_bf16(p, v); }

// The lanes of the first min(n, 16) of 16 values (the last block of keys may hold fewer than 16).
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xFFFF : (1u << n) - 1; }

// e^x for x <= 0 (scores less their maximum): x = n ln 2 + r with |r| <= ln(2) / 2, e^r by its Taylor series to
// r^7 / 7! (the rest of the series is below 6e-9 of it there), times 2^n by `vscalefps`, which gives 0 for
// x -> -inf.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // e^-104 is below float32's smallest
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  // ln 2 in two parts (Cephes'), the first of 9 significant bits, so that n times it is exact
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, n);
}

// Per-thread scratch: a group's scaled queries (G, hd), its scores (G, S) and its outputs' sums (G, hd), and
// a block of 16 keys or values in float32 (16, hd).
struct Scratch {
  std::vector<float> q, scores, acc, rows;
  Scratch(int64_t G, int64_t S, int64_t hd) : q(G * hd), scores(G * S), acc(G * hd), rows(16 * hd) {}
};

// v[j] (16 vectors) -> the vector of their 16 sums: halves of pairs, then of quadruples, ... added together
// (45 instructions, where 16 separate horizontal sums take 16 reductions of 4 shuffles and 4 adds each).
inline __m512 sum16(__m512* v) {
  for (int j = 0; j < 16; j += 2) {  // per 128-bit lane: v_j, v_j+1, v_j, v_j+1 partial sums
    v[j / 2] = _mm512_add_ps(_mm512_unpacklo_ps(v[j], v[j + 1]), _mm512_unpackhi_ps(v[j], v[j + 1]));
  }
  for (int j = 0; j < 8; j += 2) {  // per 128-bit lane: v_4i .. v_4i+3
    const __m512d a = _mm512_castps_pd(v[j]), b = _mm512_castps_pd(v[j + 1]);
    v[j / 2] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int j = 0; j < 4; j += 2) {  // 128-bit lanes: 0+1 and 2+3 of v_8i .. v_8i+3, then of v_8i+4 .. v_8i+7
    v[j / 2] = _mm512_add_ps(_mm512_shuffle_f32x4(v[j], v[j + 1], 0b10001000),
                             _mm512_shuffle_f32x4(v[j], v[j + 1], 0b11011101));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0b10001000), _mm512_shuffle_f32x4(v[0], v[1], 0b11011101));
}

// row (S,) of scores -> their softmax, in place.
void softmax(float* row, int64_t S) {
  float largest = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < S; ++s) largest = std::max(largest, row[s]);
  const __m512 m = _mm512_set1_ps(largest);
  __m512 total = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; s += 16) {
    const __mmask16 lanes = first_lanes(S - s);
    const __m512 e = _mm512_maskz_mov_ps(lanes, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, row + s), m)));
    _mm512_mask_storeu_ps(row + s, lanes, e);
    total = _mm512_add_ps(total, e);
  }
  const float inverse = 1.0f / _mm512_reduce_add_ps(total);
  for (int64_t s = 0; s < S; ++s) row[s] *= inverse;
}

// The keys (or values) s0 .. s0+n-1 of a head, rows `stride` apart -> rows (16, hd) float32, zeros past n.
template <typename T>
void load_rows(const T* x, int64_t stride, int64_t s0, int64_t n, int64_t hd, float* rows) {
  for (int64_t j = 0; j < 16; ++j) {
    for (int64_t c = 0; c < hd; c += 16) {
      _mm512_storeu_ps(rows + j * hd + c, j < n ? load16(x + (s0 + j) * stride + c) : _mm512_setzero_ps());
    }
  }
}

// Which of the keys s0 .. s0+15 the mask lets the query see (bit j: key s0+j), none past S.
inline __mmask16 visible(const bool* mask, int64_t s0, int64_t S) {
  const __mmask16 in_range = first_lanes(S - s0);
  if (!mask) return in_range;
  const __m128i bytes = _mm_maskz_loadu_epi8(in_range, mask + s0);
  return _mm_cmpneq_epi8_mask(bytes, _mm_setzero_si128());
}

// One sequence and one key/value head: the G query heads q (G, hd) that share it, against its S cached keys and
// values (rows `stride` apart) -> out (G, hd). Keys go 16 at a time, converted to float32 once for all G heads;
// a block of 16 the mask hides entirely is skipped (a long cache, mostly empty).
template <typename T, int C>  // C = hd / 16
void attend_group(const T* q, const T* k, const T* v, int64_t stride, const bool* mask, int64_t S, int64_t G,
                  T* out, Scratch& w) {
  constexpr int64_t hd = 16 * C;
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(hd)));
  for (int64_t i = 0; i < G * hd; i += 16) _mm512_storeu_ps(&w.q[i], _mm512_mul_ps(load16(q + i), scale));
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  bool any = false;
  for (int64_t s0 = 0; s0 < S; s0 += 16) {  // scores
    const __mmask16 seen = visible(mask, s0, S);
    any |= seen != 0;
    if (seen) load_rows(k, stride, s0, std::min<int64_t>(16, S - s0), hd, w.rows.data());
    for (int64_t h = 0; h < G; ++h) {
      __m512 score = minus_inf;
      if (seen) {
        __m512 dots[16];
        for (int j = 0; j < 16; ++j) dots[j] = _mm512_setzero_ps();
        for (int c = 0; c < C; ++c) {
          const __m512 qc = _mm512_loadu_ps(&w.q[h * hd + 16 * c]);
          for (int j = 0; j < 16; ++j) dots[j] = _mm512_fmadd_ps(qc, _mm512_loadu_ps(&w.rows[j * hd + 16 * c]), dots[j]);
        }
        score = _mm512_mask_mov_ps(minus_inf, seen, sum16(dots));
      }
      _mm512_mask_storeu_ps(&w.scores[h * S + s0], first_lanes(S - s0), score);
    }
  }
  if (!any) {  // no key to see: NaN, as softmax over nothing but -inf gives
    for (int64_t i = 0; i < G * hd; ++i) out[i] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  for (int64_t h = 0; h < G; ++h) softmax(&w.scores[h * S], S);
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);
  for (int64_t s0 = 0; s0 < S; s0 += 16) {  // sum of the values, weighted
    const int64_t n = std::min<int64_t>(16, S - s0);
    if (!visible(mask, s0, S)) continue;  // weights all 0
    load_rows(v, stride, s0, n, hd, w.rows.data());
    for (int64_t h = 0; h < G; ++h) {
      const float* p = &w.scores[h * S + s0];
      __m512 a[C];  // the head's C chunks of 16 sums, in registers: C independent chains of multiply-adds
      for (int c = 0; c < C; ++c) a[c] = _mm512_loadu_ps(&w.acc[h * hd + 16 * c]);
      for (int64_t j = 0; j < n; ++j) {
        const __m512 pj = _mm512_set1_ps(p[j]);
        for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(&w.rows[j * hd + 16 * c]), a[c]);
      }
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(&w.acc[h * hd + 16 * c], a[c]);
    }
  }
  for (int64_t i = 0; i < G * hd; i += 16) store16(out + i, _mm512_loadu_ps(&w.acc[i]));
}

template <typename T, int C>
void attend_all(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const bool* mask,
                torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(3), KV = k.size(1), S = k.size(2), G = H / KV;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  // Threads only where each gets enough work to pay for starting them (a small model's decode step: none).
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, G * S * hd));
  at::parallel_for(0, B * KV, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch(G, S, hd);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KV, g = i % KV;
      attend_group<T, C>(qp + (b * H + g * G) * hd, kp + b * k.stride(0) + g * k.stride(1),
                         vp + b * v.stride(0) + g * v.stride(1), k.stride(2), mask ? mask + b * S : nullptr, S, G,
                         op + (b * H + g * G) * hd, scratch);
    }
  });
}

// attend_all for the head size hd = 16 C: each C its own code, so that a head's sums stay in registers.
template <typename T>
void attend_any(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const bool* mask,
                torch::Tensor& out) {
  switch (q.size(3) / 16) {
    case 1: return attend_all<T, 1>(q, k, v, mask, out);
    case 2: return attend_all<T, 2>(q, k, v, mask, out);
    case 3: return attend_all<T, 3>(q, k, v, mask, out);
    case 4: return attend_all<T, 4>(q, k, v, mask, out);
    case 5: return attend_all<T, 5>(q, k, v, mask, out);
    case 6: return attend_all<T, 6>(q, k, v, mask, out);
    case 7: return attend_all<T, 7>(q, k, v, mask, out);
    case 8: return attend_all<T, 8>(q, k, v, mask, out);
    case 16: return attend_all<T, 16>(q, k, v, mask, out);
  }
  TORCH_CHECK(false, "decode_attention: the head size must be a multiple of 16 up to 128, or 256; got ", q.size(3));
}

}  // namespace

// q (B, H, 1, hd), k and v (B, KV, S, hd) with rows of hd contiguous, mask (B, S) bool or None: which keys each
// sequence's query sees -> (B, H, 1, hd), q's dtype (bfloat16 or float32, as k and v).
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const std::optional<torch::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_attention: q must be (B, H, 1, hd)");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.strides() == v.strides() && k.size(0) == q.size(0) &&
              k.size(3) == q.size(3) && q.size(1) % k.size(1) == 0 && k.stride(3) == 1,
              "decode_attention: k and v must be (B, KV, S, hd) alike, KV dividing H, rows contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
              (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat),
              "decode_attention: q, k and v must all be bfloat16 or all float32");
  torch::Tensor m;
  if (mask) {
    m = mask->contiguous();
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == k.size(0) && m.size(1) == k.size(2),
                "decode_attention: mask must be (B, S) bool");
  }
  const torch::Tensor qc = q.contiguous();
  torch::Tensor out = torch::empty_like(qc);
  const bool* mp = mask ? m.data_ptr<bool>() : nullptr;
  if (q.scalar_type() == at::kBFloat16) attend_any<at::BFloat16>(qc, k, v, mp, out);
  else attend_any<float>(qc, k, v, mp, out);
  return out;
}

TORCH_LIBRARY_FRAGMENT(modelcode, m) { m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor"); }
TORCH_LIBRARY_IMPL(modelcode, CPU, m) { m.impl("decode_attention", &decode_attention); }
