// The stack op's argument checks. Every tensor is checked before any pointer is read: a wrong
// shape, dtype or device must raise, never read out of bounds. (.contiguous() copies take care
// of strides.) All of it runs before any worker starts: a worker must not be the first to throw.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "geometry.h"
#include "stack.h"

namespace fastbirnn {

inline void check_tensor(const Tensor& t, const char* name, at::ScalarType dtype,
                         at::IntArrayRef expected) {
  TORCH_CHECK(t.device().is_cpu(), "fastbirnn cpp backend: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fastbirnn cpp backend: ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == expected, "fastbirnn cpp backend: ", name, " must have shape ",
              expected, ", got ", t.sizes());
}

inline void check_lengths(const Tensor& lengths, int64_t B) {
  TORCH_CHECK(lengths.device().is_cpu(), "fastbirnn cpp backend: lengths must be a CPU tensor");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.numel() == B,
              "fastbirnn cpp backend: lengths must be a 1-D int64 tensor of ", B,
              " entries (one per batch row), got ", lengths.scalar_type(), " of shape ",
              lengths.sizes());
}

// check_lengths, then every entry in [1, T]; the values, from a contiguous copy kept in
// lengths_c for as long as the pointer is used.
inline const int64_t* checked_lengths(const Tensor& lengths, int64_t B, int64_t T,
                                      Tensor& lengths_c) {
  check_lengths(lengths, B);
  lengths_c = lengths.contiguous();
  const int64_t* L = lengths_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(L[b] >= 1 && L[b] <= T, "fastbirnn cpp backend: lengths must be in [1, T]");
  return L;
}

// x, the weights (nn's flat order: per layer and direction w_ih, w_hh[, b_ih, b_hh], with
// gates * H rows), h0 and c0 (c0 only for a cell with a cell state) and lengths.
inline void check_inputs(const Tensor& x, const std::optional<Tensor>& h0,
                         const std::optional<Tensor>& c0, at::TensorList weights,
                         const std::optional<Tensor>& lengths, const StackArgs& a,
                         bool cell_state) {
  TORCH_CHECK(x.device().is_cpu(), "fastbirnn cpp backend: expected CPU tensors, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  x.scalar_type() == at::kBFloat16,
              "fastbirnn cpp backend: supports float32, float64 and bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 3, "fastbirnn cpp backend: expected 3-D input, got ", x.dim(), "-D");
  TORCH_CHECK(a.num_layers >= 1, "fastbirnn cpp backend: num_layers must be >= 1");
  TORCH_CHECK(int64_t(weights.size()) == a.num_layers * a.D * a.per_dir(),
              "fastbirnn cpp backend: expected ", a.num_layers * a.D * a.per_dir(),
              " weight tensors, got ", weights.size());
  TORCH_CHECK(weights[1].dim() == 2, "fastbirnn cpp backend: weight_hh must be 2-D");
  const int64_t H = weights[1].size(1), KH = a.gates * H;
  TORCH_CHECK(H >= 1, "fastbirnn cpp backend: hidden size must be >= 1");
  const at::ScalarType dtype = x.scalar_type();
  for (int64_t l = 0; l < a.num_layers; ++l) {
    const int64_t in_size = l == 0 ? x.size(2) : a.D * H;
    for (int64_t d = 0; d < a.D; ++d) {
      const int64_t base = (l * a.D + d) * a.per_dir();
      check_tensor(weights[base], "weight_ih", dtype, {KH, in_size});
      check_tensor(weights[base + 1], "weight_hh", dtype, {KH, H});
      if (a.has_biases) {
        check_tensor(weights[base + 2], "bias_ih", dtype, {KH});
        check_tensor(weights[base + 3], "bias_hh", dtype, {KH});
      }
    }
  }
  const int64_t B = a.batch_first ? x.size(0) : x.size(1);
  if (h0 && h0->defined()) check_tensor(*h0, "hx", dtype, {a.num_layers * a.D, B, H});
  if (c0 && c0->defined()) {
    TORCH_CHECK(cell_state, "fastbirnn cpp backend: only the LSTM cell has a cell state c0");
    check_tensor(*c0, "c0", dtype, {a.num_layers * a.D, B, H});
  }
  if (lengths && lengths->defined()) check_lengths(*lengths, B);
}

// The call's geometry from checked inputs; lengths_cpu keeps the lengths' values alive.
inline Geometry geometry(const Tensor& x, const std::optional<Tensor>& lengths,
                         const StackArgs& a, int64_t H, Tensor& lengths_cpu) {
  Geometry g;
  g.T = a.batch_first ? x.size(1) : x.size(0);
  g.B = a.batch_first ? x.size(0) : x.size(1);
  g.D = a.D;
  g.H = H;
  g.st = a.batch_first ? 1 : g.B;
  g.sb = a.batch_first ? g.T : 1;
  g.lengths = nullptr;
  g.round_bf16 = x.scalar_type() == at::kBFloat16;  // a bf16 call: see Geometry::round_bf16
  if (lengths && lengths->defined()) g.lengths = checked_lengths(*lengths, g.B, g.T, lengths_cpu);
  // 32-bit BLAS: every size and leading dimension a product passes, checked here because a
  // worker must not be the first to throw. The largest leading dimension is the gate buffer's
  // between batch rows of one step: T steps of gates * D * H apart when batch_first.
  const int64_t gate_columns = a.gates * g.DH();
  TORCH_CHECK(g.T * g.B <= INT32_MAX && gate_columns <= INT32_MAX && x.size(2) <= INT32_MAX,
              "fastbirnn cpp backend: tensor too large for 32-bit BLAS (T * B = ", g.T * g.B,
              ", gates * D * H = ", gate_columns, ", input size ", x.size(2), ")");
  TORCH_CHECK(g.sb * gate_columns <= INT32_MAX,
              "fastbirnn cpp backend: tensor too large for 32-bit BLAS: with batch_first, the "
              "gate buffer's leading dimension T * gates * D * H = ", g.sb * gate_columns,
              " passes 2^31 - 1 (use batch_first=False, or shorter sequences)");
  return g;
}

}  // namespace fastbirnn
