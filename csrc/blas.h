// BLAS from libtorch_cpu itself (MKL is linked into it), reached through weak references so a
// torch built without it still loads: the products then fall back to plain loops.
//
// Row-major products on column-major BLAS, and the scope that pins MKL to one thread, so that
// a product computes the same bits inside a parallel region and outside one.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#if defined(__GNUC__) && !defined(__APPLE__)
#define FASTBIRNN_WEAK __attribute__((weak))
#else
#define FASTBIRNN_WEAK
#endif

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) FASTBIRNN_WEAK;
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) FASTBIRNN_WEAK;
// MKL's C entry point (the lowercase symbol is the Fortran one, taking a pointer).
int MKL_Set_Num_Threads_Local(int) FASTBIRNN_WEAK;
}

namespace fastbirnn {

inline bool have_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// Pins MKL to one thread in this scope; BLAS calls inside parallel regions and the inline
// (1-thread) path then compute identically.
struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

template <typename T>
void blas(const char* ta, const char* tb, const int* m, const int* n, const int* k, const T* alpha,
          const T* a, const int* lda, const T* b, const int* ldb, const T* beta, T* c,
          const int* ldc);
template <>
inline void blas<float>(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                        const float* alpha, const float* a, const int* lda, const float* b,
                        const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <>
inline void blas<double>(const char* ta, const char* tb, const int* m, const int* n,
                         const int* k, const double* alpha, const double* a, const int* lda,
                         const double* b, const int* ldb, const double* beta, double* c,
                         const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C[M,N] = op(A)[M,K] op(B)[K,N] + beta C. BLAS is column-major, so this is the
// column-major product C^T = op(B)^T op(A)^T: swap the operands, keep the flags.
template <typename T>
void blas_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
               int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  if (have_blas()) {
    TORCH_CHECK(std::max({M, N, K, lda, ldb, ldc}) <= INT32_MAX,
                "fastbirnn cpp: tensor too large for 32-bit BLAS");
    const int m = int(M), n = int(N), k = int(K), la = int(lda), lb = int(ldb), lc = int(ldc);
    const T one(1);
    blas<T>(trans_b ? "T" : "N", trans_a ? "T" : "N", &n, &m, &k, &one, B, &lb, A, &la, &beta, C,
            &lc);
    return;
  }
  // Plain loops: only for a torch built without an exported BLAS; correct, not fast.
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      T acc(0);
      for (int64_t p = 0; p < K; ++p) {
        const T a = trans_a ? A[p * lda + i] : A[i * lda + p];
        const T b = trans_b ? B[j * ldb + p] : B[p * ldb + j];
        acc += a * b;
      }
      C[i * ldc + j] = acc + (beta == T(0) ? T(0) : beta * C[i * ldc + j]);
    }
  }
}

}  // namespace fastbirnn
