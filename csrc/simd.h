// The instruction set the engine uses, decided once at load, and the vector traits the register
// tiles (tiles.h) and the activations (activations.h) are written on, one template over traits
// for every level. Vector math comes from SLEEF, linked into libtorch_cpu, through weak
// references: a torch without it falls back to a lower level.
//
// Levels: avx512 (AVX-512F), avx2 (AVX2 + FMA), scalar (plain loops, vectorised by the
// compiler for the baseline ISA only). The environment variable FASTBIRNN_ISA, read once at
// load, can only lower the level (so CI and benchmarks run the AVX2 path on an AVX-512
// machine); a level the machine lacks falls back to what it has. An unknown value leaves the
// probed level and is reported by isa_request_error() (the Python side raises it at import).
#pragma once

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <string>

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
__m256 Sleef_expf8_u10avx2(__m256) FASTBIRNN_WEAK;
__m256d Sleef_expd4_u10avx2(__m256d) FASTBIRNN_WEAK;
}
#endif

namespace fastbirnn {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };  // ordered: a higher one has more

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// The highest level this CPU and this libtorch's SLEEF both support.
inline Isa probe_isa() {
#ifdef FASTBIRNN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && Sleef_expf16_u10 && Sleef_expd8_u10 &&
      Sleef_tanhf16_u35 && Sleef_tanhd8_u35)
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && Sleef_expf8_u10avx2 &&
      Sleef_expd4_u10avx2 && Sleef_tanhf8_u35avx2 && Sleef_tanhd4_u35avx2)
    return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

// FASTBIRNN_ISA as read at load: the level asked for (the highest if unset or unknown) and,
// for an unknown value, the message Python raises.
struct IsaRequest {
  Isa level = Isa::kAvx512;
  std::string error;
};

inline IsaRequest read_isa_request() {
  IsaRequest request;
  const char* raw = std::getenv("FASTBIRNN_ISA");
  std::string value = raw ? raw : "";
  auto space = [](unsigned char c) { return std::isspace(c) != 0; };
  value.erase(std::remove_if(value.begin(), value.end(), space), value.end());
  std::transform(value.begin(), value.end(), value.begin(),
                 [](unsigned char c) { return char(std::tolower(c)); });
  if (value.empty() || value == "avx512") return request;
  if (value == "avx2")
    request.level = Isa::kAvx2;
  else if (value == "scalar")
    request.level = Isa::kScalar;
  else
    request.error = std::string("FASTBIRNN_ISA=") + raw +
                    " is not one of 'avx512', 'avx2', 'scalar' (unset: the best this CPU has)";
  return request;
}

inline const IsaRequest kIsaRequest = read_isa_request();
// The engine's level: the probe's, lowered to FASTBIRNN_ISA's.
inline const Isa kIsa = std::min(probe_isa(), kIsaRequest.level);

inline const char* isa_request_error() { return kIsaRequest.error.c_str(); }

#ifdef FASTBIRNN_X86
// The generic vector code (tiles.h, activations.h) is compiled only inside V::run, for V's
// instructions; GCC still warns, once per file at its end (so a push/pop around the templates
// cannot silence it), that their vector arguments would change the ABI outside it.
#pragma GCC diagnostic ignored "-Wpsabi"

// Vectors of T for one ISA level: the register tiles and the activations are one template over
// these. Mask selects the first lanes of a partial vector (mask(left): min(left, kLanes) of
// them); a masked load zeroes the others, a masked store leaves them. kMaxVectors: the widest
// tile in vectors (tiles.h widens it for 1 and 2 rows on AVX2); kAccumulators: the registers
// a tile may keep its sums in (the rest hold B's vectors and the broadcast of A). run(f) calls
// f() with the level's instructions enabled and everything f calls inlined into it (GCC's
// target attribute cannot depend on a template argument; flatten carries it into the generic
// code).
template <typename T>
struct Avx512;
template <typename T>
struct Avx2;

#define FASTBIRNN_AVX512 __attribute__((target("avx512f")))
#define FASTBIRNN_AVX2 __attribute__((target("avx2,fma")))

template <>
struct Avx512<float> {
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16, kMaxVectors = 4, kAccumulators = 24;  // N <= 64
  template <typename F>
  FASTBIRNN_AVX512 __attribute__((flatten)) static void run(const F& f) { f(); }
  static Mask mask(int64_t left) { return Mask(left >= kLanes ? ~0u : (1u << left) - 1); }
  FASTBIRNN_AVX512 static Vec zero() { return _mm512_setzero_ps(); }
  FASTBIRNN_AVX512 static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  FASTBIRNN_AVX512 static Vec load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  FASTBIRNN_AVX512 static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  FASTBIRNN_AVX512 static void store(float* p, Mask m, Vec v) { _mm512_mask_storeu_ps(p, m, v); }
  FASTBIRNN_AVX512 static Vec broadcast(float a) { return _mm512_set1_ps(a); }
  FASTBIRNN_AVX512 static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  FASTBIRNN_AVX512 static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  FASTBIRNN_AVX512 static Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  FASTBIRNN_AVX512 static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  FASTBIRNN_AVX512 static Vec div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
  FASTBIRNN_AVX512 static Vec exp(Vec a) { return Sleef_expf16_u10(a); }
  FASTBIRNN_AVX512 static Vec tanh(Vec a) { return Sleef_tanhf16_u35(a); }
};
template <>
struct Avx512<double> {
  using Vec = __m512d;
  using Mask = __mmask8;
  static constexpr int kLanes = 8, kMaxVectors = 8, kAccumulators = 24;  // N <= 64
  template <typename F>
  FASTBIRNN_AVX512 __attribute__((flatten)) static void run(const F& f) { f(); }
  static Mask mask(int64_t left) { return Mask(left >= kLanes ? ~0u : (1u << left) - 1); }
  FASTBIRNN_AVX512 static Vec zero() { return _mm512_setzero_pd(); }
  FASTBIRNN_AVX512 static Vec load(const double* p) { return _mm512_loadu_pd(p); }
  FASTBIRNN_AVX512 static Vec load(Mask m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  FASTBIRNN_AVX512 static void store(double* p, Vec v) { _mm512_storeu_pd(p, v); }
  FASTBIRNN_AVX512 static void store(double* p, Mask m, Vec v) { _mm512_mask_storeu_pd(p, m, v); }
  FASTBIRNN_AVX512 static Vec broadcast(double a) { return _mm512_set1_pd(a); }
  FASTBIRNN_AVX512 static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_pd(a, b, c); }
  FASTBIRNN_AVX512 static Vec add(Vec a, Vec b) { return _mm512_add_pd(a, b); }
  FASTBIRNN_AVX512 static Vec sub(Vec a, Vec b) { return _mm512_sub_pd(a, b); }
  FASTBIRNN_AVX512 static Vec mul(Vec a, Vec b) { return _mm512_mul_pd(a, b); }
  FASTBIRNN_AVX512 static Vec div(Vec a, Vec b) { return _mm512_div_pd(a, b); }
  FASTBIRNN_AVX512 static Vec exp(Vec a) { return Sleef_expd8_u10(a); }
  FASTBIRNN_AVX512 static Vec tanh(Vec a) { return Sleef_tanhd8_u35(a); }
};

// AVX2: 16 ymm registers, so tiles of at most 12 accumulators (6 rows x 16 fp32 columns) and
// 2 vectors wide (8 for one row, 4 for two: tiles.h); wider products run as panels of that
// width. Masks are vectors (vmaskmov), built by comparing the lane index with the lanes left.
template <>
struct Avx2<float> {
  using Vec = __m256;
  using Mask = __m256i;
  static constexpr int kLanes = 8, kMaxVectors = 2, kAccumulators = 12;
  template <typename F>
  FASTBIRNN_AVX2 __attribute__((flatten)) static void run(const F& f) { f(); }
  FASTBIRNN_AVX2 static Mask mask(int64_t left) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(left, kLanes))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  FASTBIRNN_AVX2 static Vec zero() { return _mm256_setzero_ps(); }
  FASTBIRNN_AVX2 static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  FASTBIRNN_AVX2 static Vec load(Mask m, const float* p) { return _mm256_maskload_ps(p, m); }
  FASTBIRNN_AVX2 static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  FASTBIRNN_AVX2 static void store(float* p, Mask m, Vec v) { _mm256_maskstore_ps(p, m, v); }
  FASTBIRNN_AVX2 static Vec broadcast(float a) { return _mm256_set1_ps(a); }
  FASTBIRNN_AVX2 static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  FASTBIRNN_AVX2 static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  FASTBIRNN_AVX2 static Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  FASTBIRNN_AVX2 static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  FASTBIRNN_AVX2 static Vec div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
  FASTBIRNN_AVX2 static Vec exp(Vec a) { return Sleef_expf8_u10avx2(a); }
  FASTBIRNN_AVX2 static Vec tanh(Vec a) { return Sleef_tanhf8_u35avx2(a); }
};
template <>
struct Avx2<double> {
  using Vec = __m256d;
  using Mask = __m256i;
  static constexpr int kLanes = 4, kMaxVectors = 2, kAccumulators = 12;
  template <typename F>
  FASTBIRNN_AVX2 __attribute__((flatten)) static void run(const F& f) { f(); }
  FASTBIRNN_AVX2 static Mask mask(int64_t left) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(std::min<int64_t>(left, kLanes)),
                              _mm256_setr_epi64x(0, 1, 2, 3));
  }
  FASTBIRNN_AVX2 static Vec zero() { return _mm256_setzero_pd(); }
  FASTBIRNN_AVX2 static Vec load(const double* p) { return _mm256_loadu_pd(p); }
  FASTBIRNN_AVX2 static Vec load(Mask m, const double* p) { return _mm256_maskload_pd(p, m); }
  FASTBIRNN_AVX2 static void store(double* p, Vec v) { _mm256_storeu_pd(p, v); }
  FASTBIRNN_AVX2 static void store(double* p, Mask m, Vec v) { _mm256_maskstore_pd(p, m, v); }
  FASTBIRNN_AVX2 static Vec broadcast(double a) { return _mm256_set1_pd(a); }
  FASTBIRNN_AVX2 static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_pd(a, b, c); }
  FASTBIRNN_AVX2 static Vec add(Vec a, Vec b) { return _mm256_add_pd(a, b); }
  FASTBIRNN_AVX2 static Vec sub(Vec a, Vec b) { return _mm256_sub_pd(a, b); }
  FASTBIRNN_AVX2 static Vec mul(Vec a, Vec b) { return _mm256_mul_pd(a, b); }
  FASTBIRNN_AVX2 static Vec div(Vec a, Vec b) { return _mm256_div_pd(a, b); }
  FASTBIRNN_AVX2 static Vec exp(Vec a) { return Sleef_expd4_u10avx2(a); }
  FASTBIRNN_AVX2 static Vec tanh(Vec a) { return Sleef_tanhd4_u35avx2(a); }
};

#undef FASTBIRNN_AVX512
#undef FASTBIRNN_AVX2

#endif

}  // namespace fastbirnn
