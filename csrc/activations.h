// tanh and sigmoid over a block of values, vectorised with SLEEF (linked into libtorch_cpu).
//
// tanh: SLEEF's 3.5-ulp routines, not the 1-ulp ones ATen's tanh calls: those cost 2.6x as much
// (1.50 vs 0.58 ns per fp32 element on Zen 4) and were a quarter of a (32, 128, 128, 128)
// forward, while the products before them already differ from nn.RNN's by more than 2.5 ulp
// (another summation order). tests/test_exactness.py holds the error against an fp64
// reference to nn's own.
//
// sigmoid(x) = 1 / (1 + e^-x) on SLEEF's 1-ulp exp (the one ATen uses): SLEEF's 1-ulp tanh
// costs 5x its exp. It keeps NaN and gives 0/1 at -inf/+inf. (1 - 2 / (1 + e^2x) is not used
// for tanh: off by an absolute ulp of 1 near 0, it tripled the RMS error of LSTM outputs.)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace fastbirnn {

#ifdef FASTBIRNN_X86
template <typename T>
__attribute__((target("avx512f"))) void tanh_avx512(T* p, int64_t n) {
  using V = Avx512<T>;
  for (int64_t i = 0; i < n; i += V::kLanes) {
    const typename V::Mask m = lanes_avx512<T>(i, n);
    V::store(p + i, m, V::tanh(V::load(m, p + i)));
  }
}
__attribute__((target("avx2,fma"))) inline void tanh_avx2(float* p, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, Sleef_tanhf8_u35avx2(_mm256_loadu_ps(p + i)));
  if (i < n) {  // the tail goes through the same routine, via a padded copy
    alignas(32) float tail[8] = {0};
    std::memcpy(tail, p + i, sizeof(float) * (n - i));
    _mm256_store_ps(tail, Sleef_tanhf8_u35avx2(_mm256_load_ps(tail)));
    std::memcpy(p + i, tail, sizeof(float) * (n - i));
  }
}
__attribute__((target("avx2,fma"))) inline void tanh_avx2(double* p, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) _mm256_storeu_pd(p + i, Sleef_tanhd4_u35avx2(_mm256_loadu_pd(p + i)));
  if (i < n) {
    alignas(32) double tail[4] = {0};
    std::memcpy(tail, p + i, sizeof(double) * (n - i));
    _mm256_store_pd(tail, Sleef_tanhd4_u35avx2(_mm256_load_pd(tail)));
    std::memcpy(p + i, tail, sizeof(double) * (n - i));
  }
}

template <typename T>
__attribute__((target("avx512f"))) void sigmoid_avx512(T* p, int64_t n) {
  using V = Avx512<T>;
  const typename V::Vec one = V::broadcast(T(1)), minus_one = V::broadcast(T(-1));
  for (int64_t i = 0; i < n; i += V::kLanes) {
    const typename V::Mask m = lanes_avx512<T>(i, n);
    const typename V::Vec e = V::exp(V::mul(minus_one, V::load(m, p + i)));
    V::store(p + i, m, V::div(one, V::add(one, e)));
  }
}
#endif

enum class TanhImpl { kAvx512, kAvx2, kScalar };

inline TanhImpl pick_tanh() {
#ifdef FASTBIRNN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && Sleef_tanhf16_u35 && Sleef_tanhd8_u35)
    return TanhImpl::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && Sleef_tanhf8_u35avx2 &&
      Sleef_tanhd4_u35avx2)
    return TanhImpl::kAvx2;
#endif
  return TanhImpl::kScalar;
}

inline const TanhImpl kTanh = pick_tanh();

inline const char* tanh_impl_name() {
  switch (kTanh) {
    case TanhImpl::kAvx512: return "sleef-avx512";
    case TanhImpl::kAvx2: return "sleef-avx2";
    default: return "scalar";
  }
}

template <typename T>
void tanh_inplace(T* p, int64_t n) {
#ifdef FASTBIRNN_X86
  if (kTanh == TanhImpl::kAvx512) return tanh_avx512(p, n);
  if (kTanh == TanhImpl::kAvx2) return tanh_avx2(p, n);
#endif
  for (int64_t i = 0; i < n; ++i) p[i] = std::tanh(p[i]);
}

inline const bool kVectorExp = [] {
#ifdef FASTBIRNN_X86
  return kHaveAvx512 && Sleef_expf16_u10 != nullptr && Sleef_expd8_u10 != nullptr;
#else
  return false;
#endif
}();

template <typename T>
void sigmoid_inplace(T* p, int64_t n) {
#ifdef FASTBIRNN_X86
  if (kVectorExp) return sigmoid_avx512(p, n);
#endif
  for (int64_t i = 0; i < n; ++i) p[i] = T(1) / (T(1) + std::exp(-p[i]));
}

}  // namespace fastbirnn
