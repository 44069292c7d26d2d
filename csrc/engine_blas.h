// Engine support: BLAS products, small register-blocked GEMMs and vectorised tanh.
//
// Everything here is independent of the cell and of threads. BLAS and vector math come from
// libtorch_cpu itself (MKL and SLEEF are linked into it); weak references, so a build without
// them falls back to plain loops instead of failing to load.
#pragma once

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__)
#define FASTBIRNN_X86 1
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__APPLE__)
#define FASTBIRNN_WEAK __attribute__((weak))
#else
#define FASTBIRNN_WEAK
#endif

// BLAS and vector math come from libtorch_cpu itself (MKL and SLEEF are linked into it).
// Weak references: if a build lacks them we fall back to plain loops instead of failing.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) FASTBIRNN_WEAK;
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) FASTBIRNN_WEAK;
// MKL's C entry point (the lowercase symbol is the Fortran one, taking a pointer).
int MKL_Set_Num_Threads_Local(int) FASTBIRNN_WEAK;
#ifdef FASTBIRNN_X86
__m512 Sleef_tanhf16_u35(__m512) FASTBIRNN_WEAK;
__m512d Sleef_tanhd8_u35(__m512d) FASTBIRNN_WEAK;
__m512 Sleef_expf16_u10(__m512) FASTBIRNN_WEAK;
__m512d Sleef_expd8_u10(__m512d) FASTBIRNN_WEAK;
__m256 Sleef_tanhf8_u35avx2(__m256) FASTBIRNN_WEAK;
__m256d Sleef_tanhd4_u35avx2(__m256d) FASTBIRNN_WEAK;
#endif
}

namespace fastbirnn {
namespace {

using at::Tensor;

bool have_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

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
void blas<float>(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                 const float* alpha, const float* a, const int* lda, const float* b,
                 const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <>
void blas<double>(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                  const double* alpha, const double* a, const int* lda, const double* b,
                  const int* ldb, const double* beta, double* c, const int* ldc) {
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

// Small products C[M,N] (+)= A[M,K] B[K,N], B row-major with leading dimension ldb: a BLAS
// call costs more than the arithmetic for the per-step block products here (M = batch rows,
// N = one column block, K = H), and a BLAS call repacks its operands every time while these
// read the engine's packed blocks directly. Every element of C is summed in the same order
// (k = 0..K-1 from zero, one fused multiply-add each on the tiles, then C) whatever M, N, the
// tile or the thread, so results are deterministic.
template <typename T>
void small_gemm_loops(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                      int64_t ldb, T beta, T* C, int64_t ldc) {
  // Summed from zero and C added at the end, as on the register tiles; in column chunks so
  // the sums live on the stack (this runs per step and block on CPUs without AVX-512).
  constexpr int64_t kChunk = 64;
  T sum[kChunk];
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j0 = 0; j0 < N; j0 += kChunk) {
      const int64_t n = std::min(kChunk, N - j0);
      std::fill(sum, sum + n, T(0));
      for (int64_t k = 0; k < K; ++k) {
        const T a = A[i * lda + k];
        const T* __restrict__ b = B + k * ldb + j0;
        for (int64_t j = 0; j < n; ++j) sum[j] += a * b[j];
      }
      T* __restrict__ c = C + i * ldc + j0;
      for (int64_t j = 0; j < n; ++j) c[j] = beta == T(0) ? sum[j] : sum[j] + c[j];
    }
  }
}

#ifdef FASTBIRNN_X86
// AVX-512 register tiles: MR rows of C by NV vectors, held in registers for the whole k loop.
// Each k loads NV vectors of B once for MR rows (the one-row form loaded B for every row and
// was load-bound); MR * NV <= 24 leaves registers for B and the broadcast.
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

template <typename T, int NV, int MR>
__attribute__((target("avx512f"))) void gemm_tile_avx512(
    int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, bool accumulate,
    const typename Avx512<T>::Mask* mask, T* C, int64_t ldc) {
  using V = Avx512<T>;
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
      b[v] = v + 1 < NV ? V::load(B + k * ldb + v * V::kLanes)
                        : V::load(last_mask, B + k * ldb + v * V::kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const typename V::Vec a = V::broadcast(A[r * lda + k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(a, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      T* c = C + r * ldc + v * V::kLanes;
      V::store(c, mask[v], accumulate ? V::add(acc[r][v], V::load(mask[v], c)) : acc[r][v]);
    }
}

// The last rows (fewer than a full tile): one tile of exactly that many.
template <typename T, int NV, int R>
__attribute__((target("avx512f"))) void gemm_last_rows_avx512(
    int64_t rows, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, bool accumulate,
    const typename Avx512<T>::Mask* mask, T* C, int64_t ldc) {
  if constexpr (R > 0) {
    if (rows == R)
      return gemm_tile_avx512<T, NV, R>(K, A, lda, B, ldb, accumulate, mask, C, ldc);
    gemm_last_rows_avx512<T, NV, R - 1>(rows, K, A, lda, B, ldb, accumulate, mask, C, ldc);
  }
}

// All rows of C for NV vectors per row: full tiles of MR rows, then one tile for the rest.
template <typename T, int NV>
__attribute__((target("avx512f"))) void small_gemm_avx512(int64_t M, int64_t N, int64_t K,
                                                          const T* A, int64_t lda, const T* B,
                                                          int64_t ldb, T beta, T* C,
                                                          int64_t ldc) {
  using V = Avx512<T>;
  constexpr int MR = 24 / NV < 6 ? 24 / NV : 6;
  typename V::Mask mask[NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t left = std::min<int64_t>(V::kLanes, N - v * V::kLanes);
    mask[v] = typename V::Mask(left >= V::kLanes ? ~0u : (1u << left) - 1);
  }
  const bool accumulate = beta != T(0);
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    gemm_tile_avx512<T, NV, MR>(K, A + i * lda, lda, B, ldb, accumulate, mask, C + i * ldc, ldc);
  gemm_last_rows_avx512<T, NV, MR - 1>(M - i, K, A + i * lda, lda, B, ldb, accumulate, mask,
                                       C + i * ldc, ldc);
}

const bool kHaveAvx512 = [] {
  __builtin_cpu_init();
  return bool(__builtin_cpu_supports("avx512f"));
}();
#endif

// Whether small_gemm has register tiles for N <= kBlockWidth columns on this CPU, so the
// engine's per-step block products use it at every hidden size instead of BLAS.
inline bool have_gemm_tiles() {
#ifdef FASTBIRNN_X86
  return kHaveAvx512;
#else
  return false;
#endif
}

#ifdef FASTBIRNN_X86
// small_gemm_avx512 for the number of vectors N needs, up to the type's maximum.
template <typename T, int NV = 1>
void small_gemm_dispatch(int vectors, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                         const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if constexpr (NV <= Avx512<T>::kMaxVectors) {
    if (vectors == NV) return small_gemm_avx512<T, NV>(M, N, K, A, lda, B, ldb, beta, C, ldc);
    small_gemm_dispatch<T, NV + 1>(vectors, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }
}
#endif

template <typename T>
void small_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
#ifdef FASTBIRNN_X86
  using V = Avx512<T>;
  if (kHaveAvx512 && N <= V::kLanes * V::kMaxVectors)
    return small_gemm_dispatch<T>(int((N + V::kLanes - 1) / V::kLanes), M, N, K, A, lda, B, ldb,
                                  beta, C, ldc);
#endif
  small_gemm_loops<T>(M, N, K, A, lda, B, ldb, beta, C, ldc);
}

// Columns per register-tile panel (the engine's block width), and the K chunk of a long
// product: a [kTileK, 64] panel of B (64 KiB in fp32) stays in L2 while every row tile of C
// passes over it.
constexpr int64_t kTileN = 64;
constexpr int64_t kTileK = 256;

// A product with K in chunks, each chunk's sum added to C (the chunks in k order, so every
// element's sum still has one fixed order), each chunk over panels of kTileN columns. beta
// is 0 or 1.
template <typename T>
void tiled_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                int64_t ldb, T beta, T* C, int64_t ldc) {
  for (int64_t k0 = 0; k0 < K; k0 += kTileK)
    for (int64_t n0 = 0; n0 < N; n0 += kTileN)
      small_gemm<T>(M, std::min(kTileN, N - n0), std::min(kTileK, K - k0), A + k0, lda,
                    B + k0 * ldb + n0, ldb, k0 == 0 ? beta : T(1), C + n0, ldc);
}

// Row-major C[M,N] = op(A)[M,K] op(B)[K,N] + beta C (beta 0 or 1): on register tiles where
// the CPU has them and neither operand is transposed (10-15 % faster than single-threaded
// BLAS at the engine's shapes), else BLAS (which keeps the long-K weight gradients, A^T B,
// where it is faster).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (!trans_a && !trans_b && have_gemm_tiles() && K > 0)
    return tiled_gemm<T>(M, N, K, A, lda, B, ldb, beta, C, ldc);
  blas_gemm<T>(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

// ---- large buffers ----------------------------------------------------------------------

// From this size on, glibc serves every allocation with a fresh mmap (its dynamic threshold
// stops at 32 MiB), so the first write to each 4 KiB page of an output or gradient buffer
// faults: 9 % of a (64, 256, 256, 512) forward's time was the kernel zeroing pages.
constexpr int64_t kHugePageAdviceBytes = int64_t(32) << 20;

// at::empty that asks the kernel for transparent huge pages on the 2 MiB-aligned interior of
// a large buffer before anything touches it (what PyTorch's THP_MEM_ALLOC_ENABLE does for
// every allocation): one fault per 2 MiB instead of 512. Only advice: where THP is off or
// unavailable the buffer is the same, just faulted in 4 KiB pages.
inline Tensor empty_buffer(at::IntArrayRef shape, const at::TensorOptions& options) {
  Tensor t = at::empty(shape, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = t.numel() * int64_t(t.element_size());
  if (bytes >= kHugePageAdviceBytes) {
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + uintptr_t(bytes)) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// ---- scratch buffers, kept per calling thread ----------------------------------------------

// The buffers a call uses internally and never returns (the inference gates, the backward's
// gate gradients, layer-to-layer activations and gradients). A fresh multi-MiB allocation
// faults in every page on first touch whenever glibc has handed the memory back, which came
// and went with the allocator's state: (32, 128, 128, 128) LSTM inference took 14 ms with no
// faults and 25 ms with 4,700. Each slot keeps its buffer for the next call on the thread.
enum Scratch : int {
  kScratchGates, kScratchGradGates, kScratchGradGatesHidden, kScratchGradZ,
  kScratchLayer0, kScratchLayer1, kScratchGradInput0, kScratchGradInput1, kScratchSlots
};
constexpr int64_t kScratchMinBytes = int64_t(1) << 20;     // below: allocating is cheap
constexpr int64_t kScratchCacheBytes = int64_t(128) << 20;  // kept per thread, all slots

// A buffer of at least numel elements for one slot (a fresh one if the slot's buffer is
// still held elsewhere, or if keeping it would pass kScratchCacheBytes).
inline std::array<Tensor, kScratchSlots>& scratch_cache() {
  thread_local std::array<Tensor, kScratchSlots> cache;
  return cache;
}

// Frees this thread's kept scratch buffers; returns the bytes freed. (The benchmarks' peak
// memory calls it first, so a step's scratch counts as that step's allocation.)
inline int64_t release_scratch() {
  int64_t bytes = 0;
  for (Tensor& t : scratch_cache()) {
    if (t.defined()) bytes += int64_t(t.nbytes());
    t = Tensor();
  }
  return bytes;
}

inline Tensor scratch_buffer(Scratch slot, int64_t numel, const at::TensorOptions& options) {
  std::array<Tensor, kScratchSlots>& cache = scratch_cache();
  const int64_t bytes = numel * int64_t(options.dtype().itemsize());
  if (bytes < kScratchMinBytes) return at::empty({numel}, options);
  Tensor& cached = cache[slot];
  if (cached.defined() && cached.use_count() == 1 && cached.dtype() == options.dtype() &&
      cached.numel() >= numel)
    return cached;
  int64_t kept = 0;
  for (int i = 0; i < kScratchSlots; ++i)
    if (i != slot && cache[i].defined()) kept += int64_t(cache[i].nbytes());
  if (kept + bytes > kScratchCacheBytes || (cached.defined() && cached.use_count() > 1))
    return empty_buffer({numel}, options);
  cached = Tensor();  // free the smaller one first
  cached = empty_buffer({numel}, options);
  return cached;
}

// Hidden sizes up to this use small_gemm for the per-step products.
constexpr int64_t kSmallHidden = 64;
// Input projections over at most this many rows (T*B) skip BLAS when the sizes are small too.
constexpr int64_t kSmallRows = 256;

// out[0..n) = sum over rows r of src[r * ld + 0..n), summed pairwise: runs of kSumRun rows
// in order, then the runs' sums combined as a binary tree (a carry chain, as in a binary
// counter), so the rounding error grows with log(rows) instead of rows (a bias gradient sums
// T*B rows; the plain loop's error was 2-4x that of ATen's sum). The tree depends only on
// rows, so the result does too. tmp holds (2 + log2(rows)) * n elements.
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

// out[c, r] = in[r, c] for a row-major [R, C] matrix, in 32 x 32 tiles so that large ones
// do not miss the cache on every strided write.
template <typename T>
void transpose(const T* in, int64_t R, int64_t C, T* out) {
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < R; r0 += kTile)
    for (int64_t c0 = 0; c0 < C; c0 += kTile)
      for (int64_t r = r0; r < std::min(R, r0 + kTile); ++r)
        for (int64_t c = c0; c < std::min(C, c0 + kTile); ++c) out[c * R + r] = in[r * C + c];
}

// ---- tanh, vectorised with SLEEF (linked into libtorch_cpu) ----------------------------------
// The 3.5-ulp routines, not the 1-ulp ones ATen's tanh calls: those cost 2.6x as much (1.50 vs
// 0.58 ns per fp32 element on Zen 4) and were a quarter of a (32, 128, 128, 128) forward, while
// the products before them already differ from nn.RNN's by more than 2.5 ulp (another
// summation order). tests/test_exactness.py holds the error against an fp64 reference to
// nn.RNN's own.

#ifdef FASTBIRNN_X86
// The lanes of vector i of p[0..n), the last one partial.
template <typename T>
typename Avx512<T>::Mask lanes_avx512(int64_t i, int64_t n) {
  const int64_t left = n - i;
  return typename Avx512<T>::Mask(left >= Avx512<T>::kLanes ? ~0u : (1u << left) - 1);
}

template <typename T>
__attribute__((target("avx512f"))) void tanh_avx512(T* p, int64_t n) {
  using V = Avx512<T>;
  for (int64_t i = 0; i < n; i += V::kLanes) {
    const typename V::Mask m = lanes_avx512<T>(i, n);
    V::store(p + i, m, V::tanh(V::load(m, p + i)));
  }
}
__attribute__((target("avx2,fma"))) void tanh_avx2(float* p, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, Sleef_tanhf8_u35avx2(_mm256_loadu_ps(p + i)));
  if (i < n) {  // the tail goes through the same routine, via a padded copy
    alignas(32) float tail[8] = {0};
    std::memcpy(tail, p + i, sizeof(float) * (n - i));
    _mm256_store_ps(tail, Sleef_tanhf8_u35avx2(_mm256_load_ps(tail)));
    std::memcpy(p + i, tail, sizeof(float) * (n - i));
  }
}
__attribute__((target("avx2,fma"))) void tanh_avx2(double* p, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) _mm256_storeu_pd(p + i, Sleef_tanhd4_u35avx2(_mm256_loadu_pd(p + i)));
  if (i < n) {
    alignas(32) double tail[4] = {0};
    std::memcpy(tail, p + i, sizeof(double) * (n - i));
    _mm256_store_pd(tail, Sleef_tanhd4_u35avx2(_mm256_load_pd(tail)));
    std::memcpy(p + i, tail, sizeof(double) * (n - i));
  }
}
#endif

enum class TanhImpl { kAvx512, kAvx2, kScalar };

TanhImpl pick_tanh() {
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

const TanhImpl kTanh = pick_tanh();

const char* tanh_impl_name() {
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


}  // namespace
}  // namespace fastbirnn
