// The Elman cell (tanh or ReLU): the pointwise step and its derivative, nothing else.
//
// The engine (engine.cpp) owns threads, blocks, barriers, GEMMs, layouts and lengths and calls
// a cell on one block of hidden units of one batch row at a time:
//
//   forward(c, bias, n)          c[0..n) holds z + h_{t-1} W_hh^T for the block (z already has
//                                the input projection); adds the bias and writes h_t in place.
//   backward(h, dout, carry, dz, n)
//                                dz = (dout + carry) * act'(z), where act' is computed from the
//                                saved output h (no pre-activations are kept); dout may be null.
//
// kGates is the number of pre-activation columns per hidden unit (Elman 1; the gated cells'
// interface, with LSTM's c beside h, is in cell_gated.h).
#pragma once

#include "engine_blas.h"

namespace fastbirnn {
namespace {

struct ElmanCell {
  static constexpr int kGates = 1;
  bool relu;

  template <typename T>
  void forward(T* c, const T* bias, int64_t n) const {
    if (bias)
      for (int64_t j = 0; j < n; ++j) c[j] += bias[j];
    if (relu) {
      // "<= 0 -> 0" so a NaN stays NaN, as in torch.relu (a max instruction would return 0 for
      // it and hide a diverging run). Never std::max here.
      for (int64_t j = 0; j < n; ++j) c[j] = c[j] <= T(0) ? T(0) : c[j];
    } else {
      tanh_inplace(c, n);
    }
  }

  template <typename T>
  void backward(const T* h, const T* dout, const T* carry, T* dz, int64_t n) const {
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

}  // namespace
}  // namespace fastbirnn
