// What the gated cells (cell_lstm.h, cell_gru.h) share: their interface with the engine and
// the sigmoid they build from the engine's vectorised tanh.
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

#include "engine_blas.h"

namespace fastbirnn {
namespace {

// The widest block the engine hands a gated cell (its column blocks, kBlockWidth).
constexpr int64_t kMaxBlock = 64;

// sigmoid(x) = (1 + tanh(x / 2)) / 2: the same vectorised SLEEF tanh serves every gate.
template <typename T>
void halve(T* p, int64_t n) {
  for (int64_t j = 0; j < n; ++j) p[j] *= T(0.5);
}
template <typename T>
void finish_sigmoid(T* p, int64_t n) {
  for (int64_t j = 0; j < n; ++j) p[j] = T(0.5) * p[j] + T(0.5);
}

}  // namespace
}  // namespace fastbirnn
