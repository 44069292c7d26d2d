// The Elman cell (tanh or ReLU): the one-gate cell, computed in place in the output row (the
// interface is in cell.h). Its backward needs only the outputs: act' from h, no pre-activation.
#pragma once

#include "cell.h"

namespace fastbirnn {

struct ElmanCell {
  static constexpr int kGates = 1;
  static constexpr bool kCellState = false;
  static constexpr int kSplitGate = -1;
  static constexpr bool kHiddenCarry = false;
  static constexpr bool kInPlace = true;
  bool relu;

  // h holds x W_ih^T + h_{t-1} W_hh^T (gates == h): adds the bias and applies act in place.
  template <typename T>
  void forward(T*, int64_t, const T*, const T* bias, const T*, const T*, T*, T* h, T*,
               int64_t n) const {
    if (bias)
      for (int64_t j = 0; j < n; ++j) h[j] += bias[j];
    if (relu) {
      // "<= 0 -> 0" so a NaN stays NaN, as in torch.relu (a max instruction would return 0 for
      // it and hide a diverging run). Never std::max here.
      for (int64_t j = 0; j < n; ++j) h[j] = h[j] <= T(0) ? T(0) : h[j];
    } else {
      tanh_inplace(h, n);
    }
  }

  // gates holds h_t; dz = (dout + carry) * act'(h_t) into dgx.
  template <typename T>
  void backward(const T* h, int64_t, const T*, const T*, const T*, const T* dout,
                T* carry, T*, T* dz, T*, int64_t n) const {
    // The branch on dout is outside the loops so each loop vectorises.
    if (relu) {
      // As autograd's threshold_backward: zero where h <= 0, so a NaN h passes the gradient on.
      if (dout)
        for (int64_t j = 0; j < n; ++j) dz[j] = h[j] <= T(0) ? T(0) : dout[j] + carry[j];
      else
        for (int64_t j = 0; j < n; ++j) dz[j] = h[j] <= T(0) ? T(0) : carry[j];
    } else {
      if (dout)
        for (int64_t j = 0; j < n; ++j) dz[j] = (dout[j] + carry[j]) * (T(1) - h[j] * h[j]);
      else
        for (int64_t j = 0; j < n; ++j) dz[j] = carry[j] * (T(1) - h[j] * h[j]);
    }
  }
};

}  // namespace fastbirnn
