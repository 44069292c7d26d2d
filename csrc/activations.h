// tanh and sigmoid over a block of values, vectorised with SLEEF (linked into libtorch_cpu) at
// the engine's ISA level (simd.h): one template over the vector traits for AVX-512 and AVX2.
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
// p[i] = f(p[i]) on whole vectors, the last (partial) one masked: every lane's value is the
// same whatever its position, so the result does not depend on n or the block.
template <typename V, typename T, typename F>
void map_vectors(T* p, int64_t n, const F& f) {
  V::run([&] {
    int64_t i = 0;
    for (; i + V::kLanes <= n; i += V::kLanes) V::store(p + i, f(V::load(p + i)));
    if (i < n) {
      const typename V::Mask m = V::mask(n - i);
      V::store(p + i, m, f(V::load(m, p + i)));
    }
  });
}

template <typename V, typename T>
void tanh_vectors(T* p, int64_t n) {
  map_vectors<V>(p, n, [](typename V::Vec x) { return V::tanh(x); });
}

template <typename V, typename T>
void sigmoid_vectors(T* p, int64_t n) {
  map_vectors<V>(p, n, [](typename V::Vec x) {
    const typename V::Vec one = V::broadcast(T(1));
    return V::div(one, V::add(one, V::exp(V::mul(V::broadcast(T(-1)), x))));
  });
}
#endif

template <typename T>
void tanh_inplace(T* p, int64_t n) {
#ifdef FASTBIRNN_X86
  if (kIsa == Isa::kAvx512) return tanh_vectors<Avx512<T>>(p, n);
  if (kIsa == Isa::kAvx2) return tanh_vectors<Avx2<T>>(p, n);
#endif
  for (int64_t i = 0; i < n; ++i) p[i] = std::tanh(p[i]);
}

template <typename T>
void sigmoid_inplace(T* p, int64_t n) {
#ifdef FASTBIRNN_X86
  if (kIsa == Isa::kAvx512) return sigmoid_vectors<Avx512<T>>(p, n);
  if (kIsa == Isa::kAvx2) return sigmoid_vectors<Avx2<T>>(p, n);
#endif
  for (int64_t i = 0; i < n; ++i) p[i] = T(1) / (T(1) + std::exp(-p[i]));
}

}  // namespace fastbirnn
