// Whole-matrix helpers of the engine: pairwise column sums (the bias gradients), a cache-blocked
// transpose, and a check for NaN/inf.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

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
// default), in 32 x 32 tiles so that large ones do not miss the cache on every strided write.
// Row ranges write disjoint parts of out: workers can share one transpose.
constexpr int64_t kTransposeTile = 8;

template <typename T>
void transpose_strided(const T* in, int64_t ldi, int64_t R, int64_t C, T* out, int64_t ldo,
                       int64_t first = 0, int64_t last = -1) {
  if (last < 0) last = R;
  for (int64_t r0 = first; r0 < last; r0 += kTransposeTile)
    for (int64_t c0 = 0; c0 < C; c0 += kTransposeTile)
      for (int64_t r = r0; r < std::min(last, r0 + kTransposeTile); ++r)
        for (int64_t c = c0; c < std::min(C, c0 + kTransposeTile); ++c)
          out[c * ldo + r] = in[r * ldi + c];
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
