// What both builds of the kernels share (ops.h): the matmuls' argument checks, the int4 weight put back in order,
// and the operations' registration with PyTorch.

#include "ops.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <string>

namespace {
// "hint:bytes" from the environment (cpu.py has checked it), else non-temporal 8 KB ahead
Prefetch prefetch_from(const char* variable) {
  const char* v = std::getenv(variable);
  const std::string s = v ? v : "nta:8192";
  const std::string hint = s.substr(0, s.find(':'));
  const int64_t bytes = s.find(':') == std::string::npos ? 8192 : std::atoll(s.c_str() + s.find(':') + 1);
  return {hint == "t0" ? _MM_HINT_T0 : hint == "t1" ? _MM_HINT_T1 : _MM_HINT_NTA, bytes};
}
}  // namespace

const Prefetch kInt8Prefetch = prefetch_from("MODELCODE_INT8_PREFETCH");
const Prefetch kInt4Prefetch = prefetch_from("MODELCODE_INT4_PREFETCH");

void check_bf16_mm(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16_mm: x must be (M, K) bfloat16");
  const int64_t K = x.size(1);
  TORCH_CHECK(w.dim() == 5 && w.size(1) * 2 == K && K % 4 == 0 && w.size(2) == kBlocks && w.size(3) == 16 &&
              w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "bf16_mm: w must be (N/64, K/2, 4, 16, 2)");
}

void check_int8_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int8_mm: x must be (M, K) bfloat16");
  const int64_t K = x.size(1), N = w.size(0) * 64;
  TORCH_CHECK(w.dim() == 5 && w.size(1) * 4 == K && K % 128 == 0 && w.size(2) == kBlocks && w.size(3) == 16 &&
              w.size(4) == 4 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "int8_mm: w must be (N/64, K/4, 4, 16, 4) uint8 (pack_int8's) with K % 128 == 0");
  TORCH_CHECK(scales.numel() == N && scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(),
              "int8_mm: scales must be (N,) bfloat16");
}

void check_int4_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_mm: x must be (M, K) bfloat16");
  const int64_t K = x.size(1), N = w.size(0) * 64;
  TORCH_CHECK(w.dim() == 4 && w.size(1) * 8 == K && w.size(2) == kBlocks && w.size(3) == 64 &&
              w.scalar_type() == at::kByte && w.is_contiguous(), "int4_mm: w must be (N/64, K/8, 4, 64) uint8");
  TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0, "int4_mm: group_size must be a multiple of 32 that divides K");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.numel() == K / group_size * 2 * N,
              "int4_mm: sz must be (N/64, K/group_size, 2, 64) bfloat16");
}

// The same weight as (N, K) bfloat16, for a dense matmul over many rows (prefill): each group's 16 possible
// values per output are computed once, then every code is a table lookup.
torch::Tensor int4_dequantize(const torch::Tensor& w, const torch::Tensor& sz, int64_t group_size) {
  const int64_t K = w.size(1) * 8, N = w.size(0) * 64, groups = K / group_size;
  TORCH_CHECK(w.is_contiguous() && sz.is_contiguous() && sz.numel() == groups * 2 * N, "int4_dequantize: layout");
  torch::Tensor out = torch::empty({N, K}, sz.options());
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = sz.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N / 64, 1, [&](int64_t begin, int64_t end) {
    at::BFloat16 table[64][16];
    for (int64_t nb = begin; nb < end; ++nb) {
      for (int64_t g = 0; g < groups; ++g) {
        const at::BFloat16* s = sp + (nb * groups + g) * 128;
        for (int n = 0; n < 64; ++n) {
          for (int q = 0; q < 16; ++q) table[n][q] = static_cast<float>(q - 8) * s[n] + static_cast<float>(s[64 + n]);
        }
        for (int64_t c = g * group_size / 8; c < (g + 1) * group_size / 8; ++c) {
          const uint8_t* run = wp + nb * 32 * K + c * 64 * kBlocks;
          for (int n = 0; n < 64; ++n) {  // block n / 16, output n % 16: bytes 4i .. 4i+3 of its 64
            const uint8_t* b = run + 64 * (n / 16) + 4 * (n % 16);
            const auto& t = table[n];
            at::BFloat16* row = op + (nb * 64 + n) * K + 8 * c;
            row[0] = t[b[0] & 0xF], row[1] = t[b[2] & 0xF], row[2] = t[b[0] >> 4], row[3] = t[b[2] >> 4];
            row[4] = t[b[1] & 0xF], row[5] = t[b[3] & 0xF], row[6] = t[b[1] >> 4], row[7] = t[b[3] >> 4];
          }
        }
      }
    }
  });
  return out;
}

TORCH_LIBRARY(modelcode, m) {
  m.def("bf16_mm(Tensor x, Tensor w) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor w, Tensor sz, int group_size) -> Tensor");
  m.def("int8_prefill_mm(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("int4_prefill_mm(Tensor x, Tensor w, Tensor sz, int group_size) -> Tensor");
  m.def("int4_dequantize(Tensor w, Tensor sz, int group_size) -> Tensor");
  m.def("amx_ready() -> bool", &amx_ready);
}
TORCH_LIBRARY_IMPL(modelcode, CPU, m) {
  m.impl("bf16_mm", &bf16_mm);
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
  m.impl("int8_prefill_mm", &int8_prefill_mm);
  m.impl("int4_prefill_mm", &int4_prefill_mm);
  m.impl("int4_dequantize", &int4_dequantize);
}
