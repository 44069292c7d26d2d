// The LSTM cell (nn.LSTM's gate order i, f, g, o): the pointwise step and its derivative.
// The interface is in cell.h; saved holds c_t.
#pragma once

#include "cell.h"

namespace fastbirnn {

#ifdef FASTBIRNN_X86
// LstmCell::forward in one pass over the block on V's vectors: the gates stay in registers
// from the pre-activation to h instead of going through a stack buffer once per operation
// (a version in passes over such a buffer, one activation at a time, was 4-7 % slower).
// Every lane computes what the scalar loops compute, in the same order (no FMA: the build turns
// contraction off), so the results are the same bits at every ISA level.
template <typename V, typename T>
void lstm_forward_vectors(T* gates, int64_t gs, const T* hid, const T* bias, T* c, T* h,
                          T* saved, int64_t n) {
  V::run([&] {
    using Vec = typename V::Vec;
    const Vec one = V::broadcast(T(1)), minus_one = V::broadcast(T(-1));
    auto sigmoid = [&](Vec x) { return V::div(one, V::add(one, V::exp(V::mul(minus_one, x)))); };
    for (int64_t j = 0; j < n; j += V::kLanes) {
      const typename V::Mask m = V::mask(n - j);
      // Each gate is loaded just before its activation: a SLEEF call may clobber every vector
      // register, so what is live across one is spilled and reloaded around it.
      auto preactivation = [&](int q) {
        const Vec a = V::add(V::load(m, gates + q * gs + j), V::load(m, hid + q * n + j));
        return bias ? V::add(a, V::load(m, bias + q * gs + j)) : a;
      };
      Vec a[4];  // i, f, g, o
      a[0] = sigmoid(preactivation(0));
      a[1] = sigmoid(preactivation(1));
      a[2] = V::tanh(preactivation(2));
      a[3] = sigmoid(preactivation(3));
      const Vec c_t = V::add(V::mul(a[1], V::load(m, c + j)), V::mul(a[0], a[2]));
      V::store(c + j, m, c_t);
      V::store(h + j, m, V::mul(a[3], V::tanh(c_t)));
      if (saved) {
        for (int q = 0; q < 4; ++q) V::store(gates + q * gs + j, m, a[q]);
        V::store(saved + j, m, c_t);
      }
    }
  });
}

// LstmCell::backward in one pass on V's vectors, lane for lane what its loop computes.
template <typename V, typename T>
void lstm_backward_vectors(const T* gates, int64_t gs, const T* saved, const T* c_prev,
                           const T* dout, T* carry, T* dc, T* dgx, int64_t n) {
  V::run([&] {
    using Vec = typename V::Vec;
    const Vec one = V::broadcast(T(1));
    for (int64_t j = 0; j < n; j += V::kLanes) {
      const typename V::Mask m = V::mask(n - j);
      const Vec tc = V::tanh(V::load(m, saved + j));  // first: nothing else live across it
      const Vec i = V::load(m, gates + j), f = V::load(m, gates + gs + j);
      const Vec g = V::load(m, gates + 2 * gs + j), o = V::load(m, gates + 3 * gs + j);
      const Vec dh = dout ? V::add(V::load(m, dout + j), V::load(m, carry + j))
                          : V::load(m, carry + j);
      const Vec dct = V::add(V::load(m, dc + j),
                             V::mul(V::mul(dh, o), V::sub(one, V::mul(tc, tc))));
      const Vec cp = c_prev ? V::load(m, c_prev + j) : V::zero();
      V::store(dgx + j, m, V::mul(V::mul(V::mul(dct, g), i), V::sub(one, i)));
      V::store(dgx + gs + j, m, V::mul(V::mul(V::mul(dct, cp), f), V::sub(one, f)));
      V::store(dgx + 2 * gs + j, m, V::mul(V::mul(dct, i), V::sub(one, V::mul(g, g))));
      V::store(dgx + 3 * gs + j, m, V::mul(V::mul(V::mul(dh, tc), o), V::sub(one, o)));
      V::store(dc + j, m, V::mul(dct, f));
    }
  });
}
#endif

struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr bool kCellState = true;  // c travels beside h
  static constexpr int kSplitGate = -1;     // every gate adds h W_hh^T + b_hh as it is
  static constexpr bool kHiddenCarry = false;  // h_{t-1} reaches h_t only through the gates
  static constexpr bool kInPlace = false;

  template <typename T>
  void forward(T* gates, int64_t gs, const T* hid, const T* bias, const T*, const T*, T* c,
               T* h, T* saved, int64_t n) const {
#ifdef FASTBIRNN_X86
    if (kIsa == Isa::kAvx512)
      return lstm_forward_vectors<Avx512<T>>(gates, gs, hid, bias, c, h, saved, n);
    if (kIsa == Isa::kAvx2)
      return lstm_forward_vectors<Avx2<T>>(gates, gs, hid, bias, c, h, saved, n);
#endif
    alignas(64) T a[4 * kMaxBlock];  // i, f, g, o of the block
    gate_preactivations(a, gates, gs, hid, bias, 4, n);
    sigmoid_inplace(a, 2 * n);  // i, f
    tanh_inplace(a + 2 * n, n);
    sigmoid_inplace(a + 3 * n, n);
    const T *i = a, *f = a + n, *g = a + 2 * n, *o = a + 3 * n;
    alignas(64) T tc[kMaxBlock];
    for (int64_t j = 0; j < n; ++j) tc[j] = c[j] = f[j] * c[j] + i[j] * g[j];
    tanh_inplace(tc, n);
    for (int64_t j = 0; j < n; ++j) h[j] = o[j] * tc[j];
    if (saved) {
      for (int q = 0; q < 4; ++q) std::memcpy(gates + q * gs, a + q * n, sizeof(T) * n);
      std::memcpy(saved, c, sizeof(T) * n);
    }
  }

  template <typename T>
  void backward(const T* gates, int64_t gs, const T* saved, const T*, const T* c_prev,
                const T* dout, T* carry, T* dc, T* dgx, T*, int64_t n) const {
#ifdef FASTBIRNN_X86
    if (kIsa == Isa::kAvx512)
      return lstm_backward_vectors<Avx512<T>>(gates, gs, saved, c_prev, dout, carry, dc, dgx, n);
    if (kIsa == Isa::kAvx2)
      return lstm_backward_vectors<Avx2<T>>(gates, gs, saved, c_prev, dout, carry, dc, dgx, n);
#endif
    const T *i = gates, *f = gates + gs, *g = gates + 2 * gs, *o = gates + 3 * gs;
    alignas(64) T tc[kMaxBlock];
    std::memcpy(tc, saved, sizeof(T) * n);  // tanh(c_t), recomputed as forward did
    tanh_inplace(tc, n);
    T *di = dgx, *df = dgx + gs, *dg = dgx + 2 * gs, *dout_gate = dgx + 3 * gs;
    for (int64_t j = 0; j < n; ++j) {
      const T ij = i[j], fj = f[j], gj = g[j], oj = o[j];  // before dgx (maybe gates) is written
      const T dh = dout ? dout[j] + carry[j] : carry[j];
      const T dct = dc[j] + dh * oj * (T(1) - tc[j] * tc[j]);
      const T cp = c_prev ? c_prev[j] : T(0);
      di[j] = dct * gj * ij * (T(1) - ij);
      df[j] = dct * cp * fj * (T(1) - fj);
      dg[j] = dct * ij * (T(1) - gj * gj);
      dout_gate[j] = dh * tc[j] * oj * (T(1) - oj);
      dc[j] = dct * fj;
    }
  }
};

}  // namespace fastbirnn
