// The whole layer stack in one call: layers, both directions, forward and backward, and the one
// autograd node of every cell.
//
// Forward, per layer: the input projection X [W_ih^f; W_ih^r]^T as fixed row-block tasks
// (layer_gemms.h) on the recurrence's team (on all threads first where that team is smaller),
// then the recurrence (recurrence.h). Backward, per layer from the top: BPTT on the team, then
// the weight and input gradients as fixed GEMM tasks over all steps, on all threads. A gated
// cell keeps its activated gates and saved values per layer for the backward; the Elman cell
// keeps only its outputs (its pre-activation is its output, cell.h).

#include "stack.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

#include "buffers.h"
#include "cell_elman.h"
#include "cell_gru.h"
#include "cell_lstm.h"
#include "checks.h"
#include "layer_gemms.h"
#include "recurrence.h"

namespace fastbirnn {

std::atomic<int64_t>& step_projected_layers() {
  static std::atomic<int64_t> layers{0};
  return layers;
}

namespace {

// Runs fn with the cell the op's `cell` argument names.
template <typename F>
void with_cell(c10::string_view name, const F& fn) {
  if (name == "rnn_tanh") return fn(ElmanCell{false});
  if (name == "rnn_relu") return fn(ElmanCell{true});
  if (name == "lstm") return fn(LstmCell{});
  if (name == "gru") return fn(GruCell{});
  TORCH_CHECK(false, "fastbirnn cpp backend: unknown cell '", std::string(name),
              "' (expected 'rnn_tanh', 'rnn_relu', 'lstm' or 'gru')");
}

StackArgs stack_args(c10::string_view cell, int64_t num_layers, bool bidirectional,
                     bool has_biases, bool batch_first) {
  int64_t gates = 0;
  with_cell(cell, [&](auto c) { gates = decltype(c)::kGates; });
  return {num_layers, bidirectional ? 2 : 1, has_biases, batch_first, gates};
}

// The checks of every argument, then the call's geometry.
Geometry checked_geometry(c10::string_view cell, const Tensor& x, const std::optional<Tensor>& h0,
                          const std::optional<Tensor>& c0, at::TensorList weights,
                          const std::optional<Tensor>& lengths, const StackArgs& a,
                          Tensor& lengths_cpu) {
  check_inputs(x, h0, c0, weights, lengths, a, cell == "lstm");
  return geometry(x, lengths, a, weights[1].size(1), lengths_cpu);
}

std::vector<int64_t> out_shape(const Geometry& g, bool batch_first) {
  return batch_first ? std::vector<int64_t>{g.B, g.T, g.DH()}
                     : std::vector<int64_t>{g.T, g.B, g.DH()};
}

// A tensor as the engine computes on it: contiguous, and bf16 widened to fp32 (exactly).
Tensor engine_tensor(const Tensor& t) {
  if (!t.defined()) return t;
  return t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat).contiguous() : t.contiguous();
}
Tensor engine_tensor(const std::optional<Tensor>& t) {
  return t && t->defined() ? engine_tensor(*t) : Tensor();
}
// The same, with bf16 widened into a scratch slot: a large working copy, never returned, whose
// pages then stay mapped for the thread's next call.
Tensor engine_tensor(const Tensor& t, Scratch slot) {
  if (!t.defined() || t.scalar_type() != at::kBFloat16) return engine_tensor(t);
  Tensor wide = scratch_tensor(slot, t.sizes(), t.options().dtype(at::kFloat));
  wide.copy_(t);
  return wide;
}

// Where each layer of a forward writes its [rows, D*H] output: the last layer into the result,
// the others into the kept intermediates (training) or else two scratch buffers in turn, so
// layer l reads what layer l-1 wrote while it writes the other.
template <typename T>
class LayerOutputs {
 public:
  LayerOutputs(Tensor& out, Tensor& mid, int64_t num_layers, int64_t rows, int64_t width)
      : out_(out), mid_(mid), L_(num_layers), rows_(rows), width_(width) {}
  T* operator()(int64_t l) {
    if (l == L_ - 1) return out_.data_ptr<T>();
    if (mid_.defined() && mid_.numel() > 0) return mid_.data_ptr<T>() + l * rows_ * width_;
    Tensor& buffer = scratch_[l % 2];
    if (!buffer.defined())
      buffer = scratch_buffer(l % 2 ? kScratchLayer1 : kScratchLayer0, rows_ * width_,
                              out_.options());
    return buffer.data_ptr<T>();
  }

 private:
  Tensor &out_, &mid_;
  int64_t L_, rows_, width_;
  Tensor scratch_[2];
};

// Layer l's slice of a [L*D, B, H] state tensor for direction d, or null.
template <typename T>
T* layer_state(const Tensor& t, int64_t l, int64_t d, int64_t D, int64_t BH) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() + (l * D + d) * BH : nullptr;
}

template <typename T, typename Cell>
void forward_layers(const Cell& cell, const Tensor& x, const Tensor& h0, const Tensor& c0,
                    at::TensorList weights, const Geometry& g, const StackArgs& a, bool keep,
                    Tensor& out, Tensor& hn, Tensor& cn, Tensor& mid, Tensor& gates,
                    Tensor& saved) {
  constexpr int64_t K = Cell::kGates;
  const int64_t L = a.num_layers, D = a.D, H = g.H, B = g.B, rows = g.T * g.B;
  const int64_t KH = K * H, DKH = D * KH;
  const Blocks blk = column_blocks(D, H);
  const int64_t workers = team_size(g, blk, K);
  LayerOutputs<T> layer_output(out, mid, L, rows, g.DH());
  // A gated cell's gates: kept per layer in training, else one buffer the layers share
  // (allocated for the first layer that projects before its steps).
  Tensor gate_buf;
  const T* layer_in = x.data_ptr<T>();
  int64_t in_size = x.size(2);
  std::vector<T> bias(a.has_biases ? DKH : 0);
  // A bf16 call: on a CPU with AVX512-BF16 the products run on the bf16 tiles (tiles_bf16.h):
  // the projection always, the recurrence where the fp32 engine would use its register tiles
  // (W_hh's blocks packed in pairs by their owners, h_{t-1} kept as bf16). Elsewhere the fp32
  // products read h_{t-1} rounded to bf16 from `rounded`.
  const bool on_bf16 = on_bf16_tiles<T>(g);
  const bool bf16_recurrence = on_bf16 && forward_block_tiles(g, K, sizeof(T));
  // Packed W_hh blocks (filled by the workers; none where the bf16 tiles pack their own): on
  // the stack while they fit (an allocation is a visible part of a tiny call), else in
  // `packed`. W_ih^T for the tiny projection (on the stack) and for long ones (w_ih_packed).
  constexpr int64_t kStackPacked = 2 * kSmallHidden * kSmallHidden;
  alignas(64) T w_small[kStackPacked];
  const bool packs = forward_packs(g, K, sizeof(T)) && !bf16_recurrence;
  // A team that would share its one direction splits the batch instead (batch_splits; the
  // backward splits it the same way): each part packs its own copy of the weights' blocks,
  // part p's at p * D * K*H * (H or I) in the packed buffers.
  const bool batch_split = batch_splits(g, K, workers, sizeof(T));
  const int64_t parts = batch_split ? workers : 1;
  const Tensor packed = packs && parts * D * KH * H > kStackPacked
                            ? scratch_buffer(kScratchPackedHidden, parts * D * KH * H, x.options())
                            : Tensor();
  T* const packed_data = !packs ? nullptr : packed.defined() ? packed.data_ptr<T>() : w_small;
  alignas(64) T w_ih_t[2][kSmallHidden * kSmallHidden];
  Tensor w_ih_packed;
  std::vector<T> state(size_t(D) * 2 * B * H), cstate(Cell::kCellState ? D * B * H : 0);
  std::vector<T> hid(Cell::kInPlace ? 0 : size_t(D) * B * KH);
  // The step projection's operands (recurrence.h, StepProjection) where a layer has one.
  StepProjection<T> step;
  std::vector<T> step_gates, step_bias;
  std::vector<bf16_bits> step_w_pairs;
  const int64_t Hp = paired(H), block_stride = paired(H) * packed_columns(K * blk.width);
  std::vector<bf16_bits> w_hh_bf16(bf16_recurrence ? blk.count() * block_stride : 0);
  std::vector<bf16_bits> state_bf16(bf16_recurrence ? D * 2 * B * Hp : 0);  // zeros: the pads
  Bf16Buffer x_bf16;
  std::vector<bf16_bits> w_ih_bf16;
  std::vector<T> rounded(g.round_bf16 && !bf16_recurrence ? state.size() : 0);
  for (int64_t l = 0; l < L; ++l) {
    T* layer_out = layer_output(l);
    T* S = !Cell::kInPlace && keep ? saved.data_ptr<T>() + l * rows * g.DH() : nullptr;
    const Projection<T> proj = layer_projection<T>(layer_in, in_size, rows, KH, D,
                                                   input_weights<T>(weights, a, l).data(),
                                                   w_ih_t, w_ih_packed, x.options(), on_bf16,
                                                   parts);
    // The projection on more threads than the recurrence's team where that is smaller (which
    // worker runs a task changes no result); else on that team, before its first step, or
    // step by step inside the recurrence (recurrence.h, StepProjection).
    const int64_t proj_workers = projection_workers(proj, D, workers);
    const bool gated_inference = !Cell::kInPlace && !keep;  // its gates are scratch
    // The in-place Elman cell steps in training too (its projection goes to the output rows,
    // kept either way); a gated cell's training keeps every step's gates, which go to memory
    // whichever way they are projected (stepping them there measured 0.94-1.02x).
    const bool per_step = (gated_inference || Cell::kInPlace) &&
                          projects_per_step(g, proj, H, workers, on_bf16, Cell::kInPlace);
    if (gated_inference && !per_step && !gate_buf.defined())
      gate_buf = scratch_buffer(kScratchGates, rows * DKH, x.options());
    T* G = Cell::kInPlace ? layer_out
           : keep         ? gates.data_ptr<T>() + l * rows * DKH
           : per_step     ? nullptr
                          : gate_buf.data_ptr<T>();
    ForwardOperands<T> ops;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t base = (l * D + d) * a.per_dir();
      ops.w_hh[d] = weights[base + 1].data_ptr<T>();
      if (packed_data) ops.w_packed[d] = packed_data + d * KH * H;
      if (a.has_biases) {
        // b_ih + b_hh, except where the cell applies b_hh itself (GRU's n: r * (.. + b_hn)).
        const T* b_ih = weights[base + 2].data_ptr<T>();
        const T* b_hh = weights[base + 3].data_ptr<T>();
        for (int64_t q = 0; q < K; ++q)
          for (int64_t j = 0; j < H; ++j)
            bias[d * KH + q * H + j] =
                q == Cell::kSplitGate ? b_ih[q * H + j] : b_ih[q * H + j] + b_hh[q * H + j];
        ops.bias[d] = bias.data() + d * KH;
        if (Cell::kSplitGate >= 0) ops.bias_h[d] = b_hh + Cell::kSplitGate * H;
      }
      ops.h0[d] = layer_state<T>(h0, l, d, D, B * H);
      ops.c0[d] = layer_state<T>(c0, l, d, D, B * H);
      ops.hn[d] = layer_state<T>(hn, l, d, D, B * H);
      ops.cn[d] = layer_state<T>(cn, l, d, D, B * H);
    }
    Bf16Forward bf16;
    if (on_bf16) {
      const int64_t Ip = paired(in_size), w_ih_size = Ip * packed_columns(KH);
      // Uninitialised, but for an odd input size's pad column, which must be zero.
      x_bf16 = Bf16Buffer();  // the layer below's: frees the slot
      x_bf16 = Bf16Buffer(kScratchBf16Input, rows * Ip, Ip != in_size);
      w_ih_bf16.resize(per_step ? 0 : D * w_ih_size);  // (a stepped layer packs per block)
      for (int64_t d = 0; d < D && !per_step; ++d) {
        const T* w_ih = proj.w_ih[d];
        pack_rows_in_pairs(in_size, KH, [&](int64_t n) { return w_ih + n * in_size; },
                           w_ih_bf16.data() + d * w_ih_size);
        bf16.w_ih[d] = w_ih_bf16.data() + d * w_ih_size;
      }
      bf16.x = x_bf16.data;
      bf16.x_ld = Ip;
      bf16.w_ih_ld = 2 * packed_columns(KH);
      if (bf16_recurrence) {
        bf16.w_hh = w_hh_bf16.data();
        bf16.block_stride = block_stride;
        bf16.state = state_bf16.data();
      }
    }
    if (per_step) {
      step_projected_layers().fetch_add(1, std::memory_order_relaxed);
      step_gates.resize(hid.size());
      step_bias.resize(a.has_biases ? DKH : 0);
      step.X = proj.X;
      step.I = proj.I;
      step.gates = step_gates.data();
      if (on_bf16) {  // each block's gate rows of W_ih in pairs, packed by its owner
        step.x_bf16 = bf16.x;
        step.x_ld = bf16.x_ld;
        step.pairs_stride = paired(proj.I) * packed_columns(K * blk.width);
        step_w_pairs.resize(blk.count() * step.pairs_stride);
        step.w_pairs = step_w_pairs.data();
      }
      for (int64_t d = 0; d < D; ++d) {
        step.w_ih[d] = proj.w_ih[d];
        step.w_packed[d] = proj.w_ih_t[d];  // W_ih^T's buffer, for W_ih's blocks instead
        step.bias[d] = nullptr;
        if (ops.bias[d]) {
          step.bias[d] = step_bias.data() + d * KH;
          to_block_layout(ops.bias[d], K, blk, step_bias.data() + d * KH);
        }
      }
    }
    const Bf16Forward* const proj_bf16 = on_bf16 ? &bf16 : nullptr;
    std::atomic<int64_t> projection_tasks{0};
    if (proj_workers > workers)
      Team(proj_workers).run(
          [&](Team::Member& m) { project<T>(m, g, proj, G, projection_tasks, proj_bf16); });
    Team team(workers);
    team.run([&](Team::Member& m) {
      if (proj_workers <= workers && !per_step)
        project<T>(m, g, proj, G, projection_tasks, proj_bf16);
      else if (per_step && on_bf16)  // (ordered before the steps by the recurrence's first sync)
        input_rows_to_bf16(m, proj, bf16);
      if (!batch_split) {
        recurrence_forward_team<T>(m, g, blk, cell, G, layer_out, S, ops, state.data(),
                                   rounded.empty() ? nullptr : rounded.data(),
                                   on_bf16 ? &bf16 : nullptr, cstate.data(), hid.data(),
                                   per_step ? &step : nullptr);
        return;
      }
      m.sync();  // the projection before any part reads it
      const int64_t sb = g.sb;  // rows of the layout per batch row
      run_batch_parts(m, g, parts, [&](Team::Member& one, int64_t part, const BatchPart& bp) {
        ForwardOperands<T> part_ops = ops;
        bp.state_rows(H, part_ops.h0, part_ops.c0, part_ops.hn, part_ops.cn);
        for (int64_t d = 0; d < D; ++d)
          if (ops.w_packed[d]) part_ops.w_packed[d] = ops.w_packed[d] + part * D * KH * H;
        StepProjection<T> part_step = step;
        if (per_step) {
          part_step.X = bp.rows(step.X, sb * step.I);
          part_step.gates = bp.rows(step.gates, D * KH);
          for (int64_t d = 0; d < D; ++d)
            part_step.w_packed[d] = step.w_packed[d] + part * D * KH * step.I;
        }
        recurrence_forward_team<T>(one, bp.g, blk, cell, bp.rows(G, sb * DKH),
                                   bp.rows(layer_out, sb * g.DH()), bp.rows(S, sb * g.DH()),
                                   part_ops, bp.rows(state.data(), 2 * D * H), nullptr, nullptr,
                                   bp.rows(cstate.data(), D * H), bp.rows(hid.data(), D * KH),
                                   per_step ? &part_step : nullptr);
      });
    });
    layer_in = layer_out;
    in_size = g.DH();
  }
}

template <typename T, typename Cell>
void backward_layers(const Cell& cell, const Tensor& grad_out, const Tensor& grad_hn,
                     const Tensor& grad_cn, const Tensor& x, const Tensor& h0, const Tensor& c0,
                     at::TensorList weights, const Geometry& g, const StackArgs& a,
                     const Tensor& out, const Tensor& mid, const Tensor& gates,
                     const Tensor& saved, bool need_dx, Tensor& dx, Tensor& dh0, Tensor& dc0,
                     std::vector<Tensor>& dweights, const Tensor& dG, bool gates_take_dG) {
  constexpr int64_t K = Cell::kGates;
  const int64_t L = a.num_layers, D = a.D, H = g.H, B = g.B, DH = g.DH(), rows = g.T * g.B;
  const int64_t KH = K * H, DKH = D * KH;
  const int64_t threads = worth_threads(rows * KH * H) ? int64_t(at::get_num_threads()) : 1;
  const Blocks blk = column_blocks(D, H);
  const int64_t workers = team_size(g, blk, K);
  // BPTT splits the batch where the forward did (recurrence.h, batch_splits).
  const bool batch_split = batch_splits(g, K, workers, sizeof(T));
  std::vector<T> bptt(size_t(D) * 3 * B * H);  // carry, tmp and dc per direction
  // A bf16 call on a CPU with AVX512-BF16: every product on the bf16 tiles (tiles_bf16.h), with
  // the gate gradients' bf16 copies and W_hh's packed columns; no fp32 gate gradient rows are
  // kept (GateGradients: dG is undefined).
  const bool on_bf16 = on_bf16_tiles<T>(g);
  constexpr bool split = Cell::kSplitGate >= 0;
  const Tensor dGh_split =
      split && !on_bf16 ? scratch_buffer(kScratchGradGatesHidden, rows * DKH, x.options())
                        : Tensor();
  std::vector<T> block_rows(on_bf16 ? blk.count() * 2 * KH : 0);
  std::vector<T> bias_sums(on_bf16 && a.has_biases ? (split ? 2 : 1) * DKH : 0);
  Bf16Backward bf16;
  Bf16Buffer dG_bits, dGh_bits;
  std::vector<bf16_bits> w_hh_columns;
  if (on_bf16) {
    bf16.direction_ld = paired(KH);
    bf16.ld = D * bf16.direction_ld;
    // BPTT writes every element but an odd K*H's pad column, which must be zero.
    dG_bits = Bf16Buffer(kScratchBf16Grads, rows * bf16.ld, KH % 2 != 0);
    if (Cell::kSplitGate >= 0)
      dGh_bits = Bf16Buffer(kScratchBf16GradsHidden, rows * bf16.ld, KH % 2 != 0);
    bf16.block_stride = paired(KH) * packed_columns(blk.width);
    w_hh_columns.resize(blk.count() * bf16.block_stride);
    bf16.dG = dG_bits.data;
    bf16.dGh = dGh_bits.data;
    bf16.w_hh = w_hh_columns.data();
  }
  Tensor dOut_buf;  // the gradient flowing into the current layer's output
  const T* dOut = grad_out.defined() ? grad_out.data_ptr<T>() : nullptr;
  for (int64_t l = L - 1; l >= 0; --l) {
    const T* Hs = l == L - 1 ? out.data_ptr<T>() : mid.data_ptr<T>() + l * rows * DH;
    const T* X = l == 0 ? x.data_ptr<T>() : mid.data_ptr<T>() + (l - 1) * rows * DH;
    const int64_t I = l == 0 ? x.size(2) : DH;
    const T* G = Cell::kInPlace ? Hs : gates.data_ptr<T>() + l * rows * DKH;
    const T* S = Cell::kInPlace ? nullptr : saved.data_ptr<T>() + l * rows * DH;
    // The layer's gate gradients: over its gates (gates_take_dG, see stack_backward_impl), or
    // in dG; a split gate's hidden-side ones apart.
    T* const dG_rows = gates_take_dG  ? gates.data_ptr<T>() + l * rows * DKH
                       : dG.defined() ? dG.data_ptr<T>()
                                      : nullptr;
    const GateGradients<T> gate_grads{
        dG_rows, dGh_split.defined() ? dGh_split.data_ptr<T>() : dG_rows,
        on_bf16 ? block_rows.data() : nullptr, bias_sums.empty() ? nullptr : bias_sums.data(),
        bias_sums.empty() || !split ? nullptr : bias_sums.data() + DKH};

    // 1. BPTT on the team: column blocks of both directions, one barrier per step where
    //    workers share a direction, or each worker's part of the batch.
    BackwardOperands<T> ops;
    for (int64_t d = 0; d < D; ++d) {
      ops.w_hh[d] = weights[(l * D + d) * a.per_dir() + 1].data_ptr<T>();
      ops.h0[d] = layer_state<T>(h0, l, d, D, B * H);
      ops.c0[d] = layer_state<T>(c0, l, d, D, B * H);
      ops.dhn[d] = layer_state<T>(grad_hn, l, d, D, B * H);
      ops.dcn[d] = layer_state<T>(grad_cn, l, d, D, B * H);
      ops.dh0[d] = layer_state<T>(dh0, l, d, D, B * H);
      ops.dc0[d] = layer_state<T>(dc0, l, d, D, B * H);
    }
    std::fill(bias_sums.begin(), bias_sums.end(), T(0));
    Team team(workers);
    team.run([&](Team::Member& m) {
      if (!batch_split)
        return recurrence_backward_team<T>(m, g, blk, cell, dOut, Hs, G, S, gate_grads, ops,
                                           bptt.data(), on_bf16 ? &bf16 : nullptr);
      // As the forward's batch split: each part's rows on their own, with their own carry.
      const int64_t sb = g.sb;
      run_batch_parts(m, g, workers, [&](Team::Member& one, int64_t, const BatchPart& bp) {
        BackwardOperands<T> part_ops = ops;
        bp.state_rows(H, part_ops.h0, part_ops.c0, part_ops.dhn, part_ops.dcn, part_ops.dh0,
                      part_ops.dc0);
        const GateGradients<T> part_grads{bp.rows(gate_grads.dG, sb * DKH),
                                          bp.rows(gate_grads.dGh, sb * DKH)};
        recurrence_backward_team<T>(one, bp.g, blk, cell, bp.rows(dOut, sb * DH),
                                    bp.rows(Hs, sb * DH), bp.rows(G, sb * DKH),
                                    bp.rows(S, sb * DH), part_grads, part_ops,
                                    bp.rows(bptt.data(), 3 * D * H));
      });
    });
    for (int64_t d = 0; d < D && !bias_sums.empty(); ++d) {  // summed by BPTT (bf16 tiles)
      const int64_t base = (l * D + d) * a.per_dir();
      std::memcpy(dweights[base + 2].data_ptr<T>(), gate_grads.bias + d * KH, sizeof(T) * KH);
      std::memcpy(dweights[base + 3].data_ptr<T>(),
                  (split ? gate_grads.bias_hidden : gate_grads.bias) + d * KH, sizeof(T) * KH);
    }

    // 2. Weight and input gradients: fixed GEMM tasks over all steps.
    const bool want_dx = l > 0 || need_dx;
    Tensor dX_buf = !want_dx ? Tensor() : l == 0 ? dx
                    : scratch_buffer(l % 2 ? kScratchGradInput1 : kScratchGradInput0, rows * DH,
                                     x.options());
    const GradOperands<T> operands{gate_grads.dG, gate_grads.dGh, KH, X, I, Hs,
                                   layer_state<T>(h0, l, 0, D, B * H)};
    T* const dX = want_dx ? dX_buf.data_ptr<T>() : nullptr;
    if (on_bf16)
      gemm_grads_bf16<T>(g, a, weights, l, operands, bf16, dweights, dX, threads);
    else
      gemm_grads<T>(g, a, weights, l, operands, dweights, dX, threads);
    if (l > 0) {
      dOut_buf = dX_buf;  // becomes the output gradient of the layer below
      dOut = dOut_buf.data_ptr<T>();
    }
  }
}

}  // namespace

namespace {

// The results of a forward: out, h_n, c_n (empty but for the LSTM) and, when kept for a
// backward, the intermediate layers' outputs and a gated cell's gates and saved values.
struct ForwardResults {
  Tensor out, hn, cn, mid, gates, saved;
};

// The forward of every op that runs one. Only what is kept is allocated: at tiny sizes each
// allocation is a visible part of the call.
ForwardResults run_forward(c10::string_view cell, const Tensor& x_,
                           const std::optional<Tensor>& h0_, const std::optional<Tensor>& c0_,
                           at::TensorList weights_, const std::optional<Tensor>& lengths,
                           int64_t num_layers, bool bidirectional, bool has_biases,
                           bool batch_first, bool keep) {
  const StackArgs a = stack_args(cell, num_layers, bidirectional, has_biases, batch_first);
  Tensor lengths_cpu;
  // A bf16 call (g.round_bf16) runs the fp32 engine on its values (exact) with bf16-rounded
  // product operands; out, h_n and c_n come back in bf16, what backward keeps stays fp32.
  const Geometry g = checked_geometry(cell, x_, h0_, c0_, weights_, lengths, a, lengths_cpu);
  const Tensor x = engine_tensor(x_, kScratchWideInput);
  const Tensor h0 = engine_tensor(h0_), c0 = engine_tensor(c0_);
  std::vector<Tensor> weights;
  weights.reserve(weights_.size());
  for (const auto& w : weights_) weights.push_back(engine_tensor(w));
  const int64_t rows = g.T * g.B;
  const bool lstm = cell == "lstm", gated = a.gates > 1;
  const auto options = x.options();
  ForwardResults r;
  // A bf16 call's fp32 output is a working copy (the result is its bf16 conversion).
  r.out = g.round_bf16 ? scratch_tensor(kScratchWideOutput, out_shape(g, batch_first), options)
                       : empty_buffer(out_shape(g, batch_first), options, /*result=*/true);
  r.hn = empty_buffer({num_layers * a.D, g.B, g.H}, options, /*result=*/true);
  r.cn = empty_buffer({lstm ? num_layers * a.D : 0, g.B, g.H}, options, /*result=*/true);
  if (keep) {
    const int64_t kept = gated ? num_layers : 0;
    r.mid = scratch_tensor(kScratchKeptOutputs, {num_layers - 1, rows, g.DH()}, options);
    r.gates = scratch_tensor(kScratchKeptGates, {kept, rows, a.gates * g.DH()}, options);
    r.saved = scratch_tensor(kScratchKeptSaved, {kept, rows, g.DH()}, options);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastbirnn_stack_forward", [&] {
    with_cell(cell, [&](auto c) {
      forward_layers<scalar_t>(c, x, h0, c0, weights, g, a, keep, r.out, r.hn, r.cn, r.mid,
                               r.gates, r.saved);
    });
  });
  if (g.round_bf16) {
    r.out = r.out.to(at::kBFloat16);  // exact: the engine rounded the outputs already
    r.hn = r.hn.to(at::kBFloat16);
    r.cn = r.cn.to(at::kBFloat16);
  }
  return r;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> stack_forward_impl(
    c10::string_view cell, const Tensor& x, const std::optional<Tensor>& h0,
    const std::optional<Tensor>& c0, at::TensorList weights,
    const std::optional<Tensor>& lengths, int64_t num_layers, bool bidirectional,
    bool has_biases, bool batch_first, bool keep) {
  ForwardResults r = run_forward(cell, x, h0, c0, weights, lengths, num_layers, bidirectional,
                                 has_biases, batch_first, keep);
  if (!keep) {  // the op's schema returns six tensors (kept ones fp32 for a bf16 call)
    const auto options =
        x.options().dtype(x.scalar_type() == at::kBFloat16 ? at::kFloat : x.scalar_type());
    r.mid = at::empty({0, 0, 0}, options);
    r.gates = at::empty({0, 0, 0}, options);
    r.saved = at::empty({0, 0, 0}, options);
  }
  return {r.out, r.hn, r.cn, r.mid, r.gates, r.saved};
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> stack_backward_impl(
    c10::string_view cell, const std::optional<Tensor>& grad_out_,
    const std::optional<Tensor>& grad_hn_, const std::optional<Tensor>& grad_cn_,
    const Tensor& x_, const std::optional<Tensor>& h0_, const std::optional<Tensor>& c0_,
    at::TensorList weights_, const std::optional<Tensor>& lengths, const Tensor& out,
    const Tensor& mid, const Tensor& gates, const Tensor& saved, int64_t num_layers,
    bool bidirectional, bool has_biases, bool batch_first, bool need_dx) {
  const StackArgs a = stack_args(cell, num_layers, bidirectional, has_biases, batch_first);
  Tensor lengths_cpu;
  const Geometry g = checked_geometry(cell, x_, h0_, c0_, weights_, lengths, a, lengths_cpu);
  const at::ScalarType dtype = x_.scalar_type();
  // A bf16 call (see run_forward): its kept buffers are fp32, its results bf16.
  const bool bf16 = g.round_bf16;
  const at::ScalarType kept_dtype = bf16 ? at::kFloat : dtype;
  const bool lstm = cell == "lstm", gated = a.gates > 1;
  const int64_t rows = g.T * g.B, kept = gated ? num_layers : 0;
  const std::vector<int64_t> out_sizes = out_shape(g, batch_first);
  const std::vector<int64_t> state_sizes{num_layers * a.D, g.B, g.H};
  check_tensor(out, "out", dtype, out_sizes);
  TORCH_CHECK(mid.dim() == 3 && mid.size(0) == num_layers - 1,
              "fastbirnn cpp backend: intermediate outputs were not kept for backward");
  check_tensor(mid, "mid", kept_dtype, {num_layers - 1, rows, g.DH()});
  check_tensor(gates, "gates", kept_dtype, {kept, rows, a.gates * g.DH()});
  check_tensor(saved, "saved", kept_dtype, {kept, rows, g.DH()});
  // A bf16 gradient is widened into `slot` where it is large (the output's).
  auto optional = [&](const std::optional<Tensor>& t, const char* name, at::IntArrayRef sizes,
                      std::optional<Scratch> slot = std::nullopt) {
    if (!t || !t->defined()) return Tensor();
    check_tensor(*t, name, dtype, sizes);
    return slot ? engine_tensor(*t, *slot) : engine_tensor(*t);
  };
  const Tensor grad_out = optional(grad_out_, "grad_out", out_sizes, kScratchWideGradOutput);
  const Tensor grad_hn = optional(grad_hn_, "grad_hn", state_sizes);
  const Tensor grad_cn = optional(grad_cn_, "grad_cn", state_sizes);
  TORCH_CHECK(lstm || !grad_cn.defined(), "fastbirnn cpp backend: only the LSTM has a c_n");
  const Tensor x = engine_tensor(x_, kScratchWideInput);
  const Tensor out_values = engine_tensor(out, kScratchWideOutput);
  const Tensor h0 = engine_tensor(h0_), c0 = engine_tensor(c0_);
  std::vector<Tensor> weights;
  std::vector<std::vector<int64_t>> shapes;  // the results: dweights..., dx, dh0, dc0 (, dG)
  for (const auto& w : weights_) {
    weights.push_back(engine_tensor(w));
    shapes.push_back(w.sizes().vec());
  }
  shapes.push_back(need_dx ? x.sizes().vec() : std::vector<int64_t>{0});
  shapes.push_back(state_sizes);
  shapes.push_back(lstm ? state_sizes : std::vector<int64_t>{0});
  // The gate gradients' fp32 (fp64) rows, none on the bf16 tiles (GateGradients). A gated
  // cell's kept gates take them in place where the autograd engine frees the gates right after
  // this backward (no retain_graph: what AOTAutograd calls saved tensors used once): BPTT reads
  // each step's gates just before it writes that step's gradients over them (cell.h), and
  // nothing reads the gates after. Elsewhere (a retained graph, a call outside the engine) the
  // gates stay as they are and the rows are scratch: carved out with the results while small,
  // else kept per thread. (At (64, 250, 64, 512) one direction those 131 MB could not be kept
  // under the scratch cap beside the gates: 60 k page faults per training step.)
  const bool rows_kept = !on_bf16_tiles<float>(g);
  const bool gates_take_dG =
      gated && rows_kept && !torch::autograd::get_current_graph_task_keep_graph();
  const int64_t dG_numel = rows_kept && !gates_take_dG ? rows * a.gates * g.DH() : 0;
  const bool dG_kept = dG_numel * int64_t(x.element_size()) >= kScratchMinBytes;
  const bool dG_carved = dG_numel > 0 && !dG_kept;
  if (dG_carved) shapes.push_back({dG_numel});
  std::vector<Tensor> results = empty_tensors(shapes, x.options());
  Tensor dG = dG_kept ? scratch_buffer(kScratchGradGates, dG_numel, x.options())
              : dG_carved ? results.back() : Tensor();
  if (dG_carved) results.pop_back();
  Tensor dc0 = results.back();
  results.pop_back();
  Tensor dh0 = results.back();
  results.pop_back();
  Tensor dx = results.back();
  results.pop_back();
  AT_DISPATCH_FLOATING_TYPES(kept_dtype, "fastbirnn_stack_backward", [&] {
    with_cell(cell, [&](auto c) {
      backward_layers<scalar_t>(c, grad_out, grad_hn, grad_cn, x, h0, c0, weights, g,
                                a, out_values, mid.contiguous(), gates.contiguous(),
                                saved.contiguous(), need_dx, dx, dh0, dc0, results, dG,
                                gates_take_dG);
    });
  });
  if (bf16) {  // gradients in the dtype of what they are gradients of
    dx = dx.to(at::kBFloat16);
    dh0 = dh0.to(at::kBFloat16);
    dc0 = dc0.to(at::kBFloat16);
    for (auto& dw : results) dw = dw.to(at::kBFloat16);
  }
  return {dx, dh0, dc0, results};
}

// ---- autograd: one node for the whole stack --------------------------------------------------

namespace {

DifferentiableBackward& differentiable_backward() {
  static DifferentiableBackward fn;
  return fn;
}

template <typename Op>
c10::TypedOperatorHandle<Op> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Op>();
}

std::optional<Tensor> optional_tensor(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

class StackFunction : public torch::autograd::Function<StackFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const std::string& cell, const Tensor& x,
      const std::optional<Tensor>& h0, const std::optional<Tensor>& c0, at::TensorList weights,
      const std::optional<Tensor>& lengths, int64_t num_layers, bool bidirectional,
      bool has_biases, bool batch_first) {
    static const auto op =
        find_op<decltype(stack_forward_impl)>("fastbirnn_cpp::stack_forward_impl");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, hn, cn, mid, gates, saved] = op.call(cell, x, h0, c0, weights, lengths, num_layers,
                                                    bidirectional, has_biases, batch_first, true);
    auto defined = [](const std::optional<Tensor>& t) { return t ? *t : Tensor(); };
    std::vector<Tensor> kept{x, defined(h0), defined(c0), defined(lengths), out, mid, gates,
                             saved};
    kept.insert(kept.end(), weights.begin(), weights.end());
    ctx->save_for_backward(kept);
    // Outputs the loss does not use reach backward undefined, not as zeros the autograd engine
    // would allocate and fill (a visible part of a tiny training step); both backwards take
    // them as absent.
    ctx->set_materialize_grads(false);
    ctx->saved_data["cell"] = cell;
    ctx->saved_data["num_layers"] = num_layers;
    ctx->saved_data["bidirectional"] = bidirectional;
    ctx->saved_data["has_biases"] = has_biases;
    ctx->saved_data["batch_first"] = batch_first;
    ctx->saved_data["need_dx"] = x.requires_grad();
    return {out, hn, cn};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    std::vector<Tensor> weights(saved.begin() + 8, saved.end());
    const std::string cell = ctx->saved_data["cell"].toStringRef();
    const bool need_dx = ctx->saved_data["need_dx"].toBool();
    const int64_t num_layers = ctx->saved_data["num_layers"].toInt();
    const bool bidirectional = ctx->saved_data["bidirectional"].toBool();
    const bool has_biases = ctx->saved_data["has_biases"].toBool();
    const bool batch_first = ctx->saved_data["batch_first"].toBool();
    Tensor dx, dh0, dc0;
    std::vector<Tensor> dweights;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: gradients that are themselves differentiable, from a recomputation.
      // Refused loudly where none is installed, never gradients that drop second-order terms.
      TORCH_CHECK(differentiable_backward(),
                  "fastbirnn cpp backend: double backward (create_graph=True) needs the Python "
                  "package's differentiable recomputation, which is not installed");
      std::vector<Tensor> inputs{saved[0], saved[1], saved[2]};
      inputs.insert(inputs.end(), weights.begin(), weights.end());
      inputs.push_back(saved[3]);
      const std::vector<Tensor> result = differentiable_backward()(
          cell, inputs, {grads[0], grads[1], cell == "lstm" ? grads[2] : Tensor()}, num_layers,
          bidirectional, has_biases, batch_first);
      TORCH_CHECK(result.size() == 3 + weights.size(),
                  "fastbirnn cpp backend: the differentiable backward returned ", result.size(),
                  " gradients, expected ", 3 + weights.size());
      dx = result[0];
      dh0 = result[1];
      dc0 = result[2];
      dweights.assign(result.begin() + 3, result.end());
    } else {
      static const auto op =
          find_op<decltype(stack_backward_impl)>("fastbirnn_cpp::stack_backward_impl");
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(dx, dh0, dc0, dweights) =
          op.call(cell, optional_tensor(grads[0]), optional_tensor(grads[1]),
                  cell == "lstm" ? optional_tensor(grads[2]) : std::nullopt, saved[0],
                  optional_tensor(saved[1]), optional_tensor(saved[2]), weights,
                  optional_tensor(saved[3]), saved[4], saved[5], saved[6], saved[7], num_layers,
                  bidirectional, has_biases, batch_first, need_dx);
    }
    // One gradient per forward argument (cell, x, h0, c0, the weights, then lengths and the
    // non-tensor arguments).
    torch::autograd::variable_list result{Tensor(), need_dx ? dx : Tensor(),
                                          saved[1].defined() ? dh0 : Tensor(),
                                          saved[2].defined() ? dc0 : Tensor()};
    result.insert(result.end(), dweights.begin(), dweights.end());
    for (int i = 0; i < 5; ++i) result.emplace_back();
    return result;
  }
};

}  // namespace

void set_differentiable_backward(DifferentiableBackward fn) {
  differentiable_backward() = std::move(fn);
}

std::tuple<Tensor, Tensor, Tensor> stack_no_autograd(
    c10::string_view cell, const Tensor& x, const std::optional<Tensor>& h0,
    const std::optional<Tensor>& c0, at::TensorList weights, const std::optional<Tensor>& lengths,
    int64_t num_layers, bool bidirectional, bool has_biases, bool batch_first) {
  ForwardResults r = run_forward(cell, x, h0, c0, weights, lengths, num_layers, bidirectional,
                                 has_biases, batch_first, false);
  return {r.out, r.hn, r.cn};
}

std::tuple<Tensor, Tensor, Tensor> stack_autograd(
    c10::string_view cell, const Tensor& x, const std::optional<Tensor>& h0,
    const std::optional<Tensor>& c0, at::TensorList weights, const std::optional<Tensor>& lengths,
    int64_t num_layers, bool bidirectional, bool has_biases, bool batch_first) {
  bool needs_grad = x.requires_grad() || (h0 && h0->defined() && h0->requires_grad()) ||
                    (c0 && c0->defined() && c0->requires_grad());
  for (const auto& w : weights) needs_grad = needs_grad || w.requires_grad();
  if (!at::GradMode::is_enabled() || !needs_grad) {
    // No graph to build: skip the autograd node and keep nothing for a backward.
    at::AutoDispatchBelowADInplaceOrView guard;
    return stack_no_autograd(cell, x, h0, c0, weights, lengths, num_layers, bidirectional,
                             has_biases, batch_first);
  }
  auto outs = StackFunction::apply(std::string(cell), x, h0, c0, weights, lengths, num_layers,
                                   bidirectional, has_biases, batch_first);
  return {outs[0], outs[1], outs[2]};
}

std::tuple<Tensor, Tensor, Tensor> stack_eager(c10::string_view cell, const Tensor& x,
                                               const std::vector<Tensor>& weights,
                                               int64_t num_layers, bool bidirectional,
                                               bool has_biases, bool batch_first) {
  static const auto op = find_op<decltype(stack_autograd)>("fastbirnn_cpp::stack");
  return op.call(cell, x, std::nullopt, std::nullopt, weights, std::nullopt, num_layers,
                 bidirectional, has_biases, batch_first);
}

}  // namespace fastbirnn
