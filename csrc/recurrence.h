// The recurrence of one layer, both directions, on a team of workers: one forward loop and one
// backward (BPTT) loop, templated on the cell (cell_elman.h, cell_lstm.h, cell_gru.h).
//
// Parallelism comes from the machine, not from the number of directions: each direction's
// hidden units are split into fixed column blocks (geometry.h), both directions' blocks
// interleaved and dealt round-robin to a team of up to torch.get_num_threads() workers
// (team.h). Each worker keeps its blocks for the whole sequence (so its slice of W_hh stays in
// its core's cache) and the team meets at one barrier per step, unless each direction runs
// whole on one worker (a team of one or of D workers: steps_share_directions) or the team
// splits one direction's batch instead (batch_splits).
//
// Forward, each step: a block of w hidden units computes h_{t-1} W_hh^T for its K * w gate rows
// (one small product on W_hh rows packed once per layer), then the cell combines it with the
// input projection and the biases and writes h_t. Backward, each step, time reversed: a block
// first adds dG_{prev} W_hh[:, block] to its columns of h's gradient (reading every block's
// gate gradients, finished at the last barrier), then runs the cell's derivative on its
// columns. Nothing is ever summed across workers.
//
// Determinism: every product is a single-threaded BLAS call or register-tile loop on a block
// whose shape depends only on the problem, never on the thread count, so results are
// bit-identical for any torch.get_num_threads().
#pragma once

#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "geometry.h"
#include "matrix.h"
#include "team.h"
#include "tiles.h"
#include "tiles_bf16.h"

namespace fastbirnn {

// One layer's per-direction operands of the forward recurrence.
template <typename T>
struct ForwardOperands {
  const T* w_hh[2] = {nullptr, nullptr};    // [K*H, H] as nn stores it
  T* w_packed[2] = {nullptr, nullptr};      // [K*H*H] each, for pack_block, or null (unused)
  const T* bias[2] = {nullptr, nullptr};    // [K*H] input-side biases, or null
  const T* bias_h[2] = {nullptr, nullptr};  // the split gate's b_hh [H], or null
  const T* h0[2] = {nullptr, nullptr};      // [B,H], or null for zeros
  const T* c0[2] = {nullptr, nullptr};      // LSTM: [B,H], or null for zeros
  T* hn[2] = {nullptr, nullptr};            // [B,H] results
  T* cn[2] = {nullptr, nullptr};
};

// Whether the forward packs W_hh's blocks at all: for the register tiles, and for a gated cell
// on BLAS (its K gate rows of a block are not contiguous in W_hh; the Elman cell's are).
inline bool forward_packs(const Geometry& g, int64_t gates, int64_t element_size) {
  return forward_block_tiles(g, gates, element_size) || gates > 1;
}

// Packs block [j0, j0 + w) of a weight [K*H, C] (its K*w gate rows, nn's gate order; W_hh with
// C = H, or W_ih with C = I) for a per-step product v W_block^T: as the [C, K*w] panel
// small_gemm's register tiles read where `tiles`, else as those rows, contiguous, for one BLAS
// call. The blocks of a direction tile its [K*H*C] buffer in order.
template <typename T>
void pack_block(const T* weight, int64_t K, int64_t H, int64_t C, int64_t j0, int64_t w,
                bool tiles, T* packed) {
  T* block = packed + K * j0 * C;
  const int64_t n_all = K * w;
  for (int64_t q = 0; q < K; ++q) {
    const T* rows = weight + (q * H + j0) * C;  // the gate's w rows of the block
    if (tiles)  // into columns q * w.. of the panel: a blocked transpose, not a strided scatter
      transpose_strided(rows, C, w, C, block + q * w, n_all);
    else
      std::memcpy(block + q * w * C, rows, sizeof(T) * w * C);
  }
}

// pack_block for the bf16 tiles: block [j0, j0 + w)'s K*w gate rows of a weight [K*H, C],
// packed in pairs along C (tiles_bf16.h, pack_rows_in_pairs).
template <typename T>
void pack_block_in_pairs(const T* weight, int64_t K, int64_t H, int64_t C, int64_t j0, int64_t w,
                         bf16_bits* packed) {
  pack_rows_in_pairs(
      C, K * w, [&](int64_t n) { return weight + ((n / w) * H + j0 + n % w) * C; }, packed);
}

// The input projection step by step, for inference with a gated cell (and for the in-place
// Elman cell, whose rows are its output's): each block computes its own gate rows of x_t W_ih^T
// just before its cell reads them, into a buffer every step reuses (in place: the output rows),
// instead of the whole layer's before the first step (whose rows, megabytes apart from the
// cell's reads, came back from memory: the LSTM cell's loads of them stalled). The products
// are the projection's own (the register tiles, each element summed in the same order), so the
// results are the same bits either way.
// A bf16 call on the bf16 tiles reads x_t as bf16 (x_bf16) and each block's gate rows of W_ih
// packed in pairs by its owner (w_pairs) instead.
template <typename T>
struct StepProjection {
  const T* X = nullptr;  // the layer's input [rows, I], in the geometry's row layout
  int64_t I = 0;
  const T* w_ih[2] = {nullptr, nullptr};  // [K*H, I] as nn stores it
  T* w_packed[2] = {nullptr, nullptr};    // [K*H*I] each: W_ih's blocks for pack_block's tiles
  const T* bias[2] = {nullptr, nullptr};  // [K*H] input-side biases laid out as `gates`, or null
  T* gates = nullptr;  // [D, B, K*H]: each block's K*w gate rows of the step, laid out as hid
  const bf16_bits* x_bf16 = nullptr;  // the bf16 tiles: X's rows as bf16, x_ld apart; else null
  int64_t x_ld = 0;
  bf16_bits* w_pairs = nullptr;  // the bf16 tiles: block k's K*w rows of W_ih in pairs at
  int64_t pairs_stride = 0;      // k * pairs_stride
};

// A direction's [K*H] vector (gate q at q * H) laid out as the step projection's gate rows:
// block [j0, j0 + w) at K * j0, its gate q at q * w.
template <typename T>
void to_block_layout(const T* v, int64_t K, const Blocks& blk, T* out) {
  for (int64_t j0 = 0; j0 < blk.H; j0 += blk.width) {
    const int64_t w = std::min(blk.width, blk.H - j0);
    for (int64_t q = 0; q < K; ++q)
      std::memcpy(out + K * j0 + q * w, v + q * blk.H + j0, sizeof(T) * w);
  }
}

// Copies (or zeroes, for a null init) columns [j0, j0 + w) of B rows of H.
template <typename T>
void copy_block(const T* init, T* dst, int64_t B, int64_t H, int64_t j0, int64_t w) {
  for (int64_t b = 0; b < B; ++b) {
    if (init)
      std::memcpy(dst + b * H + j0, init + b * H + j0, sizeof(T) * w);
    else
      std::memset(dst + b * H + j0, 0, sizeof(T) * w);
  }
}

// Asks for rows a block reads (or, with `write`, writes) at a coming step to be brought into
// L2 while the step's product runs: `gates` runs of w columns, gate_stride apart, in each of
// `rows` batch rows, row_stride apart. The projection writes all steps' gates before the
// recurrence (the forward writes what the backward reads), so a step's rows otherwise come
// from L3 or memory as the cell reaches them. Only a hint: it changes no result.
template <bool write = false, typename T>
void prefetch_rows(const T* first, int64_t rows, int64_t row_stride, int64_t gates,
                   int64_t gate_stride, int64_t w) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t b = 0; b < rows; ++b)
    for (int64_t q = 0; q < gates; ++q) {
      const T* p = first + b * row_stride + q * gate_stride;
      for (int64_t j = 0; j < w; j += kLine) __builtin_prefetch(p + j, write ? 1 : 0, 2);
    }
}

// Whether a step reads what other workers wrote in the step before: each block reads all of
// its direction's h_{t-1} (BPTT: its dG). Blocks go round-robin to workers (Team::Member::owns)
// and block k belongs to direction k % D (Blocks::dir), so in a team of 1 or of D workers each
// direction runs whole on one worker: the directions then run apart, with no barrier per step,
// and a worker held up (descheduled, or slower) delays only its own direction.
inline bool steps_share_directions(const Team::Member& m, const Blocks& blk) {
  return blk.D % m.team_size() != 0;
}

// Where a team of one direction would share it (steps_share_directions), the forward and BPTT
// split the batch instead: part p of `workers` takes rows [r0, r1) of every step and runs the
// whole recurrence on them alone, a team of one, with its own state and carry (stack.cpp).
// Rows never read each other's state, so there is no barrier per step, and each part does
// every block's columns, so no worker waits on an uneven share of the blocks (64-column blocks
// split H 200 as 128 / 72 over two workers); each part packs its own copy of the weights'
// blocks. Each row's products and cell are the same arithmetic whichever rows share a tile,
// so the split changes no result. Only on the register tiles (a BLAS call's result may depend
// on its row count), for fp32/fp64 calls, with at least kBatchSplitRows rows per part (two
// row tiles: at 8 rows per part, a 2-row tail tile, inference read 0.81-0.88x across
// processes) and W_hh within kBatchSplitWeightBytes (each part's copy in its core's L2; at
// 1 MiB, LSTM H 256, a tie).
// In-process A/B on 2-core Zen 5, one direction, column blocks / batch split. Inference:
// LSTM (32, 60, 100, 160) 1.18x, H 192 1.22x, H 200 1.21x, (32, 128, 128, 128) 1.05x,
// H 224 1.09x, H 256 1.00x, (24, 40, 300, 128) 1.11x, (64, 60, 300, 192) 1.24x; GRU
// (32, 60, 100, 200) 1.19x, (64, 40, 300, 192) 1.04x, (32, 128, 128, 256) 1.01x; Elman
// (32, 60, 100, 320) 1.55x, (256, 32, 128, 128) 1.19x, (64, 128, 256, 256) 1.02x,
// (32, 128, 128, 512) 1.23x. Training step (forward and BPTT split): LSTM (32, 60, 100, 192)
// 1.20x, (64, 30, 100, 200) 1.06x, (32, 128, 128, 128) 1.05x, (32, 40, 100, 256) 1.01x,
// (24, 40, 100, 160) 1.10x, (128, 30, 100, 128) 1.00x, H 224 1.04x, (24, 40, 300, 128) two
// layers 1.03x; GRU (32, 60, 100, 200) 1.08x, (64, 40, 300, 192) 1.09x, (32, 128, 128, 256)
// 1.08x; Elman (32, 60, 100, 320) 1.26x, (256, 32, 128, 128) 1.01x, (64, 128, 256, 256) 0.99x.
constexpr int64_t kBatchSplitRows = 12;
constexpr int64_t kBatchSplitWeightBytes = int64_t(1) << 20;

struct BatchPart {
  Geometry g;  // the part's rows as a call of their own (pointers offset by r0 * sb rows)
  int64_t r0;
  // A buffer's rows from the part's first, `width` elements per batch row (null stays null).
  template <typename P>
  P* rows(P* p, int64_t width) const {
    return p ? p + r0 * width : p;
  }
  // Points each of a layer's per-direction [B, H] states (two pointers each) at its rows.
  template <typename... States>
  void state_rows(int64_t H, States&... states) const {
    for (int d = 0; d < 2; ++d) ((states[d] = rows(states[d], H)), ...);
  }
};

inline BatchPart batch_part(const Geometry& g, int64_t parts, int64_t part) {
  const int64_t r0 = g.B * part / parts, r1 = g.B * (part + 1) / parts;
  Geometry sub = g;
  sub.B = r1 - r0;
  sub.lengths = g.lengths ? g.lengths + r0 : nullptr;
  return {sub, r0};
}

// Runs fn(one, part, bp) on each batch part member m owns, as a team of one.
template <typename F>
void run_batch_parts(Team::Member& m, const Geometry& g, int64_t parts, const F& fn) {
  for (int64_t part = m.first(); part < m.last(); ++part) {
    const BatchPart bp = batch_part(g, parts, part);
    Team(1).run([&](Team::Member& one) { fn(one, part, bp); });
  }
}

inline bool batch_splits(const Geometry& g, int64_t gates, int64_t workers,
                         int64_t element_size) {
  if (workers <= 1 || g.D != 1 || g.round_bf16 || !have_gemm_tiles()) return false;
  const int64_t rows_per_part = g.B / workers;
  // The parts' products must take the same path as the whole call's (forward_block_tiles).
  return rows_per_part >= kBatchSplitRows && g.T * rows_per_part >= 64 &&
         gates * g.H * g.H * element_size <= kBatchSplitWeightBytes;
}

// In: G holds x W_ih^T (K*H columns per direction), or is null where `step` projects each step
// instead (inference with a gated cell: StepProjection; in place, G is Hs and each step writes
// its rows' projection there first). Out: Hs holds h_t (zero past each row's length), hn/cn
// the final states; in training (S not null) G the activated gates and S the cell's saved
// values. An in-place cell (Elman) has G == Hs. state: D * 2 * B * H (each direction's h_{t-1}
// and h_t, swapped every step); cstate: D * B * H (LSTM's c, block-local: updated in place);
// hid: D * B * K*H (each block's h_{t-1} W_hh^T; unused in place). At step s every block reads
// all of h_{s-1} and writes its own columns of h_s into the other buffer: one barrier per step
// where workers share a direction (steps_share_directions).
//
// A bf16 call (g.round_bf16): the products read h_{t-1} rounded to bf16, and the outputs Hs
// are rounded too (the state and the final states are not). rounded: that copy of state in
// fp32, for the fp32 products; or, where the bf16 tiles run the products (tiles_bf16.h),
// bf16 holds the packed W_hh blocks and the bf16 state instead (rounded null).
template <typename T, typename Cell>
void recurrence_forward_team(Team::Member& m, const Geometry& g, const Blocks& blk,
                             const Cell& cell, T* G, T* Hs, T* S, const ForwardOperands<T>& p,
                             T* state, T* rounded, const Bf16Forward* bf16, T* cstate,
                             T* hid, const StepProjection<T>* step = nullptr) {
  constexpr int64_t K = Cell::kGates;
  const int64_t H = g.H, B = g.B, KH = K * H, DH = g.DH(), DKH = g.D * KH, nb = blk.count();
  const bool tiles = forward_block_tiles(g, K, sizeof(T));
  auto buffer = [&](int64_t d, int64_t s) { return state + (d * 2 + (s & 1)) * B * H; };
  // What the per-step product reads: h_{t-1} itself, or rounded to bf16 (the cell still
  // gets it in fp32).
  auto operand = [&](int64_t d, int64_t s) {
    return rounded ? rounded + (d * 2 + (s & 1)) * B * H : buffer(d, s);
  };
  // The bf16 tiles' h_{t-1}: rows of Hp = paired(H) bf16 values (an odd H's pad stays zero).
  const bool on_bf16 = bf16 && bf16->w_hh;
  const int64_t Hp = paired(H);
  auto operand_bf16 = [&](int64_t d, int64_t s) {
    return bf16->state + (d * 2 + (s & 1)) * B * Hp;
  };
  auto block_bf16 = [&](int64_t k) { return bf16->w_hh + k * bf16->block_stride; };
  for (int64_t k = 0; k < nb; ++k) {
    if (!m.owns(k)) continue;
    const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
    copy_block(p.h0[d], buffer(d, 0), B, H, j0, w);
    if (rounded) copy_block(p.h0[d], operand(d, 0), B, H, j0, w);  // h0 comes as bf16
    if (Cell::kCellState) copy_block(p.c0[d], cstate + d * B * H, B, H, j0, w);
    // Each worker packs its own blocks: they stay in its core's cache for every step.
    if (on_bf16) {  // the block's gate rows packed in pairs, and h0 as bf16
      pack_block_in_pairs(p.w_hh[d], K, H, H, j0, w, block_bf16(k));
      for (int64_t b = 0; b < B; ++b) {
        bf16_bits* dst = operand_bf16(d, 0) + b * Hp + j0;
        if (p.h0[d])
          to_bf16_row(p.h0[d] + b * H + j0, w, dst);
        else
          std::memset(dst, 0, sizeof(bf16_bits) * w);
      }
    } else if (p.w_packed[d]) {
      pack_block(p.w_hh[d], K, H, H, j0, w, tiles, p.w_packed[d]);
    }
    if (step && step->x_bf16)
      pack_block_in_pairs(step->w_ih[d], K, H, step->I, j0, w,
                          step->w_pairs + k * step->pairs_stride);
    else if (step)
      pack_block(step->w_ih[d], K, H, step->I, j0, w, /*tiles=*/true, step->w_packed[d]);
  }
  m.sync();  // also orders the input projection before its first use
  const bool steps_meet = steps_share_directions(m, blk);
  for (int64_t s = 0; s < g.T; ++s) {
    for (int64_t k = 0; k < nb; ++k) {
      if (!m.owns(k)) continue;
      const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
      const int64_t t = g.step(d, s);
      const T* prev = buffer(d, s);
      T* next = buffer(d, s + 1);
      const T* prev_operand = operand(d, s);
      T* next_operand = operand(d, s + 1);
      const int64_t bound = g.active_bound(t);
      if (s + 1 < g.T) {
        const int64_t t_next = g.step(d, s + 1);
        if (step && step->x_bf16)  // the rows of x the next step's projection reads
          prefetch_rows(step->x_bf16 + t_next * g.st * step->x_ld, g.active_bound(t_next),
                        g.sb * step->x_ld, 1, 0, step->I);
        else if (step)
          prefetch_rows(step->X + t_next * g.st * step->I, g.active_bound(t_next),
                        g.sb * step->I, 1, 0, step->I);
        else
          prefetch_rows(G + t_next * g.st * DKH + d * KH + j0, g.active_bound(t_next),
                        g.sb * DKH, Cell::kInPlace ? 1 : K, H, w);
      }
      // h_{t-1} W_hh^T for the block's K * w gate rows (below) goes onto the projection in
      // the output row (in place), else into the block's rows of hid.
      T* product = Cell::kInPlace ? G + t * g.st * DKH + d * KH + j0 : hid + d * B * KH + K * j0;
      const int64_t ldp = Cell::kInPlace ? g.sb * DKH : KH;
      // The block's gate rows of the step: G's, or (step projection) x_t W_ih^T for its K * w
      // gate rows, computed now, with gate stride w (an in-place cell's are its output rows,
      // where the product then adds to them).
      T* const step_gates = !step            ? nullptr
                            : Cell::kInPlace ? product
                                             : step->gates + d * B * KH + K * j0;
      const int64_t step_ld = Cell::kInPlace ? ldp : KH;
      if (step && step->x_bf16)
        bf16_gemm_into<T>(bound, K * w, step->I, step->x_bf16 + t * g.st * step->x_ld,
                          g.sb * step->x_ld, step->w_pairs + k * step->pairs_stride,
                          2 * packed_columns(K * w), T(0), step_gates, step_ld);
      else if (step)
        tiled_gemm<T>(bound, K * w, step->I, step->X + t * g.st * step->I, g.sb * step->I,
                      step->w_packed[d] + K * j0 * step->I, K * w, T(0), step_gates, step_ld);
      const T beta = Cell::kInPlace ? T(1) : T(0);
      const T* block = p.w_packed[d] ? p.w_packed[d] + K * j0 * H : p.w_hh[d] + j0 * H;
      if (on_bf16)
        bf16_gemm_into<T>(bound, K * w, H, operand_bf16(d, s), Hp, block_bf16(k),
                          2 * packed_columns(K * w), beta, product, ldp);
      else if (!tiles)
        gemm<T>(false, true, bound, K * w, H, prev_operand, H, block, H, beta, product, ldp);
      else if (Cell::kInPlace)  // one panel, summed over all of H and added once to x W_ih^T
        small_gemm<T>(bound, K * w, H, prev_operand, H, block, K * w, beta, product, ldp);
      else
        tiled_gemm<T>(bound, K * w, H, prev_operand, H, block, K * w, beta, product, ldp);
      const T* bias = step          ? (step->bias[d] ? step->bias[d] + K * j0 : nullptr)
                      : p.bias[d] ? p.bias[d] + j0
                                  : nullptr;
      const T* bias_h = p.bias_h[d] ? p.bias_h[d] + j0 : nullptr;
      // A cell that does not read h_{t-1} (the LSTM's reaches h_t only through the gates)
      // writes h_t straight into the state the next step reads, and the output row gets a
      // copy: the output rows are cold, and the cell's stores waited on them (LSTM inference
      // 4-7 % faster). The GRU, which reads h_{t-1} from the other state buffer, B * H
      // elements away (a multiple of 4 KiB at B 32, H 128: 4 K aliasing, likely), ran 8-13 %
      // slower so; it and the in-place Elman cell write the output row first.
      constexpr bool kIntoState = !Cell::kInPlace && !Cell::kHiddenCarry;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = t * g.st + b * g.sb;
        T* h = Hs + row * DH + d * H + j0;
        if (b < bound && g.active(t, b)) {
          T* h_next = next + b * H + j0;
          cell.forward(Cell::kInPlace ? h
                       : step         ? step_gates + b * KH
                                      : G + row * DKH + d * KH + j0,
                       step ? w : H,
                       Cell::kInPlace ? nullptr : product + b * KH, bias, bias_h,
                       prev + b * H + j0,
                       Cell::kCellState ? cstate + (d * B + b) * H + j0 : nullptr,
                       kIntoState ? h_next : h, S ? S + row * DH + d * H + j0 : nullptr, w);
          if (kIntoState)
            std::memcpy(h, h_next, sizeof(T) * w);
          else
            std::memcpy(h_next, h, sizeof(T) * w);
          if (rounded) {  // the output and the next product's operand are bf16
            round_to_bf16(h, w);
            std::memcpy(next_operand + b * H + j0, h, sizeof(T) * w);
          }
          if (on_bf16) round_to_bf16(h, w, operand_bf16(d, s + 1) + b * Hp + j0);
        } else {
          std::memset(h, 0, sizeof(T) * w);
          std::memcpy(next + b * H + j0, prev + b * H + j0, sizeof(T) * w);
          if (rounded)
            std::memcpy(next_operand + b * H + j0, prev_operand + b * H + j0, sizeof(T) * w);
          if (on_bf16)
            std::memcpy(operand_bf16(d, s + 1) + b * Hp + j0, operand_bf16(d, s) + b * Hp + j0,
                        sizeof(bf16_bits) * w);
        }
      }
    }
    // (After the last step each block reads only its own columns.)
    if (s + 1 < g.T && steps_meet) m.sync();
  }
  for (int64_t k = 0; k < nb; ++k) {
    if (!m.owns(k)) continue;
    const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
    copy_block<T>(buffer(d, g.T), p.hn[d], B, H, j0, w);
    if (Cell::kCellState) copy_block<T>(cstate + d * B * H, p.cn[d], B, H, j0, w);
  }
}

// One layer's per-direction operands of the backward recurrence.
template <typename T>
struct BackwardOperands {
  const T* w_hh[2] = {nullptr, nullptr};  // [K*H, H] as nn stores it
  const T* h0[2] = {nullptr, nullptr};    // [B,H] or null (zeros)
  const T* c0[2] = {nullptr, nullptr};
  const T* dhn[2] = {nullptr, nullptr};   // gradients of the final states, or null
  const T* dcn[2] = {nullptr, nullptr};
  T* dh0[2] = {nullptr, nullptr};         // results
  T* dc0[2] = {nullptr, nullptr};
};

// A gate gradient row's bf16 bits, its rounded values added to `sums` where not null.
template <typename T>
void keep_bf16_row(const T* row, int64_t n, bf16_bits* bits, T* sums) {
  if (sums)
    to_bf16_row_adding(row, n, bits, sums);
  else
    to_bf16_row(row, n, bits);
}

// Where BPTT puts the gate gradients. fp32 and fp64 calls keep every step's rows (dG, dGh) for
// the gradient products after it. On the bf16 tiles those products read only the rows' bf16
// copies (Bf16Backward), so no fp32 row is kept: the cell writes each into its block's
// `block_rows`, and the bias gradients, the rows' one other reader, are summed as the steps go
// (a block's owner adds its columns in step order: no thread count changes a sum). At a large
// shape the kept rows were 400 MB of fresh pages per bf16 GRU training step.
template <typename T>
struct GateGradients {
  T* dG = nullptr;           // [rows, D*K*H] (zero at padded steps); not on the bf16 tiles
  T* dGh = nullptr;          // the same buffer unless the cell has a split gate
  T* block_rows = nullptr;   // bf16 tiles only: 2 * K*H per column block (dG's row, dGh's)
  T* bias = nullptr;         // bf16 tiles with biases: [D, K*H], the sums of dG's rows
  T* bias_hidden = nullptr;  // and of dGh's where the cell has a split gate
};

// BPTT, time reversed. dOut (may be null) and Hs share the row layout; G holds the activated
// gates (Hs itself for an in-place cell) and S the cell's saved values (null in place). What
// else flows back in time (LSTM's dc, GRU's dh * z) stays in the block. Writes the gate
// gradients (see GateGradients) and dh0/dc0.
// scratch: D * 3 * B * H (carry, tmp and dc per direction). Carry columns are only ever
// touched by their block's owner, so one barrier per step suffices, and none where no worker
// shares a direction (steps_share_directions).
template <typename T, typename Cell>
void recurrence_backward_team(Team::Member& m, const Geometry& g, const Blocks& blk,
                              const Cell& cell, const T* dOut, const T* Hs, const T* G,
                              const T* S, const GateGradients<T>& out,
                              const BackwardOperands<T>& p, T* scratch,
                              const Bf16Backward* bf16 = nullptr) {
  constexpr int64_t K = Cell::kGates;
  const int64_t H = g.H, B = g.B, KH = K * H, DH = g.DH(), DKH = g.D * KH, nb = blk.count();
  const int64_t ldg = g.sb * DKH;  // between batch rows of one step in dG
  auto carry_of = [&](int64_t d) { return scratch + d * 3 * B * H; };  // then tmp, then dc
  // On the bf16 tiles (tiles_bf16.h): the gate gradients' bf16 copies and W_hh's packed columns.
  bf16_bits* const dG_bits = bf16 ? bf16->dG : nullptr;
  bf16_bits* const dGh_bits = !bf16 ? nullptr : bf16->dGh ? bf16->dGh : bf16->dG;
  T* const dG = out.dG;
  T* const dGh = out.dGh;
  const bool rows_kept = out.block_rows == nullptr;
  auto columns_bf16 = [&](int64_t k) { return bf16->w_hh + k * bf16->block_stride; };
  for (int64_t k = 0; k < nb; ++k) {
    if (!m.owns(k)) continue;
    const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
    copy_block(p.dhn[d], carry_of(d), B, H, j0, w);
    if (Cell::kCellState) copy_block(p.dcn[d], carry_of(d) + 2 * B * H, B, H, j0, w);
    if (bf16) {
      const T* w_hh = p.w_hh[d];
      pack_columns_in_pairs(KH, w, [&](int64_t r) { return w_hh + r * H + j0; },
                            columns_bf16(k));
    }
  }
  // s = -1 is the last carry update only: dh0 gets dGh_{first step} W_hh for the active rows.
  const bool steps_meet = steps_share_directions(m, blk);
  for (int64_t s = g.T - 1; s >= -1; --s) {
    for (int64_t k = 0; k < nb; ++k) {
      if (!m.owns(k)) continue;
      const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
      T* carry = carry_of(d);
      T* tmp = carry + B * H;
      T* dc = tmp + B * H;
      if (s >= 0) {  // what the cell reads and writes after the product below
        const int64_t t = g.step(d, s), rows = g.active_bound(t), first = t * g.st * DH + d * H + j0;
        prefetch_rows(G + t * g.st * DKH + d * KH + j0, rows, ldg, K, H, w);
        if (rows_kept)
          prefetch_rows</*write=*/true>(dG + t * g.st * DKH + d * KH + j0, rows, ldg, K, H, w);
        if (rows_kept && dGh != dG)
          prefetch_rows</*write=*/true>(dGh + t * g.st * DKH + d * KH + j0, rows, ldg, K, H, w);
        if (S) prefetch_rows(S + first, rows, g.sb * DH, 1, 0, w);
        if (dOut) prefetch_rows(dOut + first, rows, g.sb * DH, 1, 0, w);
      }
      if (s + 1 < g.T) {
        // Rows active at the previous step get dGh W_hh added to the part the cell left
        // (GRU) or in place of it; the others keep their carry.
        const int64_t tp = g.step(d, s + 1);
        const int64_t bound = g.active_bound(tp);
        const bool all_active = g.all_active_below(tp, bound);
        T* target = all_active ? carry : tmp;
        const T beta = all_active && Cell::kHiddenCarry ? T(1) : T(0);
        if (bf16)
          bf16_gemm_into<T>(bound, w, KH, dGh_bits + tp * g.st * bf16->ld + d * bf16->direction_ld,
                            g.sb * bf16->ld, columns_bf16(k), 2 * packed_columns(w), beta,
                            target + j0, H);
        else if (H <= kSmallHidden)  // W_hh's columns [j0, j0 + w) are a [K*H, w] panel as they are
          small_gemm<T>(bound, w, KH, dGh + tp * g.st * DKH + d * KH, ldg, p.w_hh[d] + j0, H,
                        beta, target + j0, H);
        else
          gemm<T>(false, false, bound, w, KH, dGh + tp * g.st * DKH + d * KH, ldg, p.w_hh[d] + j0,
                  H, beta, target + j0, H);
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
        T* const block_rows = rows_kept ? nullptr : out.block_rows + k * 2 * KH + j0;
        T* const bias = out.bias ? out.bias + d * KH + j0 : nullptr;
        T* const bias_hidden = out.bias_hidden ? out.bias_hidden + d * KH + j0 : nullptr;
        for (int64_t b = 0; b < B; ++b) {
          const int64_t row = t * g.st + b * g.sb;
          T* dgx = rows_kept ? dG + row * DKH + d * KH + j0 : block_rows;
          T* dgh = rows_kept ? dGh + row * DKH + d * KH + j0
                      : Cell::kSplitGate >= 0 ? block_rows + KH : block_rows;
          bf16_bits* bits = bf16 ? dG_bits + row * bf16->ld + d * bf16->direction_ld + j0 : nullptr;
          bf16_bits* bits_h =
              bf16 && bf16->dGh ? bf16->dGh + row * bf16->ld + d * bf16->direction_ld + j0 : nullptr;
          if (!g.active(t, b)) {
            for (int64_t q = 0; q < K; ++q) {
              if (rows_kept) std::memset(dgx + q * H, 0, sizeof(T) * w);
              if (rows_kept && dgh != dgx) std::memset(dgh + q * H, 0, sizeof(T) * w);
              if (bits) std::memset(bits + q * H, 0, sizeof(bf16_bits) * w);
              if (bits_h) std::memset(bits_h + q * H, 0, sizeof(bf16_bits) * w);
            }
            continue;
          }
          const int64_t prev = g.previous_row(d, t, b);
          const T* h_prev = prev >= 0 ? Hs + prev * DH + d * H + j0
                                      : p.h0[d] ? p.h0[d] + b * H + j0 : nullptr;
          const T* c_prev = !Cell::kCellState ? nullptr
                            : prev >= 0       ? S + prev * DH + d * H + j0
                            : p.c0[d]         ? p.c0[d] + b * H + j0
                                              : nullptr;
          const int64_t at = row * DH + d * H + j0;
          cell.backward(G + row * DKH + d * KH + j0, H, S ? S + at : nullptr, h_prev, c_prev,
                        dOut ? dOut + at : nullptr, carry + b * H + j0, dc + b * H + j0, dgx,
                        dgh, w);
          if (!rows_kept) {  // the bf16 tiles: the bits, and the bias sums of the rounded values
            for (int64_t q = 0; q < K; ++q) {
              keep_bf16_row(dgx + q * H, w, bits + q * H, bias ? bias + q * H : nullptr);
              if (bits_h)
                keep_bf16_row(dgh + q * H, w, bits_h + q * H,
                              bias_hidden ? bias_hidden + q * H : nullptr);
            }
          } else if (g.round_bf16) {  // every product reading them takes them as bf16
            for (int64_t q = 0; q < K; ++q) {
              round_to_bf16(dgx + q * H, w);
              if (dgh != dgx) round_to_bf16(dgh + q * H, w);
            }
          }
        }
      }
    }
    if (s >= 0 && steps_meet) m.sync();
  }
  for (int64_t k = 0; k < nb; ++k) {
    if (!m.owns(k)) continue;
    const int64_t d = blk.dir(k), j0 = blk.j0(k), w = blk.cols(k);
    copy_block<T>(carry_of(d), p.dh0[d], B, H, j0, w);
    if (Cell::kCellState) copy_block<T>(carry_of(d) + 2 * B * H, p.dc0[d], B, H, j0, w);
  }
}

}  // namespace fastbirnn
