// What every cell (cell_elman.h, cell_lstm.h, cell_gru.h) shares: its interface with the engine.
//
// A cell is the pointwise step and its derivative, nothing else; the engine (recurrence.h)
// calls it on one block of n <= kMaxBlock hidden units of one batch row at a time. Gate q of a
// unit lives at `gates + q * gs` (the input projection's natural layout, nn's gate order), the
// block's h_{t-1} W_hh^T at `hid + q * n`. Each cell ignores the operands it has no use for:
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
//       dgx may be gates itself (a backward that consumes the kept gates, stack.cpp): each
//       unit's gates are all read before any of its gradients is written.
//
// Constants: kGates (pre-activation rows per unit), kCellState (LSTM's c travels beside h),
// kSplitGate (the gate whose hidden-side term the cell gates itself, GRU's n; -1: none),
// kHiddenCarry (h_{t-1} also reaches h_t outside the gates: backward leaves that gradient in
// carry, and the engine adds dG_h W_hh to it), kInPlace (the one-gate Elman cell: its
// pre-activation is computed in the output row itself, where h W_hh^T is added onto x W_ih^T,
// so gates == h and hid is null, and its activated "gate" is the output, all the backward
// needs).
#pragma once

#include <cstdint>
#include <cstring>

#include "activations.h"
#include "geometry.h"

namespace fastbirnn {

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

}  // namespace fastbirnn
