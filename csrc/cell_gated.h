// What the gated cells (cell_lstm.h, cell_gru.h) share: their interface with the engine and
// their activations.
//
// The engine (engine.cpp) calls a gated cell on one block of n <= kMaxBlock hidden units of
// one batch row at a time. Gate q of a unit lives at `gates + q * gs` (the input projection's
// natural layout, nn's gate order), the block's h_{t-1} W_hh^T at `hid + q * n`. Each cell
// ignores the operands it has no use for:
//
//   forward(gates, gs, hid, bias, bias_h, h_prev, c, h, saved, n)
//       gates holds x W_ih^T; bias the input-side biases (b_ih + b_hh, or null), bias_h the
//       split gate's b_hh (GRU; or null). Writes h_t to h; LSTM updates its block-local cell
//       state c in place. With saved non-null (training) it also writes the activated gates
//       back into gates and what its backward needs into saved.
//   backward(gates, gs, saved, h_prev, c_prev, dout, carry, dc, dgx, dgh, n)
//       carry holds dG_h,t+1 W_hh for the block (plus what the cell left there, GRU), dout the
//       output's gradient (or null), dc LSTM's c gradient from the next step (updated in place).
//       Writes the input-side pre-activation gradients to dgx and, for a cell with a split
//       gate, the hidden-side ones to dgh (gate stride gs). h_prev/c_prev null mean zeros.
//
// Constants: kGates (pre-activation rows per unit), kCellState (LSTM's c travels beside h),
// kSplitGate (the gate whose hidden-side term the cell gates itself, GRU's n; -1: none),
// kHiddenCarry (h_{t-1} also reaches h_t outside the gates: backward leaves that gradient in
// carry, and the engine adds dG_h W_hh to it).
#pragma once

#include <cmath>

#include "engine_blas.h"

namespace fastbirnn {
namespace {

// The widest block the engine hands a gated cell (its column blocks, kBlockWidth).
constexpr int64_t kMaxBlock = 64;

// ---- the activations --------------------------------------------------------------------
//
// sigmoid(x) = 1 / (1 + e^-x) on SLEEF's 1-ulp exp (the one ATen uses, linked into
// libtorch_cpu): SLEEF's 1-ulp tanh costs 5x its exp and was a third of the cells' time. It
// keeps NaN and gives 0/1 at -inf/+inf. tanh is the Elman cell's (SLEEF's 3.5-ulp tanh, 2x
// the exp): 1 - 2 / (1 + e^2x) is off by an absolute ulp of 1 near 0, which tripled the RMS
// error of LSTM outputs (o * tanh(c)) against fp64 (tests/test_exactness.py).

const bool kVectorExp = [] {
#ifdef FASTBIRNN_X86
  return kHaveAvx512 && Sleef_expf16_u10 != nullptr && Sleef_expd8_u10 != nullptr;
#else
  return false;
#endif
}();

#ifdef FASTBIRNN_X86
template <typename T>
__attribute__((target("avx512f"))) void sigmoid_avx512(T* p, int64_t n) {
  using V = Avx512<T>;
  const typename V::Vec one = V::broadcast(T(1)), minus_one = V::broadcast(T(-1));
  for (int64_t i = 0; i < n; i += V::kLanes) {
    const typename V::Mask m = lanes_avx512<T>(i, n);
    const typename V::Vec e = V::exp(V::mul(minus_one, V::load(m, p + i)));
    V::store(p + i, m, V::div(one, V::add(one, e)));
  }
}
#endif

template <typename T>
void sigmoid_inplace(T* p, int64_t n) {
#ifdef FASTBIRNN_X86
  if (kVectorExp) return sigmoid_avx512(p, n);
#endif
  for (int64_t i = 0; i < n; ++i) p[i] = T(1) / (T(1) + std::exp(-p[i]));
}

template <typename T>
void gate_tanh_inplace(T* p, int64_t n) {
  tanh_inplace(p, n);
}

// The pre-activations of gates [0, count) of a block: a[q * n + j] = the input part (gates,
// gate q at q * gs) + the hidden part (hid, gate q at q * n) + the bias (q * gs), if any.
template <typename T>
void gate_preactivations(T* a, const T* gates, int64_t gs, const T* hid, const T* bias,
                         int count, int64_t n) {
  for (int q = 0; q < count; ++q) {
    T* aq = a + q * n;
    const T* x = gates + q * gs;
    const T* y = hid + q * n;
    if (bias)
      for (int64_t j = 0; j < n; ++j) aq[j] = x[j] + y[j] + bias[q * gs + j];
    else
      for (int64_t j = 0; j < n; ++j) aq[j] = x[j] + y[j];
  }
}

}  // namespace
}  // namespace fastbirnn
