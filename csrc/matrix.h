// Whole-matrix helpers of the engine: pairwise column sums (the bias gradients), a cache-blocked
// transpose, and a check for NaN/inf.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace fastbirnn {

// out[0..n) = sum over rows r of src[r * ld + 0..n), summed pairwise: runs of kSumRun rows
// in order, then the runs' sums combined as a binary tree (a carry chain, as in a binary
// counter), so the rounding error grows with log(rows) instead of rows (a bias gradient sums
// T*B rows; the plain loop's error was 2-4x that of ATen's sum). The tree depends only on
// rows, so the result does too. tmp holds column_sums_scratch(rows, n) elements.
constexpr int64_t kSumRun = 8;

template <typename T>
void column_sums(const T* src, int64_t ld, int64_t rows, int64_t n, T* out, T* tmp) {
  T* run = tmp;            // the current run's sum
  T* levels = tmp + n;     // levels[k]: the sum of 2^k runs, valid where bit k of count is set
  int64_t count = 0;       // runs folded in so far
  for (int64_t r0 = 0; r0 < rows; r0 += kSumRun) {
    std::copy(src + r0 * ld, src + r0 * ld + n, run);
    for (int64_t r = r0 + 1; r < std::min(rows, r0 + kSumRun); ++r)
      for (int64_t j = 0; j < n; ++j) run[j] += src[r * ld + j];
    int k = 0;  // carry: merge with each full level below the first free one
    for (; count >> k & 1; ++k)
      for (int64_t j = 0; j < n; ++j) run[j] += levels[k * n + j];
    std::copy(run, run + n, levels + k * n);
    ++count;
  }
  // What is left: the levels of count's set bits, smallest first.
  std::fill(out, out + n, T(0));
  bool first = true;
  for (int k = 0; count >> k; ++k) {
    if (!(count >> k & 1)) continue;
    for (int64_t j = 0; j < n; ++j) out[j] = first ? levels[k * n + j] : out[j] + levels[k * n + j];
    first = false;
  }
}

// Elements of column_sums' tmp for rows rows of n columns.
inline int64_t column_sums_scratch(int64_t rows, int64_t n) {
  int64_t levels = 1;
  while ((int64_t(1) << levels) * kSumRun < rows) ++levels;
  return (levels + 2) * n;
}

// out[c * ldo + r] = in[r * ldi + c] for rows [first, last) of an [R, C] matrix (all of it by
// default), in kTransposeTile-square tiles so that large ones do not miss the cache on every
// strided write; fp32 moves 8 x 8 squares through AVX registers (at H 256 the weights'
// transposes, once per layer and call, took 4-5 % of a 2-layer LSTM's forward as scalar
// copies; 6x faster so). Row ranges write disjoint parts of out: workers can share one
// transpose.
constexpr int64_t kTransposeTile = 64;

#ifdef FASTBIRNN_X86
// out rows 0..7 (ldo apart) = columns 0..7 of in's rows 0..7 (ldi apart).
__attribute__((target("avx2"))) inline void transpose_8x8(const float* in, int64_t ldi, float* out,
                                                          int64_t ldo) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * ldi);
  for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // then quads: each 128-bit lane holds 4 rows of a column
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {  // the low lanes hold columns 0..3, the high ones 4..7
    _mm256_storeu_ps(out + i * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// out[c * ldo + r] = in[r * ldi + c] over rows [r0, r1) and columns [c0, c1), one output row
// (one column of in) at a time: the scalar copy, and the vector one's edges.
template <typename T>
void transpose_rectangle(const T* in, int64_t ldi, T* out, int64_t ldo, int64_t r0, int64_t r1,
                         int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = r0; r < r1; ++r) out[c * ldo + r] = in[r * ldi + c];
}

// Whether transpose_strided moves elements of this size through vector registers (fp32 where
// the CPU has AVX2) or one at a time (fp64): what packing a weight for the register tiles
// costs, so the packing thresholds (geometry.h, layer_gemms.h) depend on it.
inline bool transposes_in_vectors(int64_t element_size) {
  return element_size == int64_t(sizeof(float)) && kIsa != Isa::kScalar;
}

template <typename T>
void transpose_strided(const T* in, int64_t ldi, int64_t R, int64_t C, T* out, int64_t ldo,
                       int64_t first = 0, int64_t last = -1) {
  if (last < 0) last = R;
  for (int64_t r0 = first; r0 < last; r0 += kTransposeTile) {
    const int64_t r1 = std::min(last, r0 + kTransposeTile);
    for (int64_t c0 = 0; c0 < C; c0 += kTransposeTile) {
      const int64_t c1 = std::min(C, c0 + kTransposeTile);
      int64_t r = r0;  // rows from here on go through the scalar copy
#ifdef FASTBIRNN_X86
      if constexpr (std::is_same_v<T, float>) {
        if (transposes_in_vectors(sizeof(T))) {
          const int64_t c8 = c0 + (c1 - c0) / 8 * 8;  // the columns of whole squares
          for (; r + 8 <= r1; r += 8)
            for (int64_t c = c0; c < c8; c += 8)
              transpose_8x8(in + r * ldi + c, ldi, out + c * ldo + r, ldo);
          transpose_rectangle(in, ldi, out, ldo, r0, r, c8, c1);
        }
      }
#endif
      transpose_rectangle(in, ldi, out, ldo, r, r1, c0, c1);
    }
  }
}

// The dense form: a row-major [R, C] matrix into [C, R].
template <typename T>
void transpose(const T* in, int64_t R, int64_t C, T* out, int64_t first = 0, int64_t last = -1) {
  transpose_strided(in, C, R, C, out, R, first, last);
}

// Zeroes columns n0..n0+n of m rows that are ld apart.
template <typename T>
void zero_columns(T* p, int64_t ld, int64_t m, int64_t n0, int64_t n) {
  for (int64_t r = 0; r < m; ++r) std::fill(p + r * ld + n0, p + r * ld + n0 + n, T(0));
}

template <typename T>
bool all_finite(const T* p, int64_t n) {
  // NaN and inf are the values with every exponent bit set; an integer OR-reduction over the
  // bits vectorises (a floating-point one may not be reordered).
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr Bits exponent = sizeof(T) == 4 ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
  Bits nonfinite = 0;
  for (int64_t i = 0; i < n; ++i) {
    Bits bits;
    std::memcpy(&bits, p + i, sizeof(T));
    nonfinite |= Bits((bits & exponent) == exponent);
  }
  return nonfinite == 0;
}

}  // namespace fastbirnn
