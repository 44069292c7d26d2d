// The big products of one layer, outside the per-step recurrence: the input projection before
// it (X W_ih^T for every step at once) and the weight and input gradients after BPTT.
// Each is a list of fixed tasks (row blocks; blocks of weight rows and columns) whose shapes
// depend only on the problem, so no sum is ever split over workers and the thread count cannot
// change a result; they run on every thread (the projection where it is big enough), not only
// on the recurrence's team.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <array>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <utility>
#include <vector>

#include "buffers.h"
#include "geometry.h"
#include "matrix.h"
#include "stack.h"
#include "team.h"
#include "tiles.h"
#include "tiles_bf16.h"

namespace fastbirnn {

// Z = X W_ih^T of one layer as fixed tasks (direction, row block), dealt round-robin to the
// team; the recurrence then starts at the team's first barrier. Z has `cols` columns per
// direction (kGates * H).
template <typename T>
struct Projection {
  const T* X;
  int64_t I, rows, cols;
  const T* w_ih[2];
  T* w_ih_t[2];    // W_ih^T [I, cols] (register tiles / the tiny loops), or null for BLAS
  int64_t blocks;  // row blocks per direction
  bool tiny;       // small_gemm on W_ih^T (cols, I <= kSmallHidden, rows <= kSmallRows)
  // Whether the team writes W_ih^T before the products: the tiles' copy (the tiny one is
  // written by layer_projection).
  bool team_transposes() const { return !tiny && w_ih_t[0] != nullptr; }
};

// Rows of W_ih per task of the team's transpose (two of the transpose's tiles).
constexpr int64_t kTransposeRows = 2 * kTransposeTile;

// Projections over at least this many rows run on register tiles from W_ih^T: the one-off
// transpose costs about what the tiles save on a hundred rows (at 30 rows and I 300 BLAS was
// 7 % faster, from 200 rows the tiles 10-15 %; it was 512 rows before the transposes were
// vectorised, and still is where they are scalar copies: fp64).
constexpr int64_t kPackedProjectionRows = 128;
constexpr int64_t kPackedProjectionRowsScalarTranspose = 512;

// Layer l's W_ih of each direction.
template <typename T>
std::array<const T*, 2> input_weights(at::TensorList weights, const StackArgs& a, int64_t l) {
  std::array<const T*, 2> w{nullptr, nullptr};
  for (int64_t d = 0; d < a.D; ++d) w[d] = weights[(l * a.D + d) * a.per_dir()].data_ptr<T>();
  return w;
}

// The projection of one layer onto cols (kGates * H) columns per direction. W_ih^T goes to
// tiny_t for the tiny loops (written here), or to `packed` (allocated here, written by the
// team in project()) for register tiles over long projections; otherwise BLAS reads W_ih as
// stored. On_bf16: the products run on the bf16 tiles (project()), which read their own copy
// of W_ih: no fp32 W_ih^T for long projections. `copies`: packed holds that many D * I * cols
// copies, the first W_ih^T's (a batch-split step projection packs one per part, stack.cpp).
template <typename T>
Projection<T> layer_projection(const T* X, int64_t I, int64_t rows, int64_t cols, int64_t D,
                               const T* const w_ih[2], T (&tiny_t)[2][kSmallHidden * kSmallHidden],
                               Tensor& packed, const at::TensorOptions& options, bool on_bf16,
                               int64_t copies = 1) {
  const bool tiny = cols <= kSmallHidden && I <= kSmallHidden && rows <= kSmallRows;
  const bool tiles = !tiny && !on_bf16 && have_gemm_tiles() &&
                     rows >= (transposes_in_vectors(sizeof(T))
                                  ? kPackedProjectionRows : kPackedProjectionRowsScalarTranspose);
  packed = Tensor();  // the previous layer's: its scratch slot is free again
  if (tiles) packed = scratch_buffer(kScratchPackedInput, copies * D * I * cols, options);
  Projection<T> p{X, I, rows, cols, {nullptr, nullptr}, {nullptr, nullptr},
                  tiny ? 1 : row_blocks(rows), tiny};
  for (int64_t d = 0; d < D; ++d) {
    p.w_ih[d] = w_ih[d];
    if (tiny) {
      transpose(w_ih[d], cols, I, tiny_t[d]);
      p.w_ih_t[d] = tiny_t[d];
    } else if (tiles) {
      p.w_ih_t[d] = packed.data_ptr<T>() + d * I * cols;
    }
  }
  return p;
}

// Multiply-adds from which a projection takes more threads than the recurrence's team has
// (a parallel region of its own costs a few microseconds).
constexpr int64_t kSplitProjectionWork = int64_t(1) << 20;

// The workers for projection p: every thread its tasks can use where the recurrence's team
// (`team` workers, capped by its column blocks) is smaller and the product big enough, else
// that team.
template <typename T>
int64_t projection_workers(const Projection<T>& p, int64_t D, int64_t team) {
  if (p.rows * D * p.cols * p.I < kSplitProjectionWork) return team;
  return std::max(team, std::min<int64_t>(at::get_num_threads(), D * p.blocks));
}

// Whether an inference layer of a gated cell (or any layer of the in-place Elman cell, below) runs
// projection p step by step inside the recurrence (recurrence.h, StepProjection; `H` hidden units,
// `team` workers) instead of before it. The same products, so the same bits, on the same workers
// (only where the projection would run on the recurrence's team). Measured on 2-core Zen 5 against
// the projection before the steps (inference, alternating in one process): 1.07-1.36x at batch
// 16-256 where the gate rows of all steps outgrow the caches (LSTM 32,128,128,128: 1.17x;
// 16,200,80,320 3 layers: 1.22x; GRU 64,256,256,512: 1.04x); slower at batch 2-8 (0.87-0.96x: a
// step's few rows leave the register tiles load-bound), where each step re-reads weights the caches
// do not hold (0.73x at LSTM H 512 I 1024, 0.89x at GRU H 1024: 12-15 MB per direction), and at
// inputs wider than 2H (0.96-0.99x at I 300, H 100).
// A bf16 call on the bf16 tiles (on_bf16) steps the same way, its products on those tiles
// (whose sums run over all of I in one order, so again the same bits), with its weights'
// bf16 bytes against the limit; a bf16 call without them (fp32 products on rounded operands)
// projects before the steps.
// The in-place Elman cell (in_place) steps from batch 32, inference and training alike: each
// step's x_t W_ih^T goes to its output rows, where the projection would have put it, and the
// step's product adds h_{t-1} W_hh^T there as before. Its rows are a quarter of an LSTM's, so
// it gains less (in-process A/B on 2-core Zen 5, fp32, off/on: inference 1.01-1.06x at batch
// 24-32, 1.04x at (64, 32, 512, 512) one direction, 1.135x at (64, 256, 256, 512); training
// 1.02-1.06x at batch 32, 1.10x at (64, 256, 256, 512); forced AVX2 0.99-1.09x; bf16
// autocast inference 1.03-1.06x) and lost at batch 16 (0.95-1.01x).
// (fastbirnn/backends/cpu_rule.py mirrors the gated cells' batch limit: STEP_PROJECTION_BATCH.)
constexpr int64_t kStepProjectionBatch = 16;
constexpr int64_t kStepProjectionBatchInPlace = 32;
constexpr int64_t kStepProjectionWeightBytes = int64_t(8) << 20;

template <typename T>
bool projects_per_step(const Geometry& g, const Projection<T>& p, int64_t H, int64_t team,
                       bool on_bf16, bool in_place) {
  const int64_t operand_bytes = on_bf16 ? int64_t(sizeof(bf16_bits)) : int64_t(sizeof(T));
  const int64_t weight_bytes = p.cols * (p.I + H) * operand_bytes;  // W_ih and W_hh
  const bool on_tiles = on_bf16 || (!g.round_bf16 && p.team_transposes());
  return on_tiles && projection_workers(p, g.D, team) <= team &&
         g.B >= (in_place ? kStepProjectionBatchInPlace : kStepProjectionBatch) &&
         p.I <= 2 * H && weight_bytes <= kStepProjectionWeightBytes;
}

// A bf16 call's layer input as bf16 rows (bf16->x, x_ld apart), each worker converting the
// rows of the projection's row blocks it owns (the caller orders them before their use).
template <typename T>
void input_rows_to_bf16(Team::Member& m, const Projection<T>& p, const Bf16Forward& bf16) {
  for (int64_t blk = 0; blk < p.blocks; ++blk) {
    if (!m.owns(blk)) continue;
    for (int64_t r = p.rows * blk / p.blocks; r < p.rows * (blk + 1) / p.blocks; ++r)
      to_bf16_row(p.X + r * p.I, p.I, bf16.x + r * bf16.x_ld);
  }
}

// The projection's tasks; with bf16 (a bf16 call on the bf16 tiles) each worker first converts
// the rows of its blocks to bf16, then the team meets once before the products read them. The
// products' tasks go to whichever worker asks next (`queue`, shared by the team's workers,
// starting at 0): a worker held up (descheduled on a busy machine) leaves its share to the
// others, where a fixed share would hold up every worker at the next barrier. Which worker
// computes a task changes no result.
template <typename T>
void project(Team::Member& m, const Geometry& g, const Projection<T>& p, T* out,
             std::atomic<int64_t>& queue, const Bf16Forward* bf16 = nullptr) {
  const int64_t H = p.cols, ld = g.D * p.cols, n = g.D * p.blocks;
  const bool on_bf16 = bf16 && bf16->x;
  if (p.team_transposes()) {  // W_ih^T for the tiles, in row ranges of W_ih over the team
    const int64_t per_dir = (p.cols + kTransposeRows - 1) / kTransposeRows;
    for (int64_t task = 0; task < g.D * per_dir; ++task) {
      if (!m.owns(task)) continue;
      const int64_t d = task / per_dir, r0 = (task % per_dir) * kTransposeRows;
      const int64_t r1 = std::min(p.cols, r0 + kTransposeRows);
      transpose(p.w_ih[d], p.cols, p.I, p.w_ih_t[d], r0, r1);
    }
    m.sync();
  }
  if (on_bf16) {
    input_rows_to_bf16(m, p, *bf16);
    m.sync();
  }
  for (int64_t task = queue.fetch_add(1); task < n; task = queue.fetch_add(1)) {
    const int64_t d = task % g.D, blk = task / g.D;
    const int64_t r0 = p.rows * blk / p.blocks, r1 = p.rows * (blk + 1) / p.blocks;
    const T* x = p.X + r0 * p.I;
    T* z = out + r0 * ld + d * H;
    if (on_bf16)
      bf16_gemm_into<T>(r1 - r0, H, p.I, bf16->x + r0 * bf16->x_ld, bf16->x_ld, bf16->w_ih[d],
                        bf16->w_ih_ld, T(0), z, ld);
    else if (p.tiny)  // register-blocked loops beat a BLAS call's fixed cost
      small_gemm<T>(r1 - r0, H, p.I, x, p.I, p.w_ih_t[d], H, T(0), z, ld);
    else if (p.w_ih_t[d])
      gemm<T>(false, false, r1 - r0, H, p.I, x, p.I, p.w_ih_t[d], H, T(0), z, ld);
    else
      gemm<T>(false, true, r1 - r0, H, p.I, x, p.I, p.w_ih[d], p.I, T(0), z, ld);
  }
}

// Rows j0..j0+m, columns n0..n0+n of direction d's dW_hh as nn computes them: a sum over the
// steps each row actually takes, h0 (or zeros) at its first step. dz points at the rows'
// gate-gradient columns (leading dimension ldz), Hs at direction d's columns of the outputs, h0
// at direction d's initial states, dW at row j0 (leading dimension H). Used only when the
// layer's states or gradients hold a NaN or inf, where the fast path would differ: its shifted
// GEMM also multiplies the zero dz of padded steps with the last valid state (0 * NaN = NaN),
// and it skips the zero h0 term when no h0 was given (NaN * 0 = NaN in nn.RNN).
template <typename T>
void hidden_weight_grad_nonfinite(const Geometry& g, int d, int64_t m, int64_t n0, int64_t n,
                                  const T* dz, int64_t ldz, const T* Hs, const T* h0, T* dW) {
  const int64_t H = g.H, DH = g.DH();
  zero_columns(dW, H, m, n0, n);
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
        for (int64_t k = n0; k < n0 + n; ++k)
          dW[j * H + k] += dz_row[j] * (prev ? prev[k] : T(0));
    }
  }
}

// Whether every element of the arrays ({pointer, count}) is finite, scanned in fixed chunks on
// up to `threads` threads (one thread's pass over a layer's states and gate gradients took
// 230 us, 8 % of the tagger's gradient products, while the other threads waited).
template <typename T>
bool all_finite_on_threads(std::initializer_list<std::pair<const T*, int64_t>> arrays,
                           int64_t threads) {
  constexpr int64_t kChunk = int64_t(1) << 16;
  if (threads <= 1) {  // (a tiny step's: no task queue)
    for (const auto& [p, n] : arrays)
      if (!all_finite(p, n)) return false;
    return true;
  }
  std::vector<std::pair<const T*, int64_t>> chunks;
  for (const auto& [p, n] : arrays)
    for (int64_t i = 0; i < n; i += kChunk) chunks.emplace_back(p + i, std::min(kChunk, n - i));
  std::atomic<bool> finite{true};
  run_task_queue(int64_t(chunks.size()), threads, [&](int64_t i) {
    if (!all_finite(chunks[i].first, chunks[i].second))
      finite.store(false, std::memory_order_relaxed);
  });
  return finite.load(std::memory_order_relaxed);
}

// One layer's operands of its gradient GEMMs: the pre-activation gradients of all steps
// (written by BPTT, zero at padded steps), the layer's input and outputs. Only a cell with a
// split gate (GRU) has dGh != dG.
template <typename T>
struct GradOperands {
  const T* dG;   // [rows, D*KH] input-side pre-activation gradients (null on the bf16 tiles)
  const T* dGh;  // the hidden-side ones (GRU's n gate: dn_pre * r); may be dG
  int64_t KH;    // pre-activation rows per direction: kGates * H
  const T* X;    // the layer's input [rows, I]
  int64_t I;
  const T* Hs;   // the layer's outputs [rows, D*H]
  const T* h0;   // the layer's initial hidden state [D, B, H], or null (zeros)
};

// Rows j0..j0+m of direction d's bias gradients (weights' index base: W_ih's): column sums of
// the gate gradients over all rows, input side for b_ih, hidden side for b_hh.
template <typename T>
void bias_grads(const GradOperands<T>& p, std::vector<Tensor>& dweights, int64_t base, int64_t d,
                int64_t j0, int64_t m, int64_t rows, int64_t DKH) {
  for (int side = 0; side < 2; ++side) {
    T* db = dweights[base + 2 + side].data_ptr<T>() + j0;
    if (side == 1 && p.dGh == p.dG) {
      std::memcpy(db, dweights[base + 2].data_ptr<T>() + j0, sizeof(T) * m);
      break;
    }
    std::vector<T> tmp(column_sums_scratch(rows, m));
    column_sums<T>((side == 0 ? p.dG : p.dGh) + d * p.KH + j0, DKH, rows, m, db, tmp.data());
  }
}

// How one direction's weight gradient, rows x cols summed over `steps`, is cut into tasks: row
// blocks first, then column blocks of whole 64-column panels, until each task has about
// kGradTaskWork multiply-adds, at most kMaxWeightTasks of them (finer cuts, 16 tasks of 64
// rows or more, made 2-core training steps at H 512 4-11 % slower: each task reads all of its
// operand's rows again). The cut depends only on the problem, and every element's sum keeps
// its one order on the register tiles (tiles.h) and the bf16 tiles whatever its block: the
// thread count cannot change a result. More tasks than a 2-core machine needs let many cores
// share one layer's weight gradients (before, a bidirectional layer's were 4 tasks below 1024
// gate rows, whatever the core count).
struct WeightBlocks {
  static constexpr int64_t kGradTaskWork = int64_t(1) << 22;
  static constexpr int64_t kMaxWeightTasks = 4;
  static constexpr int64_t kRowsPerBlock = 256;  // at most one row block per this many rows
  static constexpr int64_t kPanel = 64;

  WeightBlocks(int64_t rows, int64_t cols, int64_t steps) : rows(rows), cols(cols) {
    const int64_t tasks = std::clamp<int64_t>(rows * cols * steps / kGradTaskWork, 1,
                                              kMaxWeightTasks);
    n_row = std::max<int64_t>(1, std::min(tasks, ceil_div(rows, kRowsPerBlock)));
    const int64_t panels = std::max<int64_t>(1, ceil_div(cols, kPanel));
    n_col = std::min(panels, std::max<int64_t>(1, tasks / n_row));
    row_block = ceil_div(rows, n_row);
    col_block = ceil_div(panels, n_col) * kPanel;
  }
  int64_t count() const { return n_row * n_col; }
  // Task i's rows j0..j0+m and columns n0..n0+n (m or n may be 0: nothing to do).
  void block(int64_t i, int64_t& j0, int64_t& m, int64_t& n0, int64_t& n) const {
    j0 = (i / n_col) * row_block;
    m = std::max<int64_t>(0, std::min(rows, j0 + row_block) - j0);
    n0 = (i % n_col) * col_block;
    n = std::max<int64_t>(0, std::min(cols, n0 + col_block) - n0);
  }

  static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
  int64_t rows, cols, n_row, n_col, row_block, col_block;
};

// The fixed tasks of one layer's gradient products, shared by gemm_grads and gemm_grads_bf16,
// in this order: per direction, the blocks of dW_hh (the bias gradients with each row block's
// first), the blocks of dW_ih, then fixed row blocks of dX. Their shapes depend only on the
// problem. (Not always biggest first: at the tagger's B 32 T 40 I 100 H 128 a dX block has
// 26 M multiply-adds, a dW_hh block 21 M.)
struct GradTasks {
  enum Kind { kHiddenWeights, kInputWeights, kInputGrad };
  struct Task {
    Kind kind;
    int64_t d, j0, m;  // weight tasks: direction d's weight rows j0..j0+m (m may be 0: skip)
    int64_t n0, n;     // and its columns n0..n0+n (n may be 0: skip)
    int64_t r0, r1;    // kInputGrad: rows r0..r1 of dX
  };

  GradTasks(int64_t D, int64_t KH, int64_t H, int64_t I, int64_t rows, bool dX)
      : D(D), rows(rows), hh(KH, H, rows), ih(KH, I, rows),
        n_row_blocks(dX ? row_blocks(rows) : 0) {}

  int64_t count() const { return D * (hh.count() + ih.count()) + n_row_blocks; }

  Task operator[](int64_t task) const {
    const int64_t n_hh = D * hh.count(), n_w = n_hh + D * ih.count();
    if (task >= n_w) {
      const int64_t blk = task - n_w;
      return {kInputGrad, 0, 0, 0, 0, 0, rows * blk / n_row_blocks,
              rows * (blk + 1) / n_row_blocks};
    }
    const bool is_hh = task < n_hh;
    const WeightBlocks& w = is_hh ? hh : ih;
    const int64_t i = is_hh ? task : task - n_hh;
    Task t{is_hh ? kHiddenWeights : kInputWeights, i / w.count(), 0, 0, 0, 0, 0, 0};
    w.block(i % w.count(), t.j0, t.m, t.n0, t.n);
    return t;
  }

 private:
  int64_t D, rows;
  WeightBlocks hh, ih;
  int64_t n_row_blocks;
};

// dW_ih, dW_hh, the bias gradients and dX (when dX is not null) of layer l, as GradTasks.
// Splitting over output rows/columns means no sum is ever split, so the thread count cannot
// change any result.
template <typename T>
void gemm_grads(const Geometry& g, const StackArgs& a, at::TensorList weights, int64_t l,
                const GradOperands<T>& p, std::vector<Tensor>& dweights, T* dX,
                int64_t threads) {
  const int64_t D = a.D, H = g.H, DH = g.DH(), KH = p.KH, DKH = D * KH, I = p.I;
  const int64_t rows = g.T * g.B;
  const GradTasks tasks(D, KH, H, I, rows, dX != nullptr);
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
  const bool nonfinite = !all_finite_on_threads<T>({{p.Hs, rows * DH}, {p.dGh, rows * DKH}},
                                                   threads);
  run_task_queue(tasks.count(), threads, [&](int64_t i) {
    const GradTasks::Task task = tasks[i];
    if (task.kind == GradTasks::kInputGrad) {
      gemm<T>(false, false, task.r1 - task.r0, I, DKH, p.dG + task.r0 * DKH, DKH, w_ih_all, I,
              T(0), dX + task.r0 * I, I);
      return;
    }
    const int64_t d = task.d, j0 = task.j0, m = task.m, n0 = task.n0, n = task.n;
    if (m == 0 || n == 0) return;
    const int64_t base = (l * D + d) * a.per_dir();
    const T* dgd = p.dG + d * KH + j0;    // columns j0..j0+m of direction d
    const T* dghd = p.dGh + d * KH + j0;
    if (task.kind == GradTasks::kInputWeights) {
      // dW_ih = dG^T X over all rows.
      gemm<T>(true, false, m, n, rows, dgd, DKH, p.X + n0, I, T(0),
              dweights[base].data_ptr<T>() + j0 * I + n0, I);
      return;
    }
    T* dW_hh = dweights[base + 1].data_ptr<T>() + j0 * H;
    const T* h0 = p.h0 ? p.h0 + d * g.B * H : nullptr;
    const T* hsd = p.Hs + d * H;
    if (nonfinite) {
      hidden_weight_grad_nonfinite<T>(g, int(d), m, n0, n, dghd, DKH, hsd, h0, dW_hh);
    } else {
      // dW_hh = sum_t dg_t^T h_{t-1}: h_{t-1} is the neighbouring row in time, a uniform
      // shift of st rows (one GEMM for time-major, one per batch row for batch_first).
      const int64_t K = g.sb == 1 ? (g.T - 1) * g.B : g.T - 1;
      const int64_t segments = K <= 0 ? 0 : g.sb == 1 ? 1 : g.B;
      for (int64_t seg = 0; seg < segments; ++seg) {
        const int64_t r = seg * g.sb;  // first row of the segment (t = 0)
        const T* A = d == 0 ? dghd + (r + g.st) * DKH : dghd + r * DKH;
        const T* Bm = d == 0 ? hsd + r * DH : hsd + (r + g.st) * DH;
        gemm<T>(true, false, m, n, K, A, DKH, Bm + n0, DH, seg == 0 ? T(0) : T(1), dW_hh + n0,
                H);
      }
      if (K <= 0) zero_columns(dW_hh, H, m, n0, n);
      // The first step of each row saw h0: forward at t = 0, reverse at t = lengths-1.
      if (h0) {
        std::vector<T> gather(size_t(g.B) * m);  // those steps' gate gradients, [B, m]
        for (int64_t b = 0; b < g.B; ++b) {
          const int64_t t0 = d == 0 ? 0 : (g.lengths ? g.lengths[b] - 1 : g.T - 1);
          std::memcpy(gather.data() + b * m, dghd + (t0 * g.st + b * g.sb) * DKH, sizeof(T) * m);
        }
        gemm<T>(true, false, m, n, g.B, gather.data(), m, h0 + n0, H, T(1), dW_hh + n0, H);
      }
    }
    if (n0 == 0 && a.has_biases) bias_grads<T>(p, dweights, base, d, j0, m, rows, DKH);
  });
}

// Rows of the long weight-gradient products per chunk on the bf16 tiles: a chunk's operands
// ([rows, 64] panels of bf16) stay in L2 while a block's tiles pass over them.
constexpr int64_t kBf16GradChunk = 256;
// Rows per task of the bf16 gradients' operand packing (even, so tasks own whole pairs).
constexpr int64_t kBf16PackRows = 512;

// gemm_grads on the bf16 tiles (tiles_bf16.h), in two task lists. First the operands, in
// pairs along the rows (the sum of the weight gradients): the gate gradients' bf16 copies (bf,
// written by BPTT), the layer's input, and each direction's previous hidden state of every row,
// zeros where there is none (no h0, or a padded step, whose gate gradients are zero too: the
// shifted sum, h0's term and padding are one form, and a NaN reaches dW_hh as in nn). Then the
// same GradTasks as gemm_grads; a weight gradient sums over the rows in chunks of
// kBf16GradChunk, added in order: the thread count cannot change a result. (The bias gradients
// come from BPTT, which sums them as it goes: no fp32 gate gradient rows are kept here, see
// GateGradients.)
template <typename T>
void gemm_grads_bf16(const Geometry& g, const StackArgs& a, at::TensorList weights, int64_t l,
                     const GradOperands<T>& p, const Bf16Backward& bf,
                     std::vector<Tensor>& dweights, T* dX, int64_t threads) {
  const int64_t D = a.D, H = g.H, DH = g.DH(), KH = p.KH, I = p.I;
  const int64_t rows = g.T * g.B, row_pairs = paired(rows) / 2;
  const GradTasks tasks(D, KH, H, I, rows, dX != nullptr);
  const bf16_bits* dG_bits = bf.dG;
  const bool split = bf.dGh != nullptr;
  const int64_t ldx = 2 * packed_columns(I), ldh = 2 * packed_columns(H);
  // (Every element is written by the packing tasks below, pads included.)
  const Bf16Buffer dG_pairs(kScratchBf16GradPairs, row_pairs * bf.ld * 2, false);
  const Bf16Buffer dGh_pairs =
      split ? Bf16Buffer(kScratchBf16GradPairsHidden, row_pairs * bf.ld * 2, false) : Bf16Buffer();
  const Bf16Buffer x_pairs(kScratchBf16InputPairs, row_pairs * ldx, false);
  const Bf16Buffer h_pairs(kScratchBf16StatePairs, D * row_pairs * ldh, false);
  // dX = dG [W_ih^f; W_ih^r]: W_ih's rows packed in pairs along the gate rows of both directions
  // (each direction's part padded as the gate gradients' rows are).
  std::vector<bf16_bits> w_ih_pairs;
  if (dX) {
    w_ih_pairs.resize(D * bf.direction_ld * packed_columns(I));
    pack_columns_in_pairs(
        D * bf.direction_ld, I,
        [&](int64_t r) -> const T* {
          const int64_t d = r / bf.direction_ld, j = r % bf.direction_ld;
          return j < KH ? weights[(l * D + d) * a.per_dir()].data_ptr<T>() + j * I : nullptr;
        },
        w_ih_pairs.data());
  }
  // The state before row r (time t, batch b) in direction d, or null for zeros.
  auto previous_state = [&](int64_t d, int64_t r) -> const T* {
    const int64_t t = g.sb == 1 ? r / g.B : r % g.T, b = g.sb == 1 ? r % g.B : r / g.T;
    if (!g.active(t, b)) return nullptr;
    const int64_t prev = g.previous_row(d, t, b);
    if (prev >= 0) return p.Hs + prev * DH + d * H;
    return p.h0 ? p.h0 + (d * g.B + b) * H : nullptr;
  };
  const int64_t n_pack = (rows + kBf16PackRows - 1) / kBf16PackRows;
  run_task_queue(n_pack * (2 + D), threads, [&](int64_t task) {
    const int64_t what = task / n_pack, r0 = (task % n_pack) * kBf16PackRows;
    const int64_t r1 = std::min(rows, r0 + kBf16PackRows);
    if (what == 0) {
      interleave_row_pairs(dG_bits, bf.ld, bf.ld, r0, r1, rows, dG_pairs.data);
      if (split) interleave_row_pairs(bf.dGh, bf.ld, bf.ld, r0, r1, rows, dGh_pairs.data);
    } else if (what == 1) {
      pack_columns_in_pairs(r1 - r0, I, [&](int64_t i) { return p.X + (r0 + i) * I; },
                            x_pairs.data + (r0 / 2) * ldx);
    } else {
      const int64_t d = what - 2;
      pack_columns_in_pairs(r1 - r0, H, [&](int64_t i) { return previous_state(d, r0 + i); },
                            h_pairs.data + (d * row_pairs + r0 / 2) * ldh);
    }
  });
  run_task_queue(tasks.count(), threads, [&](int64_t i) {
    const GradTasks::Task task = tasks[i];
    if (task.kind == GradTasks::kInputGrad) {
      bf16_gemm_into<T>(task.r1 - task.r0, I, D * bf.direction_ld, dG_bits + task.r0 * bf.ld,
                        bf.ld, w_ih_pairs.data(), 2 * packed_columns(I), T(0),
                        dX + task.r0 * I, I);
      return;
    }
    const bool hh = task.kind == GradTasks::kHiddenWeights;
    const int64_t d = task.d, j0 = task.j0, m = task.m, n0 = task.n0, n = task.n;
    if (m == 0 || n == 0) return;
    const int64_t base = (l * D + d) * a.per_dir(), N = hh ? H : I, ldb = hh ? ldh : ldx;
    T* dW = dweights[base + (hh ? 1 : 0)].data_ptr<T>() + j0 * N + n0;
    // Row j of A (the block's gate column j0 + j) pairs along the rows: a_row 2, a_pair 2 ld.
    const bf16_bits* A = (hh && split ? dGh_pairs : dG_pairs).data + (d * bf.direction_ld + j0) * 2;
    // Column c of B's row pair at 2 c.
    const bf16_bits* Bm = (hh ? h_pairs.data + d * row_pairs * ldh : x_pairs.data) + 2 * n0;
    for (int64_t r0 = 0; r0 < rows; r0 += kBf16GradChunk) {
      const int64_t rc = std::min(kBf16GradChunk, rows - r0);
      bf16_gemm_strided_into<T>(m, n, rc, A + (r0 / 2) * bf.ld * 2, 2, 2 * bf.ld,
                                Bm + (r0 / 2) * ldb, ldb, r0 == 0 ? T(0) : T(1), dW, N);
    }
  });
}

}  // namespace fastbirnn
