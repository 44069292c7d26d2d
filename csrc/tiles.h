// Products the engine runs itself: small register-blocked GEMMs for the per-step block
// products (a BLAS call costs more than their arithmetic and repacks its operands every
// time), and those tiles in panels for long products. Every element of C is summed in one
// fixed order (k = 0..K-1 from zero, one fused multiply-add each, then C once) whatever M, N,
// the tile or the thread: results are deterministic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "blas.h"
#include "simd.h"

namespace fastbirnn {

// Element (r, k) of A[M, K] and A's rows from i on: A row-major with leading dimension lda, or
// (kTransA) A^T stored row-major, [K, M] with leading dimension lda, as the weight gradients'
// dG^T reads the gate gradients. Both forms sum the same products in the same order.
template <bool kTransA, typename T>
inline const T& element_of_a(const T* A, int64_t lda, int64_t r, int64_t k) {
  return kTransA ? A[k * lda + r] : A[r * lda + k];
}
template <bool kTransA, typename T>
inline const T* rows_of_a(const T* A, int64_t lda, int64_t i) {
  return kTransA ? A + i : A + i * lda;
}
template <bool kTransA, typename T>
inline const T* steps_of_a(const T* A, int64_t lda, int64_t k) {
  return kTransA ? A + k * lda : A + k;
}

// Plain loops: for the scalar level (simd.h). Summed from zero and C added at the end, as on the
// register tiles; in column chunks so the sums live on the stack (this runs per step and
// block).
template <bool kTransA, typename T>
void small_gemm_loops(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                      int64_t ldb, T beta, T* C, int64_t ldc) {
  constexpr int64_t kChunk = 64;
  T sum[kChunk];
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j0 = 0; j0 < N; j0 += kChunk) {
      const int64_t n = std::min(kChunk, N - j0);
      std::fill(sum, sum + n, T(0));
      for (int64_t k = 0; k < K; ++k) {
        const T a = element_of_a<kTransA>(A, lda, i, k);
        const T* __restrict__ b = B + k * ldb + j0;
        for (int64_t j = 0; j < n; ++j) sum[j] += a * b[j];
      }
      T* __restrict__ c = C + i * ldc + j0;
      for (int64_t j = 0; j < n; ++j) c[j] = beta == T(0) ? sum[j] : sum[j] + c[j];
    }
  }
}

#ifdef FASTBIRNN_X86
// Register tiles on the vector traits V (simd.h; AVX-512 or AVX2): MR rows of C by NV
// vectors, held in registers for the whole k loop. Each k loads NV vectors of B once for MR
// rows (the one-row form loaded B for every row and was load-bound); MR * NV <=
// V::kAccumulators leaves registers for B and the broadcast (AVX2's one-row tile of 8 vectors
// uses each B vector once: its load can be the FMA's operand). kPartial: the last vector is
// partial and goes through masks (which cost on AVX2, vmaskmov, even when full).
template <typename V, int NV, int MR, bool kPartial, bool kTransA, typename T>
void gemm_tile(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, bool accumulate,
               const typename V::Mask* mask, T* C, int64_t ldc) {
  // Fully unrolled small loops: the accumulators must be registers, not an array in memory.
  // The products are summed from zero and C is added once at the end, not used as the
  // starting value: the partial sums stay the size of the products (not of C), so a long
  // K in chunks sums blockwise and h W_hh^T adds to the input projection in one rounding.
  // That halved the fp32 error of the outputs against fp64 (tests/test_exactness.py).
  typename V::Vec acc[MR][NV];
  const typename V::Mask last_mask = mask[NV - 1];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  for (int64_t k = 0; k < K; ++k) {
    typename V::Vec b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)  // only the last vector can be partial
      b[v] = kPartial && v + 1 == NV ? V::load(last_mask, B + k * ldb + v * V::kLanes)
                                     : V::load(B + k * ldb + v * V::kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const typename V::Vec a = V::broadcast(element_of_a<kTransA>(A, lda, r, k));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(a, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      T* c = C + r * ldc + v * V::kLanes;
      if constexpr (kPartial)
        V::store(c, mask[v], accumulate ? V::add(acc[r][v], V::load(mask[v], c)) : acc[r][v]);
      else
        V::store(c, accumulate ? V::add(acc[r][v], V::load(c)) : acc[r][v]);
    }
}

// The last rows (fewer than a full tile): one tile of exactly that many.
template <typename V, int NV, int R, bool kPartial, bool kTransA, typename T>
void gemm_last_rows(int64_t rows, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                    bool accumulate, const typename V::Mask* mask, T* C, int64_t ldc) {
  if constexpr (R > 0) {
    if (rows == R)
      return gemm_tile<V, NV, R, kPartial, kTransA>(K, A, lda, B, ldb, accumulate, mask, C, ldc);
    gemm_last_rows<V, NV, R - 1, kPartial, kTransA>(rows, K, A, lda, B, ldb, accumulate, mask, C,
                                                    ldc);
  }
}

// All rows of C for NV vectors per row, of which the last is partial or not: full tiles of
// MR rows, then one tile for the rest.
template <typename V, int NV, bool kPartial, bool kTransA, typename T>
void gemm_rows(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
               bool accumulate, const typename V::Mask* mask, T* C, int64_t ldc) {
  constexpr int MR = V::kAccumulators / NV < 6 ? V::kAccumulators / NV : 6;
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    gemm_tile<V, NV, MR, kPartial, kTransA>(K, rows_of_a<kTransA>(A, lda, i), lda, B, ldb,
                                            accumulate, mask, C + i * ldc, ldc);
  gemm_last_rows<V, NV, MR - 1, kPartial, kTransA>(M - i, K, rows_of_a<kTransA>(A, lda, i), lda,
                                                   B, ldb, accumulate, mask, C + i * ldc, ldc);
}

// All rows of C for NV vectors per row (N > (NV - 1) lanes), compiled for V's instructions
// with everything inlined (V::run).
template <typename V, int NV, bool kTransA, typename T>
void small_gemm_vectors(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                        int64_t ldb, T beta, T* C, int64_t ldc) {
  V::run([&] {
    typename V::Mask mask[NV];
    for (int v = 0; v < NV; ++v) mask[v] = V::mask(N - v * V::kLanes);
    const bool accumulate = beta != T(0);
    if (N % V::kLanes != 0)
      gemm_rows<V, NV, true, kTransA>(M, K, A, lda, B, ldb, accumulate, mask, C, ldc);
    else
      gemm_rows<V, NV, false, kTransA>(M, K, A, lda, B, ldb, accumulate, mask, C, ldc);
  });
}

// small_gemm_vectors for the number of vectors N needs (at most kWidest).
template <typename V, bool kTransA, int kWidest, int NV = 1, typename T>
void small_gemm_dispatch(int vectors, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                         const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if constexpr (NV <= kWidest) {
    if (vectors == NV)
      return small_gemm_vectors<V, NV, kTransA>(M, N, K, A, lda, B, ldb, beta, C, ldc);
    small_gemm_dispatch<V, kTransA, kWidest, NV + 1>(vectors, M, N, K, A, lda, B, ldb, beta, C,
                                                     ldc);
  }
}

// small_gemm on V's tiles: panels of kVectors vectors (V::kMaxVectors: all of N <= 64 at once
// on AVX-512), the last one narrower. Columns apart never share a sum, so the panels change
// no result.
template <typename V, bool kTransA, int kVectors = V::kMaxVectors, typename T>
void small_gemm_panels(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                       int64_t ldb, T beta, T* C, int64_t ldc) {
  constexpr int64_t kPanel = int64_t(V::kLanes) * kVectors;
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    const int64_t n = std::min(kPanel, N - n0);
    small_gemm_dispatch<V, kTransA, kVectors>(int((n + V::kLanes - 1) / V::kLanes), M, n, K, A,
                                              lda, B + n0, ldb, beta, C + n0, ldc);
  }
}

// small_gemm on AVX2 for M rows: 2-vector panels keep 12 sums in 6 rows, but only 2 in one
// row and 4 in two, too few to hide the FMA latency (batch-1 steps ran below MKL's GEMV), so
// one row takes 8-vector panels and two rows 4-vector ones: 8 sums each.
template <typename T, bool kTransA>
void small_gemm_avx2(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                     int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 1) return small_gemm_panels<Avx2<T>, kTransA, 8>(M, N, K, A, lda, B, ldb, beta, C, ldc);
  if (M == 2) return small_gemm_panels<Avx2<T>, kTransA, 4>(M, N, K, A, lda, B, ldb, beta, C, ldc);
  small_gemm_panels<Avx2<T>, kTransA>(M, N, K, A, lda, B, ldb, beta, C, ldc);
}
#endif

// Whether small_gemm has register tiles on this CPU (at the engine's ISA level), so the
// engine's per-step block products use it at every hidden size instead of BLAS.
inline bool have_gemm_tiles() { return kIsa != Isa::kScalar; }

// Small products C[M,N] (+)= op(A)[M,K] B[K,N] (beta 0 or 1; op(A) = A^T, stored [K, M], when
// kTransA), B row-major with leading dimension ldb: on register tiles where the CPU has them
// (any N; on AVX-512 N <= 64 is one panel), else plain loops.
template <typename T, bool kTransA = false>
void small_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
#ifdef FASTBIRNN_X86
  if (kIsa == Isa::kAvx512)
    return small_gemm_panels<Avx512<T>, kTransA>(M, N, K, A, lda, B, ldb, beta, C, ldc);
  if (kIsa == Isa::kAvx2) return small_gemm_avx2<T, kTransA>(M, N, K, A, lda, B, ldb, beta, C, ldc);
#endif
  small_gemm_loops<kTransA, T>(M, N, K, A, lda, B, ldb, beta, C, ldc);
}

// Columns per register-tile panel (the engine's block width), and the K chunk of a long
// product: a [kTileK, 64] panel of B (64 KiB in fp32) stays in L2 while every row tile of C
// passes over it.
constexpr int64_t kTileN = 64;
constexpr int64_t kTileK = 256;

// A product with K in chunks, each chunk's sum added to C (the chunks in k order, so every
// element's sum still has one fixed order), each chunk over panels of kTileN columns. beta
// is 0 or 1.
template <typename T, bool kTransA = false>
void tiled_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                int64_t ldb, T beta, T* C, int64_t ldc) {
  for (int64_t k0 = 0; k0 < K; k0 += kTileK)
    for (int64_t n0 = 0; n0 < N; n0 += kTileN)
      small_gemm<T, kTransA>(M, std::min(kTileN, N - n0), std::min(kTileK, K - k0),
                             steps_of_a<kTransA>(A, lda, k0), lda, B + k0 * ldb + n0, ldb,
                             k0 == 0 ? beta : T(1), C + n0, ldc);
}

// Row-major C[M,N] = op(A)[M,K] op(B)[K,N] + beta C (beta 0 or 1): on register tiles where
// the CPU has them and B is not transposed (10-15 % faster than single-threaded BLAS at the
// engine's shapes; for the weight gradients' dG^T X, with K all the steps, 7-35 % faster than
// single-threaded MKL on Zen 4 at the engine's shapes, 3 % slower at H 64 with T*B 16000),
// else BLAS. BLAS starts its sums from C where beta is 1; the tiles sum the products from zero
// and add C once, which halves the fp32 error against fp64 where C is large (the projection
// under h W_hh^T, GRU's carried gradient under dG W_hh): with beta 1, BLAS writes the
// products to scratch and they are added the same way (at the scalar level GRU's weight and
// bias gradients had 2.1-2.4x nn's error without it, tests/test_exactness.py).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (!trans_b && have_gemm_tiles() && K > 0) {
    if (trans_a) return tiled_gemm<T, true>(M, N, K, A, lda, B, ldb, beta, C, ldc);
    return tiled_gemm<T>(M, N, K, A, lda, B, ldb, beta, C, ldc);
  }
  if (beta == T(0) || M <= 0 || N <= 0)
    return blas_gemm<T>(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
  // In row chunks of at most kScratch elements (a chunk's rows depend only on N).
  constexpr int64_t kScratch = int64_t(1) << 14;
  const int64_t chunk = std::max<int64_t>(1, kScratch / N);
  std::vector<T> products(size_t(std::min(chunk, M)) * N);
  for (int64_t i0 = 0; i0 < M; i0 += chunk) {
    const int64_t m = std::min(chunk, M - i0);
    const T* A_rows = trans_a ? A + i0 : A + i0 * lda;
    blas_gemm<T>(trans_a, trans_b, m, N, K, A_rows, lda, B, ldb, T(0), products.data(), N);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < N; ++j) C[(i0 + i) * ldc + j] += products[i * N + j];
  }
}

}  // namespace fastbirnn
