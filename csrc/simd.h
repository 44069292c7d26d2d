// The instruction sets the engine uses, probed once at load, and the AVX-512 vector traits
// the register tiles and activations are written on. Vector math comes from SLEEF, linked into
// libtorch_cpu, through weak references: a torch without it falls back to scalar loops.
#pragma once

#include <cstdint>

#include "blas.h"  // FASTBIRNN_WEAK

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__)
#define FASTBIRNN_X86 1
#include <immintrin.h>
#endif

#ifdef FASTBIRNN_X86
extern "C" {
__m512 Sleef_tanhf16_u35(__m512) FASTBIRNN_WEAK;
__m512d Sleef_tanhd8_u35(__m512d) FASTBIRNN_WEAK;
__m512 Sleef_expf16_u10(__m512) FASTBIRNN_WEAK;
__m512d Sleef_expd8_u10(__m512d) FASTBIRNN_WEAK;
__m256 Sleef_tanhf8_u35avx2(__m256) FASTBIRNN_WEAK;
__m256d Sleef_tanhd4_u35avx2(__m256d) FASTBIRNN_WEAK;
}
#endif

namespace fastbirnn {

#ifdef FASTBIRNN_X86
inline const bool kHaveAvx512 = [] {
  __builtin_cpu_init();
  return bool(__builtin_cpu_supports("avx512f"));
}();

// AVX-512 vectors of T: the register tiles (tiles.h) and the activations (activations.h) are
// written once on these.
template <typename T>
struct Avx512;
template <>
struct Avx512<float> {
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr int kMaxVectors = 4;  // N <= 64
  __attribute__((target("avx512f"))) static Vec zero() { return _mm512_setzero_ps(); }
  __attribute__((target("avx512f"))) static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  __attribute__((target("avx512f"))) static Vec load(Mask m, const float* p) {
    return _mm512_maskz_loadu_ps(m, p);
  }
  __attribute__((target("avx512f"))) static void store(float* p, Mask m, Vec v) {
    _mm512_mask_storeu_ps(p, m, v);
  }
  __attribute__((target("avx512f"))) static Vec broadcast(float a) { return _mm512_set1_ps(a); }
  __attribute__((target("avx512f"))) static Vec fma(Vec a, Vec b, Vec c) {
    return _mm512_fmadd_ps(a, b, c);
  }
  __attribute__((target("avx512f"))) static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  __attribute__((target("avx512f"))) static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  __attribute__((target("avx512f"))) static Vec div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
  __attribute__((target("avx512f"))) static Vec exp(Vec a) { return Sleef_expf16_u10(a); }
  __attribute__((target("avx512f"))) static Vec tanh(Vec a) { return Sleef_tanhf16_u35(a); }
};
template <>
struct Avx512<double> {
  using Vec = __m512d;
  using Mask = __mmask8;
  static constexpr int kLanes = 8;
  static constexpr int kMaxVectors = 8;  // N <= 64
  __attribute__((target("avx512f"))) static Vec zero() { return _mm512_setzero_pd(); }
  __attribute__((target("avx512f"))) static Vec load(const double* p) { return _mm512_loadu_pd(p); }
  __attribute__((target("avx512f"))) static Vec load(Mask m, const double* p) {
    return _mm512_maskz_loadu_pd(m, p);
  }
  __attribute__((target("avx512f"))) static void store(double* p, Mask m, Vec v) {
    _mm512_mask_storeu_pd(p, m, v);
  }
  __attribute__((target("avx512f"))) static Vec broadcast(double a) { return _mm512_set1_pd(a); }
  __attribute__((target("avx512f"))) static Vec fma(Vec a, Vec b, Vec c) {
    return _mm512_fmadd_pd(a, b, c);
  }
  __attribute__((target("avx512f"))) static Vec add(Vec a, Vec b) { return _mm512_add_pd(a, b); }
  __attribute__((target("avx512f"))) static Vec mul(Vec a, Vec b) { return _mm512_mul_pd(a, b); }
  __attribute__((target("avx512f"))) static Vec div(Vec a, Vec b) { return _mm512_div_pd(a, b); }
  __attribute__((target("avx512f"))) static Vec exp(Vec a) { return Sleef_expd8_u10(a); }
  __attribute__((target("avx512f"))) static Vec tanh(Vec a) { return Sleef_tanhd8_u35(a); }
};

// The lanes of vector i of p[0..n), the last one partial.
template <typename T>
typename Avx512<T>::Mask lanes_avx512(int64_t i, int64_t n) {
  const int64_t left = n - i;
  return typename Avx512<T>::Mask(left >= Avx512<T>::kLanes ? ~0u : (1u << left) - 1);
}
#endif

}  // namespace fastbirnn
