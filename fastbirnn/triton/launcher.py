"""Host side of the Triton recurrence: picks the kernel and its tiles, launches one grid.

Two kernels per pass:

- on-chip: the direction's whole W_hh is loaded into registers once and reused for every
  step (persistent-RNN style). Used while the padded hidden size fits, see
  ``MAX_ONCHIP_HIDDEN``.
- streamed: any hidden size. Same grid and time loop, but W_hh is read in tiles from L2 at
  every step and the state goes through a small global scratch buffer. One launch per
  layer still; no cross-program synchronisation (each program owns whole batch rows).

TF32: fp32 dots use TF32 exactly when cuDNN's RNN would (``torch.backends.cudnn.rnn``'s
``fp32_precision``, or the legacy ``torch.backends.cudnn.allow_tf32``), since this kernel
stands in for ``nn.RNN``'s cuDNN call; otherwise exact fp32 (``input_precision="ieee"``).
The interpreter (CPU tensors) always uses "ieee".
"""

from __future__ import annotations

import contextlib

import torch
import triton

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - layout of older releases
    from triton.runtime.autotuner import OutOfResources

from fastbirnn.triton.backward import backward_onchip_kernel, backward_streamed_kernel
from fastbirnn.triton.forward import forward_onchip_kernel, forward_streamed_kernel

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Largest padded hidden size whose W_hh stays on chip, per dtype (about 64 KiB of weights per
# program). Above it the streamed kernel runs. From compiling for sm_90 (registers, spills,
# shared memory), not yet from timings: a GPU run should replace them with a measured
# crossover. Exact fp32 (no TF32) uses the FMA path, which spills badly past 64. Tests lower
# these to exercise the streamed path on small shapes.
MAX_ONCHIP_HIDDEN = {torch.float32: 128, torch.float16: 256, torch.bfloat16: 256}
MAX_ONCHIP_HIDDEN_FP32_IEEE = 64

# Batch rows per program. 16 is tl.dot's minimum and gives the most programs (the grid
# is only 2 x batch tiles wide).
BLOCK_B = 16
# Tiles of the streamed kernel (output hidden units / reduction). 32x32 with 2 stages
# compiles without spills for sm_90 in both TF32 and exact fp32; 64-wide tiles spill.
STREAM_BLOCK_N = 32
STREAM_BLOCK_K = 32
STREAM_NUM_STAGES = 2

_ACTIVATIONS = {"tanh": 0, "relu": 1}


def use_tf32(device: torch.device) -> bool:
    """Whether fp32 dots may use TF32: the rule cuDNN's RNN follows, per torch's flags."""
    if device.type != "cuda":
        return False
    cudnn = torch.backends.cudnn
    # torch >= 2.9: per-operator precision, "none" inherits from the cuDNN-wide setting.
    for holder in (getattr(cudnn, "rnn", None), cudnn):
        precision = getattr(holder, "fp32_precision", None)
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    try:
        return bool(cudnn.allow_tf32)
    except RuntimeError:  # mixed legacy/new flags: be exact
        return False


def _upcast_dot(x: torch.Tensor) -> bool:
    # Interpreter only: its bf16 tl.dot is wrong, see forward._dot.
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def _input_precision(x: torch.Tensor) -> str:
    return "tf32" if x.dtype == torch.float32 and use_tf32(x.device) else "ieee"


def _hidden_block(H: int) -> int:
    return max(16, triton.next_power_of_2(H))


def uses_onchip(H: int, dtype: torch.dtype, precision: str = "tf32") -> bool:
    limit = MAX_ONCHIP_HIDDEN[dtype]
    if dtype == torch.float32 and precision == "ieee":
        limit = min(limit, MAX_ONCHIP_HIDDEN_FP32_IEEE)
    return _hidden_block(H) <= limit


def _num_warps(block_h: int) -> int:
    return 4 if block_h <= 32 else 8


# On-chip configurations that failed to compile on a device (too little shared memory, e.g.
# fp32 H=128 needs ~104 KiB): they run streamed from then on, so every size stays correct.
_ONCHIP_FAILED: set = set()


def _launch_onchip(kernel, grid, args, x, **meta) -> bool:
    key = (kernel.fn.__name__, x.device.index, x.dtype, meta["PRECISION"], meta["BLOCK_H"])
    if key in _ONCHIP_FAILED:
        return False
    try:
        kernel[grid](*args, **meta, num_warps=_num_warps(meta["BLOCK_H"]))
    except OutOfResources:
        _ONCHIP_FAILED.add(key)
        return False
    return True


def _stream_blocks(H: int) -> tuple[int, int]:
    # Never wider than the padded hidden size (tl.dot still needs >= 16).
    block = _hidden_block(H)
    return min(STREAM_BLOCK_N, block), min(STREAM_BLOCK_K, block)


def _device_guard(x: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensors' one.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _check(x: torch.Tensor, *others: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton recurrence: unsupported dtype {x.dtype}")
    for other in others:
        if other.dtype != x.dtype:
            raise TypeError(
                f"triton recurrence: mixed dtypes {x.dtype} and {other.dtype}; cast first"
            )


def recurrence_forward(
    Z: torch.Tensor, W_hh: torch.Tensor, h0: torch.Tensor, lengths: torch.Tensor,
    nonlinearity: str,
) -> torch.Tensor:
    T, B, D, H = Z.shape
    _check(Z, W_hh, h0)
    Z, W_hh, h0 = Z.contiguous(), W_hh.contiguous(), h0.contiguous()
    lengths = lengths.to(device=Z.device, dtype=torch.int64).contiguous()
    Hs = torch.empty_like(Z)
    if Z.numel() == 0:
        return Hs.zero_()
    act = _ACTIVATIONS[nonlinearity]
    precision = _input_precision(Z)
    upcast = _upcast_dot(Z)
    grid = (D, triton.cdiv(B, BLOCK_B))
    with _device_guard(Z):
        if not (uses_onchip(H, Z.dtype, precision) and _launch_onchip(
            forward_onchip_kernel, grid, (Z, W_hh, h0, lengths, Hs, T, B, H), Z,
            ACT=act, PRECISION=precision, UPCAST=upcast,
            BLOCK_B=BLOCK_B, BLOCK_H=_hidden_block(H),
        )):
            block_n, block_k = _stream_blocks(H)
            state = torch.empty(2, D, B, H, device=Z.device, dtype=torch.float32)
            forward_streamed_kernel[grid](
                Z, W_hh, h0, lengths, Hs, state, T, B, H,
                ACT=act, PRECISION=precision, UPCAST=upcast,
                BLOCK_B=BLOCK_B, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=4, num_stages=STREAM_NUM_STAGES,
            )
    return Hs


def recurrence_backward(
    dHs: torch.Tensor, Hs: torch.Tensor, W_hh: torch.Tensor, lengths: torch.Tensor,
    nonlinearity: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    T, B, D, H = Hs.shape
    dHs = dHs.to(Hs.dtype)
    _check(Hs, dHs, W_hh)
    dHs, Hs, W_hh = dHs.contiguous(), Hs.contiguous(), W_hh.contiguous()
    lengths = lengths.to(device=Hs.device, dtype=torch.int64).contiguous()
    dZ = torch.empty_like(Hs)
    dh0 = Hs.new_empty(D, B, H)
    if Hs.numel() == 0:
        return dZ.zero_(), dh0.zero_()
    act = _ACTIVATIONS[nonlinearity]
    precision = _input_precision(Hs)
    upcast = _upcast_dot(Hs)
    grid = (D, triton.cdiv(B, BLOCK_B))
    with _device_guard(Hs):
        if not (uses_onchip(H, Hs.dtype, precision) and _launch_onchip(
            backward_onchip_kernel, grid, (dHs, Hs, W_hh, lengths, dZ, dh0, T, B, H), Hs,
            ACT=act, PRECISION=precision, UPCAST=upcast,
            BLOCK_B=BLOCK_B, BLOCK_H=_hidden_block(H),
        )):
            block_n, block_k = _stream_blocks(H)
            carry = torch.zeros(D, B, H, device=Hs.device, dtype=torch.float32)
            backward_streamed_kernel[grid](
                dHs, Hs, W_hh, lengths, dZ, carry, T, B, H,
                ACT=act, PRECISION=precision, UPCAST=upcast,
                BLOCK_B=BLOCK_B, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=4, num_stages=STREAM_NUM_STAGES,
            )
            dh0.copy_(carry)
    return dZ, dh0
