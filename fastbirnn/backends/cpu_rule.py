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


# Thresholds of the rule (see prefer_cpp); their derivation is in the grid's README.
# Per-step work (multiply-adds per worker thread) above which nn.RNN's per-step GEMM is as fast
# as the fused step for inference; the fused kernel is kept below it.
INFER_STEP_MACS_PER_THREAD = 1 << 62
TRAIN_STEP_MACS_PER_THREAD = 1 << 62


def prefer_cpp(s: CallShape) -> bool:
    """True where the grid shows the fused kernel at least as fast as nn.RNN."""
    per_thread = s.step_macs / max(1, min(s.threads, 2 * s.hidden // 64 or 1))
    limit = TRAIN_STEP_MACS_PER_THREAD if s.training else INFER_STEP_MACS_PER_THREAD
    return per_thread < limit
