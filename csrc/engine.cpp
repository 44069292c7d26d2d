// Fused bidirectional RNN for CPU, the engine: the whole layer stack in one call.
//
// The engine owns everything that does not depend on the cell: the thread team, the split of
// hidden units into column blocks, the per-step barrier, the GEMMs, layouts, lengths, both
// directions, the layer stack and the backward's structure. The cell (cell_elman.h; the gated
// cell_lstm.h and cell_gru.h, interface in cell_gated.h) is the pointwise step and its
// derivative.
//
// Parallelism comes from the machine, not from the number of directions: each direction's
// hidden units are split into fixed column blocks, both directions' blocks interleaved and
// dealt round-robin to a team of up to torch.get_num_threads() workers (engine_team.h). Each
// worker keeps its blocks for the whole sequence (so its slice of W_hh stays in its core's
// cache) and the team meets at one spinning barrier per step.
//
// Forward, per layer: input projection X [W_ih^f; W_ih^r]^T as fixed row-block GEMM tasks,
// then the recurrence, each step one small GEMM per block (h_{t-1} W_hh[block]^T) with the
// cell fused in. Backward: BPTT per block from the saved outputs (no saved pre-activations):
// each step first carry[block] = dz_{t+1} W_hh[:, block], then dz_t[block] from the cell;
// then weight and input gradients as fixed GEMM tasks over all steps. A gated cell runs the
// same structure with kGates pre-activations per unit and saves its activated gates (and
// LSTM's c, GRU's W_hn h + b_hn) for the backward; see "the gated recurrences" below.
//
// Determinism: every product is a single-threaded BLAS call (or register-blocked loop) on a
// block whose shape depends only on the problem, never on the thread count, and no sum is
// ever split across workers, so results are bit-identical for any torch.get_num_threads().
//
// Layout: activations are "rows" of width D*H; row (t, b) sits at t*st + b*sb, with
// (st, sb) = (B, 1) for time-major input and (1, T) for batch_first, so batch_first needs
// no transposes.

#include <torch/extension.h>
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cell_elman.h"
#include "cell_gru.h"
#include "cell_lstm.h"
#include "engine_blas.h"
#include "engine_team.h"

namespace fastbirnn {
namespace {

using at::Tensor;


// ---- geometry, the fixed block partition and the team size --------------------------------

struct Geometry {
  int64_t T, B, D, H;
  int64_t st, sb;            // row strides of time and batch (in rows)
  const int64_t* lengths;    // [B] or nullptr (every row runs T steps)
  int64_t DH() const { return D * H; }
  int64_t ld() const { return sb * D * H; }  // elements between batch rows of one step
  bool active(int64_t t, int64_t b) const { return lengths == nullptr || t < lengths[b]; }
  // Rows [0, bound) hold every row active at step t: BLAS needs no more than that.
  int64_t active_bound(int64_t t) const {
    if (lengths == nullptr) return B;
    int64_t bound = B;
    while (bound > 0 && lengths[bound - 1] <= t) --bound;
    return bound;
  }
  // Whether every row below active_bound(t) is active (lengths sorted, as from packing).
  bool all_active_below(int64_t t, int64_t bound) const {
    if (lengths == nullptr) return true;
    for (int64_t b = 0; b < bound; ++b)
      if (lengths[b] <= t) return false;
    return true;
  }
  // Step t of direction d at position s of its visiting order.
  int64_t step(int64_t d, int64_t s) const { return d == 0 ? s : T - 1 - s; }
  // The row of the step before active step t of row b in direction d's order, or -1 at its
  // first step (where the initial state comes in).
  int64_t previous_row(int64_t d, int64_t t, int64_t b) const {
    const int64_t tp = d == 0 ? t - 1 : t + 1;
    const int64_t length = lengths ? lengths[b] : T;
    return tp < 0 || tp >= length ? -1 : tp * st + b * sb;
  }
};

// Above kSmallHidden, each direction's hidden units are split into blocks of this many columns
// (a multiple of the AVX-512 width; 16 blocks per direction at H = 1024).
constexpr int64_t kBlockWidth = 64;

// The fixed split of each direction's hidden units into column blocks. It depends on H and D
// only, never on the thread count: that is what keeps results bit-identical for any count.
// Both directions' blocks interleave (k = j * D + d), so one or two directions both spread
// over the whole team.
struct Blocks {
  int64_t D, H, width, per_dir;
  int64_t count() const { return D * per_dir; }
  int64_t dir(int64_t k) const { return k % D; }
  int64_t j0(int64_t k) const { return (k / D) * width; }
  int64_t cols(int64_t k) const { return std::min(H, j0(k) + width) - j0(k); }
};

static_assert(kBlockWidth <= kMaxBlock && kSmallHidden <= kMaxBlock,
              "a gated cell's stack buffers hold one block");

Blocks column_blocks(int64_t D, int64_t H) {
  const int64_t width = H <= kSmallHidden ? H : kBlockWidth;
  return {D, H, width, (H + width - 1) / width};
}

// Below this many multiply-adds in all a parallel region costs more than it saves.

template <typename T>
bool all_finite(const T* p, int64_t n) {
  // NaN and inf are the values with every exponent bit set; an integer OR-reduction over the
  // bits vectorises (a floating-point one may not be reordered).
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr Bits exponent = sizeof(T) == 4 ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
  Bits nonfinite = 0;
  for (int64_t i = 0; i < n; ++i) {
    Bits bits;
    std::memcpy(&bits, p + i, sizeof(T));
    nonfinite |= Bits((bits & exponent) == exponent);
  }
  return nonfinite == 0;
}

// m rows of direction d's dW_hh as nn.RNN computes them: a sum over the steps each row
// actually takes, h0 (or zeros) at its first step. dz points at the rows' gate-gradient
// columns (leading dimension ldz), Hs at direction d's columns of the outputs. Used only when the layer's states or
// gradients hold a NaN or inf, where the fast path would differ: its shifted GEMM also
// multiplies the zero dz of padded steps with the last valid state (0 * NaN = NaN), and it
// skips the zero h0 term when no h0 was given (NaN * 0 = NaN in nn.RNN).
template <typename T>
void hidden_weight_grad_nonfinite(const Geometry& g, int d, int64_t m, const T* dz, int64_t ldz,
                                  const T* Hs, const T* h0, T* dW) {
  const int64_t H = g.H, DH = g.DH();
  std::fill(dW, dW + m * H, T(0));
  for (int64_t b = 0; b < g.B; ++b) {
    const int64_t length = g.lengths ? g.lengths[b] : g.T;
    for (int64_t s = 0; s < length; ++s) {
      const int64_t t = d == 0 ? s : length - 1 - s;
      const T* dz_row = dz + (t * g.st + b * g.sb) * ldz;
      const T* prev = nullptr;  // nullptr: zeros
      if (s > 0)
        prev = Hs + ((d == 0 ? t - 1 : t + 1) * g.st + b * g.sb) * DH;
      else if (h0)
        prev = h0 + b * H;
      for (int64_t j = 0; j < m; ++j)
        for (int64_t k = 0; k < H; ++k) dW[j * H + k] += dz_row[j] * (prev ? prev[k] : T(0));
    }
  }
}

bool worth_threads(int64_t flops) { return flops >= (int64_t(1) << 18); }
// Each worker should have at least this many multiply-adds per step, or the barrier dominates.
constexpr int64_t kMinStepWork = int64_t(1) << 14;

// Rows (T * B) from which the forward packs W_hh's blocks for the register tiles: packing
// moves all of W_hh once per layer, about the time of a hundred rows' products on it, so
// shorter calls multiply W_hh as it is on BLAS (at T = 4, B = 1 packing cost half the speed).
constexpr int64_t kPackedRecurrenceRows = 64;

// Whether the forward's per-step block products run on small_gemm, from W_hh blocks packed
// once per layer (register tiles where the CPU has them; plain loops below kSmallHidden), or
// on BLAS calls. (The backward reads W_hh's columns as they are: gemm picks the tiles itself.)
bool forward_block_tiles(const Geometry& g) {
  return g.H <= kSmallHidden || (have_gemm_tiles() && g.T * g.B >= kPackedRecurrenceRows);
}

// Packs block [j0, j0 + w) of W_hh [H, H] as the [H, w] panel small_gemm reads
// (panel[k * w + n] = W_hh[j0 + n, k]); the panels of a direction tile its [H * H] buffer.
template <typename T>
void pack_block(const T* w_hh, int64_t H, int64_t j0, int64_t w, T* packed) {
  T* panel = packed + j0 * H;
  for (int64_t n = 0; n < w; ++n) {
    const T* row = w_hh + (j0 + n) * H;
    for (int64_t k = 0; k < H; ++k) panel[k * w + n] = row[k];
  }
}

// Workers for the recurrence: up to torch.get_num_threads(), at most one per block, fewer when
// the per-step work is too small to pay for the barrier. Changes speed only, never results.
int64_t team_size(const Geometry& g, const Blocks& blk, int64_t gates = 1) {
  const int64_t per_step = gates * g.D * g.B * g.H * g.H;
  if (!worth_threads(per_step * g.T)) return 1;
  return std::max<int64_t>(1, std::min<int64_t>({int64_t(at::get_num_threads()), blk.count(),
                                                  per_step / kMinStepWork}));
}

// Fixed (thread-count independent) split of `rows` into blocks for row-parallel GEMMs.
int64_t row_blocks(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(32, rows / 256)); }

// ---- the recurrences, on a team --------------------------------------------------------------

// One layer's per-direction operands of the forward recurrence.
template <typename T>
struct ForwardDirs {
  const T* w_hh[2] = {nullptr, nullptr};  // [H,H]
  T* w_packed[2] = {nullptr, nullptr};    // [H*H] scratch for packed W_hh blocks, or null
  const T* bias[2] = {nullptr, nullptr};  // b_ih + b_hh [H], or null
  const T* h0[2] = {nullptr, nullptr};    // [B,H], or null for zeros
  T* hn[2] = {nullptr, nullptr};          // [B,H] results
};

// In: Hs holds z (input projection, no bias) in each direction's columns. Out: Hs holds h_t
// (zero past each row's length), hn the final states. state: D * 2 * B * H scratch (each
// direction's h_{t-1} and h_t, swapped every step). One barrier per step: at step s every
// block reads all of h_{s-1} and writes its own columns of h_s into the other buffer.
template <typename T, typename Cell>
void recurrence_forward_team(Team::Member& m, const Geometry& g, const Blocks& blk,
                             const Cell& cell, T* Hs, const ForwardDirs<T>& p, T* state) {
  const int64_t H = g.H, B = g.B, ld = g.ld(), nb = blk.count();
  auto buffer = [&](int64_t d, int64_t s) { return state + (d * 2 + (s & 1)) * B * H; };
  for (int64_t k = 0; k < nb; ++k) {
    if (!m.owns(k)) continue;
    const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
    // Each worker packs its own blocks: they stay in its core's cache for every step.
    if (p.w_packed[d]) pack_block(p.w_hh[d], H, j0, w, p.w_packed[d]);
    T* s0 = buffer(d, 0);
    for (int64_t b = 0; b < B; ++b) {
      if (p.h0[d])
        std::memcpy(s0 + b * H + j0, p.h0[d] + b * H + j0, sizeof(T) * w);
      else
        std::memset(s0 + b * H + j0, 0, sizeof(T) * w);
    }
  }
  m.sync();
  for (int64_t s = 0; s < g.T; ++s) {
    for (int64_t k = 0; k < nb; ++k) {
      if (!m.owns(k)) continue;
      const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
      const int64_t t = g.step(d, s);
      const T* prev = buffer(d, s);
      T* next = buffer(d, s + 1);
      T* C = Hs + t * g.st * g.DH() + d * H + j0;
      const int64_t bound = g.active_bound(t);
      if (p.w_packed[d])
        small_gemm<T>(bound, w, H, prev, H, p.w_packed[d] + j0 * H, w, T(1), C, ld);
      else
        gemm<T>(false, true, bound, w, H, prev, H, p.w_hh[d] + j0 * H, H, T(1), C, ld);
      const T* bias = p.bias[d] ? p.bias[d] + j0 : nullptr;
      for (int64_t b = 0; b < B; ++b) {
        T* row = C + b * ld;
        if (b < bound && g.active(t, b)) {
          cell.forward(row, bias, w);
          std::memcpy(next + b * H + j0, row, sizeof(T) * w);
        } else {
          std::memset(row, 0, sizeof(T) * w);
          std::memcpy(next + b * H + j0, prev + b * H + j0, sizeof(T) * w);
        }
      }
    }
    if (s + 1 < g.T) m.sync();  // after the last step each block reads only its own columns
  }
  for (int64_t k = 0; k < nb; ++k) {
    if (!m.owns(k)) continue;
    const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
    const T* last = buffer(d, g.T);
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(p.hn[d] + b * H + j0, last + b * H + j0, sizeof(T) * w);
  }
}

// One layer's per-direction operands of the backward recurrence.
template <typename T>
struct BackwardDirs {
  const T* w_hh[2] = {nullptr, nullptr};  // [H,H]
  const T* dhn[2] = {nullptr, nullptr};   // [B,H] gradient of h_n, or null
  T* dh0[2] = {nullptr, nullptr};         // [B,H] results
};

// BPTT, time reversed. dOut (may be null) and Hs share the row layout; writes dZ (zero past
// lengths) and dh0. scratch: D * 2 * B * H (carry and tmp per direction). At each step a block
// first computes its columns of carry = dz_{prev} W_hh (reading all of dz_{prev}, finished at
// the last barrier), then its columns of dz_t. Carry columns are only ever touched by their
// block's owner, so one barrier per step suffices.
template <typename T, typename Cell>
void recurrence_backward_team(Team::Member& m, const Geometry& g, const Blocks& blk,
                              const Cell& cell, const T* dOut, const T* Hs, T* dZ,
                              const BackwardDirs<T>& p, T* scratch) {
  const int64_t H = g.H, B = g.B, ld = g.ld(), nb = blk.count();
  for (int64_t k = 0; k < nb; ++k) {
    if (!m.owns(k)) continue;
    const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
    T* carry = scratch + d * 2 * B * H;
    for (int64_t b = 0; b < B; ++b) {
      if (p.dhn[d])
        std::memcpy(carry + b * H + j0, p.dhn[d] + b * H + j0, sizeof(T) * w);
      else
        std::memset(carry + b * H + j0, 0, sizeof(T) * w);
    }
  }
  // s = -1 is the last carry update only: dh0 = dz_{first step} W_hh for the active rows.
  for (int64_t s = g.T - 1; s >= -1; --s) {
    for (int64_t k = 0; k < nb; ++k) {
      if (!m.owns(k)) continue;
      const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
      T* carry = scratch + d * 2 * B * H;
      T* tmp = carry + B * H;
      if (s + 1 < g.T) {
        // Rows active at the previous step get dz W_hh; the others keep their carry.
        const int64_t tp = g.step(d, s + 1);
        const int64_t bound = g.active_bound(tp);
        const bool all_active = g.all_active_below(tp, bound);
        T* target = all_active ? carry : tmp;
        const T* dzp = dZ + tp * g.st * g.DH() + d * H;
        if (H <= kSmallHidden)  // W_hh's columns [j0, j0 + w) are a [H, w] panel as they are
          small_gemm<T>(bound, w, H, dzp, ld, p.w_hh[d] + j0, H, T(0), target + j0, H);
        else
          gemm<T>(false, false, bound, w, H, dzp, ld, p.w_hh[d] + j0, H, T(0), target + j0, H);
        if (!all_active)
          for (int64_t b = 0; b < bound; ++b)
            if (g.active(tp, b)) std::memcpy(carry + b * H + j0, tmp + b * H + j0, sizeof(T) * w);
      }
      if (s >= 0) {
        const int64_t t = g.step(d, s);
        const int64_t offset = t * g.st * g.DH() + d * H + j0;
        for (int64_t b = 0; b < B; ++b) {
          T* dz = dZ + offset + b * ld;
          if (g.active(t, b))
            cell.backward(Hs + offset + b * ld, dOut ? dOut + offset + b * ld : nullptr,
                          carry + b * H + j0, dz, w);
          else
            std::memset(dz, 0, sizeof(T) * w);
        }
      }
    }
    if (s >= 0) m.sync();
  }
  for (int64_t k = 0; k < nb; ++k) {
    if (!m.owns(k)) continue;
    const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
    const T* carry = scratch + d * 2 * B * H;
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(p.dh0[d] + b * H + j0, carry + b * H + j0, sizeof(T) * w);
  }
}


// ---- the gated recurrences (LSTM, GRU), on the same team and blocks -------------------------
//
// The input projection G = X W_ih^T (kGates * H columns per direction, nn's gate order) is
// computed for all steps first, as for the Elman cell. Each step, a block of w hidden units
// computes h_{t-1} W_hh^T for its kGates * w gate rows into a block-local buffer, then the cell
// combines both with the biases and writes h_t (and LSTM's block-local c_t). In training the
// cell also leaves in G the activated gates and in S what its backward needs (cell_gated.h).

// One layer's per-direction operands of the gated forward recurrence.
template <typename T>
struct GatedForwardDirs {
  const T* w_hh[2] = {nullptr, nullptr};    // [K*H, H] as nn stores it
  T* w_packed[2] = {nullptr, nullptr};      // [K*H*H] scratch for its blocks (pack_gate_block)
  const T* bias[2] = {nullptr, nullptr};    // [KH] input-side biases, or null
  const T* bias_h[2] = {nullptr, nullptr};  // the split gate's b_hh [H], or null
  const T* h0[2] = {nullptr, nullptr};      // [B,H], or null for zeros
  const T* c0[2] = {nullptr, nullptr};      // LSTM: [B,H], or null for zeros
  T* hn[2] = {nullptr, nullptr};
  T* cn[2] = {nullptr, nullptr};
};

// Packs block [j0, j0 + w) of a gated W_hh [K*H, H] (its K*w gate rows, nn's gate order)
// for the forward's per-step product h_{t-1} W_block^T: as the [H, K*w] panel small_gemm's
// register tiles read where `tiles` (forward_block_tiles), else as those rows, contiguous,
// for one BLAS call. The blocks of a direction tile its [K*H*H] buffer in order.
template <typename T>
void pack_gate_block(const T* w_hh, int64_t K, int64_t H, int64_t j0, int64_t w, bool tiles,
                     T* packed) {
  T* block = packed + K * j0 * H;
  const int64_t n_all = K * w;
  for (int64_t q = 0; q < K; ++q) {
    for (int64_t n = 0; n < w; ++n) {
      const T* row = w_hh + (q * H + j0 + n) * H;
      if (tiles)
        for (int64_t k = 0; k < H; ++k) block[k * n_all + q * w + n] = row[k];
      else
        std::memcpy(block + (q * w + n) * H, row, sizeof(T) * H);
    }
  }
}

// In: G holds x W_ih^T. Out: Hs holds h_t (zero past each row's length), hn/cn the final
// states; in training (S not null) G the activated gates and S the cell's saved values.
// state: D * 2 * B * H (h_{t-1} and h_t per direction, swapped every step, as the Elman
// recurrence); cstate: D * B * H (LSTM's c, block-local: updated in place); hid: D * B * K*H
// (each block's h_{t-1} W_hh^T, block-local). One barrier per step.
template <typename T, typename Cell>
void gated_forward_team(Team::Member& m, const Geometry& g, const Blocks& blk, const Cell& cell,
                        T* G, T* Hs, T* S, const GatedForwardDirs<T>& p, T* state, T* cstate,
                        T* hid) {
  constexpr int64_t K = Cell::kGates;
  const int64_t H = g.H, B = g.B, KH = K * H, DH = g.DH(), DKH = g.D * KH, nb = blk.count();
  const bool tiles = forward_block_tiles(g);
  auto buffer = [&](int64_t d, int64_t s) { return state + (d * 2 + (s & 1)) * B * H; };
  auto start = [&](const T* init, T* dst, int64_t j0, int64_t w) {
    for (int64_t b = 0; b < B; ++b) {
      if (init)
        std::memcpy(dst + b * H + j0, init + b * H + j0, sizeof(T) * w);
      else
        std::memset(dst + b * H + j0, 0, sizeof(T) * w);
    }
  };
  for (int64_t k = 0; k < nb; ++k) {
    if (!m.owns(k)) continue;
    const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
    // Each worker packs its own blocks: they stay in its core's cache for every step.
    pack_gate_block(p.w_hh[d], K, H, j0, w, tiles, p.w_packed[d]);
    start(p.h0[d], buffer(d, 0), j0, w);
    if (Cell::kCellState) start(p.c0[d], cstate + d * B * H, j0, w);
  }
  m.sync();  // also orders the input projection before its first use
  for (int64_t s = 0; s < g.T; ++s) {
    for (int64_t k = 0; k < nb; ++k) {
      if (!m.owns(k)) continue;
      const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
      const int64_t t = g.step(d, s);
      const T* prev = buffer(d, s);
      T* next = buffer(d, s + 1);
      T* hk = hid + d * B * KH + K * j0;  // gate q of row b at hk + b * KH + q * w
      const int64_t bound = g.active_bound(t);
      const T* block = p.w_packed[d] + K * j0 * H;
      if (tiles)
        tiled_gemm<T>(bound, K * w, H, prev, H, block, K * w, T(0), hk, KH);
      else
        gemm<T>(false, true, bound, K * w, H, prev, H, block, H, T(0), hk, KH);
      const T* bias = p.bias[d] ? p.bias[d] + j0 : nullptr;
      const T* bias_h = p.bias_h[d] ? p.bias_h[d] + j0 : nullptr;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = t * g.st + b * g.sb;
        T* h = Hs + row * DH + d * H + j0;
        if (b < bound && g.active(t, b)) {
          cell.forward(G + row * DKH + d * KH + j0, H, hk + b * KH, bias, bias_h,
                       prev + b * H + j0,
                       Cell::kCellState ? cstate + (d * B + b) * H + j0 : nullptr, h,
                       S ? S + row * DH + d * H + j0 : nullptr, w);
          std::memcpy(next + b * H + j0, h, sizeof(T) * w);
        } else {
          std::memset(h, 0, sizeof(T) * w);
          std::memcpy(next + b * H + j0, prev + b * H + j0, sizeof(T) * w);
        }
      }
    }
    if (s + 1 < g.T) m.sync();
  }
  for (int64_t k = 0; k < nb; ++k) {
    if (!m.owns(k)) continue;
    const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(p.hn[d] + b * H + j0, buffer(d, g.T) + b * H + j0, sizeof(T) * w);
      if (Cell::kCellState)
        std::memcpy(p.cn[d] + b * H + j0, cstate + (d * B + b) * H + j0, sizeof(T) * w);
    }
  }
}

// One layer's per-direction operands of the gated backward recurrence.
template <typename T>
struct GatedBackwardDirs {
  const T* w_hh[2] = {nullptr, nullptr};  // [K*H, H] as nn stores it
  const T* h0[2] = {nullptr, nullptr};    // [B,H] or null (zeros)
  const T* c0[2] = {nullptr, nullptr};
  const T* dhn[2] = {nullptr, nullptr};   // gradients of the final states, or null
  const T* dcn[2] = {nullptr, nullptr};
  T* dh0[2] = {nullptr, nullptr};
  T* dc0[2] = {nullptr, nullptr};
};

// BPTT, time reversed, the Elman recurrence's structure: at each step a block first adds
// dGh_{prev} W_hh[:, block] to its columns of h's gradient (reading every block's gate
// gradients, finished at the last barrier), then runs the cell on its columns. What else flows
// back in time (LSTM's dc, GRU's dh * z) stays in the block. Writes dG and dGh (zero at padded
// steps; the same buffer unless the cell has a split gate) and dh0/dc0. scratch: D * 3 * B * H.
template <typename T, typename Cell>
void gated_backward_team(Team::Member& m, const Geometry& g, const Blocks& blk, const Cell& cell,
                         const T* dOut, const T* Hs, const T* G, const T* S, T* dG, T* dGh,
                         const GatedBackwardDirs<T>& p, T* scratch) {
  constexpr int64_t K = Cell::kGates;
  const int64_t H = g.H, B = g.B, KH = K * H, DH = g.DH(), DKH = g.D * KH, nb = blk.count();
  const int64_t ldg = g.sb * DKH;  // between batch rows of one step in dG
  auto carry_of = [&](int64_t d) { return scratch + d * 3 * B * H; };  // then tmp, then dc
  for (int64_t k = 0; k < nb; ++k) {
    if (!m.owns(k)) continue;
    const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
    for (int64_t b = 0; b < B; ++b) {
      T* carry = carry_of(d) + b * H + j0;
      T* dc = carry_of(d) + 2 * B * H + b * H + j0;
      if (p.dhn[d])
        std::memcpy(carry, p.dhn[d] + b * H + j0, sizeof(T) * w);
      else
        std::memset(carry, 0, sizeof(T) * w);
      if (p.dcn[d])
        std::memcpy(dc, p.dcn[d] + b * H + j0, sizeof(T) * w);
      else
        std::memset(dc, 0, sizeof(T) * w);
    }
  }
  // s = -1 is the last carry update only: dh0 gets dGh_{first step} W_hh for the active rows.
  for (int64_t s = g.T - 1; s >= -1; --s) {
    for (int64_t k = 0; k < nb; ++k) {
      if (!m.owns(k)) continue;
      const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
      T* carry = carry_of(d);
      T* tmp = carry + B * H;
      T* dc = tmp + B * H;
      if (s + 1 < g.T) {
        // Rows active at the previous step get dGh W_hh added to the part the cell left
        // (GRU) or in place of it (LSTM); the others keep their carry.
        const int64_t tp = g.step(d, s + 1);
        const int64_t bound = g.active_bound(tp);
        const bool all_active = g.all_active_below(tp, bound);
        T* target = all_active ? carry : tmp;
        const T beta = all_active && Cell::kHiddenCarry ? T(1) : T(0);
        const T* dgp = dGh + tp * g.st * DKH + d * KH;
        if (H <= kSmallHidden)
          small_gemm<T>(bound, w, KH, dgp, ldg, p.w_hh[d] + j0, H, beta, target + j0, H);
        else
          gemm<T>(false, false, bound, w, KH, dgp, ldg, p.w_hh[d] + j0, H, beta, target + j0, H);
        if (!all_active) {
          for (int64_t b = 0; b < bound; ++b) {
            if (!g.active(tp, b)) continue;
            T* c = carry + b * H + j0;
            const T* add = tmp + b * H + j0;
            for (int64_t j = 0; j < w; ++j) c[j] = Cell::kHiddenCarry ? c[j] + add[j] : add[j];
          }
        }
      }
      if (s >= 0) {
        const int64_t t = g.step(d, s);
        for (int64_t b = 0; b < B; ++b) {
          const int64_t row = t * g.st + b * g.sb;
          T* dgx = dG + row * DKH + d * KH + j0;
          T* dgh = dGh + row * DKH + d * KH + j0;
          if (!g.active(t, b)) {
            for (int64_t q = 0; q < K; ++q) {
              std::memset(dgx + q * H, 0, sizeof(T) * w);
              if (dgh != dgx) std::memset(dgh + q * H, 0, sizeof(T) * w);
            }
            continue;
          }
          const int64_t prev = g.previous_row(d, t, b);
          const T* h_prev = prev >= 0 ? Hs + prev * DH + d * H + j0
                                      : p.h0[d] ? p.h0[d] + b * H + j0 : nullptr;
          const T* c_prev = prev >= 0 ? S + prev * DH + d * H + j0
                                      : p.c0[d] ? p.c0[d] + b * H + j0 : nullptr;
          const int64_t at = row * DH + d * H + j0;
          cell.backward(G + row * DKH + d * KH + j0, H, S + at, h_prev, c_prev,
                        dOut ? dOut + at : nullptr, carry + b * H + j0, dc + b * H + j0, dgx,
                        dgh, w);
        }
      }
    }
    if (s >= 0) m.sync();
  }
  for (int64_t k = 0; k < nb; ++k) {
    if (!m.owns(k)) continue;
    const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(p.dh0[d] + b * H + j0, carry_of(d) + b * H + j0, sizeof(T) * w);
      if (Cell::kCellState)
        std::memcpy(p.dc0[d] + b * H + j0, carry_of(d) + 2 * B * H + b * H + j0, sizeof(T) * w);
    }
  }
}


// ---- the whole stack ----------------------------------------------------------------------

struct StackArgs {
  int64_t num_layers;
  int64_t D;
  bool has_biases;
  bool relu;
  bool batch_first;
  int64_t gates = 1;  // pre-activation rows per hidden unit: Elman 1, GRU 3, LSTM 4
  int64_t per_dir() const { return has_biases ? 4 : 2; }
};

// Every tensor behind the seam is checked before any pointer is read: a wrong shape, dtype or
// device must raise, never read out of bounds. (.contiguous() copies take care of strides.)
void check_tensor(const Tensor& t, const char* name, at::ScalarType dtype,
                  at::IntArrayRef expected) {
  TORCH_CHECK(t.device().is_cpu(), "fastbirnn cpp backend: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fastbirnn cpp backend: ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == expected, "fastbirnn cpp backend: ", name, " must have shape ",
              expected, ", got ", t.sizes());
}

void check_lengths(const Tensor& lengths, int64_t B) {
  TORCH_CHECK(lengths.device().is_cpu(), "fastbirnn cpp backend: lengths must be a CPU tensor");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.numel() == B,
              "fastbirnn cpp backend: lengths must be a 1-D int64 tensor of ", B,
              " entries (one per batch row), got ", lengths.scalar_type(), " of shape ",
              lengths.sizes());
}

// check_lengths, then every entry in [1, T]; the values, from a contiguous copy kept in
// lengths_c for as long as the pointer is used.
const int64_t* checked_lengths(const Tensor& lengths, int64_t B, int64_t T, Tensor& lengths_c) {
  check_lengths(lengths, B);
  lengths_c = lengths.contiguous();
  const int64_t* L = lengths_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(L[b] >= 1 && L[b] <= T, "fastbirnn cpp backend: lengths must be in [1, T]");
  return L;
}

void check_inputs(const Tensor& x, const std::optional<Tensor>& hx, at::TensorList weights,
                  const std::optional<Tensor>& lengths, const StackArgs& a) {
  TORCH_CHECK(x.device().is_cpu(), "fastbirnn cpp backend: expected CPU tensors, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fastbirnn cpp backend: supports float32 and float64, got ", x.scalar_type());
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
  if (hx && hx->defined()) check_tensor(*hx, "hx", dtype, {a.num_layers * a.D, B, H});
  if (lengths && lengths->defined()) check_lengths(*lengths, B);
}

// 32-bit BLAS: checked before any worker starts (a worker must not be the first to throw).
void check_blas_sizes(const Geometry& g, int64_t I, int64_t gates = 1) {
  TORCH_CHECK(g.T * g.B <= INT32_MAX && gates * g.DH() <= INT32_MAX && I <= INT32_MAX,
              "fastbirnn cpp backend: tensor too large for 32-bit BLAS");
}

Geometry geometry(const Tensor& x, const std::optional<Tensor>& lengths, const StackArgs& a,
                  int64_t H, Tensor& lengths_cpu) {
  Geometry g;
  g.T = a.batch_first ? x.size(1) : x.size(0);
  g.B = a.batch_first ? x.size(0) : x.size(1);
  g.D = a.D;
  g.H = H;
  g.st = a.batch_first ? 1 : g.B;
  g.sb = a.batch_first ? g.T : 1;
  g.lengths = nullptr;
  if (lengths && lengths->defined()) g.lengths = checked_lengths(*lengths, g.B, g.T, lengths_cpu);
  check_blas_sizes(g, x.size(2), a.gates);
  return g;
}

// Uninitialised contiguous tensors of the given shapes. At tiny sizes one at::empty per result
// (a dispatcher round trip plus an allocation each) is most of the op's fixed cost, so small
// sets are carved out of one allocation: each piece is its own tensor (own sizes, version
// counter), only the storage is shared. Large sets keep separate buffers, so a big scratch
// buffer is never kept alive by the small tensors that share its storage.
std::vector<Tensor> empty_tensors(const std::vector<std::vector<int64_t>>& shapes,
                                  const at::TensorOptions& options) {
  constexpr int64_t kAlign = 16;      // elements: each piece starts on a 64-byte boundary (fp32)
  constexpr int64_t kShared = 1 << 16;  // elements: above this, separate allocations
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (const auto& shape : shapes) {
    offsets.push_back(total);
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    total += (n + kAlign - 1) / kAlign * kAlign;
  }
  std::vector<Tensor> out;
  out.reserve(shapes.size());
  if (total > kShared) {
    for (const auto& shape : shapes) out.push_back(empty_buffer(shape, options));
    return out;
  }
  const Tensor flat = at::empty({total}, options);
  for (size_t i = 0; i < shapes.size(); ++i) {
    Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(flat.storage()),
                                                        flat.key_set(), flat.dtype());
    t.unsafeGetTensorImpl()->set_storage_offset(offsets[i]);
    t.unsafeGetTensorImpl()->set_sizes_contiguous(shapes[i]);
    out.push_back(std::move(t));
  }
  return out;
}

// Shapes of the forward's results, shared with the Python fake implementation.
std::vector<int64_t> out_shape(const Geometry& g, bool batch_first) {
  return batch_first ? std::vector<int64_t>{g.B, g.T, g.DH()}
                     : std::vector<int64_t>{g.T, g.B, g.DH()};
}

// Z = X W_ih^T of one layer as fixed tasks (direction, row block), dealt round-robin to the
// team; the recurrence then starts at the team's first barrier. Z has `cols` columns per
// direction (kGates * H).
template <typename T>
struct Projection {
  const T* X;
  int64_t I, rows, cols;
  const T* w_ih[2];
  const T* w_ih_t[2];  // W_ih^T [I, H] (register tiles / the tiny loops), or null for BLAS
  int64_t blocks;      // row blocks per direction
  bool tiny;           // small_gemm on W_ih^T (H, I <= kSmallHidden, rows <= kSmallRows)
};

// Projections over at least this many rows run on register tiles from W_ih^T (the one-off
// transpose costs about as much as the tiles save on a few hundred rows).
constexpr int64_t kPackedProjectionRows = 512;

// Layer l's W_ih of each direction.
template <typename T>
std::array<const T*, 2> input_weights(at::TensorList weights, const StackArgs& a, int64_t l) {
  std::array<const T*, 2> w{nullptr, nullptr};
  for (int64_t d = 0; d < a.D; ++d) w[d] = weights[(l * a.D + d) * a.per_dir()].data_ptr<T>();
  return w;
}

// The projection of one layer onto cols (kGates * H) columns per direction. W_ih^T goes to
// tiny_t for the tiny loops, or to `packed` (allocated here) for register tiles over long
// projections; otherwise BLAS reads W_ih as stored.
template <typename T>
Projection<T> layer_projection(const T* X, int64_t I, int64_t rows, int64_t cols, int64_t D,
                               const T* const w_ih[2], T (&tiny_t)[2][kSmallHidden * kSmallHidden],
                               Tensor& packed, const at::TensorOptions& options) {
  const bool tiny = cols <= kSmallHidden && I <= kSmallHidden && rows <= kSmallRows;
  const bool tiles = !tiny && have_gemm_tiles() && rows >= kPackedProjectionRows;
  if (tiles) packed = at::empty({D, I, cols}, options);
  Projection<T> p{X, I, rows, cols, {nullptr, nullptr}, {nullptr, nullptr},
                  tiny ? 1 : row_blocks(rows), tiny};
  for (int64_t d = 0; d < D; ++d) {
    p.w_ih[d] = w_ih[d];
    if (tiny || tiles) {
      T* w_t = tiny ? tiny_t[d] : packed.data_ptr<T>() + d * I * cols;
      transpose(w_ih[d], cols, I, w_t);
      p.w_ih_t[d] = w_t;
    }
  }
  return p;
}

template <typename T>
void project(Team::Member& m, const Geometry& g, const Projection<T>& p, T* out) {
  const int64_t H = p.cols, ld = g.D * p.cols, n = g.D * p.blocks;
  for (int64_t task = 0; task < n; ++task) {
    if (!m.owns(task)) continue;
    const int64_t d = task % g.D, blk = task / g.D;
    const int64_t r0 = p.rows * blk / p.blocks, r1 = p.rows * (blk + 1) / p.blocks;
    const T* x = p.X + r0 * p.I;
    T* z = out + r0 * ld + d * H;
    if (p.tiny)  // register-blocked loops beat a BLAS call's fixed cost
      small_gemm<T>(r1 - r0, H, p.I, x, p.I, p.w_ih_t[d], H, T(0), z, ld);
    else if (p.w_ih_t[d])
      gemm<T>(false, false, r1 - r0, H, p.I, x, p.I, p.w_ih_t[d], H, T(0), z, ld);
    else
      gemm<T>(false, true, r1 - r0, H, p.I, x, p.I, p.w_ih[d], p.I, T(0), z, ld);
  }
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
    if (mid_.numel() > 0) return mid_.data_ptr<T>() + l * rows_ * width_;
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

template <typename T>
void forward_layers(const Tensor& x, const Tensor& hx, at::TensorList weights, const Geometry& g,
                    const StackArgs& a, Tensor& out, Tensor& hn, Tensor& mid) {
  const int64_t L = a.num_layers, D = a.D, H = g.H, B = g.B, rows = g.T * g.B;
  const ElmanCell cell{a.relu};
  const Blocks blk = column_blocks(D, H);
  const int64_t workers = team_size(g, blk);
  LayerOutputs<T> layer_output(out, mid, L, rows, g.DH());
  const T* layer_in = x.data_ptr<T>();
  int64_t in_size = x.size(2);
  std::vector<T> bias_sum(a.has_biases ? D * H : 0);
  std::vector<T> state(size_t(D) * 2 * B * H);
  // Packed W_hh blocks (filled by the workers): on the stack for one block per direction
  // (H <= kSmallHidden, where an allocation is a visible part of a tiny call), else in
  // `packed`. W_ih^T for the tiny projection (on the stack) and for long ones (w_ih_packed).
  alignas(64) T w_small[2 * kSmallHidden * kSmallHidden];
  const Tensor packed = forward_block_tiles(g) && H > kSmallHidden
                            ? at::empty({D, H, H}, x.options()) : Tensor();
  T* const packed_data = H <= kSmallHidden ? w_small
                         : packed.defined() ? packed.data_ptr<T>() : nullptr;
  alignas(64) T w_ih_t[2][kSmallHidden * kSmallHidden];
  Tensor w_ih_packed;
  for (int64_t l = 0; l < L; ++l) {
    T* layer_out = layer_output(l);
    const Projection<T> proj = layer_projection<T>(layer_in, in_size, rows, H, D,
                                                   input_weights<T>(weights, a, l).data(),
                                                   w_ih_t, w_ih_packed, x.options());
    ForwardDirs<T> dirs;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t base = (l * D + d) * a.per_dir();
      dirs.w_hh[d] = weights[base + 1].data_ptr<T>();
      if (packed_data) dirs.w_packed[d] = packed_data + d * H * H;
      if (a.has_biases) {
        const T* b_ih = weights[base + 2].data_ptr<T>();
        const T* b_hh = weights[base + 3].data_ptr<T>();
        for (int64_t j = 0; j < H; ++j) bias_sum[d * H + j] = b_ih[j] + b_hh[j];
        dirs.bias[d] = bias_sum.data() + d * H;
      }
      dirs.h0[d] = hx.defined() ? hx.data_ptr<T>() + (l * D + d) * B * H : nullptr;
      dirs.hn[d] = hn.data_ptr<T>() + (l * D + d) * B * H;
    }
    Team team(workers);
    team.run([&](Team::Member& m) {
      project<T>(m, g, proj, layer_out);
      recurrence_forward_team<T>(m, g, blk, cell, layer_out, dirs, state.data());
    });
    layer_in = layer_out;
    in_size = g.DH();
  }
}

std::tuple<Tensor, Tensor, Tensor> stack_forward_impl(
    const Tensor& x_, const std::optional<Tensor>& hx_, at::TensorList weights_,
    const std::optional<Tensor>& lengths, int64_t num_layers, bool bidirectional,
    bool has_biases, bool relu, bool batch_first, bool keep) {
  StackArgs a{num_layers, bidirectional ? 2 : 1, has_biases, relu, batch_first};
  check_inputs(x_, hx_, weights_, lengths, a);
  const int64_t H = weights_[1].size(0);
  Tensor lengths_cpu;
  const Geometry g = geometry(x_, lengths, a, H, lengths_cpu);
  const Tensor x = x_.contiguous();
  const Tensor hx = hx_ && hx_->defined() ? hx_->contiguous() : Tensor();
  std::vector<Tensor> weights;
  weights.reserve(weights_.size());
  for (const auto& w : weights_) weights.push_back(w.contiguous());
  Tensor out = empty_buffer(out_shape(g, batch_first), x.options());
  Tensor hn = at::empty({num_layers * a.D, g.B, H}, x.options());
  Tensor mid = empty_buffer({keep ? num_layers - 1 : 0, g.T * g.B, g.DH()}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastbirnn_stack_forward", [&] {
    forward_layers<scalar_t>(x, hx, weights, g, a, out, hn, mid);
  });
  return {out, hn, mid};
}

// One layer's operands of its gradient GEMMs: the pre-activation gradients of all steps
// (written by BPTT, zero at padded steps), the layer's input and outputs. The Elman cell has
// one gate and dGh == dG.
template <typename T>
struct GradOperands {
  const T* dG;   // [rows, D*KH] input-side pre-activation gradients
  const T* dGh;  // the hidden-side ones (GRU's n gate: dn_pre * r); may be dG
  int64_t KH;    // pre-activation rows per direction: kGates * H
  const T* X;    // the layer's input [rows, I]
  int64_t I;
  const T* Hs;   // the layer's outputs [rows, D*H]
  const T* h0;   // the layer's initial hidden state [D, B, H], or null (zeros)
};

// dW_ih, dW_hh, the bias gradients and dX (when dX is not null) of layer l, as independent
// tasks of fixed shape: per direction, blocks of weight rows for dW_hh (+ db) and for dW_ih,
// then fixed row blocks of dX. Splitting over output rows/columns means no sum is ever
// split, so the thread count cannot change any result. scratch: D * B * KH elements.
template <typename T>
void gemm_grads(const Geometry& g, const StackArgs& a, at::TensorList weights, int64_t l,
                const GradOperands<T>& p, std::vector<Tensor>& dweights, T* dX, int64_t threads,
                T* scratch) {
  const int64_t D = a.D, H = g.H, DH = g.DH(), KH = p.KH, DKH = D * KH, I = p.I;
  const int64_t rows = g.T * g.B;
  const int64_t n_row_blocks = dX ? row_blocks(rows) : 0;
  // Weight-row blocks per direction: single-threaded MKL loses ~40% of its rate on these
  // long-K products below m = 256 rows, so blocks stay at >= 512 rows; balance comes from
  // the dynamic queue and the small dX blocks instead.
  const int64_t n_wblk = std::max<int64_t>(1, KH / 512);
  const int64_t wblk = (KH + n_wblk - 1) / n_wblk;
  const int64_t n_w = D * n_wblk;  // tasks per weight kind
  // dX = dG [W_ih^f; W_ih^r]: one product with K = D*KH per block (not D with K = KH).
  const T* w_ih_all = weights[l * D * a.per_dir()].data_ptr<T>();
  std::vector<T> w_ih_cat;
  if (dX && D > 1) {
    w_ih_cat.resize(size_t(DKH) * I);
    for (int64_t d = 0; d < D; ++d)
      std::memcpy(w_ih_cat.data() + d * KH * I, weights[(l * D + d) * a.per_dir()].data_ptr<T>(),
                  sizeof(T) * KH * I);
    w_ih_all = w_ih_cat.data();
  }
  // A NaN or inf anywhere in this layer's states or gradients: dW_hh the exact way.
  const bool nonfinite = !all_finite(p.Hs, rows * DH) || !all_finite<T>(p.dGh, rows * DKH);
  // Task order is biggest first: dW_hh blocks (K = H columns), dW_ih blocks, dX blocks.
  run_task_queue(2 * n_w + n_row_blocks, threads, [&](int64_t task) {
    if (task < 2 * n_w) {
      const bool hh = task < n_w;
      const int64_t w = hh ? task : task - n_w;
      const int64_t d = w / n_wblk, j0 = (w % n_wblk) * wblk, j1 = std::min(KH, j0 + wblk);
      const int64_t m = j1 - j0;
      if (m <= 0) return;
      const int64_t base = (l * D + d) * a.per_dir();
      const T* dgd = p.dG + d * KH + j0;    // columns j0..j1 of direction d
      const T* dghd = p.dGh + d * KH + j0;
      if (!hh) {
        // dW_ih = dG^T X over all rows.
        gemm<T>(true, false, m, I, rows, dgd, DKH, p.X, I, T(0),
                dweights[base].data_ptr<T>() + j0 * I, I);
        return;
      }
      T* dW_hh = dweights[base + 1].data_ptr<T>() + j0 * H;
      const T* h0 = p.h0 ? p.h0 + d * g.B * H : nullptr;
      const T* hsd = p.Hs + d * H;
      if (nonfinite) {
        hidden_weight_grad_nonfinite<T>(g, int(d), m, dghd, DKH, hsd, h0, dW_hh);
      } else {
        // dW_hh = sum_t dg_t^T h_{t-1}: h_{t-1} is the neighbouring row in time, a uniform
        // shift of st rows (one GEMM for time-major, one per batch row for batch_first).
        const int64_t segments = g.sb == 1 ? 1 : g.B;
        const int64_t K = g.sb == 1 ? (g.T - 1) * g.B : g.T - 1;
        for (int64_t seg = 0; seg < segments; ++seg) {
          const int64_t r = seg * g.sb;  // first row of the segment (t = 0)
          const T* A = d == 0 ? dghd + (r + g.st) * DKH : dghd + r * DKH;
          const T* Bm = d == 0 ? hsd + r * DH : hsd + (r + g.st) * DH;
          gemm<T>(true, false, m, H, K, A, DKH, Bm, DH, seg == 0 ? T(0) : T(1), dW_hh, H);
        }
        if (K <= 0) std::fill(dW_hh, dW_hh + m * H, T(0));
        // The first step of each row saw h0: forward at t = 0, reverse at t = lengths-1.
        if (h0) {
          // Each block gathers its own columns j0..j1 of a per-direction [B, KH] buffer.
          T* gather = scratch + d * g.B * KH + j0;
          for (int64_t b = 0; b < g.B; ++b) {
            const int64_t t0 = d == 0 ? 0 : (g.lengths ? g.lengths[b] - 1 : g.T - 1);
            std::memcpy(gather + b * KH, dghd + (t0 * g.st + b * g.sb) * DKH, sizeof(T) * m);
          }
          gemm<T>(true, false, m, H, g.B, gather, KH, h0, H, T(1), dW_hh, H);
        }
      }
      if (a.has_biases) {
        // db = column sums of the gate gradients (input side for b_ih, hidden side for b_hh).
        for (int side = 0; side < 2; ++side) {
          T* db = dweights[base + 2 + side].data_ptr<T>() + j0;
          if (side == 1 && p.dGh == p.dG) {
            std::memcpy(db, dweights[base + 2].data_ptr<T>() + j0, sizeof(T) * m);
            break;
          }
          std::vector<T> tmp(column_sums_scratch(rows, m));
          column_sums<T>(side == 0 ? dgd : dghd, DKH, rows, m, db, tmp.data());
        }
      }
    } else {
      // dX for one fixed block of rows.
      const int64_t blk = task - 2 * n_w;
      const int64_t r0 = rows * blk / n_row_blocks, r1 = rows * (blk + 1) / n_row_blocks;
      gemm<T>(false, false, r1 - r0, I, DKH, p.dG + r0 * DKH, DKH, w_ih_all, I, T(0),
              dX + r0 * I, I);
    }
  });
}

template <typename T>
void backward_layers(const Tensor& grad_out, const Tensor& grad_hn, const Tensor& x,
                     const Tensor& hx, at::TensorList weights, const Geometry& g,
                     const StackArgs& a, const Tensor& out, const Tensor& mid, bool need_dx,
                     Tensor& dx, Tensor& dhx, std::vector<Tensor>& dweights, const Tensor& dZ) {
  const int64_t L = a.num_layers, D = a.D, H = g.H, DH = g.DH(), rows = g.T * g.B;
  const bool parallel = worth_threads(rows * H * H);
  const int64_t threads = parallel ? int64_t(at::get_num_threads()) : 1;
  const ElmanCell cell{a.relu};
  const Blocks blk = column_blocks(D, H);
  const int64_t workers = team_size(g, blk);
  std::vector<T> bptt(size_t(D) * 2 * g.B * H);  // carry and tmp per direction
  Tensor dOut_buf;  // the gradient flowing into the current layer's output
  const T* dOut = grad_out.defined() ? grad_out.data_ptr<T>() : nullptr;
  std::vector<T> scratch(size_t(D) * g.B * H);  // for gemm_grads
  for (int64_t l = L - 1; l >= 0; --l) {
    const T* Hs = l == L - 1 ? out.data_ptr<T>() : mid.data_ptr<T>() + l * rows * DH;
    const T* X = l == 0 ? x.data_ptr<T>() : mid.data_ptr<T>() + (l - 1) * rows * DH;
    const int64_t I = l == 0 ? x.size(2) : DH;
    T* dz = dZ.data_ptr<T>();

    // 1. BPTT on the team, column blocks of both directions, one barrier per step.
    BackwardDirs<T> dirs;
    for (int64_t d = 0; d < D; ++d) {
      dirs.w_hh[d] = weights[(l * D + d) * a.per_dir() + 1].data_ptr<T>();
      dirs.dhn[d] = grad_hn.defined() ? grad_hn.data_ptr<T>() + (l * D + d) * g.B * H : nullptr;
      dirs.dh0[d] = dhx.data_ptr<T>() + (l * D + d) * g.B * H;
    }
    Team team(workers);
    team.run([&](Team::Member& m) {
      recurrence_backward_team<T>(m, g, blk, cell, dOut, Hs, dz, dirs, bptt.data());
    });

    // 2. Weight and input gradients: fixed GEMM tasks over all steps.
    const bool want_dx = l > 0 || need_dx;
    Tensor dX_buf = !want_dx ? Tensor() : l == 0 ? dx
                    : scratch_buffer(l % 2 ? kScratchGradInput1 : kScratchGradInput0, rows * DH,
                                     x.options());
    const T* h0 = hx.defined() ? hx.data_ptr<T>() + l * D * g.B * H : nullptr;
    gemm_grads<T>(g, a, weights, l, {dz, dz, H, X, I, Hs, h0}, dweights,
                  want_dx ? dX_buf.data_ptr<T>() : nullptr, threads, scratch.data());
    if (l > 0) {
      dOut_buf = dX_buf;  // becomes the output gradient of the layer below
      dOut = dOut_buf.data_ptr<T>();
    }
  }
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> stack_backward_impl(
    const std::optional<Tensor>& grad_out_, const std::optional<Tensor>& grad_hn_,
    const Tensor& x_, const std::optional<Tensor>& hx_, at::TensorList weights_,
    const std::optional<Tensor>& lengths, const Tensor& out, const Tensor& mid,
    int64_t num_layers, bool bidirectional, bool has_biases, bool relu, bool batch_first,
    bool need_dx) {
  StackArgs a{num_layers, bidirectional ? 2 : 1, has_biases, relu, batch_first};
  check_inputs(x_, hx_, weights_, lengths, a);
  const int64_t H = weights_[1].size(0);
  Tensor lengths_cpu;
  const Geometry g = geometry(x_, lengths, a, H, lengths_cpu);
  const at::ScalarType dtype = x_.scalar_type();
  const std::vector<int64_t> out_sizes = out_shape(g, batch_first);
  check_tensor(out, "out", dtype, out_sizes);
  TORCH_CHECK(mid.dim() == 3 && mid.size(0) == num_layers - 1,
              "fastbirnn cpp backend: intermediate outputs were not kept for backward");
  check_tensor(mid, "mid", dtype, {num_layers - 1, g.T * g.B, g.DH()});
  if (grad_out_ && grad_out_->defined()) check_tensor(*grad_out_, "grad_out", dtype, out_sizes);
  if (grad_hn_ && grad_hn_->defined())
    check_tensor(*grad_hn_, "grad_hn", dtype, {num_layers * a.D, g.B, H});
  const Tensor x = x_.contiguous();
  const Tensor hx = hx_ && hx_->defined() ? hx_->contiguous() : Tensor();
  const Tensor grad_out =
      grad_out_ && grad_out_->defined() ? grad_out_->contiguous() : Tensor();
  const Tensor grad_hn = grad_hn_ && grad_hn_->defined() ? grad_hn_->contiguous() : Tensor();
  std::vector<Tensor> weights;
  std::vector<std::vector<int64_t>> shapes;  // the results: dweights..., dx, dhx (, dZ)
  for (const auto& w : weights_) {
    weights.push_back(w.contiguous());
    shapes.push_back(w.sizes().vec());
  }
  shapes.push_back(need_dx ? x.sizes().vec() : std::vector<int64_t>{0});
  shapes.push_back({num_layers * a.D, g.B, H});
  // dZ is scratch: carved out with the results while small, else kept per thread.
  const int64_t dz_numel = g.T * g.B * g.DH();
  const bool dz_scratch = dz_numel * int64_t(x.element_size()) >= kScratchMinBytes;
  if (!dz_scratch) shapes.push_back({g.T * g.B, g.DH()});
  std::vector<Tensor> results = empty_tensors(shapes, x.options());
  Tensor dZ = dz_scratch ? scratch_buffer(kScratchGradZ, dz_numel, x.options()) : results.back();
  if (!dz_scratch) results.pop_back();
  Tensor dhx = results.back();
  results.pop_back();
  Tensor dx = results.back();
  results.pop_back();
  std::vector<Tensor> dweights = std::move(results);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastbirnn_stack_backward", [&] {
    backward_layers<scalar_t>(grad_out, grad_hn, x, hx, weights, g, a, out.contiguous(),
                              mid.contiguous(), need_dx, dx, dhx, dweights, dZ);
  });
  return {dx, dhx, dweights};
}

// ---- autograd: one node for the whole stack --------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> call_forward_impl(const Tensor& x,
                                                     const std::optional<Tensor>& hx,
                                                     at::TensorList weights,
                                                     const std::optional<Tensor>& lengths,
                                                     int64_t L, bool bi, bool bias, bool relu,
                                                     bool bf, bool keep) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastbirnn_cpp::stack_forward_impl", "")
                       .typed<decltype(stack_forward_impl)>();
  return op.call(x, hx, weights, lengths, L, bi, bias, relu, bf, keep);
}

// create_graph=True turns grad mode on in a backward. The stacks' gradients are not
// differentiable, so refuse loudly instead of returning ones that silently ignore
// second-order terms.
void refuse_double_backward() {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "fastbirnn cpp backend: double backward (create_graph=True) is not supported; "
              "use backend='torch' (the nn class) for gradients of gradients");
}

class StackFunction : public torch::autograd::Function<StackFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& hx,
      at::TensorList weights, const std::optional<Tensor>& lengths, int64_t num_layers,
      bool bidirectional, bool has_biases, bool relu, bool batch_first) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, hn, mid] = call_forward_impl(x, hx, weights, lengths, num_layers, bidirectional,
                                            has_biases, relu, batch_first, true);
    std::vector<Tensor> saved{x, hx ? *hx : Tensor(), lengths ? *lengths : Tensor(), out, mid};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["num_layers"] = num_layers;
    ctx->saved_data["bidirectional"] = bidirectional;
    ctx->saved_data["has_biases"] = has_biases;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["batch_first"] = batch_first;
    ctx->saved_data["need_dx"] = x.requires_grad();
    ctx->saved_data["has_hx"] = hx.has_value() && hx->defined();
    return {out, hn};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    refuse_double_backward();
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastbirnn_cpp::stack_backward_impl", "")
                         .typed<decltype(stack_backward_impl)>();
    auto saved = ctx->get_saved_variables();
    const bool has_hx = ctx->saved_data["has_hx"].toBool();
    std::vector<Tensor> weights(saved.begin() + 5, saved.end());
    std::optional<Tensor> hx = has_hx ? std::optional<Tensor>(saved[1]) : std::nullopt;
    std::optional<Tensor> lengths =
        saved[2].defined() ? std::optional<Tensor>(saved[2]) : std::nullopt;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dx, dhx, dweights] =
        op.call(grads[0].defined() ? std::optional<Tensor>(grads[0]) : std::nullopt,
                grads[1].defined() ? std::optional<Tensor>(grads[1]) : std::nullopt, saved[0], hx,
                weights, lengths, saved[3], saved[4], ctx->saved_data["num_layers"].toInt(),
                ctx->saved_data["bidirectional"].toBool(), ctx->saved_data["has_biases"].toBool(),
                ctx->saved_data["relu"].toBool(), ctx->saved_data["batch_first"].toBool(),
                ctx->saved_data["need_dx"].toBool());
    // One gradient per forward argument, the weight list expanded in place.
    torch::autograd::variable_list result{ctx->saved_data["need_dx"].toBool() ? dx : Tensor(),
                                          has_hx ? dhx : Tensor()};
    result.insert(result.end(), dweights.begin(), dweights.end());
    for (int i = 0; i < 6; ++i) result.emplace_back();  // lengths and the non-tensor arguments
    return result;
  }
};

std::tuple<Tensor, Tensor> stack_autograd(const Tensor& x, const std::optional<Tensor>& hx,
                                          at::TensorList weights,
                                          const std::optional<Tensor>& lengths,
                                          int64_t num_layers, bool bidirectional, bool has_biases,
                                          bool relu, bool batch_first) {
  bool needs_grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || (hx && hx->defined() && hx->requires_grad()));
  for (const auto& w : weights) needs_grad = needs_grad || (at::GradMode::is_enabled() && w.requires_grad());
  if (!needs_grad) {
    // No graph to build: skip the autograd node and do not keep intermediate layers.
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, hn, mid] = call_forward_impl(x, hx, weights, lengths, num_layers, bidirectional,
                                            has_biases, relu, batch_first, false);
    return {out, hn};
  }
  auto outs = StackFunction::apply(x, hx, weights, lengths, num_layers, bidirectional,
                                   has_biases, relu, batch_first);
  return {outs[0], outs[1]};
}

std::tuple<Tensor, Tensor> stack_no_autograd(const Tensor& x, const std::optional<Tensor>& hx,
                                             at::TensorList weights,
                                             const std::optional<Tensor>& lengths,
                                             int64_t num_layers, bool bidirectional,
                                             bool has_biases, bool relu, bool batch_first) {
  auto [out, hn, mid] = call_forward_impl(x, hx, weights, lengths, num_layers, bidirectional,
                                          has_biases, relu, batch_first, false);
  return {out, hn};
}

// The common eager call (no h_0, no lengths) from Python without torch.ops' boxed argument
// parsing: the same op through the dispatcher, so autograd, profiling and dispatch modes see
// exactly what torch.ops.fastbirnn_cpp.stack would give them.
std::tuple<Tensor, Tensor> stack_eager(const Tensor& x, const std::vector<Tensor>& weights,
                                       int64_t num_layers, bool bidirectional, bool has_biases,
                                       bool relu, bool batch_first) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastbirnn_cpp::stack", "")
                       .typed<decltype(stack_autograd)>();
  return op.call(x, std::nullopt, weights, std::nullopt, num_layers, bidirectional, has_biases,
                 relu, batch_first);
}

// ---- gated cells: the whole stack --------------------------------------------------------
//
// The same contract as the Elman stack above, with LSTM's c beside h: one op for all layers
// and both directions, its autograd node in C++. The forward keeps, per layer, the activated
// gates G [rows, D*K*H] and the cell's saved values S [rows, D*H] for the backward.

// Runs fn with the cell named by the op's `cell` argument.
template <typename F>
void with_cell(c10::string_view name, const F& fn) {
  if (name == "lstm") return fn(LstmCell{});
  if (name == "gru") return fn(GruCell{});
  TORCH_CHECK(false, "fastbirnn cpp backend: unknown cell '", std::string(name),
              "' (expected 'lstm' or 'gru')");
}

StackArgs gated_args(c10::string_view cell, int64_t num_layers, bool bidirectional,
                     bool has_biases, bool batch_first) {
  int64_t gates = 0;
  with_cell(cell, [&](auto c) { gates = decltype(c)::kGates; });
  return {num_layers, bidirectional ? 2 : 1, has_biases, false, batch_first, gates};
}

// The checks of the Elman stack (weights with kGates * H rows), plus c0 for the LSTM.
Geometry gated_checked_geometry(c10::string_view cell, const Tensor& x,
                                const std::optional<Tensor>& h0, const std::optional<Tensor>& c0,
                                at::TensorList weights, const std::optional<Tensor>& lengths,
                                const StackArgs& a, Tensor& lengths_cpu) {
  check_inputs(x, h0, weights, lengths, a);
  const int64_t H = weights[1].size(1);
  const Geometry g = geometry(x, lengths, a, H, lengths_cpu);
  if (c0 && c0->defined()) {
    TORCH_CHECK(cell == "lstm", "fastbirnn cpp backend: only the LSTM cell has a cell state c0");
    check_tensor(*c0, "c0", x.scalar_type(), {a.num_layers * a.D, g.B, H});
  }
  return g;
}

template <typename T, typename Cell>
void gated_forward_layers(const Cell& cell, const Tensor& x, const Tensor& h0, const Tensor& c0,
                          at::TensorList weights, const Geometry& g, const StackArgs& a,
                          Tensor& out, Tensor& hn, Tensor& cn, Tensor& mid, Tensor& gates,
                          Tensor& saved) {
  constexpr int64_t K = Cell::kGates;
  const int64_t L = a.num_layers, D = a.D, H = g.H, B = g.B, rows = g.T * g.B;
  const int64_t KH = K * H, DKH = D * KH;
  const bool training = saved.numel() > 0;
  const Blocks blk = column_blocks(D, H);
  const int64_t workers = team_size(g, blk, K);
  LayerOutputs<T> layer_output(out, mid, L, rows, g.DH());
  // Inference: the layers share one gates buffer.
  Tensor gate_buf = training ? Tensor() : scratch_buffer(kScratchGates, rows * DKH, x.options());
  const T* layer_in = x.data_ptr<T>();
  int64_t in_size = x.size(2);
  std::vector<T> bias(a.has_biases ? DKH : 0);
  // Uninitialised: every block is packed by its worker before its first product.
  const Tensor w_packed = at::empty({DKH * H}, x.options());
  std::vector<T> state(size_t(D) * 2 * B * H), cstate(Cell::kCellState ? D * B * H : 0);
  std::vector<T> hid(size_t(D) * B * KH);
  alignas(64) T w_ih_t[2][kSmallHidden * kSmallHidden];
  Tensor w_ih_packed;
  for (int64_t l = 0; l < L; ++l) {
    T* layer_out = layer_output(l);
    T* G = training ? gates.data_ptr<T>() + l * rows * DKH : gate_buf.data_ptr<T>();
    T* S = training ? saved.data_ptr<T>() + l * rows * g.DH() : nullptr;
    const Projection<T> proj = layer_projection<T>(layer_in, in_size, rows, KH, D,
                                                   input_weights<T>(weights, a, l).data(),
                                                   w_ih_t, w_ih_packed, x.options());
    GatedForwardDirs<T> dirs;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t base = (l * D + d) * a.per_dir(), index = l * D + d;
      dirs.w_hh[d] = weights[base + 1].data_ptr<T>();
      dirs.w_packed[d] = w_packed.data_ptr<T>() + d * KH * H;
      if (a.has_biases) {
        // b_ih + b_hh, except where the cell applies b_hh itself (GRU's n: r * (.. + b_hn)).
        const T* b_ih = weights[base + 2].data_ptr<T>();
        const T* b_hh = weights[base + 3].data_ptr<T>();
        for (int64_t q = 0; q < K; ++q)
          for (int64_t j = 0; j < H; ++j)
            bias[d * KH + q * H + j] =
                q == Cell::kSplitGate ? b_ih[q * H + j] : b_ih[q * H + j] + b_hh[q * H + j];
        dirs.bias[d] = bias.data() + d * KH;
        if (Cell::kSplitGate >= 0) dirs.bias_h[d] = b_hh + Cell::kSplitGate * H;
      }
      dirs.h0[d] = h0.defined() ? h0.data_ptr<T>() + index * B * H : nullptr;
      dirs.c0[d] = c0.defined() ? c0.data_ptr<T>() + index * B * H : nullptr;
      dirs.hn[d] = hn.data_ptr<T>() + index * B * H;
      dirs.cn[d] = Cell::kCellState ? cn.data_ptr<T>() + index * B * H : nullptr;
    }
    Team team(workers);
    team.run([&](Team::Member& m) {
      project<T>(m, g, proj, G);
      gated_forward_team<T>(m, g, blk, cell, G, layer_out, S, dirs, state.data(),
                            cstate.data(), hid.data());
    });
    layer_in = layer_out;
    in_size = g.DH();
  }
}

// out, h_n, c_n (empty for the GRU), and with keep the intermediate layers' outputs, every
// layer's activated gates and the cell's saved values, for the backward.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_stack_forward_impl(
    c10::string_view cell, const Tensor& x_, const std::optional<Tensor>& h0_,
    const std::optional<Tensor>& c0_, at::TensorList weights_,
    const std::optional<Tensor>& lengths, int64_t num_layers, bool bidirectional,
    bool has_biases, bool batch_first, bool keep) {
  const StackArgs a = gated_args(cell, num_layers, bidirectional, has_biases, batch_first);
  Tensor lengths_cpu;
  const Geometry g =
      gated_checked_geometry(cell, x_, h0_, c0_, weights_, lengths, a, lengths_cpu);
  const Tensor x = x_.contiguous();
  const Tensor h0 = h0_ && h0_->defined() ? h0_->contiguous() : Tensor();
  const Tensor c0 = c0_ && c0_->defined() ? c0_->contiguous() : Tensor();
  std::vector<Tensor> weights;
  for (const auto& w : weights_) weights.push_back(w.contiguous());
  const int64_t rows = g.T * g.B, states = a.gates == 4 ? 2 : 1;
  Tensor out = empty_buffer(out_shape(g, batch_first), x.options());
  Tensor hn = at::empty({num_layers * a.D, g.B, g.H}, x.options());
  Tensor cn = at::empty({states == 2 ? num_layers * a.D : 0, g.B, g.H}, x.options());
  Tensor mid = empty_buffer({keep ? num_layers - 1 : 0, rows, g.DH()}, x.options());
  Tensor gates = empty_buffer({keep ? num_layers : 0, rows, a.gates * g.DH()}, x.options());
  Tensor saved = empty_buffer({keep ? num_layers : 0, rows, g.DH()}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastbirnn_gated_stack_forward", [&] {
    with_cell(cell, [&](auto c) {
      gated_forward_layers<scalar_t>(c, x, h0, c0, weights, g, a, out, hn, cn, mid, gates,
                                     saved);
    });
  });
  return {out, hn, cn, mid, gates, saved};
}

template <typename T, typename Cell>
void gated_backward_layers(const Cell& cell, const Tensor& grad_out, const Tensor& grad_hn,
                           const Tensor& grad_cn, const Tensor& x, const Tensor& h0,
                           const Tensor& c0, at::TensorList weights, const Geometry& g,
                           const StackArgs& a, const Tensor& out, const Tensor& mid,
                           const Tensor& gates, const Tensor& saved, bool need_dx, Tensor& dx,
                           Tensor& dh0, Tensor& dc0, std::vector<Tensor>& dweights) {
  constexpr int64_t K = Cell::kGates;
  const int64_t L = a.num_layers, D = a.D, H = g.H, B = g.B, DH = g.DH(), rows = g.T * g.B;
  const int64_t KH = K * H, DKH = D * KH;
  const int64_t threads = worth_threads(rows * KH * H) ? int64_t(at::get_num_threads()) : 1;
  const Blocks blk = column_blocks(D, H);
  const int64_t workers = team_size(g, blk, K);
  std::vector<T> bptt(size_t(D) * 3 * B * H);  // carry, tmp and dc per direction
  std::vector<T> scratch(size_t(D) * B * KH);  // for gemm_grads
  Tensor dG = scratch_buffer(kScratchGradGates, rows * DKH, x.options());
  Tensor dGh = Cell::kSplitGate >= 0
                   ? scratch_buffer(kScratchGradGatesHidden, rows * DKH, x.options()) : dG;
  Tensor dOut_buf;  // the gradient flowing into the current layer's output
  const T* dOut = grad_out.defined() ? grad_out.data_ptr<T>() : nullptr;
  for (int64_t l = L - 1; l >= 0; --l) {
    const T* Hs = l == L - 1 ? out.data_ptr<T>() : mid.data_ptr<T>() + l * rows * DH;
    const T* X = l == 0 ? x.data_ptr<T>() : mid.data_ptr<T>() + (l - 1) * rows * DH;
    const int64_t I = l == 0 ? x.size(2) : DH;
    auto at_layer = [&](const Tensor& t, int64_t d) -> T* {
      return t.defined() && t.numel() > 0 ? t.data_ptr<T>() + (l * D + d) * B * H : nullptr;
    };
    GatedBackwardDirs<T> dirs;
    for (int64_t d = 0; d < D; ++d) {
      dirs.w_hh[d] = weights[(l * D + d) * a.per_dir() + 1].data_ptr<T>();
      dirs.h0[d] = at_layer(h0, d);
      dirs.c0[d] = at_layer(c0, d);
      dirs.dhn[d] = at_layer(grad_hn, d);
      dirs.dcn[d] = at_layer(grad_cn, d);
      dirs.dh0[d] = at_layer(dh0, d);
      dirs.dc0[d] = at_layer(dc0, d);
    }
    Team team(workers);
    team.run([&](Team::Member& m) {
      gated_backward_team<T>(m, g, blk, cell, dOut, Hs, gates.data_ptr<T>() + l * rows * DKH,
                             saved.data_ptr<T>() + l * rows * DH, dG.data_ptr<T>(),
                             dGh.data_ptr<T>(), dirs, bptt.data());
    });
    const bool want_dx = l > 0 || need_dx;
    Tensor dX_buf = !want_dx ? Tensor() : l == 0 ? dx
                    : scratch_buffer(l % 2 ? kScratchGradInput1 : kScratchGradInput0, rows * DH,
                                     x.options());
    gemm_grads<T>(g, a, weights, l,
                  {dG.data_ptr<T>(), dGh.data_ptr<T>(), KH, X, I, Hs, at_layer(h0, 0)},
                  dweights, want_dx ? dX_buf.data_ptr<T>() : nullptr, threads, scratch.data());
    if (l > 0) {
      dOut_buf = dX_buf;  // becomes the output gradient of the layer below
      dOut = dOut_buf.data_ptr<T>();
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> gated_stack_backward_impl(
    c10::string_view cell, const std::optional<Tensor>& grad_out_,
    const std::optional<Tensor>& grad_hn_, const std::optional<Tensor>& grad_cn_,
    const Tensor& x_, const std::optional<Tensor>& h0_, const std::optional<Tensor>& c0_,
    at::TensorList weights_, const std::optional<Tensor>& lengths, const Tensor& out,
    const Tensor& mid, const Tensor& gates, const Tensor& saved, int64_t num_layers,
    bool bidirectional, bool has_biases, bool batch_first, bool need_dx) {
  const StackArgs a = gated_args(cell, num_layers, bidirectional, has_biases, batch_first);
  Tensor lengths_cpu;
  const Geometry g =
      gated_checked_geometry(cell, x_, h0_, c0_, weights_, lengths, a, lengths_cpu);
  const at::ScalarType dtype = x_.scalar_type();
  const int64_t rows = g.T * g.B, states = a.gates == 4 ? 2 : 1;
  const std::vector<int64_t> out_sizes = out_shape(g, batch_first);
  const std::vector<int64_t> state_sizes{num_layers * a.D, g.B, g.H};
  check_tensor(out, "out", dtype, out_sizes);
  check_tensor(mid, "mid", dtype, {num_layers - 1, rows, g.DH()});
  check_tensor(gates, "gates", dtype, {num_layers, rows, a.gates * g.DH()});
  check_tensor(saved, "saved", dtype, {num_layers, rows, g.DH()});
  auto optional = [&](const std::optional<Tensor>& t, const char* name) {
    if (!t || !t->defined()) return Tensor();
    check_tensor(*t, name, dtype, name == std::string("grad_out") ? out_sizes : state_sizes);
    return t->contiguous();
  };
  const Tensor grad_out = optional(grad_out_, "grad_out");
  const Tensor grad_hn = optional(grad_hn_, "grad_hn");
  const Tensor grad_cn = optional(grad_cn_, "grad_cn");
  TORCH_CHECK(states == 2 || !grad_cn.defined(), "fastbirnn cpp backend: the GRU has no c_n");
  const Tensor x = x_.contiguous();
  const Tensor h0 = h0_ && h0_->defined() ? h0_->contiguous() : Tensor();
  const Tensor c0 = c0_ && c0_->defined() ? c0_->contiguous() : Tensor();
  std::vector<Tensor> weights;
  std::vector<std::vector<int64_t>> shapes;  // the results: dweights..., dx, dh0, dc0
  for (const auto& w : weights_) {
    weights.push_back(w.contiguous());
    shapes.push_back(w.sizes().vec());
  }
  shapes.push_back(need_dx ? x.sizes().vec() : std::vector<int64_t>{0});
  shapes.push_back(state_sizes);
  shapes.push_back(states == 2 ? state_sizes : std::vector<int64_t>{0});
  std::vector<Tensor> results = empty_tensors(shapes, x.options());
  Tensor dc0 = results.back();
  results.pop_back();
  Tensor dh0 = results.back();
  results.pop_back();
  Tensor dx = results.back();
  results.pop_back();
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastbirnn_gated_stack_backward", [&] {
    with_cell(cell, [&](auto c) {
      gated_backward_layers<scalar_t>(c, grad_out, grad_hn, grad_cn, x, h0, c0, weights, g, a,
                                      out.contiguous(), mid.contiguous(), gates.contiguous(),
                                      saved.contiguous(), need_dx, dx, dh0, dc0, results);
    });
  });
  return {dx, dh0, dc0, results};
}

class GatedStackFunction : public torch::autograd::Function<GatedStackFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const std::string& cell, const Tensor& x,
      const std::optional<Tensor>& h0, const std::optional<Tensor>& c0, at::TensorList weights,
      const std::optional<Tensor>& lengths, int64_t num_layers, bool bidirectional,
      bool has_biases, bool batch_first) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastbirnn_cpp::gated_stack_forward_impl", "")
                         .typed<decltype(gated_stack_forward_impl)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, hn, cn, mid, gates, saved] = op.call(cell, x, h0, c0, weights, lengths, num_layers,
                                                    bidirectional, has_biases, batch_first, true);
    auto defined = [](const std::optional<Tensor>& t) { return t ? *t : Tensor(); };
    std::vector<Tensor> kept{x, defined(h0), defined(c0), defined(lengths), out, mid, gates,
                             saved};
    kept.insert(kept.end(), weights.begin(), weights.end());
    ctx->save_for_backward(kept);
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
    refuse_double_backward();
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastbirnn_cpp::gated_stack_backward_impl", "")
                         .typed<decltype(gated_stack_backward_impl)>();
    auto saved = ctx->get_saved_variables();
    auto optional = [](const Tensor& t) {
      return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
    };
    std::vector<Tensor> weights(saved.begin() + 8, saved.end());
    const std::string cell = ctx->saved_data["cell"].toStringRef();
    const bool need_dx = ctx->saved_data["need_dx"].toBool();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dx, dh0, dc0, dweights] =
        op.call(cell, optional(grads[0]), optional(grads[1]),
                cell == "lstm" ? optional(grads[2]) : std::nullopt, saved[0], optional(saved[1]),
                optional(saved[2]), weights, optional(saved[3]), saved[4], saved[5], saved[6],
                saved[7], ctx->saved_data["num_layers"].toInt(),
                ctx->saved_data["bidirectional"].toBool(), ctx->saved_data["has_biases"].toBool(),
                ctx->saved_data["batch_first"].toBool(), need_dx);
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

std::tuple<Tensor, Tensor, Tensor> gated_stack_no_autograd(
    c10::string_view cell, const Tensor& x, const std::optional<Tensor>& h0,
    const std::optional<Tensor>& c0, at::TensorList weights, const std::optional<Tensor>& lengths,
    int64_t num_layers, bool bidirectional, bool has_biases, bool batch_first) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastbirnn_cpp::gated_stack_forward_impl", "")
                       .typed<decltype(gated_stack_forward_impl)>();
  auto [out, hn, cn, mid, gates, saved] = op.call(cell, x, h0, c0, weights, lengths, num_layers,
                                                  bidirectional, has_biases, batch_first, false);
  return {out, hn, cn};
}

std::tuple<Tensor, Tensor, Tensor> gated_stack_autograd(
    c10::string_view cell, const Tensor& x, const std::optional<Tensor>& h0,
    const std::optional<Tensor>& c0, at::TensorList weights, const std::optional<Tensor>& lengths,
    int64_t num_layers, bool bidirectional, bool has_biases, bool batch_first) {
  bool needs_grad = x.requires_grad() || (h0 && h0->defined() && h0->requires_grad()) ||
                    (c0 && c0->defined() && c0->requires_grad());
  for (const auto& w : weights) needs_grad = needs_grad || w.requires_grad();
  if (!at::GradMode::is_enabled() || !needs_grad) {
    // No graph to build: skip the autograd node and keep nothing for a backward.
    at::AutoDispatchBelowADInplaceOrView guard;
    return gated_stack_no_autograd(cell, x, h0, c0, weights, lengths, num_layers, bidirectional,
                                   has_biases, batch_first);
  }
  auto outs = GatedStackFunction::apply(std::string(cell), x, h0, c0, weights, lengths,
                                        num_layers, bidirectional, has_biases, batch_first);
  return {outs[0], outs[1], outs[2]};
}

// ---- the per-layer seam (used when training with dropout between layers) ------------------

// Z or Hs [T,B,D,H] with W_hh [D,H,H], and lengths [B] in [1, T].
Geometry seam_geometry(const Tensor& Z, const Tensor& W_hh, const Tensor& lengths,
                       Tensor& lengths_c) {
  TORCH_CHECK(Z.dim() == 4, "fastbirnn cpp backend: expected a [T, B, D, H] tensor, got ",
              Z.dim(), "-D");
  TORCH_CHECK(Z.scalar_type() == at::kFloat || Z.scalar_type() == at::kDouble,
              "fastbirnn cpp backend: supports float32 and float64, got ", Z.scalar_type());
  TORCH_CHECK(Z.size(2) == 1 || Z.size(2) == 2, "fastbirnn cpp backend: D must be 1 or 2");
  Geometry g{Z.size(0), Z.size(1), Z.size(2), Z.size(3), Z.size(1), 1, nullptr};
  check_tensor(Z, "Z", Z.scalar_type(), Z.sizes());
  check_tensor(W_hh, "W_hh", Z.scalar_type(), {g.D, g.H, g.H});
  g.lengths = checked_lengths(lengths, g.B, g.T, lengths_c);
  check_blas_sizes(g, g.H);
  return g;
}

Tensor recurrence_forward(const Tensor& Z, const Tensor& W_hh, const Tensor& h0,
                          const Tensor& lengths, bool relu) {
  Tensor lengths_c;
  const Geometry g = seam_geometry(Z, W_hh, lengths, lengths_c);
  check_tensor(h0, "h0", Z.scalar_type(), {g.D, g.B, g.H});
  Tensor Hs = Z.contiguous().clone();
  Tensor W = W_hh.contiguous(), h = h0.contiguous();
  Tensor scratch = at::empty({g.D * 3, g.B, g.H}, Z.options());  // state (2 per direction), h_n
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "fastbirnn_recurrence_forward", [&] {
    using T = scalar_t;
    const Blocks blk = column_blocks(g.D, g.H);
    const ElmanCell cell{relu};
    ForwardDirs<T> dirs;
    const Tensor packed = forward_block_tiles(g) ? at::empty_like(W) : Tensor();
    for (int64_t d = 0; d < g.D; ++d) {
      dirs.w_hh[d] = W.data_ptr<T>() + d * g.H * g.H;
      if (packed.defined()) dirs.w_packed[d] = packed.data_ptr<T>() + d * g.H * g.H;
      dirs.h0[d] = h.data_ptr<T>() + d * g.B * g.H;
      dirs.hn[d] = scratch.data_ptr<T>() + (2 * g.D + d) * g.B * g.H;
    }
    Team team(team_size(g, blk));
    team.run([&](Team::Member& m) {
      recurrence_forward_team<T>(m, g, blk, cell, Hs.data_ptr<T>(), dirs, scratch.data_ptr<T>());
    });
  });
  return Hs;
}

std::tuple<Tensor, Tensor> recurrence_backward(const Tensor& dHs, const Tensor& Hs_,
                                               const Tensor& W_hh, const Tensor& lengths,
                                               bool relu) {
  Tensor lengths_c;
  const Geometry g = seam_geometry(Hs_, W_hh, lengths, lengths_c);
  check_tensor(dHs, "dHs", Hs_.scalar_type(), Hs_.sizes());
  Tensor Hs = Hs_.contiguous(), dO = dHs.contiguous(), W = W_hh.contiguous();
  Tensor dZ = empty_buffer(Hs.sizes(), Hs.options());
  Tensor dh0 = at::empty({g.D, g.B, g.H}, Hs.options());
  Tensor scratch = at::empty({g.D * 2, g.B, g.H}, Hs.options());
  AT_DISPATCH_FLOATING_TYPES(Hs.scalar_type(), "fastbirnn_recurrence_backward", [&] {
    using T = scalar_t;
    const Blocks blk = column_blocks(g.D, g.H);
    const ElmanCell cell{relu};
    BackwardDirs<T> dirs;
    for (int64_t d = 0; d < g.D; ++d) {
      dirs.w_hh[d] = W.data_ptr<T>() + d * g.H * g.H;
      dirs.dh0[d] = dh0.data_ptr<T>() + d * g.B * g.H;
    }
    Team team(team_size(g, blk));
    team.run([&](Team::Member& m) {
      recurrence_backward_team<T>(m, g, blk, cell, dO.data_ptr<T>(), Hs.data_ptr<T>(),
                                  dZ.data_ptr<T>(), dirs, scratch.data_ptr<T>());
    });
  });
  return {dZ, dh0};
}

}  // namespace
}  // namespace fastbirnn

TORCH_LIBRARY(fastbirnn_cpp, m) {
  m.def(
      "stack(Tensor x, Tensor? hx, Tensor[] weights, Tensor? lengths, int num_layers, "
      "bool bidirectional, bool has_biases, bool relu, bool batch_first) -> (Tensor, Tensor)");
  m.def(
      "stack_forward_impl(Tensor x, Tensor? hx, Tensor[] weights, Tensor? lengths, "
      "int num_layers, bool bidirectional, bool has_biases, bool relu, bool batch_first, "
      "bool keep) -> (Tensor, Tensor, Tensor)");
  m.def(
      "stack_backward_impl(Tensor? grad_out, Tensor? grad_hn, Tensor x, Tensor? hx, "
      "Tensor[] weights, Tensor? lengths, Tensor out, Tensor mid, int num_layers, "
      "bool bidirectional, bool has_biases, bool relu, bool batch_first, bool need_dx) "
      "-> (Tensor, Tensor, Tensor[])");
  // The gated cells ('lstm', 'gru'): c0 and the returned c_n (empty) only for the LSTM.
  m.def(
      "gated_stack(str cell, Tensor x, Tensor? h0, Tensor? c0, Tensor[] weights, "
      "Tensor? lengths, int num_layers, bool bidirectional, bool has_biases, bool batch_first) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "gated_stack_forward_impl(str cell, Tensor x, Tensor? h0, Tensor? c0, Tensor[] weights, "
      "Tensor? lengths, int num_layers, bool bidirectional, bool has_biases, bool batch_first, "
      "bool keep) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gated_stack_backward_impl(str cell, Tensor? grad_out, Tensor? grad_hn, Tensor? grad_cn, "
      "Tensor x, Tensor? h0, Tensor? c0, Tensor[] weights, Tensor? lengths, Tensor out, "
      "Tensor mid, Tensor gates, Tensor saved, int num_layers, bool bidirectional, "
      "bool has_biases, bool batch_first, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(fastbirnn_cpp, CPU, m) {
  m.impl("stack", &fastbirnn::stack_no_autograd);
  m.impl("stack_forward_impl", &fastbirnn::stack_forward_impl);
  m.impl("stack_backward_impl", &fastbirnn::stack_backward_impl);
  m.impl("gated_stack", &fastbirnn::gated_stack_no_autograd);
  m.impl("gated_stack_forward_impl", &fastbirnn::gated_stack_forward_impl);
  m.impl("gated_stack_backward_impl", &fastbirnn::gated_stack_backward_impl);
}

TORCH_LIBRARY_IMPL(fastbirnn_cpp, Autograd, m) {
  m.impl("stack", &fastbirnn::stack_autograd);
  m.impl("gated_stack", &fastbirnn::gated_stack_autograd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastbirnn fused C++ CPU kernels (ops live in torch.ops.fastbirnn_cpp)";
  m.def("recurrence_forward", &fastbirnn::recurrence_forward);
  m.def("recurrence_backward", &fastbirnn::recurrence_backward);
  m.def("stack_eager", &fastbirnn::stack_eager,
        "torch.ops.fastbirnn_cpp.stack(x, None, weights, None, ...) without boxed arguments");
  m.def("has_blas", &fastbirnn::have_blas, "Whether an optimised BLAS was found in libtorch");
  m.def("tanh_impl", &fastbirnn::tanh_impl_name, "Which vectorised tanh is in use");
  m.def("release_scratch", &fastbirnn::release_scratch,
        "Free the scratch buffers the engine keeps for this thread; returns the bytes freed");
}
