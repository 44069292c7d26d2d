// Fused bidirectional Elman RNN for CPU: the whole layer stack in one call.
//
// Forward, per layer: the input projection and the recurrence of each direction run on their
// own thread (direction d = thread d), each step one small GEMM into the output buffer plus a
// fused bias + activation. Backward: BPTT per direction from the saved outputs (no saved
// pre-activations), then big GEMMs over all steps for dW_ih, dW_hh, db and dX.
//
// Determinism: every GEMM is a single-threaded BLAS call on a block whose shape depends only
// on the problem, never on the thread count, so results are bit-identical for any
// torch.get_num_threads() (multi-threaded MKL splits long reductions differently per count).
//
// Layout: activations are "rows" of width D*H; row (t, b) sits at t*st + b*sb, with
// (st, sb) = (B, 1) for time-major input and (1, T) for batch_first, so batch_first needs
// no transposes.

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

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
__m512 Sleef_tanhf16_u10(__m512) FASTBIRNN_WEAK;
__m512d Sleef_tanhd8_u10(__m512d) FASTBIRNN_WEAK;
__m256 Sleef_tanhf8_u10avx2(__m256) FASTBIRNN_WEAK;
__m256d Sleef_tanhd4_u10avx2(__m256d) FASTBIRNN_WEAK;
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
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
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

// Small products C[M,N] (+)= A[M,K] B[K,N] with B contiguous: a BLAS call costs more than the
// arithmetic for the tiny hidden sizes here. The axpy form vectorises over N without
// reordering any sum, so results stay deterministic.
template <typename T>
void small_gemm_loops(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, T beta,
                      T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    T* __restrict__ c = C + i * ldc;
    if (beta == T(0)) std::fill(c, c + N, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[i * lda + k];
      const T* __restrict__ b = B + k * N;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

#ifdef FASTBIRNN_X86
// The same axpy form for float with N <= 64 on AVX-512: a row of C stays in NV registers for
// the whole k loop (the portable loops load and store C at every k, at SSE width).
template <int NV>
__attribute__((target("avx512f"))) void small_gemm_avx512(int64_t M, int64_t N, int64_t K,
                                                          const float* A, int64_t lda,
                                                          const float* B, float beta, float* C,
                                                          int64_t ldc) {
  __mmask16 mask[NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t left = std::min<int64_t>(16, N - 16 * v);
    mask[v] = __mmask16(left >= 16 ? 0xFFFFu : (1u << left) - 1);
  }
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    __m512 acc[NV];
    for (int v = 0; v < NV; ++v)
      acc[v] = beta == 0.f ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[v], c + 16 * v);
    const float* a = A + i * lda;
    for (int64_t k = 0; k < K; ++k) {
      const __m512 ak = _mm512_set1_ps(a[k]);
      const float* b = B + k * N;
      for (int v = 0; v < NV; ++v)
        acc[v] = _mm512_fmadd_ps(ak, _mm512_maskz_loadu_ps(mask[v], b + 16 * v), acc[v]);
    }
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(c + 16 * v, mask[v], acc[v]);
  }
}

const bool kHaveAvx512 = [] {
  __builtin_cpu_init();
  return bool(__builtin_cpu_supports("avx512f"));
}();
#endif

template <typename T>
void small_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, T beta,
                T* C, int64_t ldc) {
#ifdef FASTBIRNN_X86
  if constexpr (std::is_same_v<T, float>) {
    if (kHaveAvx512 && N <= 64) {
      switch ((N + 15) / 16) {
        case 1: return small_gemm_avx512<1>(M, N, K, A, lda, B, beta, C, ldc);
        case 2: return small_gemm_avx512<2>(M, N, K, A, lda, B, beta, C, ldc);
        case 3: return small_gemm_avx512<3>(M, N, K, A, lda, B, beta, C, ldc);
        case 4: return small_gemm_avx512<4>(M, N, K, A, lda, B, beta, C, ldc);
      }
    }
  }
#endif
  small_gemm_loops<T>(M, N, K, A, lda, B, beta, C, ldc);
}

// Hidden sizes up to this use small_gemm for the per-step products.
constexpr int64_t kSmallHidden = 64;
// Input projections over at most this many rows (T*B) skip BLAS when the sizes are small too.
constexpr int64_t kSmallRows = 256;

// out[c, r] = in[r, c] for a small row-major [R, C] matrix.
template <typename T>
void transpose(const T* in, int64_t R, int64_t C, T* out) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) out[c * R + r] = in[r * C + c];
}

// ---- tanh, vectorised with the same SLEEF routines (1-ulp) that ATen's tanh uses ----------

#ifdef FASTBIRNN_X86
__attribute__((target("avx512f"))) void tanh_avx512(float* p, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(p + i, Sleef_tanhf16_u10(_mm512_loadu_ps(p + i)));
  if (i < n) {
    const __mmask16 m = __mmask16((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(p + i, m, Sleef_tanhf16_u10(_mm512_maskz_loadu_ps(m, p + i)));
  }
}
__attribute__((target("avx512f"))) void tanh_avx512(double* p, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm512_storeu_pd(p + i, Sleef_tanhd8_u10(_mm512_loadu_pd(p + i)));
  if (i < n) {
    const __mmask8 m = __mmask8((1u << (n - i)) - 1);
    _mm512_mask_storeu_pd(p + i, m, Sleef_tanhd8_u10(_mm512_maskz_loadu_pd(m, p + i)));
  }
}
__attribute__((target("avx2,fma"))) void tanh_avx2(float* p, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, Sleef_tanhf8_u10avx2(_mm256_loadu_ps(p + i)));
  if (i < n) {  // the tail goes through the same routine, via a padded copy
    alignas(32) float tail[8] = {0};
    std::memcpy(tail, p + i, sizeof(float) * (n - i));
    _mm256_store_ps(tail, Sleef_tanhf8_u10avx2(_mm256_load_ps(tail)));
    std::memcpy(p + i, tail, sizeof(float) * (n - i));
  }
}
__attribute__((target("avx2,fma"))) void tanh_avx2(double* p, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) _mm256_storeu_pd(p + i, Sleef_tanhd4_u10avx2(_mm256_loadu_pd(p + i)));
  if (i < n) {
    alignas(32) double tail[4] = {0};
    std::memcpy(tail, p + i, sizeof(double) * (n - i));
    _mm256_store_pd(tail, Sleef_tanhd4_u10avx2(_mm256_load_pd(tail)));
    std::memcpy(p + i, tail, sizeof(double) * (n - i));
  }
}
#endif

enum class TanhImpl { kAvx512, kAvx2, kScalar };

TanhImpl pick_tanh() {
#ifdef FASTBIRNN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && Sleef_tanhf16_u10 && Sleef_tanhd8_u10)
    return TanhImpl::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && Sleef_tanhf8_u10avx2 &&
      Sleef_tanhd4_u10avx2)
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

// h = act(c + bias), in place.
template <typename T>
inline void activate(T* c, const T* bias, int64_t H, bool relu) {
  if (bias)
    for (int64_t j = 0; j < H; ++j) c[j] += bias[j];
  if (relu) {
    // Written as "<= 0 -> 0" so a NaN stays NaN, as in torch.relu (a max instruction would
    // return 0 for it and hide a diverging run).
    for (int64_t j = 0; j < H; ++j) c[j] = c[j] <= T(0) ? T(0) : c[j];
  } else {
    tanh_inplace(c, H);
  }
}

// ---- the two recurrences of one direction ---------------------------------------------

struct Geometry {
  int64_t T, B, D, H;
  int64_t st, sb;            // row strides of time and batch (in rows)
  const int64_t* lengths;    // [B] or nullptr (every row runs T steps)
  int64_t DH() const { return D * H; }
  bool active(int64_t t, int64_t b) const { return lengths == nullptr || t < lengths[b]; }
  // Rows [0, bound) hold every row active at step t: BLAS needs no more than that.
  int64_t active_bound(int64_t t) const {
    if (lengths == nullptr) return B;
    int64_t bound = B;
    while (bound > 0 && lengths[bound - 1] <= t) --bound;
    return bound;
  }
  // Step t of direction d at position s of its visiting order.
  int64_t step(int d, int64_t s) const { return d == 0 ? s : T - 1 - s; }
};

// In: Hs holds the projection X W_ih^T (no bias) in direction d's columns. Out: Hs holds h_t
// (zero past each row's length); state [B,H] (starting at h0, or 0) ends as h_n.
template <typename T>
void recurrence_forward_dir(const Geometry& g, int d, T* Hs, const T* W_hh, const T* bias,
                            const T* h0, bool relu, T* state) {
  const int64_t H = g.H, ld = g.sb * g.DH();
  // W_hh^T, the layout small_gemm wants; on the stack (no malloc per call).
  alignas(64) T W_t[kSmallHidden * kSmallHidden];
  if (H <= kSmallHidden) transpose(W_hh, H, H, W_t);
  if (h0)
    std::memcpy(state, h0, sizeof(T) * g.B * H);
  else
    std::memset(state, 0, sizeof(T) * g.B * H);
  for (int64_t s = 0; s < g.T; ++s) {
    const int64_t t = g.step(d, s);
    T* C = Hs + t * g.st * g.DH() + d * H;
    const int64_t bound = g.active_bound(t);
    if (H <= kSmallHidden)
      small_gemm<T>(bound, H, H, state, H, W_t, T(1), C, ld);
    else
      gemm<T>(false, true, bound, H, H, state, H, W_hh, H, T(1), C, ld);  // C += h W_hh^T
    for (int64_t b = 0; b < g.B; ++b) {
      T* row = C + b * ld;
      if (b < bound && g.active(t, b)) {
        activate(row, bias, H, relu);
        std::memcpy(state + b * H, row, sizeof(T) * H);
      } else {
        std::memset(row, 0, sizeof(T) * H);
      }
    }
  }
}

// BPTT of direction d, time reversed. dOut (may be null) and Hs share the row layout; writes
// dZ (zero past lengths). carry [B,H] starts as dh_n (or 0) and ends as dh0. tmp is [B,H].
template <typename T>
void recurrence_backward_dir(const Geometry& g, int d, const T* dOut, const T* Hs, const T* W_hh,
                             bool relu, T* dZ, T* carry, T* tmp) {
  const int64_t H = g.H, ld = g.sb * g.DH();
  for (int64_t s = g.T - 1; s >= 0; --s) {
    const int64_t t = g.step(d, s);
    const int64_t offset = t * g.st * g.DH() + d * H;
    T* dz = dZ + offset;
    const int64_t bound = g.active_bound(t);
    bool all_active = true;
    for (int64_t b = 0; b < g.B; ++b) {
      T* dz_row = dz + b * ld;
      if (b < bound && g.active(t, b)) {
        const T* h = Hs + offset + b * ld;
        const T* c = carry + b * H;
        const T* go = dOut ? dOut + offset + b * ld : nullptr;
        if (relu) {
          // As autograd's threshold_backward: zero where h <= 0, so a NaN h passes g on.
          for (int64_t j = 0; j < H; ++j)
            dz_row[j] = h[j] <= T(0) ? T(0) : (go ? go[j] + c[j] : c[j]);
        } else {
          for (int64_t j = 0; j < H; ++j)
            dz_row[j] = (go ? go[j] + c[j] : c[j]) * (T(1) - h[j] * h[j]);
        }
      } else {
        std::memset(dz_row, 0, sizeof(T) * H);
        if (b < bound) all_active = false;
      }
    }
    // Rows past the bound keep their carry; when every row below it is active they get
    // dz W_hh directly, otherwise through tmp.
    T* target = all_active ? carry : tmp;
    if (H <= kSmallHidden)
      small_gemm<T>(bound, H, H, dz, ld, W_hh, T(0), target, H);
    else
      gemm<T>(false, false, bound, H, H, dz, ld, W_hh, H, T(0), target, H);
    if (!all_active) {
      for (int64_t b = 0; b < bound; ++b)
        if (g.active(t, b)) std::memcpy(carry + b * H, tmp + b * H, sizeof(T) * H);
    }
  }
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

// dW_hh rows j0..j0+m of direction d as nn.RNN computes them: a sum over the steps each row
// actually takes, h0 (or zeros) at its first step. Used only when the layer's states or
// gradients hold a NaN or inf, where the fast path would differ: its shifted GEMM also
// multiplies the zero dz of padded steps with the last valid state (0 * NaN = NaN), and it
// skips the zero h0 term when no h0 was given (NaN * 0 = NaN in nn.RNN).
template <typename T>
void hidden_weight_grad_nonfinite(const Geometry& g, int d, int64_t j0, int64_t m,
                                  const T* dz, const T* Hs, const T* h0, T* dW) {
  const int64_t H = g.H, DH = g.DH();
  std::fill(dW, dW + m * H, T(0));
  for (int64_t b = 0; b < g.B; ++b) {
    const int64_t length = g.lengths ? g.lengths[b] : g.T;
    for (int64_t s = 0; s < length; ++s) {
      const int64_t t = d == 0 ? s : length - 1 - s;
      const T* dz_row = dz + (t * g.st + b * g.sb) * DH + d * H + j0;
      const T* prev = nullptr;  // nullptr: zeros
      if (s > 0)
        prev = Hs + ((d == 0 ? t - 1 : t + 1) * g.st + b * g.sb) * DH + d * H;
      else if (h0)
        prev = h0 + b * H;
      for (int64_t j = 0; j < m; ++j)
        for (int64_t k = 0; k < H; ++k) dW[j * H + k] += dz_row[j] * (prev ? prev[k] : T(0));
    }
  }
}

// Runs fn(task) for task in [0, n), on several threads only when the work is worth a parallel
// region. BLAS is single-threaded inside either way (see the determinism note at the top).
template <typename F>
void run_tasks(int64_t n, bool parallel, const F& fn) {
  if (parallel && n > 1) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      SingleThreadedBlas pin;
      for (int64_t i = begin; i < end; ++i) fn(i);
    });
  } else {
    SingleThreadedBlas pin;
    for (int64_t i = 0; i < n; ++i) fn(i);
  }
}

// Runs fn(task) for task in [0, n) with dynamic load balancing: each thread takes the next
// task from a shared counter, so unequal tasks keep both cores busy. Tasks write disjoint
// outputs and each is computed the same way whichever thread runs it (deterministic).
// List the biggest tasks first.
template <typename F>
void run_tasks_balanced(int64_t n, bool parallel, const F& fn) {
  const int64_t threads = std::min<int64_t>(n, at::get_num_threads());
  if (!parallel || threads <= 1) return run_tasks(n, false, fn);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    SingleThreadedBlas pin;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

// Below this many multiply-adds per direction a parallel region costs more than it saves.
bool worth_threads(int64_t flops) { return flops >= (int64_t(1) << 18); }

// Fixed (thread-count independent) split of `rows` into blocks for row-parallel GEMMs.
int64_t row_blocks(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(8, rows / 256)); }

// ---- the whole stack ----------------------------------------------------------------------

struct StackArgs {
  int64_t num_layers;
  int64_t D;
  bool has_biases;
  bool relu;
  bool batch_first;
  int64_t per_dir() const { return has_biases ? 4 : 2; }
};

// Every tensor behind the seam is checked before any pointer is read: a wrong shape, dtype or
// device must raise, never read out of bounds. (.contiguous() copies take care of strides.)
void check_tensor(const Tensor& t, const char* name, at::ScalarType dtype,
                  at::IntArrayRef expected) {
  TORCH_CHECK(t.device().is_cpu(), "fastbirnn cpp backend: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fastbirnn cpp backend: ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == expected, "fastbirnn cpp backend: ", name, " must have shape ",
              expected, ", got ", t.sizes());
}

void check_lengths(const Tensor& lengths, int64_t B) {
  TORCH_CHECK(lengths.device().is_cpu(), "fastbirnn cpp backend: lengths must be a CPU tensor");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.numel() == B,
              "fastbirnn cpp backend: lengths must be a 1-D int64 tensor of ", B,
              " entries (one per batch row), got ", lengths.scalar_type(), " of shape ",
              lengths.sizes());
}

void check_inputs(const Tensor& x, const std::optional<Tensor>& hx, at::TensorList weights,
                  const std::optional<Tensor>& lengths, const StackArgs& a) {
  TORCH_CHECK(x.device().is_cpu(), "fastbirnn cpp backend: expected CPU tensors, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fastbirnn cpp backend: supports float32 and float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3, "fastbirnn cpp backend: expected 3-D input, got ", x.dim(), "-D");
  TORCH_CHECK(a.num_layers >= 1, "fastbirnn cpp backend: num_layers must be >= 1");
  TORCH_CHECK(int64_t(weights.size()) == a.num_layers * a.D * a.per_dir(),
              "fastbirnn cpp backend: expected ", a.num_layers * a.D * a.per_dir(),
              " weight tensors, got ", weights.size());
  TORCH_CHECK(weights[1].dim() == 2, "fastbirnn cpp backend: weight_hh must be 2-D");
  const int64_t H = weights[1].size(0);
  TORCH_CHECK(H >= 1, "fastbirnn cpp backend: hidden size must be >= 1");
  const at::ScalarType dtype = x.scalar_type();
  for (int64_t l = 0; l < a.num_layers; ++l) {
    const int64_t in_size = l == 0 ? x.size(2) : a.D * H;
    for (int64_t d = 0; d < a.D; ++d) {
      const int64_t base = (l * a.D + d) * a.per_dir();
      check_tensor(weights[base], "weight_ih", dtype, {H, in_size});
      check_tensor(weights[base + 1], "weight_hh", dtype, {H, H});
      if (a.has_biases) {
        check_tensor(weights[base + 2], "bias_ih", dtype, {H});
        check_tensor(weights[base + 3], "bias_hh", dtype, {H});
      }
    }
  }
  const int64_t B = a.batch_first ? x.size(0) : x.size(1);
  if (hx && hx->defined()) check_tensor(*hx, "hx", dtype, {a.num_layers * a.D, B, H});
  if (lengths && lengths->defined()) check_lengths(*lengths, B);
}

Geometry geometry(const Tensor& x, const std::optional<Tensor>& lengths, const StackArgs& a,
                  int64_t H, Tensor& lengths_cpu) {
  Geometry g;
  g.T = a.batch_first ? x.size(1) : x.size(0);
  g.B = a.batch_first ? x.size(0) : x.size(1);
  g.D = a.D;
  g.H = H;
  g.st = a.batch_first ? 1 : g.B;
  g.sb = a.batch_first ? g.T : 1;
  g.lengths = nullptr;
  if (lengths && lengths->defined()) {
    lengths_cpu = lengths->contiguous();
    check_lengths(lengths_cpu, g.B);
    const int64_t* L = lengths_cpu.data_ptr<int64_t>();
    for (int64_t b = 0; b < g.B; ++b)
      TORCH_CHECK(L[b] >= 1 && L[b] <= g.T, "fastbirnn cpp backend: lengths must be in [1, T]");
    g.lengths = L;
  }
  return g;
}

// Uninitialised contiguous tensors of the given shapes. At tiny sizes one at::empty per result
// (a dispatcher round trip plus an allocation each) is most of the op's fixed cost, so small
// sets are carved out of one allocation: each piece is its own tensor (own sizes, version
// counter), only the storage is shared. Large sets keep separate buffers, so a big scratch
// buffer is never kept alive by the small tensors that share its storage.
std::vector<Tensor> empty_tensors(const std::vector<std::vector<int64_t>>& shapes,
                                  const at::TensorOptions& options) {
  constexpr int64_t kAlign = 16;      // elements: each piece starts on a 64-byte boundary (fp32)
  constexpr int64_t kShared = 1 << 16;  // elements: above this, separate allocations
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (const auto& shape : shapes) {
    offsets.push_back(total);
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    total += (n + kAlign - 1) / kAlign * kAlign;
  }
  std::vector<Tensor> out;
  out.reserve(shapes.size());
  if (total > kShared) {
    for (const auto& shape : shapes) out.push_back(at::empty(shape, options));
    return out;
  }
  const Tensor flat = at::empty({total}, options);
  for (size_t i = 0; i < shapes.size(); ++i) {
    Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(flat.storage()),
                                                        flat.key_set(), flat.dtype());
    t.unsafeGetTensorImpl()->set_storage_offset(offsets[i]);
    t.unsafeGetTensorImpl()->set_sizes_contiguous(shapes[i]);
    out.push_back(std::move(t));
  }
  return out;
}

// Shapes of the forward's results, shared with the Python fake implementation.
std::vector<int64_t> out_shape(const Geometry& g, bool batch_first) {
  return batch_first ? std::vector<int64_t>{g.B, g.T, g.DH()}
                     : std::vector<int64_t>{g.T, g.B, g.DH()};
}

template <typename T>
void forward_layers(const Tensor& x, const Tensor& hx, at::TensorList weights, const Geometry& g,
                    const StackArgs& a, Tensor& out, Tensor& hn, Tensor& mid) {
  const int64_t L = a.num_layers, D = a.D, H = g.H, rows = g.T * g.B;
  const bool parallel = D > 1 && worth_threads(rows * H * H);
  // Without kept intermediates, layers alternate between two scratch buffers: layer l reads
  // the buffer layer l-1 wrote while it writes the other one.
  Tensor scratch[2];
  const T* layer_in = x.data_ptr<T>();
  int64_t in_size = x.size(2);
  std::vector<T> bias_sum(a.has_biases ? D * H : 0);
  for (int64_t l = 0; l < L; ++l) {
    T* layer_out;
    if (l == L - 1) {
      layer_out = out.data_ptr<T>();
    } else if (mid.numel() > 0) {
      layer_out = mid.data_ptr<T>() + l * rows * g.DH();
    } else {
      Tensor& buffer = scratch[l % 2];
      if (!buffer.defined()) buffer = at::empty({rows, g.DH()}, x.options());
      layer_out = buffer.data_ptr<T>();
    }
    if (a.has_biases) {
      for (int64_t d = 0; d < D; ++d) {
        const T* b_ih = weights[(l * D + d) * 4 + 2].data_ptr<T>();
        const T* b_hh = weights[(l * D + d) * 4 + 3].data_ptr<T>();
        for (int64_t j = 0; j < H; ++j) bias_sum[d * H + j] = b_ih[j] + b_hh[j];
      }
    }
    run_tasks(D, parallel, [&](int64_t d) {
      const Tensor& w_ih = weights[(l * D + d) * a.per_dir()];
      const Tensor& w_hh = weights[(l * D + d) * a.per_dir() + 1];
      // Z = X W_ih^T for this direction's columns; rows follow the input's layout.
      if (H <= kSmallHidden && in_size <= kSmallHidden && rows <= kSmallRows) {
        // Tiny projection: the register-blocked loops beat a BLAS call's fixed cost.
        alignas(64) T W_t[kSmallHidden * kSmallHidden];
        transpose(w_ih.data_ptr<T>(), H, in_size, W_t);
        small_gemm<T>(rows, H, in_size, layer_in, in_size, W_t, T(0), layer_out + d * H, g.DH());
      } else {
        gemm<T>(false, true, rows, H, in_size, layer_in, in_size, w_ih.data_ptr<T>(), in_size,
                T(0), layer_out + d * H, g.DH());
      }
      recurrence_forward_dir<T>(g, int(d), layer_out, w_hh.data_ptr<T>(),
                                a.has_biases ? bias_sum.data() + d * H : nullptr,
                                hx.defined() ? hx.data_ptr<T>() + (l * D + d) * g.B * H : nullptr,
                                a.relu, hn.data_ptr<T>() + (l * D + d) * g.B * H);
    });
    layer_in = layer_out;
    in_size = g.DH();
  }
}

std::tuple<Tensor, Tensor, Tensor> stack_forward_impl(
    const Tensor& x_, const std::optional<Tensor>& hx_, at::TensorList weights_,
    const std::optional<Tensor>& lengths, int64_t num_layers, bool bidirectional,
    bool has_biases, bool relu, bool batch_first, bool keep) {
  StackArgs a{num_layers, bidirectional ? 2 : 1, has_biases, relu, batch_first};
  check_inputs(x_, hx_, weights_, lengths, a);
  const int64_t H = weights_[1].size(0);
  Tensor lengths_cpu;
  const Geometry g = geometry(x_, lengths, a, H, lengths_cpu);
  const Tensor x = x_.contiguous();
  const Tensor hx = hx_ && hx_->defined() ? hx_->contiguous() : Tensor();
  std::vector<Tensor> weights;
  weights.reserve(weights_.size());
  for (const auto& w : weights_) weights.push_back(w.contiguous());
  Tensor out = at::empty(out_shape(g, batch_first), x.options());
  Tensor hn = at::empty({num_layers * a.D, g.B, H}, x.options());
  Tensor mid = at::empty({keep ? num_layers - 1 : 0, g.T * g.B, g.DH()}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastbirnn_stack_forward", [&] {
    forward_layers<scalar_t>(x, hx, weights, g, a, out, hn, mid);
  });
  return {out, hn, mid};
}

template <typename T>
void backward_layers(const Tensor& grad_out, const Tensor& grad_hn, const Tensor& x,
                     const Tensor& hx, at::TensorList weights, const Geometry& g,
                     const StackArgs& a, const Tensor& out, const Tensor& mid, bool need_dx,
                     Tensor& dx, Tensor& dhx, std::vector<Tensor>& dweights, const Tensor& dZ) {
  const int64_t L = a.num_layers, D = a.D, H = g.H, DH = g.DH(), rows = g.T * g.B;
  const bool parallel = worth_threads(rows * H * H);
  Tensor dOut_buf;  // the gradient flowing into the current layer's output
  const T* dOut = grad_out.defined() ? grad_out.data_ptr<T>() : nullptr;
  // Per-direction scratch: carry and tmp [B,H] each, plus the gather for dW_hh.
  std::vector<T> scratch(size_t(D) * 3 * g.B * H);
  for (int64_t l = L - 1; l >= 0; --l) {
    const T* Hs = l == L - 1 ? out.data_ptr<T>() : mid.data_ptr<T>() + l * rows * DH;
    const T* X = l == 0 ? x.data_ptr<T>() : mid.data_ptr<T>() + (l - 1) * rows * DH;
    const int64_t I = l == 0 ? x.size(2) : DH;
    T* dz = dZ.data_ptr<T>();

    // 1. BPTT, one direction per thread.
    run_tasks(D, parallel && D > 1, [&](int64_t d) {
      T* carry = scratch.data() + d * 3 * g.B * H;
      T* tmp = carry + g.B * H;
      if (grad_hn.defined())
        std::memcpy(carry, grad_hn.data_ptr<T>() + (l * D + d) * g.B * H, sizeof(T) * g.B * H);
      else
        std::memset(carry, 0, sizeof(T) * g.B * H);
      const T* w_hh = weights[(l * D + d) * a.per_dir() + 1].data_ptr<T>();
      recurrence_backward_dir<T>(g, int(d), dOut, Hs, w_hh, a.relu, dz, carry, tmp);
      std::memcpy(dhx.data_ptr<T>() + (l * D + d) * g.B * H, carry, sizeof(T) * g.B * H);
    });

    // 2. Weight gradients (reductions over all steps) and the input gradient, as independent
    // tasks of fixed shape: per direction, blocks of weight rows for dW_hh (+ db) and for
    // dW_ih, then fixed row blocks of dX. Splitting over output rows/columns means no sum
    // is ever split, so the thread count cannot change any result.
    const bool want_dx = l > 0 || need_dx;
    Tensor dX_buf = want_dx ? (l == 0 ? dx : at::empty({rows, DH}, x.options())) : Tensor();
    const int64_t n_row_blocks = want_dx ? row_blocks(rows) : 0;
    // Weight-row blocks per direction: single-threaded MKL loses ~40% of its rate on these
    // long-K products below m = 256 rows, so blocks stay at >= 512 rows; balance comes from
    // the dynamic queue and the small dX blocks instead.
    const int64_t n_wblk = std::max<int64_t>(1, H / 512);
    const int64_t wblk = (H + n_wblk - 1) / n_wblk;
    const int64_t n_w = D * n_wblk;  // tasks per weight kind
    // dX = dZ [W_ih^f; W_ih^r]: one product with K = D*H per block (not D with K = H).
    const T* w_ih_all = weights[l * D * a.per_dir()].data_ptr<T>();
    std::vector<T> w_ih_cat;
    if (want_dx && D > 1) {
      w_ih_cat.resize(size_t(DH) * I);
      for (int64_t d = 0; d < D; ++d)
        std::memcpy(w_ih_cat.data() + d * H * I, weights[(l * D + d) * a.per_dir()].data_ptr<T>(),
                    sizeof(T) * H * I);
      w_ih_all = w_ih_cat.data();
    }
    // A NaN or inf anywhere in this layer's states or gradients: dW_hh the exact way.
    const bool nonfinite = !all_finite(Hs, rows * DH) || !all_finite<T>(dz, rows * DH);
    // Task order is biggest first: dW_hh blocks (K = H columns), dW_ih blocks, dX blocks.
    run_tasks_balanced(2 * n_w + n_row_blocks, parallel, [&](int64_t task) {
      if (task < 2 * n_w) {
        const bool hh = task < n_w;
        const int64_t w = hh ? task : task - n_w;
        const int64_t d = w / n_wblk, j0 = (w % n_wblk) * wblk, j1 = std::min(H, j0 + wblk);
        const int64_t m = j1 - j0;
        if (m <= 0) return;
        const int64_t base = (l * D + d) * a.per_dir();
        const T* dzd = dz + d * H + j0;  // columns j0..j1 of direction d
        if (!hh) {
          // dW_ih = dZ^T X over all rows.
          gemm<T>(true, false, m, I, rows, dzd, DH, X, I, T(0),
                  dweights[base].data_ptr<T>() + j0 * I, I);
          return;
        }
        T* dW_hh = dweights[base + 1].data_ptr<T>() + j0 * H;
        if (nonfinite) {
          const T* h0 = hx.defined() ? hx.data_ptr<T>() + (l * D + d) * g.B * H : nullptr;
          hidden_weight_grad_nonfinite<T>(g, int(d), j0, m, dz, Hs, h0, dW_hh);
        } else {
          // dW_hh = sum_t dz_t^T h_{t-1}: h_{t-1} is the neighbouring row in time, a uniform
          // shift of st rows (one GEMM for time-major, one per batch row for batch_first).
          const T* hsd = Hs + d * H;
          const int64_t segments = g.sb == 1 ? 1 : g.B;
          const int64_t K = g.sb == 1 ? (g.T - 1) * g.B : g.T - 1;
          for (int64_t seg = 0; seg < segments; ++seg) {
            const int64_t r = seg * g.sb;  // first row of the segment (t = 0)
            const T* A = d == 0 ? dzd + (r + g.st) * DH : dzd + r * DH;
            const T* Bm = d == 0 ? hsd + r * DH : hsd + (r + g.st) * DH;
            gemm<T>(true, false, m, H, K, A, DH, Bm, DH, seg == 0 ? T(0) : T(1), dW_hh, H);
          }
          if (K <= 0) std::fill(dW_hh, dW_hh + m * H, T(0));
          // The first step of each row saw h0: forward at t = 0, reverse at t = lengths-1.
          if (hx.defined()) {
            // Each block gathers its own columns j0..j1 of a per-direction [B,H] buffer.
            T* gather = scratch.data() + d * 3 * g.B * H + 2 * g.B * H + j0;
            for (int64_t b = 0; b < g.B; ++b) {
              const int64_t t0 = d == 0 ? 0 : (g.lengths ? g.lengths[b] - 1 : g.T - 1);
              std::memcpy(gather + b * H, dzd + (t0 * g.st + b * g.sb) * DH, sizeof(T) * m);
            }
            gemm<T>(true, false, m, H, g.B, gather, H,
                    hx.data_ptr<T>() + (l * D + d) * g.B * H, H, T(1), dW_hh, H);
          }
        }
        if (a.has_biases) {
          T* db = dweights[base + 2].data_ptr<T>() + j0;
          std::fill(db, db + m, T(0));
          for (int64_t r = 0; r < rows; ++r) {
            const T* row = dzd + r * DH;
            for (int64_t j = 0; j < m; ++j) db[j] += row[j];
          }
          std::memcpy(dweights[base + 3].data_ptr<T>() + j0, db, sizeof(T) * m);
        }
      } else {
        // dX for one fixed block of rows.
        const int64_t blk = task - 2 * n_w;
        const int64_t r0 = rows * blk / n_row_blocks, r1 = rows * (blk + 1) / n_row_blocks;
        gemm<T>(false, false, r1 - r0, I, DH, dz + r0 * DH, DH, w_ih_all, I, T(0),
                dX_buf.data_ptr<T>() + r0 * I, I);
      }
    });
    if (l > 0) {
      dOut_buf = dX_buf;  // becomes the output gradient of the layer below
      dOut = dOut_buf.data_ptr<T>();
    }
  }
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> stack_backward_impl(
    const std::optional<Tensor>& grad_out_, const std::optional<Tensor>& grad_hn_,
    const Tensor& x_, const std::optional<Tensor>& hx_, at::TensorList weights_,
    const std::optional<Tensor>& lengths, const Tensor& out, const Tensor& mid,
    int64_t num_layers, bool bidirectional, bool has_biases, bool relu, bool batch_first,
    bool need_dx) {
  StackArgs a{num_layers, bidirectional ? 2 : 1, has_biases, relu, batch_first};
  check_inputs(x_, hx_, weights_, lengths, a);
  const int64_t H = weights_[1].size(0);
  Tensor lengths_cpu;
  const Geometry g = geometry(x_, lengths, a, H, lengths_cpu);
  const at::ScalarType dtype = x_.scalar_type();
  const std::vector<int64_t> out_sizes = out_shape(g, batch_first);
  check_tensor(out, "out", dtype, out_sizes);
  TORCH_CHECK(mid.dim() == 3 && mid.size(0) == num_layers - 1,
              "fastbirnn cpp backend: intermediate outputs were not kept for backward");
  check_tensor(mid, "mid", dtype, {num_layers - 1, g.T * g.B, g.DH()});
  if (grad_out_ && grad_out_->defined()) check_tensor(*grad_out_, "grad_out", dtype, out_sizes);
  if (grad_hn_ && grad_hn_->defined())
    check_tensor(*grad_hn_, "grad_hn", dtype, {num_layers * a.D, g.B, H});
  const Tensor x = x_.contiguous();
  const Tensor hx = hx_ && hx_->defined() ? hx_->contiguous() : Tensor();
  const Tensor grad_out =
      grad_out_ && grad_out_->defined() ? grad_out_->contiguous() : Tensor();
  const Tensor grad_hn = grad_hn_ && grad_hn_->defined() ? grad_hn_->contiguous() : Tensor();
  std::vector<Tensor> weights;
  std::vector<std::vector<int64_t>> shapes;  // the results: dweights..., dx, dhx, then dZ
  for (const auto& w : weights_) {
    weights.push_back(w.contiguous());
    shapes.push_back(w.sizes().vec());
  }
  shapes.push_back(need_dx ? x.sizes().vec() : std::vector<int64_t>{0});
  shapes.push_back({num_layers * a.D, g.B, H});
  shapes.push_back({g.T * g.B, g.DH()});
  std::vector<Tensor> results = empty_tensors(shapes, x.options());
  Tensor dZ = results.back();
  results.pop_back();
  Tensor dhx = results.back();
  results.pop_back();
  Tensor dx = results.back();
  results.pop_back();
  std::vector<Tensor> dweights = std::move(results);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastbirnn_stack_backward", [&] {
    backward_layers<scalar_t>(grad_out, grad_hn, x, hx, weights, g, a, out.contiguous(),
                              mid.contiguous(), need_dx, dx, dhx, dweights, dZ);
  });
  return {dx, dhx, dweights};
}

// ---- autograd: one node for the whole stack --------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> call_forward_impl(const Tensor& x,
                                                     const std::optional<Tensor>& hx,
                                                     at::TensorList weights,
                                                     const std::optional<Tensor>& lengths,
                                                     int64_t L, bool bi, bool bias, bool relu,
                                                     bool bf, bool keep) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastbirnn_cpp::stack_forward_impl", "")
                       .typed<decltype(stack_forward_impl)>();
  return op.call(x, hx, weights, lengths, L, bi, bias, relu, bf, keep);
}

class StackFunction : public torch::autograd::Function<StackFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& hx,
      at::TensorList weights, const std::optional<Tensor>& lengths, int64_t num_layers,
      bool bidirectional, bool has_biases, bool relu, bool batch_first) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, hn, mid] = call_forward_impl(x, hx, weights, lengths, num_layers, bidirectional,
                                            has_biases, relu, batch_first, true);
    std::vector<Tensor> saved{x, hx ? *hx : Tensor(), lengths ? *lengths : Tensor(), out, mid};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["num_layers"] = num_layers;
    ctx->saved_data["bidirectional"] = bidirectional;
    ctx->saved_data["has_biases"] = has_biases;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["batch_first"] = batch_first;
    ctx->saved_data["need_dx"] = x.requires_grad();
    ctx->saved_data["has_hx"] = hx.has_value() && hx->defined();
    return {out, hn};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // create_graph=True turns grad mode on here. The gradients below are not differentiable,
    // so refuse loudly instead of returning ones that silently ignore second-order terms.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fastbirnn cpp backend: double backward (create_graph=True) is not supported; "
                "use FastBiRNN(..., backend='torch') for gradients of gradients");
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastbirnn_cpp::stack_backward_impl", "")
                         .typed<decltype(stack_backward_impl)>();
    auto saved = ctx->get_saved_variables();
    const bool has_hx = ctx->saved_data["has_hx"].toBool();
    std::vector<Tensor> weights(saved.begin() + 5, saved.end());
    std::optional<Tensor> hx = has_hx ? std::optional<Tensor>(saved[1]) : std::nullopt;
    std::optional<Tensor> lengths =
        saved[2].defined() ? std::optional<Tensor>(saved[2]) : std::nullopt;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dx, dhx, dweights] =
        op.call(grads[0].defined() ? std::optional<Tensor>(grads[0]) : std::nullopt,
                grads[1].defined() ? std::optional<Tensor>(grads[1]) : std::nullopt, saved[0], hx,
                weights, lengths, saved[3], saved[4], ctx->saved_data["num_layers"].toInt(),
                ctx->saved_data["bidirectional"].toBool(), ctx->saved_data["has_biases"].toBool(),
                ctx->saved_data["relu"].toBool(), ctx->saved_data["batch_first"].toBool(),
                ctx->saved_data["need_dx"].toBool());
    // One gradient per forward argument, the weight list expanded in place.
    torch::autograd::variable_list result{ctx->saved_data["need_dx"].toBool() ? dx : Tensor(),
                                          has_hx ? dhx : Tensor()};
    result.insert(result.end(), dweights.begin(), dweights.end());
    for (int i = 0; i < 6; ++i) result.emplace_back();  // lengths and the non-tensor arguments
    return result;
  }
};

std::tuple<Tensor, Tensor> stack_autograd(const Tensor& x, const std::optional<Tensor>& hx,
                                          at::TensorList weights,
                                          const std::optional<Tensor>& lengths,
                                          int64_t num_layers, bool bidirectional, bool has_biases,
                                          bool relu, bool batch_first) {
  bool needs_grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || (hx && hx->defined() && hx->requires_grad()));
  for (const auto& w : weights) needs_grad = needs_grad || (at::GradMode::is_enabled() && w.requires_grad());
  if (!needs_grad) {
    // No graph to build: skip the autograd node and do not keep intermediate layers.
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, hn, mid] = call_forward_impl(x, hx, weights, lengths, num_layers, bidirectional,
                                            has_biases, relu, batch_first, false);
    return {out, hn};
  }
  auto outs = StackFunction::apply(x, hx, weights, lengths, num_layers, bidirectional,
                                   has_biases, relu, batch_first);
  return {outs[0], outs[1]};
}

std::tuple<Tensor, Tensor> stack_no_autograd(const Tensor& x, const std::optional<Tensor>& hx,
                                             at::TensorList weights,
                                             const std::optional<Tensor>& lengths,
                                             int64_t num_layers, bool bidirectional,
                                             bool has_biases, bool relu, bool batch_first) {
  auto [out, hn, mid] = call_forward_impl(x, hx, weights, lengths, num_layers, bidirectional,
                                          has_biases, relu, batch_first, false);
  return {out, hn};
}

// ---- the per-layer seam (used when training with dropout between layers) ------------------

// Z or Hs [T,B,D,H] with W_hh [D,H,H], and lengths [B] in [1, T].
Geometry seam_geometry(const Tensor& Z, const Tensor& W_hh, const Tensor& lengths,
                       Tensor& lengths_c) {
  TORCH_CHECK(Z.dim() == 4, "fastbirnn cpp backend: expected a [T, B, D, H] tensor, got ",
              Z.dim(), "-D");
  TORCH_CHECK(Z.scalar_type() == at::kFloat || Z.scalar_type() == at::kDouble,
              "fastbirnn cpp backend: supports float32 and float64, got ", Z.scalar_type());
  TORCH_CHECK(Z.size(2) == 1 || Z.size(2) == 2, "fastbirnn cpp backend: D must be 1 or 2");
  Geometry g{Z.size(0), Z.size(1), Z.size(2), Z.size(3), Z.size(1), 1, nullptr};
  check_tensor(Z, "Z", Z.scalar_type(), Z.sizes());
  check_tensor(W_hh, "W_hh", Z.scalar_type(), {g.D, g.H, g.H});
  check_lengths(lengths, g.B);
  lengths_c = lengths.contiguous();
  g.lengths = lengths_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < g.B; ++b)
    TORCH_CHECK(g.lengths[b] >= 1 && g.lengths[b] <= g.T,
                "fastbirnn cpp backend: lengths must be in [1, T]");
  return g;
}

Tensor recurrence_forward(const Tensor& Z, const Tensor& W_hh, const Tensor& h0,
                          const Tensor& lengths, bool relu) {
  Tensor lengths_c;
  const Geometry g = seam_geometry(Z, W_hh, lengths, lengths_c);
  check_tensor(h0, "h0", Z.scalar_type(), {g.D, g.B, g.H});
  Tensor Hs = Z.contiguous().clone();
  Tensor W = W_hh.contiguous(), h = h0.contiguous();
  Tensor state = at::empty({g.D, g.B, g.H}, Z.options());
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "fastbirnn_recurrence_forward", [&] {
    run_tasks(g.D, g.D > 1 && worth_threads(g.T * g.B * g.H * g.H), [&](int64_t d) {
      recurrence_forward_dir<scalar_t>(g, int(d), Hs.data_ptr<scalar_t>(),
                                       W.data_ptr<scalar_t>() + d * g.H * g.H, nullptr,
                                       h.data_ptr<scalar_t>() + d * g.B * g.H, relu,
                                       state.data_ptr<scalar_t>() + d * g.B * g.H);
    });
  });
  return Hs;
}

std::tuple<Tensor, Tensor> recurrence_backward(const Tensor& dHs, const Tensor& Hs_,
                                               const Tensor& W_hh, const Tensor& lengths,
                                               bool relu) {
  Tensor lengths_c;
  const Geometry g = seam_geometry(Hs_, W_hh, lengths, lengths_c);
  check_tensor(dHs, "dHs", Hs_.scalar_type(), Hs_.sizes());
  Tensor Hs = Hs_.contiguous(), dO = dHs.contiguous(), W = W_hh.contiguous();
  Tensor dZ = at::empty_like(Hs);
  Tensor dh0 = at::zeros({g.D, g.B, g.H}, Hs.options());
  Tensor tmp = at::empty({g.D, g.B, g.H}, Hs.options());
  AT_DISPATCH_FLOATING_TYPES(Hs.scalar_type(), "fastbirnn_recurrence_backward", [&] {
    run_tasks(g.D, g.D > 1 && worth_threads(g.T * g.B * g.H * g.H), [&](int64_t d) {
      recurrence_backward_dir<scalar_t>(
          g, int(d), dO.data_ptr<scalar_t>(), Hs.data_ptr<scalar_t>(),
          W.data_ptr<scalar_t>() + d * g.H * g.H, relu, dZ.data_ptr<scalar_t>(),
          dh0.data_ptr<scalar_t>() + d * g.B * g.H, tmp.data_ptr<scalar_t>() + d * g.B * g.H);
    });
  });
  return {dZ, dh0};
}

}  // namespace
}  // namespace fastbirnn

TORCH_LIBRARY(fastbirnn_cpp, m) {
  m.def(
      "stack(Tensor x, Tensor? hx, Tensor[] weights, Tensor? lengths, int num_layers, "
      "bool bidirectional, bool has_biases, bool relu, bool batch_first) -> (Tensor, Tensor)");
  m.def(
      "stack_forward_impl(Tensor x, Tensor? hx, Tensor[] weights, Tensor? lengths, "
      "int num_layers, bool bidirectional, bool has_biases, bool relu, bool batch_first, "
      "bool keep) -> (Tensor, Tensor, Tensor)");
  m.def(
      "stack_backward_impl(Tensor? grad_out, Tensor? grad_hn, Tensor x, Tensor? hx, "
      "Tensor[] weights, Tensor? lengths, Tensor out, Tensor mid, int num_layers, "
      "bool bidirectional, bool has_biases, bool relu, bool batch_first, bool need_dx) "
      "-> (Tensor, Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(fastbirnn_cpp, CPU, m) {
  m.impl("stack", &fastbirnn::stack_no_autograd);
  m.impl("stack_forward_impl", &fastbirnn::stack_forward_impl);
  m.impl("stack_backward_impl", &fastbirnn::stack_backward_impl);
}

TORCH_LIBRARY_IMPL(fastbirnn_cpp, Autograd, m) {
  m.impl("stack", &fastbirnn::stack_autograd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastbirnn fused C++ CPU kernels (ops live in torch.ops.fastbirnn_cpp)";
  m.def("recurrence_forward", &fastbirnn::recurrence_forward);
  m.def("recurrence_backward", &fastbirnn::recurrence_backward);
  m.def("has_blas", &fastbirnn::have_blas, "Whether an optimised BLAS was found in libtorch");
  m.def("tanh_impl", &fastbirnn::tanh_impl_name, "Which vectorised tanh is in use");
}
