// The GRU cell (nn.GRU's gate order r, z, n): the pointwise step and its derivative.
//
// The interface is in cell.h. What differs from the LSTM: the new gate's hidden-side
// term is gated, n = tanh(x_n + b_in + r * (W_hn h + b_hn)), so bias holds b_ih + b_hh for
// r and z but only b_in for n, bias_h holds b_hn (or null), saved keeps W_hn h + b_hn, and
// backward writes the hidden-side gate gradients (which differ in n: dn_pre * r) to dgh.
// h_{t-1} also reaches h_t directly (h = n + z (h_{t-1} - n)): backward writes that part of
// h_{t-1}'s gradient, dh * z, to carry, and the engine adds dG_h W_hh to it.
#pragma once

#include "cell.h"

namespace fastbirnn {

#ifdef FASTBIRNN_X86
// GruCell::backward on V's vectors, lane for lane what its loop computes (no FMA: the build
// turns contraction off), so the results are the same bits at every ISA level. (The forward
// keeps its loops: a one-pass vector version like the LSTM's measured no faster.)
template <typename V, typename T>
void gru_backward_vectors(const T* gates, int64_t gs, const T* saved, const T* h_prev,
                          const T* dout, T* carry, T* dgx, T* dgh, int64_t n) {
  V::run([&] {
    using Vec = typename V::Vec;
    const Vec one = V::broadcast(T(1));
    for (int64_t j = 0; j < n; j += V::kLanes) {
      const typename V::Mask m = V::mask(n - j);
      const Vec r = V::load(m, gates + j), z = V::load(m, gates + gs + j);
      const Vec nn = V::load(m, gates + 2 * gs + j);
      const Vec dh = dout ? V::add(V::load(m, dout + j), V::load(m, carry + j))
                          : V::load(m, carry + j);
      const Vec hp = h_prev ? V::load(m, h_prev + j) : V::zero();
      const Vec dn = V::mul(V::mul(dh, V::sub(one, z)), V::sub(one, V::mul(nn, nn)));
      const Vec dr =
          V::mul(V::mul(V::mul(dn, V::load(m, saved + j)), r), V::sub(one, r));
      const Vec dz = V::mul(V::mul(V::mul(dh, V::sub(hp, nn)), z), V::sub(one, z));
      V::store(dgx + j, m, dr);
      V::store(dgh + j, m, dr);
      V::store(dgx + gs + j, m, dz);
      V::store(dgh + gs + j, m, dz);
      V::store(dgx + 2 * gs + j, m, dn);
      V::store(dgh + 2 * gs + j, m, V::mul(dn, r));
      V::store(carry + j, m, V::mul(dh, z));
    }
  });
}
#endif

struct GruCell {
  static constexpr int kGates = 3;
  static constexpr bool kCellState = false;
  static constexpr int kSplitGate = 2;      // n keeps its hidden-side term apart
  static constexpr bool kHiddenCarry = true;  // h = n + z (h_{t-1} - n)
  static constexpr bool kInPlace = false;

  template <typename T>
  void forward(T* gates, int64_t gs, const T* hid, const T* bias, const T* bias_h,
               const T* h_prev, T*, T* h, T* saved, int64_t n) const {
    alignas(64) T a[3 * kMaxBlock];  // r, z, n of the block
    alignas(64) T hn[kMaxBlock];     // W_hn h + b_hn
    gate_preactivations(a, gates, gs, hid, bias, 2, n);
    sigmoid_inplace(a, 2 * n);
    const T *r = a, *z = a + n, *yn = hid + 2 * n, *xn = gates + 2 * gs;
    T* nn = a + 2 * n;
    for (int64_t j = 0; j < n; ++j) {
      hn[j] = bias_h ? yn[j] + bias_h[j] : yn[j];
      nn[j] = (bias ? xn[j] + bias[2 * gs + j] : xn[j]) + r[j] * hn[j];
    }
    tanh_inplace(nn, n);
    // nn.GRU's form, (h - n) * z + n, so NaN and inf flow the same way.
    for (int64_t j = 0; j < n; ++j) h[j] = (h_prev[j] - nn[j]) * z[j] + nn[j];
    if (saved) {
      for (int q = 0; q < 3; ++q) std::memcpy(gates + q * gs, a + q * n, sizeof(T) * n);
      std::memcpy(saved, hn, sizeof(T) * n);
    }
  }

  template <typename T>
  void backward(const T* gates, int64_t gs, const T* saved, const T* h_prev, const T*,
                const T* dout, T* carry, T*, T* dgx, T* dgh, int64_t n) const {
#ifdef FASTBIRNN_X86
    if (kIsa == Isa::kAvx512)
      return gru_backward_vectors<Avx512<T>>(gates, gs, saved, h_prev, dout, carry, dgx, dgh, n);
    if (kIsa == Isa::kAvx2)
      return gru_backward_vectors<Avx2<T>>(gates, gs, saved, h_prev, dout, carry, dgx, dgh, n);
#endif
    const T *r = gates, *z = gates + gs, *nn = gates + 2 * gs;
    for (int64_t j = 0; j < n; ++j) {
      const T rj = r[j], zj = z[j], nj = nn[j];  // before dgx (maybe gates) is written
      const T dh = dout ? dout[j] + carry[j] : carry[j];
      const T hp = h_prev ? h_prev[j] : T(0);
      const T dn = dh * (T(1) - zj) * (T(1) - nj * nj);
      const T dr = dn * saved[j] * rj * (T(1) - rj);
      const T dz = dh * (hp - nj) * zj * (T(1) - zj);
      dgx[j] = dgh[j] = dr;
      dgx[gs + j] = dgh[gs + j] = dz;
      dgx[2 * gs + j] = dn;
      dgh[2 * gs + j] = dn * rj;
      carry[j] = dh * zj;
    }
  }
};

}  // namespace fastbirnn
