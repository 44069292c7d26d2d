// The bf16 engine's register tiles: C[M,N] (+)= A[M,K] B[K,N] with A and B in bfloat16 and the
// sums in fp32, on AVX512-BF16's vdpbf16ps (two bf16 products added to an fp32 lane per
// instruction: twice the multiply-adds of an fp32 FMA, half the bytes of B). CPUs without it
// keep the fp32 products on bf16-rounded operands (bf16.h), which compute the same exact
// products with the same fp32 sums in another order. (libtorch's oneDNN brgemm would be the
// kept library here, but its bf16 ukernel needs AMX: cpublas::could_pack is false on Zen 4.)
//
// Layouts: A row-major bf16, rows of an even number of elements (an odd K padded with one zero);
// B packed in pairs along k, [K/2][Npad][2], Npad = N rounded up to 16 columns (zeros), so
// every load is a full vector; only the stores of the last vector are masked. As on the fp32
// tiles (tiles.h), each sum starts from zero and C is added once at the end.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bf16.h"
#include "buffers.h"
#include "geometry.h"
#include "simd.h"

namespace fastbirnn {

// Columns of B's packed panel: N rounded up to whole vectors of 16.
inline int64_t packed_columns(int64_t N) { return (N + 15) / 16 * 16; }
// A row's length in bf16 elements: K rounded up to pairs.
inline int64_t paired(int64_t K) { return (K + 1) / 2 * 2; }

// A [K, N] panel packed in pairs along k, [paired(K)/2][packed_columns(N)][2], zeroed (so its
// pads stay zero); returns packed_columns(N). Element (k, n) goes to pair_slot(k, n, npad).
inline int64_t clear_pairs(int64_t K, int64_t N, bf16_bits* packed) {
  const int64_t npad = packed_columns(N);
  std::memset(packed, 0, sizeof(bf16_bits) * paired(K) * npad);
  return npad;
}
inline int64_t pair_slot(int64_t k, int64_t n, int64_t npad) {
  return ((k / 2) * npad + n) * 2 + (k % 2);
}

// B[k][n] = row(n)[k] for N rows of K elements (fp32 holding bf16 values: the rounding is
// exact), packed in pairs.
template <typename RowOf>
void pack_rows_in_pairs(int64_t K, int64_t N, const RowOf& row, bf16_bits* packed) {
  const int64_t npad = clear_pairs(K, N, packed);
  for (int64_t n = 0; n < N; ++n) {
    const auto* r = row(n);
    for (int64_t k = 0; k < K; ++k) packed[pair_slot(k, n, npad)] = to_bf16_bits(float(r[k]));
  }
}

// B[k][n] = row(k)[n] for K rows of N elements (row(k) null: a zero row), packed in pairs.
template <typename RowOf>
void pack_columns_in_pairs(int64_t K, int64_t N, const RowOf& row, bf16_bits* packed) {
  const int64_t npad = clear_pairs(K, N, packed);
  for (int64_t k = 0; k < K; ++k) {
    const auto* r = row(k);
    if (!r) continue;  // a zero row: already cleared
    for (int64_t n = 0; n < N; ++n) packed[pair_slot(k, n, npad)] = to_bf16_bits(float(r[n]));
  }
}

#ifdef FASTBIRNN_X86
#define FASTBIRNN_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// MR rows by NV vectors of 16 columns, in registers for the whole k loop: MR * NV <= 24
// accumulators, NV registers of B and one broadcast pair of A.
// Pair p of A's row r is at A + r * a_row + p * a_pair (row-major: a_row = lda, a_pair = 2).
template <int NV, int MR, bool kPartial>
FASTBIRNN_AVX512BF16 inline void bf16_tile(int64_t pairs, const bf16_bits* A, int64_t a_row,
                                           int64_t a_pair, const bf16_bits* B, int64_t ldb,
                                           bool accumulate, __mmask16 last_mask, float* C,
                                           int64_t ldc) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      b[v] = (__m512bh)_mm512_loadu_si512(B + p * ldb + v * 32);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * a_row + p * a_pair, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* c = C + r * ldc + v * 16;
      if (kPartial && v + 1 == NV) {
        const __m512 sum = accumulate ? _mm512_add_ps(acc[r][v], _mm512_maskz_loadu_ps(last_mask, c))
                                      : acc[r][v];
        _mm512_mask_storeu_ps(c, last_mask, sum);
      } else {
        _mm512_storeu_ps(c, accumulate ? _mm512_add_ps(acc[r][v], _mm512_loadu_ps(c)) : acc[r][v]);
      }
    }
}

template <int NV, int R, bool kPartial>
FASTBIRNN_AVX512BF16 inline void bf16_last_rows(int64_t rows, int64_t pairs, const bf16_bits* A,
                                                int64_t a_row, int64_t a_pair,
                                                const bf16_bits* B, int64_t ldb, bool accumulate,
                                                __mmask16 mask, float* C, int64_t ldc) {
  if constexpr (R > 0) {
    if (rows == R)
      return bf16_tile<NV, R, kPartial>(pairs, A, a_row, a_pair, B, ldb, accumulate, mask, C,
                                        ldc);
    bf16_last_rows<NV, R - 1, kPartial>(rows, pairs, A, a_row, a_pair, B, ldb, accumulate, mask,
                                        C, ldc);
  }
}

template <int NV, bool kPartial>
FASTBIRNN_AVX512BF16 void bf16_rows(int64_t M, int64_t pairs, const bf16_bits* A, int64_t a_row,
                                    int64_t a_pair, const bf16_bits* B, int64_t ldb,
                                    bool accumulate, __mmask16 mask, float* C, int64_t ldc) {
  constexpr int MR = 24 / NV < 6 ? 24 / NV : 6;
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    bf16_tile<NV, MR, kPartial>(pairs, A + i * a_row, a_row, a_pair, B, ldb, accumulate, mask,
                                C + i * ldc, ldc);
  bf16_last_rows<NV, MR - 1, kPartial>(M - i, pairs, A + i * a_row, a_row, a_pair, B, ldb,
                                       accumulate, mask, C + i * ldc, ldc);
}

template <int NV>
FASTBIRNN_AVX512BF16 void bf16_panel(int64_t M, int64_t N, int64_t pairs, const bf16_bits* A,
                                     int64_t a_row, int64_t a_pair, const bf16_bits* B,
                                     int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  const int64_t left = N - (NV - 1) * 16;  // columns of the last vector, 1..16
  const __mmask16 mask = __mmask16(left >= 16 ? 0xFFFF : (1u << left) - 1);
  if (left < 16)
    bf16_rows<NV, true>(M, pairs, A, a_row, a_pair, B, ldb, accumulate, mask, C, ldc);
  else
    bf16_rows<NV, false>(M, pairs, A, a_row, a_pair, B, ldb, accumulate, mask, C, ldc);
}
#endif

// Whether this CPU runs the bf16 tiles (AVX512-BF16, at the engine's AVX-512 level: lowering
// FASTBIRNN_ISA turns them off with the rest).
inline bool probe_bf16_tiles() {
#ifdef FASTBIRNN_X86
  __builtin_cpu_init();
  // The level as kIsa has it, computed again: kIsa, another inline variable, may not be
  // initialised yet when this one is.
  const Isa level = std::min(probe_isa(), read_isa_request().level);
  return level == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}
inline const bool kBf16Tiles = probe_bf16_tiles();

// Whether this call's products run on the bf16 tiles: a bf16 call (g.round_bf16) on the fp32
// engine where the CPU has them.
template <typename T>
bool on_bf16_tiles(const Geometry& g) {
  return std::is_same_v<T, float> && g.round_bf16 && kBf16Tiles;
}

// C[M,N] (+)= A[M,K] B[K,N] (beta 0 or 1), C fp32: A's row r, pair p (elements 2p, 2p+1 along
// K) at A + r * a_row + p * a_pair; B packed by pack_*_in_pairs with ldb = 2 * packed_columns
// (of the whole panel). Panels of 64 columns; only where kBf16Tiles.
inline void bf16_gemm_strided(int64_t M, int64_t N, int64_t K, const bf16_bits* A, int64_t a_row,
                              int64_t a_pair, const bf16_bits* B, int64_t ldb, float beta,
                              float* C, int64_t ldc) {
#ifdef FASTBIRNN_X86
  if (M <= 0 || N <= 0) return;
  const int64_t pairs = paired(K) / 2;
  const bool accumulate = beta != 0.f;
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t n = std::min<int64_t>(64, N - n0);
    const bf16_bits* b = B + 2 * n0;
    float* c = C + n0;
    switch ((n + 15) / 16) {
      case 1: bf16_panel<1>(M, n, pairs, A, a_row, a_pair, b, ldb, accumulate, c, ldc); break;
      case 2: bf16_panel<2>(M, n, pairs, A, a_row, a_pair, b, ldb, accumulate, c, ldc); break;
      case 3: bf16_panel<3>(M, n, pairs, A, a_row, a_pair, b, ldb, accumulate, c, ldc); break;
      default: bf16_panel<4>(M, n, pairs, A, a_row, a_pair, b, ldb, accumulate, c, ldc); break;
    }
  }
#else
  TORCH_CHECK(false, "fastbirnn: bf16 tiles need x86");
#endif
}

// A row-major: rows of paired(K) bf16 elements (an odd K's pad zero) lda apart.
inline void bf16_gemm(int64_t M, int64_t N, int64_t K, const bf16_bits* A, int64_t lda,
                      const bf16_bits* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  bf16_gemm_strided(M, N, K, A, lda, 2, B, ldb, beta, C, ldc);
}

// Rows [r0, r1) (r0 even) of a [rows, n] bf16 matrix (rows ld apart) interleaved in pairs of
// rows, [rows/2][n][2] from pair r0/2 on (an odd last row paired with zeros): pairs along the
// rows, for a product that sums over them (A^T B with a_row = 2, a_pair = 2 * n).
inline void interleave_row_pairs(const bf16_bits* src, int64_t ld, int64_t n, int64_t r0,
                                 int64_t r1, int64_t rows, bf16_bits* dst) {
  for (int64_t r = r0; r < r1; r += 2) {
    const bf16_bits* a = src + r * ld;
    const bf16_bits* b = r + 1 < rows ? a + ld : nullptr;
    bf16_bits* out = dst + (r / 2) * n * 2;
    for (int64_t j = 0; j < n; ++j) {
      out[2 * j] = a[j];
      out[2 * j + 1] = b ? b[j] : bf16_bits(0);
    }
  }
}

// bf16_gemm where C's type is a template parameter: the engine's templates are instantiated
// for fp64 too, which never has bf16 operands.
template <typename T>
void bf16_gemm_strided_into(int64_t M, int64_t N, int64_t K, const bf16_bits* A, int64_t a_row,
                            int64_t a_pair, const bf16_bits* B, int64_t ldb, T beta, T* C,
                            int64_t ldc) {
  if constexpr (std::is_same_v<T, float>)
    bf16_gemm_strided(M, N, K, A, a_row, a_pair, B, ldb, beta, C, ldc);
  else
    TORCH_CHECK(false, "fastbirnn cpp backend: bf16 products are for the fp32 engine");
}
template <typename T>
void bf16_gemm_into(int64_t M, int64_t N, int64_t K, const bf16_bits* A, int64_t lda,
                    const bf16_bits* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  bf16_gemm_strided_into<T>(M, N, K, A, lda, 2, B, ldb, beta, C, ldc);
}

// One layer's operands of the forward on the bf16 tiles (stack.cpp fills them where
// kBf16Tiles and the call is bf16; null pointers where a product keeps the fp32 path).
struct Bf16Forward {
  // The input projection: the layer's input as bf16 rows of x_ld = paired(I) (each worker
  // converts its row blocks first), W_ih of each direction packed in pairs.
  bf16_bits* x = nullptr;
  int64_t x_ld = 0;
  const bf16_bits* w_ih[2] = {nullptr, nullptr};
  int64_t w_ih_ld = 0;  // 2 * packed_columns(K * H)
  // The recurrence: each block's K*w rows of W_hh packed in pairs by its owner, block k at
  // k * block_stride; h_{t-1} and h_t of each direction as bf16 rows of paired(H).
  bf16_bits* w_hh = nullptr;
  int64_t block_stride = 0;
  bf16_bits* state = nullptr;
};

// One layer's operands of the backward on the bf16 tiles (stack.cpp fills them where the
// forward ran on them). The gate gradients as bf16, written by BPTT next to their fp32 (rounded)
// values: rows of ld = D * paired(K*H), each direction's part starting at d * paired(K*H) (the
// pads stay zero); dGh only for a cell with a split gate (else null: dG). W_hh's columns of
// each block packed in pairs along its K*H rows by the block's owner, block k at
// k * block_stride.
struct Bf16Backward {
  bf16_bits* dG = nullptr;
  bf16_bits* dGh = nullptr;
  int64_t ld = 0, direction_ld = 0;  // direction_ld: paired(K*H)
  bf16_bits* w_hh = nullptr;
  int64_t block_stride = 0;
};

// n bf16 elements of a scratch slot (buffers.h: kept for the thread's next call, so a large
// one does not fault its pages in again every call), uninitialised but for `zeroed`.
struct Bf16Buffer {
  Tensor storage;
  bf16_bits* data = nullptr;
  Bf16Buffer() = default;
  Bf16Buffer(Scratch slot, int64_t n, bool zeroed)
      : storage(scratch_buffer(slot, n, at::TensorOptions().dtype(at::kBFloat16))) {
    data = reinterpret_cast<bf16_bits*>(storage.data_ptr());
    if (zeroed) std::memset(data, 0, sizeof(bf16_bits) * n);
  }
};

}  // namespace fastbirnn
