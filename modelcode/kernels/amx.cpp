// bfloat16 matmuls of more than a few rows on AMX (Advanced Matrix Extensions: Intel Xeon since Sapphire Rapids).
//
// A tile is up to 16 rows of 64 bytes; one `tdpbf16ps` multiplies a tile of 16 rows x 32 inputs of x by a tile
// of 16 input pairs x 16 outputs of the weight, into 16 x 16 float32 sums: 8192 multiply-adds, where one AVX-512
// `vdpbf16ps` does 32. With a few rows the matmul is bound by reading the weights, and the vector kernel keeps
// up; with more (a batch of decode steps, a prompt) it is bound by arithmetic, and AMX is several times faster
// (llama-1b's matmuls at 16 rows and more: see BENCHMARKS.md).
//
// The weight needs no layout of its own: `bf16_mm`'s (per 64 outputs, for each input pair, 4 blocks of 16 outputs
// x 2 inputs, 64 bytes each) already holds, for one block, the rows of a weight tile 256 bytes apart, the form
// `tileloadd` reads with a stride. Each output's sum is still added pair after pair in float32, and rounded to
// bfloat16 at the end, as the vector kernel does.

#include "amx.h"

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cpuid.h>
#include <cstdlib>
#include <string>

#include "bf16.h"

namespace {

constexpr int kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
constexpr int64_t kMaxRows = 16;

struct alignas(64) TileConfig {  // the 64-byte operand of `ldtilecfg` (palette 1)
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row, per tile
  uint8_t rows[16] = {};
};

// Tiles 0-3: the sums of the 4 blocks of 16 outputs (rows x 16 float32); 4: x (rows x 32 bfloat16); 5, 6: the
// weights of one block (16 input pairs x 16 outputs x 2).
__attribute__((target("amx-tile"))) void configure(int64_t rows) {
  TileConfig cfg;
  for (int t = 0; t < 5; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows);
    cfg.colsb[t] = 64;
  }
  for (int t = 5; t < 7; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC's _tile_loadconfig tells the compiler it reads only the first 8 bytes (so it drops the stores to the
  // rest): the whole struct is the operand here.
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

// Up to 16 rows of x (K apart) times the 64 outputs whose weights start at wb: sums (rows, 64) float32.
__attribute__((target("amx-tile,amx-bf16"))) void block_rows(const at::BFloat16* x, int64_t K, const uint8_t* wb,
                                                                float* sums) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t c = 0; c < K / 2; c += 16) {  // 16 input pairs: 4 KB of weights
    const uint8_t* wc = wb + c * 256;
    _tile_loadd(4, x + 2 * c, K * 2);
    _tile_loadd(5, wc, 256);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, wc + 64, 256);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(5, wc + 128, 256);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(6, wc + 192, 256);
    _tile_dpbf16ps(3, 4, 6);
  }
  _tile_stored(0, sums, 256);
  _tile_stored(1, sums + 16, 256);
  _tile_stored(2, sums + 32, 256);
  _tile_stored(3, sums + 48, 256);
}

__attribute__((target("amx-tile"))) void release() { _tile_release(); }

}  // namespace

bool amx_ready() {
  static const bool ready = [] {
    const char* off = std::getenv("MODELCODE_NO_AMX");  // to compare with the vector kernel
    if (off && std::string(off) == "1") return false;
    unsigned int a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;  // AMX-BF16, AMX-TILE
    unsigned long permitted = 0;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 &&
           syscall(SYS_arch_prctl, kArchGetXcompPerm, &permitted) == 0 && (permitted & (1ul << kXfeatureXtiledata));
  }();
  return ready;
}

namespace {

// All M rows of x times one block's weights, the tiles configured for `configured` rows (0: none yet) on entry.
void block_all_rows(const at::BFloat16* x, const uint8_t* wb, at::BFloat16* y, int64_t M, int64_t K, int64_t ldy,
                    int64_t& configured) {
  float sums[kMaxRows * 64];
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int64_t rows = std::min(kMaxRows, M - m0);
    if (rows != configured) configure(configured = rows);  // the tiles' shapes are per thread
    block_rows(x + m0 * K, K, wb, sums);
    for (int64_t r = 0; r < rows; ++r) {
      for (int b = 0; b < 4; ++b) store_bf16(y + (m0 + r) * ldy + 16 * b, _mm512_loadu_ps(sums + 64 * r + 16 * b));
    }
  }
}

}  // namespace

void amx_bf16_mm(const at::BFloat16* x, const uint8_t* w, at::BFloat16* y, int64_t M, int64_t K, int64_t N) {
  // Each thread takes blocks of 64 outputs; their weights (64 x K) stay in its L2 while every 16 rows read them.
  at::parallel_for(0, N / 64, 1, [&](int64_t begin, int64_t end) {
    int64_t configured = 0;
    for (int64_t nb = begin; nb < end; ++nb) block_all_rows(x, w + nb * 128 * K, y + nb * 64, M, K, N, configured);
    if (configured) release();
  });
}

void amx_bf16_block(const at::BFloat16* x, const uint8_t* wb, at::BFloat16* y, int64_t M, int64_t K, int64_t ldy) {
  int64_t configured = 0;
  block_all_rows(x, wb, y, M, K, ldy, configured);
  if (configured) release();
}
