"""Where ``'auto'`` runs the fused C++ kernel on CPU, and where it hands the call to the nn
class (nn.RNN, nn.LSTM, nn.GRU).

The one place this decision is made. It is derived from the committed CPU grids
(``benchmarks/results/cpu-grid/`` for the Elman cell, ``cpu-grid-lstm/`` and ``cpu-grid-gru/``,
reproduced by ``python benchmarks/cpu_grid.py [--cell lstm|gru]``): every grid point records
the nn class's and the fused kernel's medians for inference and a training step, and
``benchmarks/cpu_grid.py --check`` reports any point where this rule picks the slower one.

Where the kernel wins, and why: it saves nn.RNN's per-step dispatch (several ATen ops a step
and direction), fuses bias and activation into the step, and runs both directions at once.
That saving is large against small per-step products and vanishes once each step is a big
GEMM, where both run at the GEMM's rate; the rule then keeps nn.RNN, which is never slower
there than our single-threaded-BLAS blocks by more than noise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class CallShape:
    """What ``'auto'`` knows about one call (``FastBiRNN.selected_backend`` fills it)."""

    batch: int
    seq: int
    hidden: int
    layers: int
    bidirectional: bool
    dtype: torch.dtype
    training: bool  # an autograd graph will be recorded (a training step follows)
    threads: int  # torch.get_num_threads() at the call
    cell: str = "rnn"  # 'rnn', 'lstm' or 'gru'
    proj_size: int = 0  # LSTM projections, which the engine does not have
    isa: str = "avx512"  # the engine's vector paths here: 'avx512', 'avx2' or 'scalar'
    bf16_tiles: bool = True  # whether bf16 calls run on the engine's AVX512-BF16 tiles
    input: int | None = None  # the first layer's input size, where the caller knows it

    @property
    def step_macs(self) -> int:
        """Multiply-adds of one recurrence step, both directions and every gate: the per-step
        GEMM's size."""
        directions = 2 if self.bidirectional else 1
        return GATES[self.cell] * directions * self.batch * self.hidden * self.hidden


# The rule's thresholds, in multiply-adds per worker per recurrence step (see workers()).
# fp32: the fused kernel won almost everywhere. nn.RNN gets: inference where the kernel runs on
# one worker (one direction of H <= 64 is one block) on a machine with more threads, with a
# step big enough for nn.RNN's GEMM to use them; and one direction's inference over fewer than
# VERY_SHORT steps on a team from 8.4 M per worker (Zen 4 grid at 122932b: B 64 T 4 H 512 and
# 1024, 2-3 layers, 0.90-0.97x). Other short sequences with large steps, which went to nn.RNN
# until ac4003c (an earlier engine lost them), won in both machines' grids: B 8-256, T 4-8,
# H 512-1024, 8.4-537 M per worker, 1.00-1.60x on Zen 4 (122932b) and 1.02-2.46x on Zen 5
# (c8f3e28). The AVX2 grids do not agree: AVX2 keeps the earlier limits (_avx2_declines).
# fp64: inference at H = 1024 was mixed (0.91-1.56x); the other fp64 limits come from the
# previous engine's grid (per-block dgemm calls) and are kept because the re-measured grid
# shows no loss under them, though they now give up wins (1.65x at B256 T4 H32 training).
UNDERUSED_LIMIT = 1 << 18  # 262 k
SHORT = 16  # the gated cells' shortest measured sequence (below: the nn class at large steps)
VERY_SHORT = 8  # between the Elman grid's T = 4 and T = 8
SHORT_UNI_INFER_LIMIT = 1 << 23  # 8.4 M
# AVX2 keeps the earlier short-sequence limits (T < SHORT: nn.RNN from 16.8 M per worker on one
# worker, 8.4 M on a team): B 64 T 4 H 1024 lost there on both machines (0.68-0.84x).
AVX2_SHORT_LIMIT = 1 << 24  # 16.8 M
AVX2_SHORT_LIMIT_TEAM = 1 << 23  # 8.4 M
TRAIN_LIMIT_FP64 = 1 << 23  # 8.4 M
FP64_INFER_MAX_HIDDEN = 512
FP64_SMALL_HIDDEN_MAX_BATCH = 128

# The gated cells, in multiply-adds per worker per recurrence step (gates included).
# GRU: nn.GRU has no fused CPU path (several ATen ops per gate and step), and the kernel won at
# every fp32 point of its grid at 5a9275d (1.10-19x; B = 128, H 128-512: 1.10-1.68x).
# Until then B >= 128 went to nn.GRU from 4.2 M per worker: its large steps had lost (0.54-0.88x)
# to the stall of fresh huge pages on a host that had reclaimed them, which 49717e1 took away.
# fp64, both cells: the kernel won at 393 k to 4.2 M per worker (GRU B 8 T 128 H 128 bi 1.98x /
# 2.92x, B 32 T 16 H 256 uni 1.08x / 1.21x; LSTM 2.37x / 3.07x and 1.19x / 1.39x at the same
# points) and lost or tied at the grids' largest fp64 step, 100-134 M (B 128 T 128 H 512 bi:
# GRU 0.91x / 0.85x, LSTM 0.98x / 1.07x): fused below 16.8 M, between the two in log-scale. (The
# held-out B 64 T 20 I 100 H 200 bi, 7.7 M for the GRU and 10 M for the LSTM, kept out of this
# fit: GRU 1.41x / 1.61x, LSTM 1.78x / 1.37x.)
# LSTM: nn.LSTM runs through oneDNN's fused LSTM, which the kernel beat only where a step is
# small (and in training at batch 1, where oneDNN's backward is per step): nn.LSTM elsewhere.
# At batch 1 a unidirectional layer over a long sequence was a toss-up (T = 128, training:
# 1.01x and 1.01x at H = 256, 1.18x and 0.94x at H = 512 in the last two grids; at T = 16
# 1.91x and 2.18x): from T = 64 only both directions at once are fused.
# Both directions at once won in both modes up to 640 k per worker (cpu-grid-lstm: B 1-32 at
# 131-524 k, 1.00-1.83x inference and 0.99-1.83x training; cpu-grid-tagger-lstm, issue 23: the
# tagger shapes B 16 H 100 at 640 k, 1.32-1.36x / 1.08-1.12x, and B 1 H 256 2 layers, 1.12x /
# 1.26x) and lost inference from 1 M (B 1 H 512: 0.86-0.96x): fused below LSTM_BI_LIMIT.
# The one inference loss under it, 0.90x at B 1 T 16 H 256, a short sequence at batch 1, kept
# that inference with nn.LSTM up to T = 16 until 0495a1a, whose grid measured it at 5.31x (its
# W_hh packed from 16 rows, in kept scratch). (The held-out grid, kept out of this fit, agrees:
# 1.10-1.44x / 1.01-1.42x at its three points in this range.)
# Sequences shorter than the gated grids' T = 16 take the LSTM's limit for both cells.
GATES = {"rnn": 1, "gru": 3, "lstm": 4}
GATED_FP64_LIMIT = 1 << 24  # 16.8 M
GATED_SMALL_LIMIT = 1 << 16  # 65 k
LSTM_LONG_SEQ = 64  # between the grid's T = 16 and T = 128, above the tagger shapes' 20-60
LSTM_BI_LIMIT = 1 << 20  # 1 M: between the grids' 640 k (won) and 1 M (lost inference)
# Inference with both directions over short sequences (T < 64) is fused up to 4.2 M per worker.
# Every such point won in the last two full LSTM grids (de7e3db, 58268a4): B 1 T 16 H 512 (1 M)
# 2.58-3.25x, B 8 T 16 H 256 1.19-1.20x, B 32 T 16 H 128 1.12-1.16x, B 128 T 16 H 64 (1 and 2
# layers) 1.16-1.35x (0.80x once, in 2106332's grid); and in the last three tagger presets
# (1f1d9dd, de7e3db, 7c40643): B 32 T 40 H 128 1.08-1.12x, B 16 T 60 H 200 1.06-1.27x. At
# 4.2 M (B 64, H 128, T 30-40) it tied or lost (0.95-1.19x), at 8.4 M tied (0.96-1.01x), and
# at T = 128 it lost as often as it won (B 32 H 128: 0.94-1.14x). (The held-out points in this
# range, kept out of the fit: B 32 T 40 I 300 H 128 1.06x / 1.06x / 1.01x, B 16 T 50 H 200
# 2 layers 1.17x / 1.20x / 1.31x, at 1f1d9dd and twice at 58268a4.)
LSTM_BI_SHORT_INFER_LIMIT = 1 << 22  # 4.2 M
# Training steps with one direction are fused up to 262 k per worker, from T = 16: B 8 at H 64
# (131 k) and H 128 (262 k) won in the last five Zen 4 grids (d68e213 to 58268a4: T 16
# 1.65-1.99x and 1.11-1.23x, T 128 1.28-1.51x and 1.15-1.21x) and in the Zen 5 grid (c8f3e28:
# 1.96x, 1.31x, 1.37x, 1.31x), as did B 1 H 256 (131 k) at T 128 (1.13-1.36x, Zen 5 1.03x);
# at 524 k (B 32 H 64, T 128) they lost in four of those five grids and on Zen 5 (0.88-0.92x).
LSTM_UNI_TRAIN_LIMIT = 1 << 18  # 262 k
# Above it, from batch 16, one direction's training steps on a team (H > 64) are fused since
# e3887d3, where the forward and BPTT of such a team split the batch (csrc/recurrence.h,
# batch_splits). Zen 5 grid at e3887d3 (cpu-grid-lstm-batch-split): B 32 and 128, H 128-512,
# T 16 and 128, 1.01-1.47x but B 128 T 16 H 256 0.95x (1.39x interleaved in one process), and
# two layers (B 32 T 128 H 256) 1.07x (1.26x interleaved; 0.87-0.89x before the split); in the
# two grids before the split (38e9be1, ef2a0d9) these points read 1.01-1.39x. At batch 8 (H 256
# and 512, no split: 4 rows per worker) they lost up to 0.90x (0.90-1.87x), and a team of one
# (H 64) at B 128 T 16 lost (0.88-0.93x): both stay with nn.LSTM. Held out of this fit, the
# preset's one-direction points (benchmarks/cpu_grid.py HELDOUT, four of them added for it)
# read 1.01-1.13x under it (cpu-grid-heldout-lstm-team-clause, 4fc4002).
LSTM_UNI_TRAIN_TEAM_BATCH = 16
# Inference with both directions is also fused where every layer projects its input step by
# step inside the recurrence (csrc/layer_gemms.h, projects_per_step: batch >= 16, I <= 2H)
# with at most 4 MiB of W_ih and W_hh per direction (the engine steps up to 8 MiB). Measured
# at 2d1a135 on 2-core Zen 5, which put the step projection in: the LSTM grid's bidirectional
# points up to H 256 (B 32 and 128, T 16 and 128) 1.00-2.11x (at H 512, 8 MiB, 0.84-1.02x:
# left to nn.LSTM), where its previous grid (c8f3e28) had 0.82-1.25x; the tagger preset's rows
# in this range 1.00-1.16x but B 32 T 20 I 300 H 256, 0.97x (the issue-23 rows: 2 layers
# 1.04x, (32, 128, 128, 128) 1.07x); the held-out set's (kept out of this fit, at 6d60967)
# 0.98-1.06x.
LSTM_STEP_INFER_WEIGHT_LIMIT = 4 << 20  # bytes of W_ih and W_hh per direction, fp32
STEP_PROJECTION_BATCH = 16  # csrc/layer_gemms.h, kStepProjectionBatch
# Training steps with both directions are fused at every size, from the rule's shortest
# sequence (T = 16). Up to 8.4 M per worker they won since the weight gradients moved onto the
# register tiles (7073f32; 1.05-1.55x, the 2-layer and speech rows 1.02-1.11x). Above it some
# lost (0.43-0.80x) until 49717e1 took away a stall of the whole step (fresh huge pages on a
# host that had reclaimed them); since, every such point measured 0.99-1.20x (cpu-grid-lstm
# at 2106332: B 32-128, H 256-512, T 16 and 128, 0.99x at B 32 T 16 H 512, 1.00x at B 128 T 128
# H 512; cpu-grid-tagger-lstm at fbb3174: 1.01-1.17x at five I != H rows up to 67 M).

# The engine's fixed column blocks (csrc/geometry.h, kBlockWidth and kSmallHidden).
_BLOCK_WIDTH = 64
_SMALL_HIDDEN = 64


def workers(s: CallShape) -> int:
    """How many threads the fused kernel's recurrence can use for this call."""
    per_dir = 1 if s.hidden <= _SMALL_HIDDEN else -(-s.hidden // _BLOCK_WIDTH)
    return max(1, min(s.threads, (2 if s.bidirectional else 1) * per_dir))


# What the committed grids measured: the engine's instruction set (csrc/simd.h; AVX2 with the
# limits of _avx2_declines) and the thread counts. Outside them the rule is conservative.
# Without vector paths the engine lost (0.46-0.66x nn at small shapes, issue 22): the nn class. With more threads than measured,
# the nn class's per-step GEMMs use all of them while the engine's team is capped at
# D * ceil(H / 64) workers: fused only where a whole step (both directions, every gate) is at
# most UNMEASURED_STEP_LIMIT multiply-adds, where the per-step dispatch the engine saves
# outweighs what more threads give one small GEMM, and where the measured rule fuses too.
MEASURED_ISAS = ("avx512", "avx2")
MEASURED_MAX_THREADS = 2
UNMEASURED_STEP_LIMIT = 1 << 20  # 1 M: (32, 128, 128, 128) bidirectional Elman


def prefer_cpp(s: CallShape) -> bool:
    """True where the grids show the fused kernel faster than the nn class (False: the nn
    class); conservative where they measured nothing (see MEASURED_ISAS)."""
    if s.proj_size:
        return False  # the engine has no LSTM projections: nn.LSTM runs them
    if s.isa not in MEASURED_ISAS:
        return False
    if s.threads > MEASURED_MAX_THREADS:
        return s.step_macs <= UNMEASURED_STEP_LIMIT and prefer_cpp(
            replace(s, threads=MEASURED_MAX_THREADS))
    if s.dtype == torch.bfloat16:
        return _prefer_bf16(s)
    team = workers(s)
    per_worker = s.step_macs / team
    if s.isa == "avx2" and _avx2_declines(s, team, per_worker):
        return False
    if s.cell != "rnn":
        return _prefer_gated(s, team, per_worker)
    if s.dtype == torch.float64:
        if not s.training:
            return s.hidden <= FP64_INFER_MAX_HIDDEN
        if s.hidden <= _SMALL_HIDDEN and s.batch >= FP64_SMALL_HIDDEN_MAX_BATCH and team == 1:
            return False
        return per_worker < TRAIN_LIMIT_FP64
    if not s.training and team == 1 < s.threads and per_worker >= UNDERUSED_LIMIT:
        return False
    if s.seq < VERY_SHORT and not (s.training or s.bidirectional) and team > 1:
        return per_worker < SHORT_UNI_INFER_LIMIT
    return True


def _lstm_layers_step(s: CallShape) -> bool:
    """Whether this is an fp32 LSTM inference whose every layer projects its input step by
    step (csrc/layer_gemms.h, projects_per_step) within LSTM_STEP_INFER_WEIGHT_LIMIT."""
    if s.training or s.dtype != torch.float32:
        return False
    if s.input is None or s.batch < STEP_PROJECTION_BATCH:
        return False  # (from T = SHORT its batch >= 16 has the 128 rows the engine needs)
    directions = 2 if s.bidirectional else 1
    inputs = [s.input] + [directions * s.hidden] * (s.layers - 1)
    return all(i <= 2 * s.hidden and GATES["lstm"] * s.hidden * (i + s.hidden) * 4
               <= LSTM_STEP_INFER_WEIGHT_LIMIT for i in inputs)


def _prefer_gated(s: CallShape, team: int, per_worker: float) -> bool:
    if per_worker <= GATED_SMALL_LIMIT:
        return True
    if s.seq < SHORT:
        return False
    if s.dtype == torch.float64 and per_worker < GATED_FP64_LIMIT:
        return True
    if s.cell == "gru":
        return s.dtype == torch.float32
    # LSTM
    if s.dtype == torch.float32 and s.bidirectional:
        if per_worker < LSTM_BI_LIMIT or s.training:  # training: from T = SHORT (above)
            return True
        if s.seq < LSTM_LONG_SEQ and per_worker < LSTM_BI_SHORT_INFER_LIMIT:
            return True
        if _lstm_layers_step(s):
            return True
    if s.dtype == torch.float32 and s.training and per_worker <= LSTM_UNI_TRAIN_LIMIT:
        return True
    if (s.dtype == torch.float32 and s.training and not s.bidirectional
            and s.batch >= LSTM_UNI_TRAIN_TEAM_BATCH and team > 1):
        return True
    return s.training and s.batch == 1 and (s.bidirectional or s.seq < LSTM_LONG_SEQ)


# AVX2 without AVX-512 (benchmarks/results/cpu-grid-avx2/, cpu-grid-gru-avx2/ and
# cpu-grid-lstm-avx2/, measured by `cpu_grid.py --isa avx2`: the engine, ATen, MKL and oneDNN all
# lowered to AVX2 on the AVX-512 machine). The engine's per-step products run 8 wide instead of
# 16 and its margins shrink, but the AVX-512 rule held at most points. Where it fuses, these
# lost in both AVX2 runs (and in re-measures), and take the nn class on AVX2 (one loss is left:
# B 1 T 64 H 1024 inference at 1 thread, 0.86-1.20x over five runs, median 0.94x; a limit for
# batch 1 alone would break the rule's monotonicity in the batch):
# - fp64 inference from 8.4 M per worker (0.70-0.95x), and fp64 over T < 16 at batch 1
#   (B 1 T 4 H 1024 training: 0.82-0.91x in five runs): W_hh's packing outweighs a few steps;
# - GRU from 8.4 M per worker (B 32 T 16 H 512: 0.81-0.94x; B 32 T 128 H 512 training 0.98x and
#   1.16x, then 0.66x (one direction) at 2e2e190 and 1.06-1.07x alone), and at B >= 128 from
#   4.2 M (B 128 T 16-128 H 256-512: 0.79-1.03x in training at 2e2e190, with the huge-page
#   advice off as on AVX-512, where the kernel won there);
# - LSTM above 65 k per worker, or 131 k with both directions at once (B 1 T 128 H 256
#   0.61-1.05x, H 512 0.67-0.86x, B 32 T 128 H 64 0.84-1.47x; 1.02-9.3x at or below it),
#   except a bidirectional fp32 inference whose every layer projects its input step by step
#   (_lstm_layers_step, the AVX-512 rule's clause). On AVX2 the step projection (2d1a135) took
#   such points from 0.89-1.26x (results/zen5/cpu-grid-lstm-avx2/, 0407384) to 1.05-1.63x
#   (cpu-grid-lstm-avx2-step/, Zen 5 at db4521c: B 32 and 128, T 16 and 128, H 64-256, one
#   and two layers); the tagger preset's such rows 1.07-1.73x (cpu-grid-tagger-lstm-avx2-step/:
#   B 32 T 20 I 300 H 256 1.07x, (32, 40, 100, 128) 1.13x). The held-out set, kept out of this
#   fit (cpu-grid-heldout-lstm-avx2-step/): its four such points 1.06-1.19x. Its training
#   steps stay with nn.LSTM: 0.82-1.33x over the same points. (The Zen 4 AVX2 grids predate
#   the step projection: their kernel read 0.80-0.96x at 11 such points; not re-measured.)
AVX2_LARGE_STEP = 1 << 23  # 8.4 M
AVX2_LSTM_BI_LIMIT = 1 << 17  # 131 k
AVX2_GRU_LARGE_BATCH = 128
AVX2_GRU_LARGE_BATCH_LIMIT = 1 << 22  # 4.2 M


def _avx2_declines(s: CallShape, team: int, per_worker: float) -> bool:
    """Where the AVX2 grids measured the nn class faster, though the rule for AVX-512 fuses
    (see above)."""
    if s.dtype == torch.float64 and (s.seq < SHORT and s.batch == 1 or
                                     not s.training and per_worker >= AVX2_LARGE_STEP):
        return True
    if s.cell == "gru":
        return (per_worker >= AVX2_LARGE_STEP or
                s.batch >= AVX2_GRU_LARGE_BATCH and per_worker >= AVX2_GRU_LARGE_BATCH_LIMIT)
    if s.cell == "lstm":
        if s.bidirectional and _lstm_layers_step(s):
            return False
        return per_worker > (AVX2_LSTM_BI_LIMIT if s.bidirectional else GATED_SMALL_LIMIT)
    return (s.dtype == torch.float32 and s.seq < SHORT and
            per_worker >= (AVX2_SHORT_LIMIT if team == 1 else AVX2_SHORT_LIMIT_TEAM))


# bfloat16 (under CPU autocast, or bf16 modules and inputs): the engine's products run on bf16
# register tiles where the CPU has AVX512-BF16 (csrc/tiles_bf16.h), else as fp32 products on
# bf16-rounded operands. Measured on the AVX512-BF16 machine (benchmarks/results/cpu/bf16.json,
# Zen 4, 2 threads, against the nn class under the same autocast, four shapes, inference and
# a training step): nn.RNN and nn.GRU have no bf16 CPU kernel of their own, and the engine
# won everywhere (1.32-3.44x) but the training step at (64, 256, 256, 512), 16.8 M activations
# per layer (T * B * directions * H), where it lost or tied across runs (Elman 0.83-1.09x, GRU
# 0.68-0.81x; 1.17x and 1.00x at 47d22c4, after the huge-page stall was removed: one run, not
# refitted): its kept fp32 gates, their bf16 copies and the fresh pages they take cost about
# what its products save. Training is fused up to BF16_TRAIN_MAX_ACTIVATIONS, below that shape.
# nn.LSTM runs oneDNN's bf16 LSTM: the engine's inference lost (0.76-0.86x); its training step
# won at the speech shape (1.24x; 1.47x at 47d22c4), tied at B = 32, H = 128 (0.90-1.17x over
# four runs) and lost above the limit (0.90x; 0.99x at 47d22c4): LSTM training steps are fused up to the limit (from T = 16,
# the shortest gated grid sequence), LSTM inference stays with nn.LSTM. Held-out shapes kept
# out of this fit (bf16-heldout.json) agree: Elman and GRU 1.11-3.98x, LSTM training
# 1.00-1.20x, LSTM inference 0.64-0.85x. Without bf16 tiles no measurement is committed: the
# nn class.
BF16_TRAIN_MAX_ACTIVATIONS = 1 << 23  # 8.4 M


def _prefer_bf16(s: CallShape) -> bool:
    if not s.bf16_tiles:
        return False
    directions = 2 if s.bidirectional else 1
    if s.training and s.seq * s.batch * directions * s.hidden > BF16_TRAIN_MAX_ACTIVATIONS:
        return False
    if s.cell == "lstm":
        return s.training and s.seq >= SHORT
    return prefer_cpp(replace(s, dtype=torch.float32))
