"""Where ``'auto'`` runs the fused C++ kernel on CPU, and where it hands the call to nn.RNN.

The one place this decision is made. It is derived from the committed CPU grid
(``benchmarks/results/cpu-grid/``, reproduced by ``python benchmarks/cpu_grid.py``): every
grid point records nn.RNN's and the fused kernel's medians for inference and a training step,
and ``benchmarks/cpu_grid.py --check`` reports any point where this rule picks the slower one.

Where the kernel wins, and why: it saves nn.RNN's per-step dispatch (several ATen ops a step
and direction), fuses bias and activation into the step, and runs both directions at once.
That saving is large against small per-step products and vanishes once each step is a big
GEMM, where both run at the GEMM's rate; the rule then keeps nn.RNN, which is never slower
there than our single-threaded-BLAS blocks by more than noise.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def step_macs(self) -> int:
        """Multiply-adds of one recurrence step, both directions: the per-step GEMM's size."""
        return (2 if self.bidirectional else 1) * self.batch * self.hidden * self.hidden


# The rule's thresholds, in multiply-adds per worker per recurrence step (see workers()).
# Below them the fused kernel's saving (nn.RNN's per-step dispatch, its separate bias and
# tanh passes, one direction after the other) is a clear win in the grid. Above them every
# step is a large GEMM for both; over long sequences the kernel still wins (its input
# projection and BPTT/weight-gradient GEMMs run over all steps at once), but short ones
# (T < SHORT) are a few large GEMMs either way, the measured ratios scatter around 1.0, and
# 'auto' keeps nn.RNN. fp64 training steps lost above the lower threshold at any length
# (the large dgemm weight gradients), so they go to nn.RNN there.
INFER_LIMIT = 1 << 23  # 8.4 M
TRAIN_LIMIT = 1 << 26  # 67 M
TRAIN_LIMIT_FP64 = 1 << 23
SHORT = 16

# The engine's fixed column blocks (csrc/engine.cpp, kBlockWidth and kSmallHidden).
_BLOCK_WIDTH = 64
_SMALL_HIDDEN = 64


def workers(s: CallShape) -> int:
    """How many threads the fused kernel's recurrence can use for this call."""
    per_dir = 1 if s.hidden <= _SMALL_HIDDEN else -(-s.hidden // _BLOCK_WIDTH)
    return max(1, min(s.threads, (2 if s.bidirectional else 1) * per_dir))


def prefer_cpp(s: CallShape) -> bool:
    """True where the grid shows the fused kernel faster than nn.RNN (False: nn.RNN)."""
    per_worker = s.step_macs / workers(s)
    if s.training and s.dtype == torch.float64:
        return per_worker < TRAIN_LIMIT_FP64
    limit = TRAIN_LIMIT if s.training else INFER_LIMIT
    return per_worker < limit or s.seq >= SHORT
