"""The CPU benchmark grids behind ``'auto'``'s rule (fastbirnn/backends/cpu_rule.py), per cell.

One command reproduces each (JSON, CSV, plot and a summary under ``--out``, by default the cell's
folder ``benchmarks/results/cpu-grid`` for rnn, ``cpu-grid-lstm``, ``cpu-grid-gru``):

    python benchmarks/cpu_grid.py --out benchmarks/results/cpu-grid --max-macs 1e9 --budget 0.3
    python benchmarks/cpu_grid.py --cell lstm     # -> benchmarks/results/cpu-grid-lstm/
    python benchmarks/cpu_grid.py --cell gru      # -> benchmarks/results/cpu-grid-gru/

Each point times the cell's nn class (nn.RNN, nn.LSTM, nn.GRU), the fused kernel
(``backend='cpp'``, when it has the cell) and ``backend='auto'`` with the same weights,
interleaved in one process (medians of rounds), for inference (``no_grad``) and a training
step (forward + backward). The run time is estimated before starting; ``grid.json`` is
rewritten after every point and ``--resume`` continues a disturbed run where it stopped.

The Elman (rnn) space: unidirectional and bidirectional, B 1-256, T 4-512, H 32-1024, 1-3
layers, fp32 and fp64, at 1 thread and at all threads. The full product is ~2,000 points and
days of CPU time on 2 cores, so the grid is a covering sample: every (B, T, H) of B {1, 8, 64,
256} x T {4, 64, 512} x H {32, 128, 512, 1024}, each at both thread counts and both
directions, with the layer count (1-3) and the dtype (one point in four fp64) rotated over
the points, plus the issue's named shapes. Points whose forward exceeds ``--max-macs``
multiply-adds are shortened in T (kept in B and H) so a run takes minutes; the rule
extrapolates past them (there every step is a large GEMM).

The gated (lstm, gru) space, smaller since each point costs 2-5x an Elman one: every (B, T,
H) of B {1, 8, 32, 128} x T {16, 128} x H {64, 128, 256, 512}, uni- and bidirectional, one
layer, fp32, at all threads; plus a few fp64 and 2-layer points and the tutorial's shape.

``--check FILE`` re-evaluates the current rule on a committed grid without timing anything:
it lists every point where the rule picks the slower contender by more than the noise
allowance (with the cell in the rule's ``CallShape``), and every point where it would pick
a kernel the grid has no timing of.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

import fastbirnn
from fastbirnn import backends
from fastbirnn import benchmarking as bm
from fastbirnn.backends import cpp_backend, cpu_rule
from fastbirnn.benchmarking import machine_info, measure_by_mode

BATCH = (1, 8, 64, 256)
SEQ = (4, 64, 512)
HIDDEN = (32, 128, 512, 1024)
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
NOISE = 0.03  # the noise allowance of the target "auto >= 1.0x"
GATES = {"rnn": 1, "gru": 3, "lstm": 4}  # gate blocks per cell: its GEMMs' width in units of H

# The gated cells' preset (see the module doc).
GATED_BATCH = (1, 8, 32, 128)
GATED_SEQ = (16, 128)
GATED_HIDDEN = (64, 128, 256, 512)
GATED_EXTRA = [  # (B, T, I, H, layers, bidirectional, dtype)
    (2, 4, 16, 32, 1, True, "fp32"),  # the tutorial's
    (1, 128, 64, 64, 1, True, "fp64"),
    (8, 128, 128, 128, 1, True, "fp64"),
    (32, 16, 256, 256, 1, False, "fp64"),
    (128, 128, 512, 512, 1, True, "fp64"),
    (1, 128, 512, 512, 2, True, "fp32"),
    (8, 128, 128, 128, 2, True, "fp32"),
    (32, 128, 256, 256, 2, False, "fp32"),
    (128, 16, 64, 64, 2, True, "fp32"),
]
# The held-out points (--preset heldout): shapes taggers and speech models run, off every axis
# the grids sample (I != H, 300-d embeddings, T 20-60, odd H, B 16-64), which no threshold of
# the rule was fitted to. Report the rule against them separately (their own --out folder),
# to check it, never to fit it.
HELDOUT = [  # (B, T, I, H, layers, bidirectional, dtype)
    (16, 20, 300, 100, 1, True, "fp32"),
    (32, 40, 300, 128, 1, True, "fp32"),
    (64, 60, 300, 256, 1, True, "fp32"),
    (16, 50, 300, 200, 2, True, "fp32"),
    (32, 30, 100, 256, 2, True, "fp32"),
    (48, 25, 300, 150, 1, False, "fp32"),
    (24, 45, 50, 300, 1, True, "fp32"),
    (1, 35, 300, 256, 2, True, "fp32"),
    (8, 60, 300, 100, 1, True, "fp32"),
    (64, 20, 100, 200, 1, True, "fp64"),
    (12, 48, 100, 96, 1, False, "fp32"),  # added with the LSTM's one-direction training limit
    # added with the Elman rule's short-sequence change (T < 16, large steps):
    (32, 6, 512, 768, 1, True, "fp32"),
    (48, 5, 256, 640, 2, False, "fp32"),
    (16, 12, 300, 1024, 1, False, "fp32"),
    # one direction at batch 64-96, uneven 64-column blocks (H 200, 320): added to check a clause
    # fusing one-direction LSTM training from batch 64, which the first point disproved (0.72x)
    (64, 30, 100, 200, 1, False, "fp32"),
    (96, 50, 300, 320, 1, False, "fp32"),
    # added with the clause fusing one direction's LSTM training from batch 16 on a team
    # (after the batch split in training, e3887d3): the batch-16 edge, uneven blocks, two
    # layers past the split's weight limit, two blocks of 64 and 32
    (16, 60, 100, 256, 1, False, "fp32"),
    (40, 35, 200, 176, 1, False, "fp32"),
    (32, 80, 300, 384, 2, False, "fp32"),
    (128, 24, 64, 96, 1, False, "fp32"),
]
# The tagger preset (--preset tagger, LSTM, issue 23): the rows of the table (a tagger,
# 2-layer and long-sequence taggers, speech, a long unidirectional layer, batch-1 serving), then
# tagger shapes (I != H, T 20-60, B 16-64, H 100-512, 1-2 layers) apart from HELDOUT's, which
# stay out of every fit.
TAGGER = [  # (B, T, I, H, layers, bidirectional, dtype)
    (32, 40, 100, 128, 1, True, "fp32"),
    (32, 40, 100, 256, 2, True, "fp32"),
    (32, 128, 128, 128, 1, True, "fp32"),
    (16, 200, 80, 320, 3, True, "fp32"),
    (64, 250, 64, 512, 1, False, "fp32"),
    (1, 30, 300, 256, 2, True, "fp32"),
    (16, 30, 100, 100, 1, True, "fp32"),
    (16, 60, 300, 200, 1, True, "fp32"),
    (32, 20, 300, 256, 1, True, "fp32"),
    (32, 50, 100, 200, 2, True, "fp32"),
    (64, 30, 100, 128, 1, True, "fp32"),
    (64, 40, 300, 300, 1, True, "fp32"),
    (64, 50, 50, 512, 1, True, "fp32"),
    (16, 40, 300, 512, 1, True, "fp32"),
    (32, 60, 300, 400, 1, True, "fp32"),
    (48, 30, 200, 150, 2, True, "fp32"),
    (24, 25, 100, 256, 1, False, "fp32"),
    (64, 40, 100, 128, 2, True, "fp32"),
    (16, 25, 50, 100, 2, True, "fp32"),
    (32, 35, 300, 512, 2, True, "fp32"),
]
MICRO = [  # the --preset micro smoke test: seconds
    (2, 4, 16, 32, 1, True, "fp32"),
    (2, 4, 16, 32, 1, False, "fp64"),
]

RESULTS = "benchmarks/results"


def default_out(cell: str, isa: Optional[str] = None) -> str:
    """The cell's committed folder: cpu-grid (rnn), cpu-grid-lstm, cpu-grid-gru; with a
    forced level, -avx2 after it (cpu-grid-avx2, cpu-grid-lstm-avx2, ...)."""
    name = "cpu-grid" if cell == "rnn" else f"cpu-grid-{cell}"
    return os.path.join(RESULTS, name + (f"-{isa}" if isa else ""))


@dataclass(frozen=True)
class Point:
    batch: int
    seq: int
    input: int
    hidden: int
    layers: int
    bidirectional: bool
    dtype: str
    threads: int
    cell: str = "rnn"  # grids written before cells were recorded are Elman grids
    isa: str = "avx512"  # the engine's level (grids written before it was recorded: AVX-512)

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def macs(self) -> int:
        """Multiply-adds of one forward (projection and recurrence, all layers)."""
        D = self.directions
        first = self.input * self.hidden + self.hidden * self.hidden
        rest = D * self.hidden * self.hidden + self.hidden * self.hidden
        return GATES[self.cell] * D * self.seq * self.batch * (first + (self.layers - 1) * rest)

    @property
    def step_macs(self) -> int:
        """Multiply-adds of one recurrence step, both directions (G*D*B*H^2)."""
        return GATES[self.cell] * self.directions * self.batch * self.hidden * self.hidden

    def call(self, training: bool) -> cpu_rule.CallShape:
        """The rule's view of this point; the cell goes in when ``CallShape`` has the field."""
        kwargs = dict(
            batch=self.batch, seq=self.seq, hidden=self.hidden, input=self.input,
            layers=self.layers,
            bidirectional=self.bidirectional, dtype=DTYPES[self.dtype], training=training,
            threads=self.threads, cell=self.cell, isa=self.isa,
        )
        return cpu_rule.CallShape(**kwargs)

    @property
    def label(self) -> str:
        d = "bi" if self.bidirectional else "uni"
        s = (f"B{self.batch} T{self.seq} I{self.input} H{self.hidden} L{self.layers} {d} "
             f"{self.dtype} {self.threads}t")
        if self.isa != "avx512":
            s += f" {self.isa}"
        return s if self.cell == "rnn" else f"{self.cell} {s}"


NAMED = [  # (B, T, I, H, bidirectional): the shapes
    (64, 32, 512, 512, False),
    (1, 512, 64, 1024, True),
    (64, 256, 256, 512, True),
    (32, 128, 128, 128, True),
    (2, 4, 16, 32, True),
    (64, 64, 256, 1024, False),  # the scaling target (uni, H 1024, B 64)
]


def points(all_threads: int, max_macs: float, thread_counts=None) -> list[Point]:
    """The Elman grid (see the module doc)."""
    thread_counts = thread_counts or sorted({1, all_threads})
    out: list[Point] = []
    seen = set()

    def add(p: Point) -> None:
        if p not in seen:
            seen.add(p)
            out.append(p)

    for threads in thread_counts:
        for B, T, I, H, bi in NAMED:
            add(Point(B, T, I, H, 1, bi, "fp32", threads))
        for ib, B in enumerate(BATCH):
            for it, T in enumerate(SEQ):
                for ih, H in enumerate(HIDDEN):
                    for idir, bi in enumerate((True, False)):
                        layers = (1, 2, 3)[(ib + it + ih + idir) % 3]
                        dtype = "fp64" if (ib + 2 * it + ih + idir) % 4 == 3 else "fp32"
                        p = Point(B, T, H, H, layers, bi, dtype, threads)
                        while p.macs > max_macs and p.seq > 4:
                            p = Point(B, max(4, p.seq // 2), H, H, layers, bi, dtype, threads)
                        add(p)
    return out


def gated_points(cell: str, thread_counts, max_macs: float) -> list[Point]:
    """The LSTM / GRU grid (see the module doc); T halved (down to 16) above ``max_macs``."""
    shapes = [(B, T, H, H, 1, bi, "fp32") for B in GATED_BATCH for T in GATED_SEQ
              for H in GATED_HIDDEN for bi in (True, False)] + GATED_EXTRA
    out: list[Point] = []
    for threads in thread_counts:
        for B, T, I, H, layers, bi, dtype in shapes:
            p = Point(B, T, I, H, layers, bi, dtype, threads, cell)
            while p.macs > max_macs and p.seq > min(GATED_SEQ):
                p = dataclasses.replace(p, seq=max(min(GATED_SEQ), p.seq // 2))
            if p not in out:
                out.append(p)
    return out


def micro_points(cell: str, thread_counts) -> list[Point]:
    return [Point(B, T, I, H, L, bi, dtype, threads, cell)
            for threads in thread_counts for B, T, I, H, L, bi, dtype in MICRO]


def preset_points(preset: str, cell: str, all_threads: int, thread_counts, max_macs: float):
    if preset == "micro":
        return micro_points(cell, thread_counts)
    if preset in ("heldout", "tagger"):
        shapes = HELDOUT if preset == "heldout" else TAGGER
        return [Point(B, T, I, H, L, bi, dtype, threads, cell)
                for threads in thread_counts for B, T, I, H, L, bi, dtype in shapes]
    if cell == "rnn":
        return points(all_threads, max_macs, thread_counts)
    return gated_points(cell, thread_counts, max_macs)


# ------------------------------------------------------------------------- run-time estimate

# A rough model of one call of the nn class, fitted to the committed Elman grid's 1-thread
# medians (benchmarks/results/cpu-grid/grid.json, fp32): a fixed cost per step and direction
# plus the multiply-adds at a GEMM rate; the gated cells' nn classes took these multiples of
# nn.RNN's time at the same shape (a few 1-thread points on a 2-core EPYC VM). Only for the
# estimate printed before a run, never for a result.
_STEP_S = {"infer": 6.6e-6, "train": 42e-6}
_MACS_PER_S = {"infer": 34e9, "train": 12.4e9}  # per thread, fp32; fp64 at half
_CELL_FACTOR = {"rnn": {"infer": 1.0, "train": 1.0}, "lstm": {"infer": 2.3, "train": 3.0},
                "gru": {"infer": 4.0, "train": 4.5}}


def estimate_call_s(p: Point, mode: str) -> float:
    rate = _MACS_PER_S[mode] * (0.5 if p.dtype == "fp64" else 1.0) * (0.9 * p.threads
                                                                        if p.threads > 1 else 1)
    rnn = dataclasses.replace(p, cell="rnn")
    seconds = _STEP_S[mode] * p.seq * p.layers * p.directions + rnn.macs / rate
    return seconds * _CELL_FACTOR[p.cell][mode]


def estimate_point_s(p: Point, budget_s: float, contenders: int = 3) -> float:
    """Seconds measure() takes for ``p``, by the model above and measure_by_mode's loops (each
    mode's rounds on half the budget)."""
    seconds = 0.05  # build
    for mode in ("infer", "train"):
        call_s = estimate_call_s(p, mode)
        round_s = contenders * max(SAMPLE_S, call_s)
        rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(budget_s / 2 / round_s) + 1))
        seconds += 2 * contenders * call_s + rounds * round_s  # warm-up + estimate, rounds
    return seconds


# -------------------------------------------------------------------------- measuring

MIN_ROUNDS, MAX_ROUNDS, SAMPLE_S = 3, 9, 0.01


def cpp_reason(cell: str) -> Optional[str]:
    """Why the fused C++ kernel is not measured for ``cell`` here, or None."""
    return bm.missing_cell_reason("cpp", cell) or (
        None if fastbirnn.available_backends().get("cpp") is None
        else f"cpp unavailable: {fastbirnn.available_backends().get('cpp')}")


def cpp_has_cell(cell: str) -> bool:
    """Whether the cpp backend has the cell at all (what lets 'auto' pick it)."""
    return "cpp" in backends.names() and backends.get("cpp").supports(cell)


def _models(p: Point, names: list[str]):
    dtype = DTYPES[p.dtype]
    cell = bm.CELLS[p.cell]
    torch.manual_seed(0)
    ref = cell.nn_class(p.input, p.hidden, p.layers, bidirectional=p.bidirectional, dtype=dtype)
    models = {"torch": ref}
    for name in names:
        m = cell.fast_class(p.input, p.hidden, p.layers, bidirectional=p.bidirectional,
                            dtype=dtype, backend=name)
        m.load_state_dict(ref.state_dict())
        models[name] = m
    g = torch.Generator().manual_seed(1)
    x = torch.randn(p.seq, p.batch, p.input, generator=g).to(dtype).requires_grad_(True)
    grad_out = torch.randn(p.seq, p.batch, p.directions * p.hidden, generator=g).to(dtype)
    return models, x, grad_out


def measure(p: Point, budget_s: float) -> dict:
    skipped = {"cpp": cpp_reason(p.cell)}
    names = [n for n in ("cpp", "auto") if skipped.get(n) is None]
    saved = torch.get_num_threads()
    torch.set_num_threads(p.threads)
    try:
        models, x, grad_out = _models(p, names)
        fns = {}
        for name, m in models.items():
            fns[(name, "infer")] = bm.forward_step(m, x)
            fns[(name, "train")] = bm.train_step(m, x, grad_out)
        t = measure_by_mode(fns, "cpu", warmup=1, min_rounds=MIN_ROUNDS,
                            max_rounds=MAX_ROUNDS, budget_s=budget_s, target_sample_s=SAMPLE_S)
        with torch.no_grad():
            auto_infer = models["auto"].selected_backend(x)
        auto_train = models["auto"].selected_backend(x)
    finally:
        torch.set_num_threads(saved)
    row = {"point": asdict(p), "label": p.label, "cell": p.cell,
           "baseline": bm.baseline_name(p.cell), "macs": p.macs,
           "auto_backend": {"infer": auto_infer, "train": auto_train}}
    if any(skipped.values()):
        row["skipped"] = {k: v for k, v in skipped.items() if v}
    for mode in ("infer", "train"):
        base = t[("torch", mode)].median
        for name in ("torch", "cpp", "auto"):
            timing = t.get((name, mode))
            row[f"{name}_{mode}_ms"] = None if timing is None else timing.median * 1e3
            row[f"{name}_{mode}_samples_ms"] = (
                None if timing is None else [s * 1e3 for s in timing.samples])
        for name in ("cpp", "auto"):
            timing = t.get((name, mode))
            row[f"{name}_{mode}_x"] = None if timing is None else base / timing.median
    del models, fns, x, grad_out
    gc.collect()
    return row


# --------------------------------------------------------------------- the rule, checked


def rule_picks_cpp(p: Point, training: bool) -> bool:
    """What 'auto' runs under the current rule: the kernel only where it has the cell."""
    return cpp_has_cell(p.cell) and cpu_rule.prefer_cpp(p.call(training))


def check(rows: list[dict]) -> list[str]:
    """Points where the current rule picks the slower contender (beyond the noise), or picks
    the kernel where the grid has no timing of it (measured before it had the cell)."""
    problems = []
    for row in rows:
        p = Point(**row["point"])
        base = bm.baseline_name(p.cell)
        for mode in ("infer", "train"):
            fused = rule_picks_cpp(p, mode == "train")
            ratio = row.get(f"cpp_{mode}_x")
            if ratio is None:
                if fused:
                    problems.append(f"{p.label} {mode}: rule picks cpp, but the grid has no cpp "
                                    "timing here: measure the grid again")
                continue
            if fused and ratio < 1 - NOISE:
                problems.append(f"{p.label} {mode}: rule picks cpp at {ratio:.2f}x")
            elif not fused and ratio > 1 + NOISE:
                problems.append(f"{p.label} {mode}: rule picks {base}, cpp would be {ratio:.2f}x")
    return problems


def rule_ratio(row: dict, mode: str) -> float:
    """The ratio 'auto' gets under the current rule, from the measured medians (nan: the rule
    picks a kernel the grid did not time)."""
    p = Point(**row["point"])
    if not rule_picks_cpp(p, mode == "train"):
        return 1.0
    ratio = row.get(f"cpp_{mode}_x")
    return math.nan if ratio is None else ratio


def slow_auto(rows: list[dict]) -> list[str]:
    """Points where 'auto' itself measured slower than the nn class beyond the noise (its
    wrapper's cost where it runs the nn class, or noise: the run's own ratio)."""
    out = []
    for row in rows:
        for mode in ("infer", "train"):
            ratio = row.get(f"auto_{mode}_x")
            if ratio is not None and ratio < 1 - NOISE:
                out.append(f"{row['label']} {mode}: auto measured {ratio:.2f}x "
                           f"(ran {row['auto_backend'][mode]})")
    return out


def _worst(rows: list[dict], mode: str) -> str:
    known = [r for r in rows if not math.isnan(rule_ratio(r, mode))]
    if not known:
        return f"worst {mode} under the rule: -"
    worst = min(known, key=lambda r: rule_ratio(r, mode))
    return f"worst {mode} under the rule: {rule_ratio(worst, mode):.2f}x at {worst['label']}"


def rows_cell(rows: list[dict]) -> str:
    cells = {Point(**r["point"]).cell for r in rows} or {"rnn"}
    if len(cells) > 1:
        raise SystemExit(f"a grid holds one cell; this one mixes {', '.join(sorted(cells))}")
    return cells.pop()


# ------------------------------------------------------------------------------ report


def _fmt_x(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = bm.baseline_name(rows_cell(rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, mode in zip(axes, ("infer", "train")):
        for threads in sorted({r["point"]["threads"] for r in rows}):
            sel = [r for r in rows if r["point"]["threads"] == threads]
            per_step = [Point(**r["point"]).step_macs for r in sel]
            with_cpp = [(s, r[f"cpp_{mode}_x"]) for s, r in zip(per_step, sel)
                        if r.get(f"cpp_{mode}_x") is not None]
            if with_cpp:
                ax.scatter(*zip(*with_cpp), s=14, alpha=0.7,
                           label=f"cpp, {threads} thread{'s' if threads > 1 else ''}")
            ax.scatter(per_step, [r[f"auto_{mode}_x"] for r in sel], s=22, marker="x",
                       alpha=0.8, label=f"auto (measured), {threads}t")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.0 - NOISE, color="k", lw=0.5, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("multiply-adds per recurrence step (G*D*B*H^2, G gate blocks)")
        ax.set_title("inference (no_grad)" if mode == "infer" else "training step")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"speed-up over {base} (same run, medians)")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict]) -> str:
    """Markdown table: measured ratios, and what 'auto' gets under the current rule."""
    cell = rows_cell(rows)
    base = bm.baseline_name(cell)
    lines = [f"Cell: {cell}. Ratios are {base} time / fastbirnn time (medians, same run). "
             "'auto (run)' is what 'auto' measured with the rule of the run's commit; 'rule' is "
             "the contender the current rule picks and 'auto (rule)' its measured ratio "
             "('-': the cpp kernel had no such cell when measured).", "",
             "| point | infer cpp x | infer auto (run) | train cpp x | train auto (run) | "
             "rule infer/train | infer auto (rule) | train auto (rule) | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = Point(**r["point"])
        picks = "/".join("cpp" if rule_picks_cpp(p, m == "train") else "torch"
                         for m in ("infer", "train"))
        lines.append(
            f"| {r['label']} | {_fmt_x(r.get('cpp_infer_x'))} | {_fmt_x(r['auto_infer_x'])} | "
            f"{_fmt_x(r.get('cpp_train_x'))} | {_fmt_x(r['auto_train_x'])} | {picks} | "
            f"{_fmt_x(rule_ratio(r, 'infer'))} | {_fmt_x(rule_ratio(r, 'train'))} | "
            f"{r.get('loadavg', ['?'])[0]} |")
    lines.append("")
    for m in ("infer", "train"):
        lines.append(f"- {_worst(rows, m)}")
    problems = check(rows)
    lines.append(f"- points where the rule picks the slower contender by > {NOISE:.0%}: "
                 f"{len(problems)}")
    lines += [f"  - {p}" for p in problems]
    slow = slow_auto(rows)
    lines.append(f"- points where 'auto' measured slower than {base} by > {NOISE:.0%} in this "
                 f"run (noise, or the wrapper's cost): {len(slow)}")
    lines += [f"  - {s}" for s in slow]
    return "\n".join(lines)


CSV_FIELDS = ("cell", "batch", "seq", "input", "hidden", "layers", "bidirectional", "dtype",
              "threads", "macs", "torch_infer_ms", "cpp_infer_ms", "auto_infer_ms",
              "torch_train_ms", "cpp_train_ms", "auto_train_ms", "cpp_infer_x", "auto_infer_x",
              "cpp_train_x", "auto_train_x", "rule_infer", "rule_train", "rule_infer_x",
              "rule_train_x")


def write_csv(rows: list[dict], path: str) -> None:
    """One line per point: the point, the medians (ms), the ratios and the current rule's pick
    and ratio (empty where not measured)."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            p = Point(**r["point"])
            line = {**asdict(p), **r, "macs": p.macs}
            for mode in ("infer", "train"):
                line[f"rule_{mode}"] = "cpp" if rule_picks_cpp(p, mode == "train") else "torch"
                ratio = rule_ratio(r, mode)
                line[f"rule_{mode}_x"] = "" if math.isnan(ratio) else ratio
            writer.writerow({k: "" if line.get(k) is None else line[k] for k in CSV_FIELDS})


def report(doc: dict, out: str) -> None:
    info = doc["machine"]
    cell = rows_cell(doc["rows"])
    title = (f"fastbirnn CPU grid, cell {cell} ({bm.CELLS[cell].fast_class.__name__} vs "
             f"{bm.baseline_name(cell)}): {info.get('cpu')}, {info.get('cpu_count')} cores, "
             f"torch {info.get('torch')}, load {info.get('loadavg')} -> {info.get('loadavg_end')}")
    os.makedirs(out, exist_ok=True)
    plot(doc["rows"], os.path.join(out, "grid.png"), title)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary(doc["rows"]) + "\n")
    write_csv(doc["rows"], os.path.join(out, "grid.csv"))


# -------------------------------------------------------------------------------- run


def _write(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)  # a killed run leaves the previous complete file, never half a one


def _key(point: dict) -> str:
    return json.dumps(dict(asdict(Point(**point))), sort_keys=True)


def _start(args, path: str, cell: str, command: str) -> dict:
    """A new document, or the partial one of an earlier run with ``--resume``."""
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    if old is not None and not args.resume and not args.fresh and old.get("complete") is False:
        raise SystemExit(
            f"{path} holds a partial grid ({len(old['rows'])} points measured): --resume to "
            "continue it, --fresh to start over")
    info = machine_info("cpu")
    if args.resume and old is not None:
        old_cell = rows_cell(old["rows"]) if old["rows"] else old.get("cell", cell)
        if old_cell != cell:
            raise SystemExit(f"--resume: {path} is a grid of another cell, not {cell}")
        if old["machine"].get("cpu") != info.get("cpu"):
            print(f"warning: resuming a grid of {old['machine'].get('cpu')!r} on "
                  f"{info.get('cpu')!r}", file=sys.stderr)
        old.setdefault("resumed", []).append({"machine": info, "command": command})
        old["complete"] = False
        return old
    return {"machine": info, "command": command, "cell": cell, "complete": False, "rows": []}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", default=None, choices=list(bm.CELLS),
                    help="rnn (default), lstm or gru: the nn class and fastbirnn module timed")
    ap.add_argument("--out", default=None,
                    help="folder for grid.json, grid.csv, grid.png, summary.md (default: the cell's, "
                         f"{default_out('rnn')}, {default_out('lstm')}, {default_out('gru')})")
    ap.add_argument("--preset", default="full", choices=("full", "heldout", "tagger", "micro"),
                    help="full: the cell's grid (module doc); heldout: points no rule threshold "
                         "was fitted to (HELDOUT; give them their own --out); tagger: the "
                         "issue-23 rows and tagger shapes (TAGGER, for --cell lstm, own --out); "
                         "micro: two tiny "
                         "points (a smoke test)")
    ap.add_argument("--threads", default=None,
                    help="comma list of counts or 'all' (default: 1,all for rnn, all for gated)")
    ap.add_argument("--max-macs", type=float, default=None,
                    help="shorten T of points above this many forward multiply-adds "
                         "(default 4e9 for rnn; 1e11 for gated cells, which keeps all their T)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of rounds per point after the first 3 (default 1.0)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N points (smoke test)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the partial grid.json in --out: measure only missing points")
    ap.add_argument("--fresh", action="store_true",
                    help="start over even where --out holds a partial grid")
    ap.add_argument("--estimate", action="store_true",
                    help="print the points and the estimated run time, time nothing")
    ap.add_argument("--isa", default=None, choices=sorted(bm.ISA_ENV),
                    help="measure every contender at this instruction-set level (the engine, "
                         "ATen, MKL and oneDNN lowered to it, as on a CPU without AVX-512; the "
                         "script re-executes itself with their environment variables); default "
                         "out: the cell's folder with -ISA after it")
    ap.add_argument("--check", metavar="JSON", help="evaluate the rule on a committed grid")
    ap.add_argument("--report", metavar="JSON",
                    help="redraw the plot and summary of a grid (into --out) without timing")
    args = ap.parse_args(argv)

    if args.report:
        with open(args.report) as f:
            doc = json.load(f)
        report(doc, args.out or default_out(rows_cell(doc["rows"])))
        return 0

    if args.check:
        with open(args.check) as f:
            rows = json.load(f)["rows"]
        cell = rows_cell(rows)
        if args.cell and args.cell != cell:
            raise SystemExit(f"--check {args.check}: a grid of cell {cell}, not {args.cell}")
        problems = check(rows)
        print(f"cell {cell}, {len(rows)} points: "
              + ("\n".join(problems) or "the rule picks the faster contender at every point"))
        for mode in ("infer", "train"):
            print(_worst(rows, mode))
        slow = slow_auto(rows)
        if slow:
            print(f"note: 'auto' measured slower than {bm.baseline_name(cell)} by > "
                  f"{NOISE:.0%} at {len(slow)} point(s) in that run (noise or the wrapper's "
                  "cost; see summary.md)")
        return 1 if problems else 0

    bm.run_with_isa(args.isa)
    cell = args.cell or "rnn"
    gated = cell != "rnn"
    out = args.out or default_out(cell, args.isa)
    max_macs = args.max_macs if args.max_macs is not None else (1e11 if gated else 4e9)
    budget = args.budget if args.budget is not None else 1.0
    all_threads = os.cpu_count() or 1
    thread_spec = args.threads or ("all" if gated else "1,all")
    counts = sorted({all_threads if c == "all" else int(c) for c in thread_spec.split(",")})
    isa = cpp_backend.cpu_isa() or "scalar"
    grid = [dataclasses.replace(p, isa=isa)
            for p in preset_points(args.preset, cell, all_threads, counts, max_macs)]
    if args.limit:
        grid = grid[: args.limit]
    contenders = 3 if cpp_reason(cell) is None else 2
    estimates = {p: estimate_point_s(p, budget, contenders) for p in grid}
    why_not_cpp = cpp_reason(cell)

    if args.estimate:
        for p in grid:
            print(f"{p.label}: ~{estimates[p]:.1f}s")
    path = os.path.join(out, "grid.json")
    if not args.estimate:
        os.makedirs(out, exist_ok=True)
        command = " ".join(["python", "benchmarks/cpu_grid.py",
                            *(sys.argv[1:] if argv is None else argv)])
        doc = _start(args, path, cell, command)
        done = {_key(r["point"]) for r in doc["rows"]}
    else:
        done = set()
    todo = [p for p in grid if _key(asdict(p)) not in done]
    total = sum(estimates[p] for p in todo)
    print(f"cpu grid, cell {cell} ({bm.CELLS[cell].fast_class.__name__} vs "
          f"{bm.baseline_name(cell)}): {len(todo)} points to measure"
          + (f" ({len(grid) - len(todo)} already in {path})" if len(todo) < len(grid) else "")
          + f", threads {counts}, budget {budget}s/point, max {max_macs:.0e} MACs; "
          f"estimated {total / 60:.1f} min on {all_threads} idle cores (a model; a loaded "
          "machine takes longer)" + (f"; not measured: {why_not_cpp}" if why_not_cpp else ""),
          flush=True)
    if args.estimate:
        return 0

    start = time.time()
    spent_estimate = 0.0
    for i, p in enumerate(todo):
        row = measure(p, budget)
        row["loadavg"] = [round(v, 2) for v in os.getloadavg()]
        doc["rows"].append(row)
        _write(path, doc)  # partial results survive; --resume continues from here
        spent_estimate += estimates[p]
        elapsed = time.time() - start
        left = (total - spent_estimate) * elapsed / max(spent_estimate, 1e-9)
        print(f"[{i + 1}/{len(todo)} {elapsed:.0f}s, ~{left:.0f}s left, load "
              f"{row['loadavg'][0]}] {p.label}: infer cpp {_fmt_x(row['cpp_infer_x'])}x auto "
              f"{_fmt_x(row['auto_infer_x'])}x | train cpp {_fmt_x(row['cpp_train_x'])}x auto "
              f"{_fmt_x(row['auto_train_x'])}x", flush=True)
    doc["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    doc["seconds"] = round(time.time() - start + doc.get("seconds", 0.0), 1)
    doc["complete"] = len(doc["rows"]) >= len(grid) and not args.limit
    _write(path, doc)
    report(doc, out)
    problems = check(doc["rows"])
    print("\n".join(problems) or "rule: faster contender at every point")
    print(f"wrote {path}, grid.png, grid.csv, summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
