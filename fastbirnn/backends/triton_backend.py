"""The 'triton' backend: fused recurrence kernels in ``fastbirnn.triton``.

Runs on CUDA tensors; on CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``
set before triton is imported), which is how CI tests the kernels without a GPU.

'auto' does not pick it yet: it should only where a GPU run measured it faster than cuDNN's
``nn.RNN``, and no such measurement is committed. ``CUDA_CROSSOVER`` is where that run's
result goes; until it is filled, ``preferred_for`` is False everywhere and CUDA keeps cuDNN.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from fastbirnn import backends

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Measured crossover vs cuDNN nn.RNN (bidirectional, T=256, forward+backward), to be filled
# from a committed GPU benchmark in benchmarks/results/:
#     {dtype: {hidden_size: largest batch size at which triton was faster}}
# e.g. {torch.float32: {512: 32, 1024: 32}, torch.bfloat16: {...}}. A hidden size between
# measured ones uses the next larger measured entry; beyond the table, cuDNN. Empty: no GPU
# measurement exists yet, so nothing is preferred.
CUDA_CROSSOVER: dict[torch.dtype, dict[int, int]] = {}


def crossover_prefers(dtype: torch.dtype, hidden_size: int, batch_size: int) -> bool:
    """Whether the measured table says triton beats cuDNN for this shape."""
    table = CUDA_CROSSOVER.get(dtype, {})
    larger = [h for h in sorted(table) if h >= hidden_size]
    return bool(larger) and batch_size <= table[larger[0]]


@functools.lru_cache(maxsize=None)
def _import_failure() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"the 'triton' package cannot be imported ({error}); pip install triton"
    try:
        import fastbirnn.triton  # noqa: F401
    except Exception as error:  # an incompatible triton version fails here
        return f"the triton kernels failed to load ({type(error).__name__}: {error})"
    return None


def _unavailable_reason() -> Optional[str]:
    """Why triton cannot run anything on this machine, or None.

    Needs the package and kernels (checked once) and something to run on: a CUDA device, or
    the interpreter (``TRITON_INTERPRET=1``, read live like ``_unsupported_reason`` does).
    """
    failure = _import_failure()
    if failure is not None:
        return failure
    if not torch.cuda.is_available() and not backends.triton_interpreter_enabled():
        return (
            "no CUDA device: the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 set "
            "before triton is imported to run its kernels on CPU tensors through the "
            "interpreter (for tests)"
        )
    return None


def _unsupported_reason(x: torch.Tensor) -> Optional[str]:
    if x.dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {x.dtype} (triton supports float32, float16, bfloat16)"
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu":
        if backends.triton_interpreter_enabled():
            return None
        return (
            "CPU tensor: the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set "
            "before triton is imported to run its kernels on CPU through the interpreter"
        )
    return f"device {x.device.type!r} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"


def _preferred_for(x: torch.Tensor, call) -> bool:
    # Only CUDA counts: under the interpreter triton is a test vehicle, never the fast path.
    # With no GPU measurement yet (CUDA_CROSSOVER is empty) this is False: CUDA keeps cuDNN.
    # Nor where the multi-CTA grid cannot be co-resident on this GPU: the launcher would run
    # the slow single-CTA streamed kernel there, which the measurements did not time.
    if x.device.type != "cuda" or not crossover_prefers(x.dtype, call.hidden, call.batch):
        return False
    from fastbirnn.triton import launcher

    return launcher.persistent_unavailable_reason(call.hidden, call.batch, x.dtype,
                                                  x.device) is None


def _forward(Z, W_hh, h0, lengths, nonlinearity):
    from fastbirnn.triton import recurrence_forward

    return recurrence_forward(Z, W_hh, h0, lengths, nonlinearity)


def _backward(dHs, Hs, W_hh, lengths, nonlinearity):
    from fastbirnn.triton import recurrence_backward

    return recurrence_backward(dHs, Hs, W_hh, lengths, nonlinearity)


def _elman_stack(*args, **config):
    """The Elman layer stack through the seam (``functional.seam_stack``), reading the
    persistent kernels' barrier-timeout flag once at its end instead of after every layer
    (``fastbirnn.triton.barrier_check``)."""
    from fastbirnn.functional import seam_stack

    stack = seam_stack("triton")
    if torch.compiler.is_compiling():  # traced: each seam call then reads its own flag
        return stack(*args, **config)
    from fastbirnn.triton import barrier_check

    return barrier_check.one_check_per_call(stack, *args, **config)


def _lstm_stack(*args, **config):
    from fastbirnn.triton.gated_stack import lstm_stack

    return lstm_stack(*args, **config)


def _gru_stack(*args, **config):
    from fastbirnn.triton.gated_stack import gru_stack

    return gru_stack(*args, **config)


backends.register(
    backends.RecurrenceBackend(
        name="triton",
        forward=_forward,
        backward=_backward,
        cell_stacks={"rnn": _elman_stack, "lstm": _lstm_stack, "gru": _gru_stack},
        # 'auto' keeps cuDNN's nn.LSTM / nn.GRU on CUDA: no GPU run has timed the gated
        # kernels yet (benchmarks/gpu_run.sh, stage 'gated', will), and CUDA_CROSSOVER is the
        # Elman cell's table. Add "lstm"/"gru" here with their own measured table.
        auto_cells=("rnn",),
        unavailable_reason=_unavailable_reason,
        unsupported_reason=_unsupported_reason,
        preferred_for=_preferred_for,
        auto_devices=("cuda",),
    ),
    # Ahead of the CPU kernel: the two never claim the same device.
    auto_priority=0,
)
