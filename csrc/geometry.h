// The shape of one call as the engine sees it: the row layout of activations, the fixed split
// of hidden units into column blocks, and how many workers a recurrence gets.
//
// Layout: activations are "rows" of width D*H (or D*K*H for K gates); row (t, b) sits at
// t*st + b*sb, with (st, sb) = (B, 1) for time-major input and (1, T) for batch_first, so
// batch_first needs no transposes.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "matrix.h"
#include "tiles.h"

namespace fastbirnn {

struct Geometry {
  int64_t T, B, D, H;
  int64_t st, sb;            // row strides of time and batch (in rows)
  const int64_t* lengths;    // [B] or nullptr (every row runs T steps)
  // The bfloat16 engine (fp32 buffers, a bf16 call): every product takes its operands rounded
  // to bf16 (h_{t-1}, the layers' outputs, the gate gradients; inputs and weights come as bf16),
  // while the state, the cell's arithmetic and every sum stay fp32 (bf16.h).
  bool round_bf16 = false;
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

// Hidden sizes up to this are one block per direction, multiplied on small_gemm (register tiles,
// or plain loops without AVX-512); above it, each direction's hidden units are split into
// blocks of kBlockWidth columns (a multiple of the AVX-512 width; 16 blocks at H = 1024).
constexpr int64_t kSmallHidden = 64;
constexpr int64_t kBlockWidth = 64;
// The widest block a cell is handed (its stack buffers hold one block).
constexpr int64_t kMaxBlock = 64;
static_assert(kBlockWidth <= kMaxBlock && kSmallHidden <= kMaxBlock,
              "a cell's stack buffers hold one block");
// Input projections over at most this many rows (T*B) skip BLAS when the sizes are small too.
constexpr int64_t kSmallRows = 256;

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

inline Blocks column_blocks(int64_t D, int64_t H) {
  const int64_t width = H <= kSmallHidden ? H : kBlockWidth;
  return {D, H, width, (H + width - 1) / width};
}

// Below this many multiply-adds in all a parallel region costs more than it saves.
inline bool worth_threads(int64_t flops) { return flops >= (int64_t(1) << 18); }
// Each worker should have at least this many multiply-adds per step, or the barrier dominates.
constexpr int64_t kMinStepWork = int64_t(1) << 14;

// Whether the forward's per-step products over `rows` rows (T * B) of a W_hh of `bytes` per
// direction run on the register tiles from its blocks packed once per call, rather than on BLAS
// reading W_hh as it is. Packing moves the weight once; the tiles then beat BLAS (gemv at batch
// 1) on every row. Break-even (2-core Zen 4, batch 1, I = H) grows with the weight as it falls
// out of the caches: about 8 rows for Elman H 256, 14-20 for LSTM H 256-384, 30 for LSTM H 512,
// 40 for Elman H 1024, over 32 for LSTM H 1024: one row per 96 KiB of weight, from 16 rows up to
// 64 (where it was fixed before the transposes were vectorised).
// Where the transposes are scalar copies (fp64; matrix.h) it keeps the 64 rows of before (from
// 16 rows fp64 lost up to 18 % at H 512, batch 8).
inline bool packs_weights(int64_t rows, int64_t bytes, int64_t element_size) {
  if (!transposes_in_vectors(element_size)) return rows >= 64;
  return rows >= std::clamp<int64_t>(bytes / (int64_t(96) << 10), 16, 64);
}

// Whether the forward's per-step block products run on small_gemm, from W_hh blocks packed
// once per layer (register tiles where the CPU has them; plain loops below kSmallHidden), or
// on BLAS calls. (The backward reads W_hh's columns as they are: gemm picks the tiles itself.)
inline bool forward_block_tiles(const Geometry& g, int64_t gates, int64_t element_size) {
  return g.H <= kSmallHidden ||
         (have_gemm_tiles() &&
          packs_weights(g.T * g.B, gates * g.H * g.H * element_size, element_size));
}

// Workers for the recurrence: up to torch.get_num_threads(), at most one per block, fewer when
// the per-step work is too small to pay for the barrier. Changes speed only, never results.
inline int64_t team_size(const Geometry& g, const Blocks& blk, int64_t gates) {
  const int64_t per_step = gates * g.D * g.B * g.H * g.H;
  if (!worth_threads(per_step * g.T)) return 1;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), blk.count());
  // One worker per direction meets no barrier per step (recurrence.h, steps_share_directions):
  // the floor on each worker's step, which is there for the barrier, does not hold it back.
  if (g.D > 1 && threads >= g.D && per_step / kMinStepWork < g.D) return g.D;
  return std::max<int64_t>(1, std::min<int64_t>(threads, per_step / kMinStepWork));
}

// Fixed (thread-count independent) split of `rows` into blocks for row-parallel GEMMs.
inline int64_t row_blocks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(32, rows / 256));
}

}  // namespace fastbirnn
