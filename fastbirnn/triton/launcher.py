"""Host side of the Triton recurrence: picks the kernel and its tiles, launches the grid.

Three kernels per pass; ``choose_path`` (one function of H, B, dtype, precision and the
device) picks one:

- on-chip: the direction's whole W_hh is loaded into registers once and reused for every
  step (persistent-RNN style). Used while the padded hidden size fits, see
  ``MAX_ONCHIP_HIDDEN``.
- streamed: any hidden size. Same grid and time loop, but W_hh is read in tiles from L2 at
  every step and the state goes through a small global scratch buffer. One launch per
  layer still; no cross-program synchronisation (each program owns whole batch rows).
- multicta (``fastbirnn.triton.multicta``): large H. Each direction's hidden units are split
  over K CTAs, each keeping its block of W_hh for the whole sequence; a grid barrier per step
  (persistent mode, on a GPU), or one launch per step (step mode: the interpreter, and tests
  or benchmarks that force it). ``MULTICTA_MIN_HIDDEN`` is a placeholder until GPU timings.

Persistent mode is one cooperative launch (``launch_cooperative_grid=True``): the driver runs
the grid only with every CTA resident, or refuses it (``fastbirnn.triton.residency``). Before
launching, the compiled kernel's registers, shared memory and threads are checked against the
device (``_persistent_blocker``). Where the grid cannot be co-resident, the launcher warns once
with the limit and runs the single-CTA streamed kernel; it never picks step mode by itself on
a GPU (T launches per layer and pass: slower than cuDNN), and 'auto' keeps cuDNN there
(``persistent_unavailable_reason``). ``FORCE_MULTICTA_MODE = 'persistent'`` raises instead.
The barrier itself gives up after ``BARRIER_MAX_SPIN`` polls and sets an error flag instead of
hanging; the host reads the flag once per call (a module's forward, a backward pass), not per
layer and pass, and raises RuntimeError before the call returns (``barrier_check``). A CUDA
graph capture of a persistent launch is refused: its replay would skip that read.

The gated cells (``gated_forward`` / ``gated_backward``: LSTM and GRU, ``gated_kernels``) go
through the same rule with their own on-chip limits, and run 'streamed' where the Elman cell
would run 'multicta' (no multi-CTA gated kernels yet).

Test knobs (module attributes, read once per call, not per step): ``FORCE_PATH`` forces a
path, ``FORCE_MULTICTA_MODE`` forces 'persistent' or 'step', ``MULTICTA_OVERRIDES`` overrides
fields of the multi-CTA configuration (e.g. ``{"BLOCK_K": 16, "W_RESIDENT": False}``).

TF32: fp32 dots use TF32 exactly when cuDNN's RNN would (``torch.backends.cudnn.rnn``'s
``fp32_precision``, or the legacy ``torch.backends.cudnn.allow_tf32``), since this kernel
stands in for ``nn.RNN``'s cuDNN call; otherwise exact fp32 (``input_precision="ieee"``).
The interpreter (CPU tensors) always uses "ieee".
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import triton

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - layout of older releases
    from triton.runtime.autotuner import OutOfResources

from fastbirnn.triton import barrier_check, residency
from fastbirnn.triton.backward import backward_onchip_kernel, backward_streamed_kernel
from fastbirnn.triton.cells import GATES, SAVED_SLOTS
from fastbirnn.triton.forward import forward_onchip_kernel, forward_streamed_kernel
from fastbirnn.triton.gated_kernels import (
    gated_backward_onchip_kernel,
    gated_backward_streamed_kernel,
    gated_forward_onchip_kernel,
    gated_forward_streamed_kernel,
)
from fastbirnn.triton.multicta import backward_multicta_kernel, forward_multicta_kernel

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Largest padded hidden size whose W_hh stays on chip, per dtype (about 64 KiB of weights per
# program). Above it the streamed kernel runs. From compiling for sm_90 (registers, spills,
# shared memory), not yet from timings: a GPU run should replace them with a measured
# crossover. Exact fp32 (no TF32) uses the FMA path, which spills badly past 64. Tests lower
# these to exercise the streamed path on small shapes.
MAX_ONCHIP_HIDDEN = {torch.float32: 128, torch.float16: 256, torch.bfloat16: 256}
MAX_ONCHIP_HIDDEN_FP32_IEEE = 64
# The gated cells (all G blocks of W_hh on chip), from compiling for sm_80 and sm_90 (python
# -m fastbirnn.triton.aot --gated), not from timings: at 64 every dtype compiles without
# spills within sm_80's shared memory in one pipeline stage; bf16 at 128 spills in the
# backward. Exact fp32: never, since the LSTM forward makes Triton 3.9's LLVM abort the
# process when compiling for sm_90 as launched (aligned, divisible sizes), even at 16 units
# (an SLPVectorizer assertion, which no fallback can catch; Triton 3.6 compiles it).
MAX_ONCHIP_HIDDEN_GATED = {torch.float32: 64, torch.float16: 64, torch.bfloat16: 64}
MAX_ONCHIP_HIDDEN_GATED_FP32_IEEE = 0
# The time loop gains nothing from software pipelining; 3 stages (the default) cost shared
# memory and registers (the bf16 backward at 64 spills on sm_80).
GATED_ONCHIP_NUM_STAGES = 1

# Batch rows per program. 16 is tl.dot's minimum and gives the most programs (the grid
# is only 2 x batch tiles wide).
BLOCK_B = 16
# Tiles of the streamed kernel (output hidden units / reduction). 32x32 with 2 stages
# compiles without spills for sm_90 in both TF32 and exact fp32; 64-wide tiles spill.
STREAM_BLOCK_N = 32
STREAM_BLOCK_K = 32
STREAM_NUM_STAGES = 2
# The gated streamed kernels (G accumulators, G weight tiles a step), per pass: among those
# tried (2/4/8 warps, 16/32/64-wide k tiles, 1/2 stages), compiled as launched (aligned
# pointers, sizes divisible by 16), the settings with which every cell and dtype compiles
# without spills for both sm_80 and sm_90 with both Triton 3.6 and 3.9 (python -m
# fastbirnn.triton.aot --gated); the previous 8-warp settings spilled 8-32 bytes there.
GATED_STREAM = {"forward": dict(BLOCK_K=32, num_warps=4, num_stages=2),
                "backward": dict(BLOCK_K=32, num_warps=4, num_stages=2)}

# Multi-CTA path from this (unpadded) hidden size up, when the single-CTA on-chip kernel does
# not apply. A placeholder from the per-step budget (fastbirnn.triton.budget): a GPU run of
# benchmarks/gpu_run.sh should replace it with the measured crossover against "streamed".
MULTICTA_MIN_HIDDEN = {torch.float32: 256, torch.float16: 256, torch.bfloat16: 256}
# ... and up to this batch size (the issue-13 target is B <= 32; larger batches make cuDNN's
# per-step GEMMs efficient, and the grid would need wider hidden blocks).
MULTICTA_MAX_BATCH = 64
# The W_hh block stays on chip for the whole launch (W_RESIDENT) while the block plus the
# state tile it multiplies, (BLOCK_N + BLOCK_B) * padded H, is at most this many elements
# (Triton stages both dot operands in shared memory); otherwise the block is re-read from L2
# in BLOCK_K-wide tiles every step. Exact fp32 (FMA dots, no tensor cores) always re-reads.
# From compiling for sm_80/sm_90 (python -m fastbirnn.triton.aot): resident fp32 H=1024 with
# BLOCK_N = BLOCK_B = 16 takes 160-190 registers and 128 KiB of shared memory, no spills; the
# same in bf16 spills (so does anything larger). tests/test_triton_aot.py compiles every
# configuration the launcher can choose for sm_80 and sm_90 and asserts no spills and shared
# memory within the limit.
MULTICTA_RESIDENT_ELEMENTS = {torch.float32: 32 * 1024, torch.float16: 24 * 1024,
                              torch.bfloat16: 24 * 1024}
MULTICTA_BLOCK_K = 32
MULTICTA_BLOCK_K_FP32_IEEE = 16  # FMA dots: 32-wide k tiles spill 8 bytes in some backwards
MULTICTA_MAX_BLOCK_B = 32
MULTICTA_MAX_BLOCK_B_FP32_IEEE = 16  # FMA dots: 32-row tiles spill
MULTICTA_MAX_BLOCK_N = 64  # 128-unit blocks spill
MULTICTA_NUM_WARPS = 8
# The k-tiled variant's tiles are small (at most 64 x 32 of W, 32 x 32 of state): with 8 warps
# ptxas spills 8-24 bytes in some backward kernels once compiled as launched (aligned,
# divisible sizes), with 4 (and 16-wide k tiles in exact fp32) in none, with Triton 3.6 and
# 3.9 (python -m fastbirnn.triton.aot, sm_80 and sm_90).
MULTICTA_NUM_WARPS_K_TILED = 4
# No software pipelining of the k loop: with 2 stages the streamed variant spills.
MULTICTA_NUM_STAGES = 1
# Polls of the grid barrier before it gives up, flags the error and stops waiting (~seconds:
# a legitimate wait is one step, microseconds). The host then raises RuntimeError.
BARRIER_MAX_SPIN = 1 << 22
# SM count assumed where there is no device (the interpreter): an H100/H200's.
DEFAULT_NUM_SMS = 132

# Test knobs, see the module docstring.
# What the last multi-CTA launch ran ({"mode", "grid", config...}), for benchmarks.
LAST_MULTICTA: dict = {}

FORCE_PATH: "str | None" = None  # "onchip", "streamed" or "multicta"
FORCE_MULTICTA_MODE: "str | None" = None  # "persistent" or "step"
MULTICTA_OVERRIDES: dict = {}

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


def uses_onchip(H: int, dtype: torch.dtype, precision: str = "tf32", gates: int = 1) -> bool:
    """Whether the ``gates`` blocks of W_hh stay on chip (1: Elman, 3: GRU, 4: LSTM)."""
    exact_fp32 = dtype == torch.float32 and precision == "ieee"
    if gates > 1:
        limit = MAX_ONCHIP_HIDDEN_GATED_FP32_IEEE if exact_fp32 else MAX_ONCHIP_HIDDEN_GATED[dtype]
    else:
        limit = MAX_ONCHIP_HIDDEN[dtype]
        if exact_fp32:
            limit = min(limit, MAX_ONCHIP_HIDDEN_FP32_IEEE)
    return _hidden_block(H) <= limit


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_path(H: int, B: int, dtype: torch.dtype, precision: str,
                device: torch.device, gates: int = 1) -> str:
    """The one rule for which kernel runs: 'onchip', 'multicta' or 'streamed'.

    ``gates``: 1 for the Elman cell, 4 for the LSTM, 3 for the GRU. The gated cells have no
    multi-CTA kernels yet: they run 'streamed' where the Elman cell would run 'multicta'.
    ``device`` is unused until GPU measurements say where each path wins.
    """
    if FORCE_PATH is not None:
        if FORCE_PATH not in ("onchip", "streamed", "multicta"):
            raise ValueError(f"FORCE_PATH: unknown path {FORCE_PATH!r}")
        return "streamed" if FORCE_PATH == "multicta" and gates > 1 else FORCE_PATH
    if uses_onchip(H, dtype, precision, gates):
        return "onchip"
    if gates == 1 and H >= MULTICTA_MIN_HIDDEN[dtype] and B <= MULTICTA_MAX_BATCH:
        return "multicta"
    return "streamed"


def multicta_config(H: int, B: int, D: int, dtype: torch.dtype, num_sms: int,
                    precision: str = "tf32") -> dict:
    """Tiles of the multi-CTA kernels: the grid (D, K, NB) fits one CTA per SM if it can."""
    exact_fp32 = dtype == torch.float32 and precision == "ieee"
    max_b = MULTICTA_MAX_BLOCK_B_FP32_IEEE if exact_fp32 else MULTICTA_MAX_BLOCK_B
    block_b = min(max_b, max(16, triton.next_power_of_2(B)))
    nb = triton.cdiv(B, block_b)
    block_n = 16
    while block_n < MULTICTA_MAX_BLOCK_N and D * triton.cdiv(H, block_n) * nb > num_sms:
        block_n *= 2
    block_h = _hidden_block(H)
    resident = (block_n + block_b) * block_h <= MULTICTA_RESIDENT_ELEMENTS[dtype] and not exact_fp32
    block_k = MULTICTA_BLOCK_K_FP32_IEEE if exact_fp32 else MULTICTA_BLOCK_K
    config = dict(
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=min(block_k, block_h),
        W_RESIDENT=resident, num_stages=MULTICTA_NUM_STAGES,
        num_warps=MULTICTA_NUM_WARPS if resident else MULTICTA_NUM_WARPS_K_TILED,
    )
    config.update(MULTICTA_OVERRIDES)
    # Only the resident variant uses BLOCK_H: one compiled kernel per k-tiled config.
    config["BLOCK_H"] = block_h if config["W_RESIDENT"] else 16
    return config


@dataclass
class MultiCTALaunch:
    """One multi-CTA kernel call over all steps, as the launcher makes it; ``call`` gives
    ``kernel[grid]``'s arguments for a persistent launch or for one step (the ahead-of-time
    check, ``fastbirnn.triton.aot``, compiles exactly these)."""

    kernel: Any
    grid: tuple
    tensors: tuple  # the kernel's pointer arguments up to COUNTERS
    sizes: tuple  # (T, B, H)
    steps: int
    meta: dict  # constexprs
    options: dict  # num_warps, num_stages

    @property
    def ctas(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def call(self, persistent: bool, err: torch.Tensor, first_step: int = 0,
             end_step: "int | None" = None) -> tuple[tuple, dict]:
        """(args, kwargs) of ``kernel[grid]`` running steps first_step .. end_step - 1."""
        end_step = self.steps if end_step is None else end_step
        args = (*self.tensors, err, *self.sizes, first_step, end_step, BARRIER_MAX_SPIN)
        kwargs = dict(self.meta, PERSISTENT=persistent, **self.options)
        if persistent and residency.COOPERATIVE_LAUNCH:
            kwargs["launch_cooperative_grid"] = True  # all CTAs resident, or no launch
        return args, kwargs

    def describe(self) -> str:
        return f"{self.kernel.fn.__name__} with grid {self.grid} ({self.ctas} CTAs)"

    def key(self, device: torch.device) -> tuple:
        """What decides whether the compiled grid fits the device."""
        return (self.kernel.fn.__name__, device.index, self.grid, self.tensors[0].dtype,
                tuple(sorted(self.meta.items())), tuple(sorted(self.options.items())))


def multicta_launch(kernel, tensors: tuple, sizes: tuple, steps: int, D: int,
                    device: torch.device, dtype: torch.dtype, **constexprs) -> MultiCTALaunch:
    """The launch of ``kernel`` (forward or backward multi-CTA) for these tensors: tiles from
    ``multicta_config``, a fresh barrier counter per (direction, batch tile) group."""
    _, B, H = sizes
    config = multicta_config(H, B, D, dtype, _num_sms(device), constexprs["PRECISION"])
    options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
    grid = (D, triton.cdiv(H, config["BLOCK_N"]), triton.cdiv(B, config["BLOCK_B"]))
    counters = torch.zeros(D * grid[2], device=device, dtype=torch.int32)
    return MultiCTALaunch(kernel, grid, (*tensors, counters), sizes, steps,
                          {**constexprs, **config}, options)


def _on_gpu(device: torch.device) -> bool:
    # One place to ask, so that tests can stand a CPU tensor in for a GPU's decisions.
    return device.type == "cuda"


def _capturing(device: torch.device) -> bool:
    """Whether the current stream is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# MultiCTALaunch.key -> why that grid cannot be co-resident, or None.
_NOT_CORESIDENT: dict = {}


def _coresidency(launch: MultiCTALaunch, device: torch.device) -> residency.Residency:
    """How many CTAs of the compiled persistent kernel the device holds at once (compiling it,
    with the arguments of the real launch, if it was not yet)."""
    args, kwargs = launch.call(True, torch.zeros(1, dtype=torch.int32, device=device))
    compiled = launch.kernel.warmup(*args, grid=launch.grid, **kwargs)
    return residency.coresidency(compiled, device)


def _persistent_blocker(launch: MultiCTALaunch, device: torch.device) -> "str | None":
    """Why this launch cannot run persistently on the device, or None."""
    if not residency.COOPERATIVE_LAUNCH:
        return (f"triton {triton.__version__} has no cooperative launch "
                "(launch_cooperative_grid), without which nothing guarantees that every CTA "
                "of the grid barrier is resident")
    key = launch.key(device)
    if key not in _NOT_CORESIDENT:
        try:
            fit = _coresidency(launch, device)
            why = None if launch.ctas <= fit.max_ctas else fit.describe()
        except OutOfResources as error:
            why = f"it does not compile within the device's resources ({error})"
        _NOT_CORESIDENT[key] = None if why is None else (
            f"the persistent grid of {launch.describe()} cannot be co-resident on "
            f"{_device_name(device)}: {why}")
    return _NOT_CORESIDENT[key]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _run_multicta(launch: MultiCTALaunch, device: torch.device) -> bool:
    """Run a multi-CTA launch: persistent (a cooperative launch, grid barrier per step) on a
    GPU, one launch per step under the interpreter or when forced. Returns False, after a
    warning, where the persistent grid cannot be co-resident: the caller then runs the
    single-CTA streamed kernel. Never falls back to step mode by itself (T launches per layer
    and pass: slower than cuDNN)."""
    mode = FORCE_MULTICTA_MODE
    if mode not in (None, "persistent", "step"):
        raise ValueError(f"FORCE_MULTICTA_MODE: unknown mode {mode!r}")
    if not _on_gpu(device):
        if mode == "persistent":
            raise RuntimeError("the persistent multi-CTA kernel needs a GPU: its grid "
                               "barrier deadlocks under the interpreter")
        mode = "step"
    LAST_MULTICTA.clear()
    LAST_MULTICTA.update(launch.meta, **launch.options, grid=launch.grid)
    if mode != "step":
        if _capturing(device):
            raise RuntimeError(
                f"fastbirnn triton: the persistent multi-CTA kernel ({launch.describe()}) "
                "cannot be captured in a CUDA graph: the host reads its barrier-timeout flag "
                "after each call, which a replay would skip. Capture with backend='torch', or "
                "with fastbirnn.triton.launcher.FORCE_MULTICTA_MODE = 'step' (no barrier).")
        why_not = _persistent_blocker(launch, device)
        if why_not is None:
            why_not = _launch_persistent(launch, device)
        if why_not is None:
            LAST_MULTICTA["mode"] = "persistent"
            return True
        if mode == "persistent":
            raise RuntimeError(f"fastbirnn triton: {why_not}.")
        LAST_MULTICTA.update(mode="streamed", not_persistent=why_not)
        _warn_once(f"fastbirnn triton: {why_not}. Running the single-CTA streamed kernel "
                   "instead (correct, but slow at this hidden size; backend='torch' runs "
                   "cuDNN).")
        return False
    LAST_MULTICTA["mode"] = "step"
    no_flag = torch.zeros(1, dtype=torch.int32, device=device)  # step mode never sets it
    for s in range(launch.steps):
        args, kwargs = launch.call(False, no_flag, s, s + 1)
        launch.kernel[launch.grid](*args, **kwargs)
    return True


def _launch_persistent(launch: MultiCTALaunch, device: torch.device) -> "str | None":
    """One cooperative launch over all steps; why it could not run (the driver refused to
    make the grid co-resident), or None. Its barrier-timeout flag is read once per call
    (``barrier_check``)."""
    try:
        with barrier_check.flag_for(device, launch.describe()) as err:
            args, kwargs = launch.call(True, err)
            launch.kernel[launch.grid](*args, **kwargs)
    except RuntimeError as error:
        if not residency.is_cooperative_refusal(error):
            raise
        _NOT_CORESIDENT[launch.key(device)] = (
            f"the driver refused the cooperative launch of {launch.describe()} on "
            f"{_device_name(device)} ({error})")
        return _NOT_CORESIDENT[launch.key(device)]
    return None


def persistent_unavailable_reason(H: int, B: int, dtype: torch.dtype,
                                  device: torch.device) -> "str | None":
    """Why this shape's multi-CTA kernels would not run persistently on ``device`` (the
    launcher then warns and runs the slow single-CTA streamed kernel), or None, also where the
    shape takes another path. 'auto' keeps cuDNN where this says why. Compiles the kernels on
    first use; checks the bidirectional grid (the larger one)."""
    if not _on_gpu(device):
        return None
    precision = "tf32" if dtype == torch.float32 and use_tf32(device) else "ieee"
    if choose_path(H, B, dtype, precision, device) != "multicta":
        return None
    # Stand-ins for the tensors: only their dtypes and alignment shape the compiled kernel.
    x = torch.empty(1, dtype=dtype, device=device)
    lengths = torch.empty(1, dtype=torch.int64, device=device)
    T = 64  # a multiple of 16, as in a typical training call
    constexprs = dict(ACT=0, PRECISION=precision, UPCAST=False)
    launches = (
        multicta_launch(forward_multicta_kernel, (x, x, lengths, x, x), (T, B, H), T, 2,
                        device, dtype, **constexprs),
        multicta_launch(backward_multicta_kernel, (x, x, x, lengths, x, x, x), (T, B, H),
                        T + 1, 2, device, dtype, **constexprs),
    )
    for launch in launches:
        why_not = _persistent_blocker(launch, device)
        if why_not is not None:
            return why_not
    return None


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


def forward_multicta_launch(Z, W_hh, h0, lengths, Hs, act: int, precision: str,
                            upcast: bool) -> MultiCTALaunch:
    """The multi-CTA forward of Z [T, B, D, H] into Hs; the state double buffer starts at h0."""
    T, B, D, H = Z.shape
    state = torch.empty(2, D, B, H, device=Z.device, dtype=W_hh.dtype)
    state[0].copy_(h0)
    return multicta_launch(forward_multicta_kernel, (Z, W_hh, lengths, Hs, state), (T, B, H),
                           T, D, Z.device, Z.dtype, ACT=act, PRECISION=precision, UPCAST=upcast)


def backward_multicta_launch(dHs, Hs, W_hh, lengths, dZ, dh0, act: int, precision: str,
                             upcast: bool) -> MultiCTALaunch:
    """The multi-CTA backward: T + 1 steps, the last one writes dh0."""
    T, B, D, H = Hs.shape
    state = torch.zeros(2, D, B, H, device=Hs.device, dtype=W_hh.dtype)
    return multicta_launch(backward_multicta_kernel, (dHs, Hs, W_hh, lengths, dZ, dh0, state),
                           (T, B, H), T + 1, D, Hs.device, Hs.dtype, ACT=act,
                           PRECISION=precision, UPCAST=upcast)


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
    path = choose_path(H, B, Z.dtype, precision, Z.device)
    grid = (D, triton.cdiv(B, BLOCK_B))
    with _device_guard(Z):
        if path == "multicta":
            ran = _run_multicta(forward_multicta_launch(Z, W_hh, h0, lengths, Hs, act, precision,
                                                        upcast), Z.device)
        else:
            ran = path == "onchip" and _launch_onchip(
                forward_onchip_kernel, grid, (Z, W_hh, h0, lengths, Hs, T, B, H), Z,
                ACT=act, PRECISION=precision, UPCAST=upcast,
                BLOCK_B=BLOCK_B, BLOCK_H=_hidden_block(H),
            )
        if not ran:
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
    path = choose_path(H, B, Hs.dtype, precision, Hs.device)
    grid = (D, triton.cdiv(B, BLOCK_B))
    with _device_guard(Hs):
        if path == "multicta":
            ran = _run_multicta(backward_multicta_launch(dHs, Hs, W_hh, lengths, dZ, dh0, act,
                                                         precision, upcast), Hs.device)
        else:
            ran = path == "onchip" and _launch_onchip(
                backward_onchip_kernel, grid, (dHs, Hs, W_hh, lengths, dZ, dh0, T, B, H), Hs,
                ACT=act, PRECISION=precision, UPCAST=upcast,
                BLOCK_B=BLOCK_B, BLOCK_H=_hidden_block(H),
            )
        if not ran:
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


# ---- the gated cells (LSTM, GRU): the same paths, less multi-CTA ------------------------------


def gated_stream_config(H: int, backward: bool) -> dict:
    """Tiles and launch options of the gated streamed kernels (``GATED_STREAM``)."""
    config = dict(GATED_STREAM["backward" if backward else "forward"])
    block_n, block_k = _stream_blocks(H)
    config.update(BLOCK_N=block_n, BLOCK_K=min(block_k, config["BLOCK_K"]))
    return config


def gated_forward(
    Z: torch.Tensor, W_hh: torch.Tensor, b_hn: torch.Tensor, h0: torch.Tensor,
    c0: torch.Tensor, lengths: torch.Tensor, cell: str, save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hs [T, B, D, H], the final c [D, B, H] (LSTM; GRU: h0, untouched) and, when ``save``,
    what the backward needs (SAVED [T, B, D, 5, H] fp32; else an empty tensor).

    Z [T, B, D, G*H], W_hh [D, G*H, H], b_hn [D, H] (GRU's; the LSTM wants zeros), h0, c0
    [D, B, H] (c0 not read for the GRU); see ``gated_kernels`` for the layouts.
    """
    G = GATES[cell]
    T, B, D, GH = Z.shape
    H = GH // G
    _check(Z, W_hh, h0, c0, b_hn)
    Z, W_hh, h0, c0, b_hn = (t.contiguous() for t in (Z, W_hh, h0, c0, b_hn))
    lengths = lengths.to(device=Z.device, dtype=torch.int64).contiguous()
    Hs = Z.new_empty(T, B, D, H)
    cn = torch.empty_like(c0) if G == 4 else h0
    saved = Z.new_empty((T, B, D, SAVED_SLOTS, H) if save else (0,), dtype=torch.float32)
    if Z.numel() == 0:
        return Hs.zero_(), (cn.copy_(c0) if G == 4 else cn), saved
    precision = _input_precision(Z)
    upcast = _upcast_dot(Z)
    path = choose_path(H, B, Z.dtype, precision, Z.device, gates=G)
    grid = (D, triton.cdiv(B, BLOCK_B))
    meta = dict(GATES=G, SAVE=save, PRECISION=precision, UPCAST=upcast, BLOCK_B=BLOCK_B)
    with _device_guard(Z):
        if not (path == "onchip" and _launch_onchip(
            gated_forward_onchip_kernel, grid,
            (Z, W_hh, b_hn, h0, c0, lengths, Hs, saved, cn, T, B, H), Z,
            **meta, BLOCK_H=_hidden_block(H), num_stages=GATED_ONCHIP_NUM_STAGES,
        )):
            state = Z.new_empty(2, D, B, H, dtype=torch.float32)
            c_state = Z.new_empty(D, B, H, dtype=torch.float32) if G == 4 else state
            gated_forward_streamed_kernel[grid](
                Z, W_hh, b_hn, h0, c0, lengths, Hs, saved, state, c_state, T, B, H,
                **meta, **gated_stream_config(H, backward=False),
            )
            if G == 4:
                cn.copy_(c_state)
    return Hs, cn, saved


def gated_backward(
    dHs: torch.Tensor, dcn: torch.Tensor, saved: torch.Tensor, W_hh: torch.Tensor,
    lengths: torch.Tensor, cell: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BPTT from dHs [T, B, D, H] (h_n's gradient included) and dc_n's [D, B, H] (LSTM;
    ignored for the GRU): dZ [T, B, D, G*H], dHN [T, B, D, H] (GRU: the gradient of n's
    hidden part; LSTM: empty), dh0 and dc0 [D, B, H] (GRU: dc0 is dh0)."""
    G = GATES[cell]
    T, B, D, H = dHs.shape
    dtype = W_hh.dtype
    dHs, dcn = dHs.to(dtype).contiguous(), dcn.to(dtype).contiguous()
    _check(dHs, W_hh, dcn)
    W_hh, saved = W_hh.contiguous(), saved.contiguous()
    lengths = lengths.to(device=dHs.device, dtype=torch.int64).contiguous()
    dZ = dHs.new_empty(T, B, D, G * H)
    dhn = dHs.new_empty(T, B, D, H) if G == 3 else dHs.new_empty(0)
    dh0 = dHs.new_empty(D, B, H)
    dc0 = torch.empty_like(dh0) if G == 4 else dh0
    if dHs.numel() == 0:
        dh0.zero_()
        return dZ.zero_(), dhn.zero_(), dh0, (dc0.copy_(dcn) if G == 4 else dc0)
    precision = _input_precision(dHs)
    upcast = _upcast_dot(dHs)
    path = choose_path(H, B, dtype, precision, dHs.device, gates=G)
    grid = (D, triton.cdiv(B, BLOCK_B))
    meta = dict(GATES=G, PRECISION=precision, UPCAST=upcast, BLOCK_B=BLOCK_B)
    with _device_guard(dHs):
        if not (path == "onchip" and _launch_onchip(
            gated_backward_onchip_kernel, grid,
            (dHs, dcn, saved, W_hh, lengths, dZ, dhn, dh0, dc0, T, B, H), dHs,
            **meta, BLOCK_H=_hidden_block(H), num_stages=GATED_ONCHIP_NUM_STAGES,
        )):
            carry = dHs.new_zeros(D, B, H, dtype=torch.float32)
            dc = dcn.to(torch.float32, copy=True) if G == 4 else carry
            gated_backward_streamed_kernel[grid](
                dHs, saved, W_hh, lengths, dZ, dhn, carry, dc, T, B, H,
                **meta, **gated_stream_config(H, backward=True),
            )
            dh0.copy_(carry)
            if G == 4:
                dc0.copy_(dc)
    return dZ, dhn, dh0, dc0
