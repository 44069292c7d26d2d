// The layer stack as torch ops (stack.cpp), registered in bindings.cpp.
//
// One op runs every cell ('rnn_tanh', 'rnn_relu', 'lstm', 'gru') over all layers and both
// directions, with one autograd node in C++: stack(cell, x, h0, c0, weights, lengths, ...)
// -> (out, h_n, c_n), c0 and c_n (empty) for the LSTM only. stack_forward_impl and
// stack_backward_impl are the node's two halves, ops of their own so torch.compile sees fake
// kernels for them.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <atomic>
#include <functional>
#include <optional>
#include <tuple>
#include <vector>

namespace fastbirnn {

using at::Tensor;

// What the stack op's arguments say, less the tensors.
struct StackArgs {
  int64_t num_layers;
  int64_t D;
  bool has_biases;
  bool batch_first;
  int64_t gates;  // pre-activation rows per hidden unit: Elman 1, GRU 3, LSTM 4
  int64_t per_dir() const { return has_biases ? 4 : 2; }
};

std::tuple<Tensor, Tensor, Tensor> stack_autograd(
    c10::string_view cell, const Tensor& x, const std::optional<Tensor>& h0,
    const std::optional<Tensor>& c0, at::TensorList weights, const std::optional<Tensor>& lengths,
    int64_t num_layers, bool bidirectional, bool has_biases, bool batch_first);

std::tuple<Tensor, Tensor, Tensor> stack_no_autograd(
    c10::string_view cell, const Tensor& x, const std::optional<Tensor>& h0,
    const std::optional<Tensor>& c0, at::TensorList weights, const std::optional<Tensor>& lengths,
    int64_t num_layers, bool bidirectional, bool has_biases, bool batch_first);

// out, h_n, c_n, and with keep what the backward needs: the intermediate layers' outputs and,
// for a gated cell, every layer's activated gates and the cell's saved values.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> stack_forward_impl(
    c10::string_view cell, const Tensor& x, const std::optional<Tensor>& h0,
    const std::optional<Tensor>& c0, at::TensorList weights, const std::optional<Tensor>& lengths,
    int64_t num_layers, bool bidirectional, bool has_biases, bool batch_first, bool keep);

// dx (empty unless need_dx), dh0, dc0 (empty but for the LSTM) and every weight's gradient.
// Called by the autograd engine for a graph it frees right after (no retain_graph), a gated
// cell's backward writes its gate gradients over `gates`, which no one reads again.
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> stack_backward_impl(
    c10::string_view cell, const std::optional<Tensor>& grad_out,
    const std::optional<Tensor>& grad_hn, const std::optional<Tensor>& grad_cn, const Tensor& x,
    const std::optional<Tensor>& h0, const std::optional<Tensor>& c0, at::TensorList weights,
    const std::optional<Tensor>& lengths, const Tensor& out, const Tensor& mid,
    const Tensor& gates, const Tensor& saved, int64_t num_layers, bool bidirectional,
    bool has_biases, bool batch_first, bool need_dx);

// The common eager call (no h0, c0 or lengths) from Python without torch.ops' boxed argument
// parsing: the same op through the dispatcher.
std::tuple<Tensor, Tensor, Tensor> stack_eager(c10::string_view cell, const Tensor& x,
                                               const std::vector<Tensor>& weights,
                                               int64_t num_layers, bool bidirectional,
                                               bool has_biases, bool batch_first);

// Gradients of gradients (create_graph=True): the engine's gradients are not differentiable,
// so under grad mode the autograd node asks this function instead, which recomputes the stack
// differentiably (fastbirnn.backends.cpp_backend installs the pure-PyTorch reference). Its
// arguments: the cell, the saved inputs (x, h0, c0, weights, lengths; undefined where absent),
// the incoming gradients (grad_out, grad_hn, grad_cn), num_layers, bidirectional, has_biases,
// batch_first. Returns one gradient per input: dx, dh0, dc0, then the weights'.
using DifferentiableBackward = std::function<std::vector<Tensor>(
    const std::string& cell, const std::vector<Tensor>& inputs, const std::vector<Tensor>& grads,
    int64_t num_layers, bool bidirectional, bool has_biases, bool batch_first)>;
void set_differentiable_backward(DifferentiableBackward fn);

// Layers whose forward projected its input step by step inside the recurrence (recurrence.h,
// StepProjection) since the extension loaded (tests).
std::atomic<int64_t>& step_projected_layers();

}  // namespace fastbirnn
