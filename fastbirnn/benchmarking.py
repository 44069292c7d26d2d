"""Shared benchmarking code: shapes, contenders, timing, memory, machine info.

Used by the CLI (``python -m fastbirnn.bench``), the pytest-benchmark suite (``benchmarks/``)
and the GPU profiler (``benchmarks/profile_gpu.py``), so that all three build the same models,
inputs and steps and skip the same backends for the same reasons.

How things are measured (see ``benchmarks/README.md``):

- Every contender is a fastbirnn module of the case's cell (``FastBiRNN``, ``FastBiLSTM`` or
  ``FastBiGRU``) with one ``backend``, or the baseline nn class of that cell (``torch.nn.RNN``,
  ``nn.LSTM``, ``nn.GRU``), all holding the same weights, fed the same input. The three cells
  share every line of this module: only :data:`CELLS` differs.
- *forward*: one call under ``torch.no_grad()``. *train*: ``zero_grad(set_to_none=True)``,
  forward, ``backward`` of the output with a fixed random gradient (the input requires grad,
  as it does inside a network, so dX is computed too). No optimizer step.
- Timing (:func:`measure_by_mode`, :func:`measure_interleaved`): one mode after the other
  (inference, then training steps); within a mode, warm-up calls first (Triton compilation,
  allocator), then rounds in which every contender takes one sample in a rotating order, so
  machine noise hits all alike; each sample is a wall-clock time of ``number`` back-to-back
  calls (enough for ~2 ms), bracketed by a device synchronisation; the median over samples is
  reported. Modes are not interleaved: a model switching between inference and training at
  every call is not what users run, and it slows nn.LSTM (oneDNN) more than the kernel.
- Peak memory of a training step (:func:`peak_train_memory`): on CUDA,
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
  allocated before the step. On CPU there is no allocator high-water mark, so one step runs
  under ``torch.profiler`` with ``profile_memory=True`` and the peak of the running sum of
  its allocation/free events is taken: bytes obtained through PyTorch's CPU allocator during
  the step above what was live before it (parameters, input). Memory a kernel takes with
  ``malloc``/``std::vector`` outside the allocator is not seen; the C++ engine's kept scratch
  buffers are freed first, so the step's scratch is counted.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator, Optional

import torch
from torch import nn

import fastbirnn
from fastbirnn import FastBiGRU, FastBiLSTM, FastBiRNN
from fastbirnn.backends import cpp_backend
from fastbirnn.base import FusedRNNMixin


@dataclass(frozen=True)
class Cell:
    """A benchmarked cell: its nn class (the baseline), its fastbirnn drop-in, their label."""

    baseline: str  # the baseline contender's name in tables and JSON
    nn_class: type
    fast_class: type


CELLS: dict[str, Cell] = {
    "rnn": Cell("nn.RNN", nn.RNN, FastBiRNN),
    "lstm": Cell("nn.LSTM", nn.LSTM, FastBiLSTM),
    "gru": Cell("nn.GRU", nn.GRU, FastBiGRU),
}

# The Elman cell's baseline; ``baseline_name(cell)`` for any cell.
BASELINE = CELLS["rnn"].baseline
BASELINES = frozenset(c.baseline for c in CELLS.values())


def baseline_name(cell: str = "rnn") -> str:
    """The baseline contender of ``cell``: 'nn.RNN', 'nn.LSTM' or 'nn.GRU'."""
    return CELLS[cell].baseline


def is_baseline(name: str) -> bool:
    return name in BASELINES

# label -> (dtype, TF32 allowed). TF32 only matters for fp32 on CUDA (cuBLAS, cuDNN, tl.dot).
DTYPES: dict[str, tuple[torch.dtype, Optional[bool]]] = {
    "fp32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
}


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration: (B, T, I, H), layers, precision, cell."""

    batch: int
    seq: int
    input: int
    hidden: int
    layers: int = 1
    dtype: str = "fp32"
    nonlinearity: str = "tanh"
    cell: str = "rnn"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; one of {', '.join(DTYPES)}")
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; one of {', '.join(CELLS)}")
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"unknown nonlinearity {self.nonlinearity!r}; tanh or relu")
        if self.cell != "rnn" and self.nonlinearity != "tanh":
            raise ValueError(f"nonlinearity is an Elman RNN option: the {self.cell.upper()} "
                             "cell has fixed gates")

    @property
    def baseline(self) -> str:
        return baseline_name(self.cell)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def shape(self) -> str:
        s = f"B{self.batch} T{self.seq} I{self.input} H{self.hidden}"
        return s if self.layers == 1 else f"{s} L{self.layers}"

    @property
    def id(self) -> str:
        s = f"b{self.batch}-t{self.seq}-i{self.input}-h{self.hidden}"
        if self.layers != 1:
            s += f"-l{self.layers}"
        if self.nonlinearity != "tanh":
            s += f"-{self.nonlinearity}"
        s = f"{s}-{self.dtype}"
        return s if self.cell == "rnn" else f"{self.cell}-{s}"

    def with_dtype(self, dtype: str) -> "Case":
        return replace(self, dtype=dtype)

    def with_cell(self, cell: str, nonlinearity: str = "tanh") -> "Case":
        return replace(self, cell=cell, nonlinearity=nonlinearity)

    def as_dict(self) -> dict:
        return asdict(self)


def _grid(batches, hiddens, seq, dtypes) -> list[Case]:
    return [Case(b, seq, h, h, dtype=d) for d in dtypes for h in hiddens for b in batches]


# The design's three shapes: the tutorial's, medium, large.
DESIGN_SHAPES = [Case(2, 4, 16, 32), Case(32, 128, 128, 128), Case(64, 256, 256, 512)]

# The GPU grid of issues 5 and 8: batch {1,8,32,128} x hidden {128,256,512,1024}, T=256,
# plus small batch / long sequence and the design's big one.
GPU_GRID = _grid((1, 8, 32, 128), (128, 256, 512, 1024), 256, ("fp32",))
GPU_EXTRA = [Case(4, 1024, 256, 256), Case(256, 256, 1024, 1024)]


def _with_dtypes(cases: list[Case], dtypes) -> list[Case]:
    return [c.with_dtype(d) for d in dtypes for c in cases]


# preset -> device type -> cases. Presets are also what the pytest-benchmark suite runs.
PRESETS: dict[str, dict[str, list[Case]]] = {
    # A few seconds: the CLI smoke test.
    "tiny": {
        "cpu": [Case(2, 4, 16, 32), Case(4, 8, 16, 32)],
        "cuda": [Case(2, 4, 16, 32), Case(4, 8, 16, 32)],
    },
    # The default: under a minute on a 2-core CPU.
    "quick": {
        "cpu": list(DESIGN_SHAPES),
        "cuda": _with_dtypes(
            [Case(8, 256, 256, 256), Case(8, 256, 1024, 1024), Case(32, 256, 512, 512)],
            ("tf32", "bf16"),
        ),
    },
    # Sweeps over batch and hidden around the design shapes: minutes on a 2-core CPU.
    "cpu": {
        "cpu": list(DESIGN_SHAPES)
        + [Case(b, 128, 128, 128) for b in (1, 8, 64)]
        + [Case(32, 128, h, h) for h in (32, 64, 256, 512)],
    },
    # Issues 5/8: the full GPU grid, fp32 with TF32 on and off, and bf16.
    "gpu": {
        "cuda": _with_dtypes(GPU_GRID + GPU_EXTRA, ("tf32", "bf16", "fp32"))
        + [c.with_dtype("tf32") for c in DESIGN_SHAPES],
    },
}


# (preset, device type, cell) -> cases, where a cell's differ from PRESETS'. With the design's
# large shape, (64, 256, 256, 512), the quick preset of the LSTM and the GRU took 49 s and 63 s
# on an idle 2-core VM (issue 26; the Elman one about 20 s): nn.LSTM and nn.GRU are slow
# there. On CPU their quick preset takes instead (32, 128, 512, 512), a point of the committed
# LSTM and GRU grids with a quarter of its multiply-adds (benchmarks/results/cpu-grid-lstm,
# cpu-grid-gru: nn.LSTM's training step 0.64 s there, nn.GRU's 0.70 s).
CELL_PRESETS: dict[tuple[str, str, str], list[Case]] = {
    ("quick", "cpu", cell): DESIGN_SHAPES[:2] + [Case(32, 128, 512, 512)]
    for cell in ("lstm", "gru")
}


def preset_cases(
    preset: str, device: torch.device | str, cell: str = "rnn", nonlinearity: str = "tanh"
) -> list[Case]:
    """The preset's shapes for ``device``, as cases of ``cell`` (the same shapes for every
    cell, except where ``CELL_PRESETS`` names others)."""
    kind = torch.device(device).type
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
    by_device = PRESETS[preset]
    if kind not in by_device:
        raise ValueError(
            f"preset {preset!r} is for {' / '.join(by_device)}, not {kind}; "
            f"presets for {kind}: {', '.join(p for p, d in PRESETS.items() if kind in d)}"
        )
    cases = CELL_PRESETS.get((preset, kind, cell), by_device[kind])
    return [c.with_cell(cell, nonlinearity) for c in cases]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------- contenders

# The reference backend is a Python loop over time steps: only for tiny shapes.
REFERENCE_MAX_SEQ = 8
REFERENCE_MAX_HIDDEN = 64


def candidate_backends() -> list[str]:
    """FastBiRNN backends worth benchmarking: 'auto' plus every registered kernel backend.

    'torch' is left out: it is nn.RNN itself, the baseline.
    """
    names = [n for n in fastbirnn.available_backends() if n not in ("auto", "torch")]
    return ["auto", *names]


def skip_reason(backend: str, case: Case, device: torch.device | str) -> Optional[str]:
    """Why ``backend`` is not benchmarked for ``case`` on ``device``, or None."""
    device = torch.device(device)
    if is_baseline(backend) or backend == "auto":
        return None
    status = fastbirnn.available_backends()
    if backend not in status:
        return f"unknown backend {backend!r}"
    reason = missing_cell_reason(backend, case.cell)
    if reason is not None:
        return reason
    if status[backend] is not None:
        return f"unavailable: {status[backend]}"
    if backend == "triton" and device.type != "cuda":
        return "triton runs on CPU only under the Triton interpreter: not a benchmark"
    if backend == "reference" and (
        case.seq > REFERENCE_MAX_SEQ or case.hidden > REFERENCE_MAX_HIDDEN
    ):
        return "reference is a Python loop over time: tiny shapes only"
    from fastbirnn import backends

    probe = torch.empty(0, dtype=DTYPES[case.dtype][0], device=device)
    reason = backends.get(backend).unsupported_reason(probe)
    return None if reason is None else f"unsupported: {reason}"


def missing_cell_reason(backend: str, cell: str) -> Optional[str]:
    """Why the fastbirnn ``backend`` cannot run ``cell`` at all (it has no such cell), or None.

    'auto' always can (it resolves to the nn class where no kernel has the cell), and so
    can 'torch' (the nn class itself).
    """
    from fastbirnn import backends

    if backend in ("auto", backends.TORCH) or backend not in backends.names():
        return None
    if backends.get(backend).supports(cell):
        return None
    have = [n for n in backends.names()
            if n in ("auto", backends.TORCH) or backends.get(n).supports(cell)]
    return (f"backend {backend!r} has no {cell.upper()} cell yet (backends with it: "
            f"{', '.join(have)})")


def contenders(
    case: Case, device: torch.device | str, backends: Optional[list[str]] = None
) -> list[tuple[str, Optional[str]]]:
    """[(name, skip reason or None)], the baseline (the cell's nn class) first."""
    names = candidate_backends() if backends is None else [
        b for b in backends if not is_baseline(b)]
    return [(case.baseline, None)] + [(n, skip_reason(n, case, device)) for n in names]


# ------------------------------------------------------------------------ models, steps


def build_models(case: Case, device, names: list[str], seed: int = 0) -> dict[str, nn.Module]:
    """The baseline nn class of the case's cell and one fastbirnn module per backend name,
    all with the same weights (any baseline name in ``names`` is the baseline)."""
    dtype = DTYPES[case.dtype][0]
    cell = CELLS[case.cell]
    kwargs = {"num_layers": case.layers}
    if case.cell == "rnn":
        kwargs["nonlinearity"] = case.nonlinearity
    torch.manual_seed(seed)
    base = cell.nn_class(case.input, case.hidden, bidirectional=True, **kwargs).to(
        device=device, dtype=dtype)
    models: dict[str, nn.Module] = {}
    for name in names:
        if is_baseline(name):
            models[name] = base
            continue
        m = cell.fast_class(case.input, case.hidden, device=device, dtype=dtype, backend=name,
                            **kwargs)
        m.load_state_dict(base.state_dict())
        models[name] = m
    return models


def make_inputs(case: Case, device, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, B, I] (requires grad) and a fixed output gradient [T, B, 2H]."""
    dtype = DTYPES[case.dtype][0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.seq, case.batch, case.input, generator=g).to(device, dtype)
    grad_out = torch.randn(case.seq, case.batch, 2 * case.hidden, generator=g).to(device, dtype)
    return x.requires_grad_(True), grad_out


def resolved_backend(model: nn.Module, x: torch.Tensor) -> str:
    """What actually runs: 'torch' for the nn class, the backend 'auto' resolves to, etc."""
    if isinstance(model, FusedRNNMixin):
        return model.selected_backend(x)
    return "torch"


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Inference: one forward under no_grad (no synchronisation: the timer does that)."""

    def step() -> None:
        with torch.no_grad():
            model(x)

    return step


def train_step(model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    """Training step: zero grads, forward, backward of the output (no optimizer)."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = model(x)
        out.backward(grad_out)

    return step


def synchronized(fn: Callable[[], None], device) -> Callable[[], None]:
    """``fn`` followed by a device synchronisation (what pytest-benchmark times)."""
    if torch.device(device).type != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(device)

    return run


@contextlib.contextmanager
def precision(dtype_label: str) -> Iterator[None]:
    """Set TF32 for fp32 matmuls and cuDNN as the case says ('tf32' on, 'fp32' off)."""
    allow = DTYPES[dtype_label][1]
    if allow is None:
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------------------ timing


@dataclass
class Timing:
    """Seconds per call, one entry per sample (each the mean of ``number`` calls)."""

    samples: list[float] = field(default_factory=list)
    number: int = 1

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def iqr(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[2] - q[0]


def _time_calls(fn: Callable[[], None], number: int, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / number


def measure_interleaved(
    fns: dict,
    device,
    *,
    warmup: int = 1,
    min_rounds: int = 3,
    max_rounds: int = 15,
    budget_s: float = 5.0,
    target_sample_s: float = 0.002,
) -> dict:
    """Median-ready timings of several callables, interleaved.

    ``fns`` maps any key to a no-argument callable. Each gets ``warmup`` untimed calls (Triton
    compiles on the first) and one timed estimate (also untimed in the results); then rounds, each taking one sample of every callable in a rotating order,
    until ``max_rounds`` or, after ``min_rounds``, once ``budget_s`` is spent. A sample times
    ``number`` back-to-back calls, with ``number`` chosen so a sample lasts ~``target_sample_s``.
    """
    keys = list(fns)
    timings = {k: Timing() for k in keys}
    for k in keys:
        for _ in range(warmup):
            fns[k]()
        estimate = _time_calls(fns[k], 1, device)
        timings[k].number = max(1, min(1000, int(target_sample_s / max(estimate, 1e-7))))
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for r in range(max_rounds):
            if r >= min_rounds and time.perf_counter() - start > budget_s:
                break
            shift = r % len(keys)
            for k in keys[shift:] + keys[:shift]:
                timings[k].samples.append(_time_calls(fns[k], timings[k].number, device))
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings


def measure_by_mode(fns: dict, device, *, budget_s: float = 5.0, **kwargs) -> dict:
    """:func:`measure_interleaved` for each mode in turn, the contenders interleaved within it.

    ``fns`` maps ``(contender, mode)`` keys to callables; the budget is split evenly between
    the modes. Interleaving the modes too would time each model alternating between an
    inference and a training call, which no training loop or server does, and which costs
    nn.LSTM alone: oneDNN's training step at the tagger's (32, 40, 100, 128) took 37.4 ms
    with the modes interleaved and 18.4 ms timed per mode (benchmarks/results/
    cpu-grid-tagger-lstm/, 2-core Zen 4, torch 2.13).
    """
    modes = list(dict.fromkeys(key[-1] for key in fns))
    timings: dict = {}
    for mode in modes:
        group = {key: fn for key, fn in fns.items() if key[-1] == mode}
        timings.update(measure_interleaved(group, device, budget_s=budget_s / len(modes),
                                           **kwargs))
    return timings


# ------------------------------------------------------------------------- disturbance

# A case is disturbed when other processes used more than this many cores on average beyond
# the ones this process leaves idle (cpu_count - torch threads). An idle machine's daemons
# take a few hundredths of a core.
OTHER_CORES_LIMIT = 0.2
# A contender's repeats are too spread out when their interquartile range exceeds this
# fraction of their median. On an idle 2-core VM the worst seen was 0.34 (the tutorial shape,
# ~30 us calls); a steady run of a large shape stays under 0.05.
SPREAD_LIMIT = 0.5


def _machine_busy_seconds() -> Optional[float]:
    """CPU seconds all processes have used since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy;
    # steal is time a hypervisor gave another guest while this one wanted to run.
    ticks = [int(v) for v in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


class OtherCpuMeter:
    """How many cores other processes kept busy, on average, since it was created."""

    def __init__(self) -> None:
        self._machine = _machine_busy_seconds()
        self._own = time.process_time()  # all of this process's threads
        self._wall = time.perf_counter()

    def cores(self) -> Optional[float]:
        """Average cores used by other processes, or None where it cannot be measured."""
        machine = _machine_busy_seconds()
        wall = time.perf_counter() - self._wall
        if machine is None or self._machine is None or wall <= 0:
            return None
        other = (machine - self._machine) - (time.process_time() - self._own)
        return max(0.0, other / wall)


def relative_spread(samples: list[float]) -> float:
    """Interquartile range of the samples over their median (0 for fewer than 2)."""
    if len(samples) < 2:
        return 0.0
    q = statistics.quantiles(samples, n=4, method="inclusive")
    median = statistics.median(samples)
    return (q[2] - q[0]) / median if median > 0 else 0.0


def disturbance(
    samples: dict[str, list[float]],
    baseline_samples: Optional[dict[str, list[float]]],
    other_cores: Optional[float],
    spare_cores: float = 0.0,
    baseline: str = BASELINE,
) -> list[str]:
    """Why a row's times or ratios cannot be trusted; empty when nothing disturbed them.

    ``samples``: the row's repeat times per mode ('fwd', 'train'). ``baseline_samples``:
    the baseline's (``baseline``: nn.RNN, nn.LSTM or nn.GRU), since a ratio is wrong when
    either side is (None for the baseline's own row).
    ``other_cores``: what :class:`OtherCpuMeter` measured over the case (None: unknown).
    ``spare_cores``: cores this process does not use (cpu_count - torch threads), which
    others may use freely.
    """
    reasons = []
    if other_cores is not None and other_cores > spare_cores + OTHER_CORES_LIMIT:
        reasons.append(f"others {other_cores:.2f} cores")
    for who, by_mode in (("", samples), (f"{baseline} ", baseline_samples or {})):
        spreads = {mode: relative_spread(values) for mode, values in by_mode.items()}
        wide = [f"{mode} {spread:.0%}" for mode, spread in spreads.items() if spread > SPREAD_LIMIT]
        if wide:
            reasons.append(f"{who}spread {' '.join(wide)}")
    return reasons


# ------------------------------------------------------------------------------ memory


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop chatter on fd 2."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_from_profiler(fn: Callable[[], None]) -> Optional[int]:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    try:
        events = prof.profiler.kineto_results.events()
        allocations = sorted(
            (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"
        )
    except Exception:  # private API moved: report nothing rather than a wrong number
        return None
    running = peak = 0
    for _, nbytes in allocations:
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_train_memory(fn: Callable[[], None], device, warm: bool = True) -> Optional[int]:
    """Peak bytes a training step allocates above what was live before it (see module doc).

    ``warm``: ``fn`` already ran (else it runs once first, so first-call caches don't count).
    """
    device = torch.device(device)
    if not warm:
        fn()
    # The C++ engine keeps large scratch buffers per thread between calls: free them, so the
    # step allocates (and this counts) its own.
    from fastbirnn.backends.cpp_backend import release_scratch

    release_scratch()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type == "cpu":
        return _cpu_peak_from_profiler(fn)
    return None


# ---------------------------------------------------------------------- one whole case


def run_case(
    case: Case,
    device,
    backends: Optional[list[str]] = None,
    *,
    warmup: int = 1,
    min_rounds: int = 3,
    max_rounds: int = 15,
    budget_s: float = 5.0,
    memory: bool = True,
    seed: int = 0,
) -> list[dict]:
    """Time every contender on ``case`` (forward and train, interleaved); one row each.

    Rows of skipped contenders carry ``skipped`` (the reason) and no numbers.
    """
    device = torch.device(device)
    entries = contenders(case, device, backends)
    names = [n for n, reason in entries if reason is None]
    rows: list[dict] = []
    with precision(case.dtype):
        models = build_models(case, device, names, seed=seed)
        x, grad_out = make_inputs(case, device, seed=seed + 1)
        fns = {}
        for name in names:
            fns[(name, "fwd")] = forward_step(models[name], x)
            fns[(name, "train")] = train_step(models[name], x, grad_out)
        meter = OtherCpuMeter()
        timings = measure_by_mode(
            fns, device, warmup=warmup, min_rounds=min_rounds, max_rounds=max_rounds,
            budget_s=budget_s,
        )
        other_cores = meter.cores()
        peaks = {n: peak_train_memory(fns[(n, "train")], device) if memory else None
                 for n in names}
        # What ran in each timed step: 'auto' decides by grad mode too (forward: no_grad).
        with torch.no_grad():
            resolved_fwd = {n: resolved_backend(models[n], x) for n in names}
        resolved = {n: resolved_backend(models[n], x) for n in names}
    base_name = case.baseline
    base_fwd = timings[(base_name, "fwd")].median
    base_train = timings[(base_name, "train")].median
    base_samples = {m: timings[(base_name, m)].samples for m in ("fwd", "train")}
    spare_cores = max(0, (os.cpu_count() or 1) - torch.get_num_threads())
    for name, reason in entries:
        row: dict = {
            "case": case.as_dict(), "id": case.id, "shape": case.shape, "dtype": case.dtype,
            "backend": name, "device": device.type, "cell": case.cell,
        }
        if reason is not None:
            row["skipped"] = reason
            rows.append(row)
            continue
        fwd, train = timings[(name, "fwd")], timings[(name, "train")]
        row.update(
            resolved_backend=resolved[name],  # the training step's (as before)
            resolved_backend_fwd=resolved_fwd[name],
            fwd_ms=fwd.median * 1e3,
            train_ms=train.median * 1e3,
            fwd_iqr_ms=fwd.iqr * 1e3,
            train_iqr_ms=train.iqr * 1e3,
            fwd_samples_ms=[s * 1e3 for s in fwd.samples],
            train_samples_ms=[s * 1e3 for s in train.samples],
            calls_per_sample={"fwd": fwd.number, "train": train.number},
            tokens_per_s_fwd=case.tokens / fwd.median,
            tokens_per_s_train=case.tokens / train.median,
            speedup_fwd=base_fwd / fwd.median,
            speedup_train=base_train / train.median,
            peak_train_bytes=peaks[name],
            other_cpu_cores=None if other_cores is None else round(other_cores, 3),
            fwd_spread=relative_spread(fwd.samples),
            train_spread=relative_spread(train.samples),
            disturbed_by=disturbance(
                {"fwd": fwd.samples, "train": train.samples},
                None if name == base_name else base_samples, other_cores, spare_cores,
                baseline=base_name,
            ),
        )
        rows.append(row)
    del models, fns, x, grad_out
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------ machine info


def _first_cpu_fields() -> dict[str, str]:
    """/proc/cpuinfo's fields for the first CPU (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _cpu_model() -> str:
    return _first_cpu_fields().get("model name") or platform.processor() or platform.machine()


def _cpu_id() -> dict:
    """Vendor, family, model and stepping: what tells CPUs with one model name apart (a VM's
    "AMD EPYC" is Zen 4 at family 25 and Zen 5 at family 26)."""
    fields = _first_cpu_fields()
    return {key: fields[name] for key, name in (("vendor", "vendor_id"), ("family", "cpu family"),
                                                ("model", "model"), ("stepping", "stepping"))
            if name in fields}


def git_commit(path: Optional[str] = None) -> Optional[dict]:
    """The commit of the checkout holding ``path`` (default: this package), and if dirty.

    Without a git checkout (a copied working tree, e.g. on the GPU machine), the commit
    named by the environment variable ``FASTBIRNN_GIT_COMMIT``, if any.
    """
    cwd = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from_env = os.environ.get("FASTBIRNN_GIT_COMMIT")
    fallback = {"commit": from_env, "dirty": None, "source": "FASTBIRNN_GIT_COMMIT"} \
        if from_env else None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return fallback
        # Measured results are outputs, not code: a grid rewriting its own files, or one grid
        # run after another, must not mark the code it measured as modified.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude)benchmarks/results"], cwd=cwd, capture_output=True, text=True, timeout=10,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return fallback


def _cpu_vector_flags() -> list[str]:
    """The CPU's vector and matrix instruction flags (lscpu's, from /proc/cpuinfo): which
    kernels a result was measured on (AVX2, FMA, AVX-512 and its BF16, AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags
                                  if f in ("avx2", "fma") or f.startswith(("avx512", "amx")))
    except OSError:
        pass
    return []


# What lowers every contender of a CPU comparison to one instruction-set level, as a CPU of
# that level would run them: the engine (FASTBIRNN_ISA), ATen's vector kernels, MKL's GEMMs and
# oneDNN's RNN primitives. All are read when the libraries load, so they must be set before
# Python starts (run_with_isa re-executes the script with them).
ISA_ENV = {
    "avx2": {"FASTBIRNN_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def run_with_isa(isa: Optional[str]) -> None:
    """Re-execute this process with ``ISA_ENV[isa]`` set unless it already runs with it (a
    no-op for None). Returns only when the environment is already in place."""
    if isa is None:
        return
    wanted = ISA_ENV[isa]
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})


def machine_info(device) -> dict:
    device = torch.device(device)
    info: dict = {
        "device": device.type,
        "cpu": _cpu_model(),
        "cpu_id": _cpu_id(),
        "cpu_flags": _cpu_vector_flags(),
        "engine_isa": cpp_backend.cpu_isa(),  # the cpp engine's level (FASTBIRNN_ISA lowers it)
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_env": {k: os.environ[k] for k in ISA_ENV["avx2"] if k in os.environ},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "fastbirnn": fastbirnn.__version__,
        "backends": fastbirnn.available_backends(),
        "git": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as error:  # noqa: BLE001 - any import failure just means "no triton"
        info["triton"] = None
        info["triton_error"] = f"{type(error).__name__}: {error}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_sm_count=props.multi_processor_count,
            allow_tf32_default={
                "matmul": torch.backends.cuda.matmul.allow_tf32,
                "cudnn": torch.backends.cudnn.allow_tf32,
            },
        )
    return info


def describe_machine(info: dict) -> str:
    """One line: what it was measured on."""
    if info.get("device") == "cuda":
        hw = f"{info.get('gpu')} (sm {info.get('gpu_capability')}), CUDA {info.get('cuda')}"
    else:
        hw = f"{info.get('cpu')}, {info.get('cpu_count')} cores, {info.get('torch_threads')} threads"
    git = info.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + ("+dirty" if git.get("dirty") else "")
    return (f"{hw}; torch {info.get('torch')}, triton {info.get('triton')}, "
            f"python {info.get('python')}; commit {commit}")


# ---------------------------------------------------------------------------- bf16


def _relative_rms_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    diff = value.double() - truth.double()
    return (diff.square().mean().sqrt() / truth.double().square().mean().sqrt()).item()


def bf16_accuracy(cell: str, steps: int = 200, batch: int = 8, input_size: int = 32,
                  hidden: int = 64, layers: int = 2) -> dict:
    """The RMS errors (relative to the fp64 result's RMS) of the outputs, final states and every
    gradient of the nn class and of the engine (backend='cpp'), both under CPU bf16 autocast,
    against the nn class in fp64; same weights and inputs. Issue 24's accuracy bar compares
    them (tests/test_bf16.py, benchmarks/bf16_autocast.py)."""
    nn_class = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
    fast_class = {"rnn": FastBiRNN, "lstm": FastBiLSTM, "gru": FastBiGRU}[cell]
    torch.manual_seed(2)
    reference = nn_class(input_size, hidden, num_layers=layers, bidirectional=True)
    fused = fast_class(input_size, hidden, num_layers=layers, backend="cpp")
    fused.load_state_dict(reference.state_dict())
    exact = nn_class(input_size, hidden, num_layers=layers, bidirectional=True)
    exact.load_state_dict(reference.state_dict())
    exact.double()
    torch.manual_seed(3)
    x = torch.randn(steps, batch, input_size)
    grad_out = torch.randn(steps, batch, 2 * hidden)

    def run(model, autocast: bool):
        model.zero_grad(set_to_none=True)
        inp = x.to(next(model.parameters()).dtype, copy=True).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, final = model(inp)
        final = final if isinstance(final, tuple) else (final,)
        out.to(grad_out.dtype).backward(grad_out)
        grads = {"input": inp.grad}
        grads.update({n: p.grad for n, p in model.named_parameters()})
        values = {"output": out, **{f"final_state_{i}": s for i, s in enumerate(final)}}
        return values, grads

    truth_values, truth_grads = run(exact, False)
    errors = {}
    for name, model in (("nn", reference), ("cpp", fused)):
        values, grads = run(model, True)
        errors[name] = {k: _relative_rms_error(v, truth_values[k]) for k, v in values.items()}
        errors[name].update({f"grad_{k}": _relative_rms_error(v, truth_grads[k])
                             for k, v in grads.items()})
    ratio = {k: errors["cpp"][k] / errors["nn"][k] for k in errors["nn"]}
    return {"cell": cell, "steps": steps, "batch": batch, "input_size": input_size,
            "hidden": hidden, "layers": layers, "rms_error": errors,
            "cpp_over_nn": ratio, "worst_cpp_over_nn": max(ratio.values())}
