// The bfloat16 engine's one rounding: a product operand the engine computes itself (h_{t-1},
// a layer's outputs, the gate gradients) rounded to the nearest bf16, as torch's own
// conversion does it (c10::BFloat16: ties to even, NaN to 0x7FC0). A product of two bf16
// values is exact in fp32, so fp32 products on these operands are bf16 products with fp32
// accumulation (geometry.h's Geometry::round_bf16); the bf16 tiles (tiles_bf16.h) take the
// same operands as bf16 bits.
//
// The conversions run per step and block, so they are written branch-free for the compiler
// to vectorise, and compiled for AVX-512 too where the engine runs it.
#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace fastbirnn {

using bf16_bits = uint16_t;

// c10::BFloat16's rounding, without its branch.
inline bf16_bits to_bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return v != v ? bf16_bits(0x7FC0) : bf16_bits(rounded);
}

inline float bf16_value(bf16_bits b) {
  const uint32_t u = uint32_t(b) << 16;
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

namespace detail {
#define FASTBIRNN_BF16_LOOPS(suffix, attributes)                                              \
  attributes inline void round_in_place_##suffix(float* v, int64_t n) {                       \
    for (int64_t j = 0; j < n; ++j) v[j] = bf16_value(to_bf16_bits(v[j]));                    \
  }                                                                                           \
  attributes inline void to_bits_##suffix(const float* src, int64_t n, bf16_bits* dst) {      \
    for (int64_t j = 0; j < n; ++j) dst[j] = to_bf16_bits(src[j]);                            \
  }                                                                                           \
  attributes inline void round_and_bits_##suffix(float* v, int64_t n, bf16_bits* dst) {       \
    for (int64_t j = 0; j < n; ++j) {                                                         \
      dst[j] = to_bf16_bits(v[j]);                                                            \
      v[j] = bf16_value(dst[j]);                                                              \
    }                                                                                         \
  }                                                                                           \
  attributes inline void to_bits_adding_##suffix(const float* src, int64_t n, bf16_bits* dst, \
                                                 float* sums) {                               \
    for (int64_t j = 0; j < n; ++j) {                                                         \
      dst[j] = to_bf16_bits(src[j]);                                                          \
      sums[j] += bf16_value(dst[j]);                                                          \
    }                                                                                         \
  }
FASTBIRNN_BF16_LOOPS(baseline, )
#ifdef FASTBIRNN_X86
FASTBIRNN_BF16_LOOPS(avx512, __attribute__((target("avx512f"))))
#endif
#undef FASTBIRNN_BF16_LOOPS
}  // namespace detail

// values[0, n) rounded to bf16 in place.
inline void round_to_bf16(float* values, int64_t n) {
#ifdef FASTBIRNN_X86
  if (kIsa == Isa::kAvx512) return detail::round_in_place_avx512(values, n);
#endif
  detail::round_in_place_baseline(values, n);
}
// The engine's templates are instantiated for fp64 too, which never rounds.
inline void round_to_bf16(double* values, int64_t n) {
  for (int64_t j = 0; j < n; ++j) values[j] = bf16_value(to_bf16_bits(float(values[j])));
}

// values[0, n) rounded to bf16 in place, and their bits into dst (one pass for both).
inline void round_to_bf16(float* values, int64_t n, bf16_bits* dst) {
#ifdef FASTBIRNN_X86
  if (kIsa == Isa::kAvx512) return detail::round_and_bits_avx512(values, n, dst);
#endif
  detail::round_and_bits_baseline(values, n, dst);
}
inline void round_to_bf16(double* values, int64_t n, bf16_bits* dst) {
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = to_bf16_bits(float(values[j]));
    values[j] = bf16_value(dst[j]);
  }
}

// n values rounded to bf16 bits into dst.
inline void to_bf16_row(const float* src, int64_t n, bf16_bits* dst) {
#ifdef FASTBIRNN_X86
  if (kIsa == Isa::kAvx512) return detail::to_bits_avx512(src, n, dst);
#endif
  detail::to_bits_baseline(src, n, dst);
}
inline void to_bf16_row(const double* src, int64_t n, bf16_bits* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = to_bf16_bits(float(src[j]));
}

// n values rounded to bf16 bits into dst, and the rounded values added to sums[0, n).
inline void to_bf16_row_adding(const float* src, int64_t n, bf16_bits* dst, float* sums) {
#ifdef FASTBIRNN_X86
  if (kIsa == Isa::kAvx512) return detail::to_bits_adding_avx512(src, n, dst, sums);
#endif
  detail::to_bits_adding_baseline(src, n, dst, sums);
}
inline void to_bf16_row_adding(const double* src, int64_t n, bf16_bits* dst, double* sums) {
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = to_bf16_bits(float(src[j]));
    sums[j] += bf16_value(dst[j]);
  }
}

}  // namespace fastbirnn
