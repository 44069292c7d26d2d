"""The CPU benchmark grid behind ``'auto'``'s rule (fastbirnn/backends/cpu_rule.py).

One command reproduces it (JSON, plot and a summary under ``--out``):

    python benchmarks/cpu_grid.py --out benchmarks/results/cpu-grid

Each point times nn.RNN, the fused kernel (``backend='cpp'``) and ``backend='auto'`` with the
same weights, interleaved in one process (medians of rounds), for inference (``no_grad``)
and a training step (forward + backward), at 1 thread and at all threads.

The space: unidirectional and bidirectional, B 1-256, T 4-512, H 32-1024, 1-3 layers, fp32
and fp64. The full product is ~2,000 points and days of CPU time on 2 cores, so the grid is a
covering sample: every (B, T, H) of B {1, 8, 64, 256} x T {4, 64, 512} x H {32, 128, 512,
1024}, each at both thread counts and both directions, with the layer count (1-3) and the
dtype (one point in four fp64) rotated over the points, plus the issue's named shapes. Points
whose forward exceeds ``--max-macs`` multiply-adds are shortened in T (kept in B and H) so a
run takes minutes; the rule extrapolates past them (there every step is a large GEMM).

``--check FILE`` re-evaluates the current rule on a committed grid without timing anything:
it lists every point where the rule picks the slower contender by more than the noise
allowance.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fastbirnn import FastBiRNN
from fastbirnn.backends import cpu_rule
from fastbirnn.benchmarking import machine_info, measure_interleaved

BATCH = (1, 8, 64, 256)
SEQ = (4, 64, 512)
HIDDEN = (32, 128, 512, 1024)
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
NOISE = 0.03  # the noise allowance of the target "auto >= 1.0x"


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

    @property
    def macs(self) -> int:
        """Multiply-adds of one forward (projection and recurrence, all layers)."""
        D = 2 if self.bidirectional else 1
        first = self.input * self.hidden + self.hidden * self.hidden
        rest = D * self.hidden * self.hidden + self.hidden * self.hidden
        return D * self.seq * self.batch * (first + (self.layers - 1) * rest)

    def call(self, training: bool) -> cpu_rule.CallShape:
        return cpu_rule.CallShape(
            batch=self.batch, seq=self.seq, hidden=self.hidden, layers=self.layers,
            bidirectional=self.bidirectional, dtype=DTYPES[self.dtype], training=training,
            threads=self.threads,
        )

    @property
    def label(self) -> str:
        d = "bi" if self.bidirectional else "uni"
        return (f"B{self.batch} T{self.seq} I{self.input} H{self.hidden} L{self.layers} {d} "
                f"{self.dtype} {self.threads}t")


NAMED = [  # (B, T, I, H, bidirectional): the shapes
    (64, 32, 512, 512, False),
    (1, 512, 64, 1024, True),
    (64, 256, 256, 512, True),
    (32, 128, 128, 128, True),
    (2, 4, 16, 32, True),
    (64, 64, 256, 1024, False),  # the scaling target (uni, H 1024, B 64)
]


def points(all_threads: int, max_macs: float, thread_counts=None) -> list[Point]:
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


def _models(p: Point):
    dtype = DTYPES[p.dtype]
    torch.manual_seed(0)
    ref = nn.RNN(p.input, p.hidden, p.layers, bidirectional=p.bidirectional, dtype=dtype)
    models = {"torch": ref}
    for name in ("cpp", "auto"):
        m = FastBiRNN(p.input, p.hidden, p.layers, bidirectional=p.bidirectional, dtype=dtype,
                      backend=name)
        m.load_state_dict(ref.state_dict())
        models[name] = m
    g = torch.Generator().manual_seed(1)
    x = torch.randn(p.seq, p.batch, p.input, generator=g).to(dtype).requires_grad_(True)
    D = 2 if p.bidirectional else 1
    grad_out = torch.randn(p.seq, p.batch, D * p.hidden, generator=g).to(dtype)
    return models, x, grad_out


def _forward(model, x):
    def step():
        with torch.no_grad():
            model(x)
    return step


def _train(model, x, grad_out):
    def step():
        model.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = model(x)
        out.backward(grad_out)
    return step


def measure(p: Point, budget_s: float) -> dict:
    saved = torch.get_num_threads()
    torch.set_num_threads(p.threads)
    try:
        models, x, grad_out = _models(p)
        fns = {}
        for name, m in models.items():
            fns[(name, "infer")] = _forward(m, x)
            fns[(name, "train")] = _train(m, x, grad_out)
        t = measure_interleaved(fns, "cpu", warmup=1, min_rounds=3, max_rounds=9,
                                budget_s=budget_s, target_sample_s=0.01)
        with torch.no_grad():
            auto_infer = models["auto"].selected_backend(x)
        auto_train = models["auto"].selected_backend(x)
    finally:
        torch.set_num_threads(saved)
    row = {"point": asdict(p), "label": p.label, "macs": p.macs,
           "auto_backend": {"infer": auto_infer, "train": auto_train}}
    for mode in ("infer", "train"):
        base = t[("torch", mode)].median
        for name in ("torch", "cpp", "auto"):
            row[f"{name}_{mode}_ms"] = t[(name, mode)].median * 1e3
            row[f"{name}_{mode}_samples_ms"] = [s * 1e3 for s in t[(name, mode)].samples]
        row[f"cpp_{mode}_x"] = base / t[("cpp", mode)].median
        row[f"auto_{mode}_x"] = base / t[("auto", mode)].median
    del models, fns, x, grad_out
    gc.collect()
    return row


def check(rows: list[dict]) -> list[str]:
    """Points where the current rule picks the slower contender (beyond the noise)."""
    problems = []
    for row in rows:
        p = Point(**row["point"])
        for mode in ("infer", "train"):
            fused = cpu_rule.prefer_cpp(p.call(mode == "train"))
            ratio = row[f"cpp_{mode}_x"]
            if fused and ratio < 1 - NOISE:
                problems.append(f"{p.label} {mode}: rule picks cpp at {ratio:.2f}x")
            elif not fused and ratio > 1 + NOISE:
                problems.append(f"{p.label} {mode}: rule picks nn.RNN, cpp would be {ratio:.2f}x")
    return problems


def rule_ratio(row: dict, mode: str) -> float:
    """The ratio 'auto' gets under the current rule, from the measured medians."""
    p = Point(**row["point"])
    return row[f"cpp_{mode}_x"] if cpu_rule.prefer_cpp(p.call(mode == "train")) else 1.0


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, mode in zip(axes, ("infer", "train")):
        for threads in sorted({r["point"]["threads"] for r in rows}):
            sel = [r for r in rows if r["point"]["threads"] == threads]
            per_step = [Point(**r["point"]).call(False).step_macs for r in sel]
            ax.scatter(per_step, [r[f"cpp_{mode}_x"] for r in sel], s=14, alpha=0.7,
                       label=f"cpp, {threads} thread{'s' if threads > 1 else ''}")
            ax.scatter(per_step, [r[f"auto_{mode}_x"] for r in sel], s=22, marker="x",
                       alpha=0.8, label=f"auto (measured), {threads}t")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.0 - NOISE, color="k", lw=0.5, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("multiply-adds per recurrence step (D*B*H^2)")
        ax.set_title("inference (no_grad)" if mode == "infer" else "training step")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speed-up over nn.RNN (same run, medians)")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict]) -> str:
    """Markdown table: measured ratios, and what 'auto' gets under the current rule."""
    lines = ["Ratios are nn.RNN time / fastbirnn time (medians, same run). 'auto (run)' is what "
             "'auto' measured with the rule of the run's commit; 'rule' is the contender the "
             "current rule picks and 'auto (rule)' its measured ratio.", "",
             "| point | infer cpp x | infer auto (run) | train cpp x | train auto (run) | "
             "rule infer/train | infer auto (rule) | train auto (rule) | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = Point(**r["point"])
        picks = "/".join("cpp" if cpu_rule.prefer_cpp(p.call(m == "train")) else "torch"
                         for m in ("infer", "train"))
        lines.append(
            f"| {r['label']} | {r['cpp_infer_x']:.2f} | {r['auto_infer_x']:.2f} | "
            f"{r['cpp_train_x']:.2f} | {r['auto_train_x']:.2f} | {picks} | "
            f"{rule_ratio(r, 'infer'):.2f} | {rule_ratio(r, 'train'):.2f} | "
            f"{r.get('loadavg', ['?'])[0]} |")
    lines.append("")
    for m in ("infer", "train"):
        worst = min(rows, key=lambda r: rule_ratio(r, m))
        lines.append(f"- worst {m} under the rule: {rule_ratio(worst, m):.2f}x at {worst['label']}")
    problems = check(rows)
    lines.append(f"- points where the rule picks the slower contender by > {NOISE:.0%}: "
                 f"{len(problems)}")
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def report(doc: dict, out: str) -> None:
    info = doc["machine"]
    title = (f"fastbirnn CPU grid: {info.get('cpu')}, {info.get('cpu_count')} cores, torch "
             f"{info.get('torch')}, load {info.get('loadavg')} -> {info.get('loadavg_end')}")
    plot(doc["rows"], os.path.join(out, "grid.png"), title)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary(doc["rows"]) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/cpu-grid")
    ap.add_argument("--threads", default="1,all", help="comma list of counts or 'all'")
    ap.add_argument("--max-macs", type=float, default=4e9)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per point (after 3 rounds)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N points (smoke test)")
    ap.add_argument("--check", metavar="JSON", help="evaluate the rule on a committed grid")
    ap.add_argument("--report", metavar="JSON",
                    help="redraw the plot and summary of a grid (into --out) without timing")
    args = ap.parse_args(argv)

    if args.report:
        with open(args.report) as f:
            report(json.load(f), args.out)
        return 0

    if args.check:
        with open(args.check) as f:
            rows = json.load(f)["rows"]
        problems = check(rows)
        print("\n".join(problems) or "the rule picks the faster contender at every point")
        for mode in ("infer", "train"):
            worst = min(rows, key=lambda r: rule_ratio(r, mode))
            print(f"worst {mode} under the rule: {rule_ratio(worst, mode):.2f}x at {worst['label']}")
        return 1 if problems else 0

    all_threads = os.cpu_count() or 1
    counts = sorted({all_threads if c == "all" else int(c) for c in args.threads.split(",")})
    grid = points(all_threads, args.max_macs, counts)
    if args.limit:
        grid = grid[: args.limit]
    os.makedirs(args.out, exist_ok=True)
    info = machine_info("cpu")
    doc = {"machine": info, "command": " ".join(["python", *sys.argv]), "rows": []}
    path = os.path.join(args.out, "grid.json")
    start = time.time()
    for i, p in enumerate(grid):
        row = measure(p, args.budget)
        row["loadavg"] = [round(v, 2) for v in os.getloadavg()]
        doc["rows"].append(row)
        print(f"[{i + 1}/{len(grid)} {time.time() - start:.0f}s load {row['loadavg'][0]}] "
              f"{p.label}: infer cpp {row['cpp_infer_x']:.2f}x auto {row['auto_infer_x']:.2f}x"
              f" | train cpp {row['cpp_train_x']:.2f}x auto {row['auto_train_x']:.2f}x",
              flush=True)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
    doc["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    doc["seconds"] = round(time.time() - start, 1)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    report(doc, args.out)
    problems = check(doc["rows"])
    print("\n".join(problems) or "rule: faster contender at every point")
    return 0


if __name__ == "__main__":
    sys.exit(main())
