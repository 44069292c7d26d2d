"""Compare fastbirnn's backends with the nn class of a cell: a table, a JSON file and a plot.

    python -m fastbirnn.bench                      # quick preset on the best device
    python -m fastbirnn.bench --cell lstm          # FastBiLSTM vs nn.LSTM (gru: FastBiGRU vs nn.GRU)
    python -m fastbirnn.bench --preset cpu --out benchmarks/results/cpu
    python -m fastbirnn.bench --preset gpu --out $OUT
    python -m fastbirnn.bench --replot results.json --out DIR   # redraw table + plot

Every contender holds the same weights and sees the same input; contenders are interleaved
and medians reported (see fastbirnn/benchmarking.py for exactly what is timed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
from typing import Optional

import torch

from fastbirnn import benchmarking as bm

JSON_NAME = "bench.json"
PNG_NAME = "bench.png"
SCHEMA = 1

# Per-preset measurement effort: (min_rounds, max_rounds, budget per case in seconds).
EFFORT = {
    "tiny": (3, 5, 0.5),
    "quick": (3, 9, 4.0),
    "cpu": (5, 15, 10.0),
    "gpu": (5, 25, 1.0),
}


def _fmt_ms(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _fmt_rate(v) -> str:
    if v is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


def _fmt_mb(b) -> str:
    if b is None:
        return "-"
    mb = b / 2**20
    return f"{mb:.1f}" if mb >= 10 else f"{mb:.3g}"


def _backend_label(row: dict) -> str:
    """``auto->cpp``: what 'auto' ran; ``auto->torch/cpp`` where the forward (under no_grad)
    ran one backend and the training step another."""
    name, resolved = row["backend"], row.get("resolved_backend")
    if name == "auto" and resolved:
        fwd = row.get("resolved_backend_fwd") or resolved
        return f"auto->{resolved}" if fwd == resolved else f"auto->{fwd}/{resolved}"
    return name


HEADER = ("cell", "shape", "dtype", "backend", "fwd ms", "train ms", "train tok/s", "fwd x", "train x",
          "peak MB")
DISTURBED_HEADER = "disturbed by"


def row_cell(r: dict) -> str:
    """The cell a result row measured ('rnn' for rows written before cells were recorded)."""
    return r.get("cell") or (r.get("case") or {}).get("cell") or "rnn"


def baselines_of(rows: list[dict]) -> str:
    """'nn.RNN', or 'nn.LSTM / nn.GRU' etc.: the baselines the rows' ratios are over."""
    names = dict.fromkeys(bm.baseline_name(row_cell(r)) for r in rows)
    return " / ".join(names) or bm.BASELINE


def _cells(r: dict) -> list[str]:
    return [
        row_cell(r), r["shape"], r["dtype"], _backend_label(r), _fmt_ms(r["fwd_ms"]),
        _fmt_ms(r["train_ms"]), _fmt_rate(r["tokens_per_s_train"]),
        f"{r['speedup_fwd']:.2f}", f"{r['speedup_train']:.2f}",
        _fmt_mb(r.get("peak_train_bytes")),
    ]


def disturbed_rows(rows: list[dict]) -> list[dict]:
    """Measured rows whose times or ratios other work on the machine disturbed."""
    return [r for r in rows if "skipped" not in r and r.get("disturbed_by")]


def disturbance_note(rows: list[dict]) -> Optional[str]:
    """A warning naming how many rows were disturbed, or None when none was."""
    bad = disturbed_rows(rows)
    if not bad:
        return None
    measured = sum("skipped" not in r for r in rows)
    return textwrap.fill(
        f"WARNING: {len(bad)} of {measured} rows were disturbed while measured, so their "
            f"times and ratios are not trustworthy ({baselines_of(rows)}'s multithreaded "
            "per-step ops suffer most): rerun on an idle machine. "
            f"'{DISTURBED_HEADER}': others = cores that other processes kept busy meanwhile "
            f"(limit {bm.OTHER_CORES_LIMIT} beyond idle ones); spread = interquartile range "
            f"of the repeats over their median (limit {bm.SPREAD_LIMIT:.0%}), of this row or "
            f"of {baselines_of(rows)}'s (the ratios' other side).", width=100)


def table(rows: list[dict]) -> str:
    """A plain-text table, one line per measured contender, skipped ones as notes below.

    Rows disturbed by other work on the machine say why in a last column.
    """
    measured = [r for r in rows if "skipped" not in r]
    show_disturbed = bool(disturbed_rows(rows))
    header = HEADER + ((DISTURBED_HEADER,) if show_disturbed else ())
    lines = [_cells(r) + ([", ".join(r.get("disturbed_by") or [])] if show_disturbed else [])
             for r in measured]
    notes = []
    for r in rows:
        if "skipped" in r:
            note = f"{r['backend']}: {r['skipped']}"
            if note not in notes:
                notes.append(note)
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    left = {0, 1, 2, 3, len(HEADER)}

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [fmt(header), fmt(["-" * w for w in widths])]
    prev = None
    for l in lines:
        if prev is not None and l[:3] != prev:
            out.append("")
        out.append(fmt(l))
        prev = l[:3]
    if notes:
        out.append("")
        out.append("not run: " + "; ".join(notes))
    out.append(f"fwd x / train x: speedup over {baselines_of(measured)} (its time / this "
               "time), median of interleaved runs; train = forward + backward; "
               "peak MB: training step; auto->X: what 'auto' ran (torch: the nn class), "
               "auto->X/Y: X in the forward, Y in the training step")
    note = disturbance_note(rows)
    if note:
        out.append(note)
    return "\n".join(out)


def markdown_table(rows: list[dict]) -> str:
    """The same table in Markdown, for the README."""
    show_disturbed = bool(disturbed_rows(rows))
    header = HEADER + ((DISTURBED_HEADER,) if show_disturbed else ())
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "skipped" in r:
            continue
        cells = _cells(r) + ([", ".join(r.get("disturbed_by") or [])] if show_disturbed else [])
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


BACKEND_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]


def _plot_row(axes, measured, dtype, mode, backends, matplotlib) -> None:
    """Speedup (``mode``: train or fwd) vs batch size and vs hidden size for one precision.

    One curve per backend and fixed other dimensions; colour = the other dimensions,
    line style and marker = the backend. Without any sweep (sparse presets), markers only.
    Points of rows the table flags as disturbed are drawn hollow, with a legend entry saying so.
    """
    letters = {"batch": "B", "seq": "T", "input": "I", "hidden": "H", "layers": "L"}
    metric = "speedup_train" if mode == "train" else "speedup_fwd"
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, xkey, fixed_keys in (
        (axes[0], "batch", ("hidden", "seq", "input", "layers")),
        (axes[1], "hidden", ("batch", "seq", "layers")),
    ):
        series: dict = {}
        for r in measured:
            c = r["case"]
            fixed = tuple(c[k] for k in fixed_keys)
            series.setdefault((fixed, r["backend"]), []).append(
                (c[xkey], r[metric], _disturbed(r)))
        swept = any(len({p[0] for p in pts}) > 1 for pts in series.values())
        if not swept:
            series = {}
            for r in measured:
                series.setdefault(((), r["backend"]), []).append(
                    (r["case"][xkey], r[metric], _disturbed(r)))
        fixed_values = sorted({f for f, _ in series})
        for (fixed, backend), pts in sorted(series.items()):
            if swept and len({p[0] for p in pts}) < 2:
                continue
            pts.sort()
            style, marker = BACKEND_STYLES[backends.index(backend) % len(BACKEND_STYLES)]
            desc = " ".join(f"{letters[k]}{v}" for k, v in zip(fixed_keys, fixed)
                            if not (k == "layers" and v == 1)) or "various shapes"
            color = colors[(fixed_values.index(fixed) if swept else backends.index(backend))
                           % len(colors)]
            clean = [i for i, p in enumerate(pts) if not p[2]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                    linestyle=style if swept else "none", markersize=5, color=color,
                    markevery=clean, label=f"{backend} ({desc})")
            disturbed = [p for p in pts if p[2]]
            if disturbed:  # hollow: the table flags these rows as disturbed
                ax.plot([p[0] for p in disturbed], [p[1] for p in disturbed], marker=marker,
                        linestyle="none", markersize=5, color=color, markerfacecolor="none",
                        gid="disturbed")
        if any(p[2] for pts in series.values() for p in pts):
            ax.plot([], [], marker="o", linestyle="none", markersize=5, color="black",
                    markerfacecolor="none", label="hollow: disturbed, rerun on an idle machine")
        ax.axhline(1.0, color="grey", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel(f"{xkey} size")
        ax.set_title(f"{dtype}, {'training step' if mode == 'train' else 'forward'}: "
                     f"speedup vs {xkey} size", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best", ncol=2)
    axes[0].set_ylabel(f"speedup over {baselines_of(measured)} (log scale)")


def _disturbed(row: dict) -> bool:
    return bool(row.get("disturbed_by"))


def plot(rows: list[dict], path: str, title: str = "") -> Optional[str]:
    """Speedup over the nn class vs batch size and vs hidden size (PNG). Returns why not, or None.

    One row of two panels per precision and mode (training step, forward); the title names
    the cell(s). Disturbed rows' points are hollow.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"matplotlib not available ({error})"
    fig = figure(rows, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def figure(rows: list[dict], title: str = ""):
    """The matplotlib figure that ``plot`` saves (matplotlib must be importable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    measured = [r for r in rows if "skipped" not in r and not bm.is_baseline(r["backend"])]
    backends = list(dict.fromkeys(r["backend"] for r in measured))
    dtypes = sorted({r["dtype"] for r in measured}, key=list(bm.DTYPES).index) or ["fp32"]
    panels = [(d, m) for d in dtypes for m in ("train", "fwd")]
    fig, grid = plt.subplots(len(panels), 2, figsize=(12, 0.4 + 3.8 * len(panels)),
                             squeeze=False, layout="constrained")
    for row_axes, (dtype, mode) in zip(grid, panels):
        _plot_row(row_axes, [r for r in measured if r["dtype"] == dtype], dtype, mode,
                  backends, matplotlib)
    cells = ", ".join(dict.fromkeys(row_cell(r) for r in rows)) or "rnn"
    fig.suptitle(f"cell: {cells}" + (f"; {title}" if title else ""), fontsize=9)
    return fig


def _write_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fastbirnn-bench",
        description="Time fastbirnn's backends against the nn class of a cell (FastBiRNN vs "
                    "nn.RNN, FastBiLSTM vs nn.LSTM, FastBiGRU vs nn.GRU; same weights, same "
                    "input; interleaved runs, medians) and write a table, JSON and a PNG plot.",
    )
    p.add_argument("--cell", default="rnn", choices=list(bm.CELLS),
                   help="rnn (default: FastBiRNN vs nn.RNN), lstm (FastBiLSTM vs nn.LSTM) or "
                        "gru (FastBiGRU vs nn.GRU)")
    p.add_argument("--nonlinearity", default="tanh", choices=("tanh", "relu"),
                   help="the Elman cell's activation (--cell rnn only; default tanh)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--preset", default="quick", choices=sorted(bm.PRESETS),
                   help="tiny (seconds), quick (default; on CPU the design's shapes "
                        "(2,4,16,32), (32,128,128,128) and (64,256,256,512), for lstm and gru "
                        "(32,128,512,512) in place of the last: under a minute on 2 cores), "
                        "cpu (sweeps, minutes), "
                        "gpu (CUDA: batch {1,8,32,128} x hidden {128..1024}, T=256, in fp32 "
                        "with TF32 on and off, and bf16)")
    p.add_argument("--backends", default=None,
                   help="comma-separated fastbirnn backends (default: auto and every registered "
                        "one, skipping those that cannot run here or lack the cell)")
    p.add_argument("--dtype", default=None,
                   help="comma-separated precisions to keep from the preset (fp32, tf32, bf16, fp16)")
    p.add_argument("--shape", action="append", default=[], metavar="B,T,I,H[,L]",
                   help="run this shape instead of the preset (repeatable)")
    p.add_argument("--out", default=None, help=f"folder for {JSON_NAME} and {PNG_NAME}")
    p.add_argument("--min-rounds", type=int, default=None,
                   help="timed rounds per case at least, whatever the budget (each round times "
                        "every contender once; default set by the preset)")
    p.add_argument("--max-rounds", type=int, default=None,
                   help="timed rounds per case at most (default set by the preset)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed rounds per case (after the minimum rounds)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="only print the table and redraw the plot of an earlier run")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def _cases(args, device) -> list[bm.Case]:
    dtypes = args.dtype.split(",") if args.dtype else None
    if args.shape:
        cases = []
        for s in args.shape:
            dims = [int(v) for v in s.split(",")]
            if len(dims) not in (4, 5):
                raise SystemExit(f"--shape wants B,T,I,H[,L], got {s!r}")
            for d in dtypes or ["fp32"]:
                cases.append(bm.Case(*dims[:4], layers=dims[4] if len(dims) == 5 else 1, dtype=d,
                                     nonlinearity=args.nonlinearity, cell=args.cell))
        return cases
    try:
        cases = bm.preset_cases(args.preset, device, args.cell, args.nonlinearity)
    except ValueError as error:
        raise SystemExit(str(error))
    if dtypes:
        cases = [c for c in cases if c.dtype in dtypes]
    return cases


def _report(rows, out_dir, info, markdown, log) -> int:
    text = markdown_table(rows) if markdown else table(rows)
    print(text)
    print(f"\nmeasured on: {bm.describe_machine(info)}")
    if out_dir:
        why = plot(rows, os.path.join(out_dir, PNG_NAME), title=bm.describe_machine(info))
        if why:
            log(f"plot skipped: {why}")
        else:
            print(f"wrote {os.path.join(out_dir, PNG_NAME)}")
    bad = [r for r in rows if "skipped" not in r
           and not all(math.isfinite(r[k]) and r[k] > 0 for k in ("speedup_fwd", "speedup_train"))]
    return 1 if bad else 0


def main(argv=None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
    if args.replot:
        with open(args.replot) as f:
            doc = json.load(f)
        return _report(doc["results"], args.out, doc["machine"], args.markdown, log)

    if args.cell != "rnn" and args.nonlinearity != "tanh":
        raise SystemExit(f"--nonlinearity is an Elman RNN option (--cell rnn); the "
                         f"{args.cell.upper()} cell has fixed gates")
    backends = args.backends.split(",") if args.backends else None
    lacking = [bm.missing_cell_reason(b, args.cell) for b in backends or []]
    lacking = [reason for reason in lacking if reason]
    if lacking:
        raise SystemExit(f"fastbirnn bench --cell {args.cell}: " + "; ".join(lacking)
                         + ". Leave it out of --backends (or drop --backends: 'auto' always "
                         f"runs, on {bm.baseline_name(args.cell)} where no kernel has the cell).")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = bm.default_device() if args.device == "auto" else torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cases = _cases(args, device)
    min_rounds, max_rounds, budget = EFFORT.get(args.preset, EFFORT["quick"])
    min_rounds = args.min_rounds or min_rounds
    max_rounds = max(args.max_rounds or max_rounds, min_rounds)
    budget = budget if args.budget is None else args.budget

    info = bm.machine_info(device)
    log(f"fastbirnn bench: cell {args.cell} ({bm.CELLS[args.cell].fast_class.__name__} vs "
        f"{bm.baseline_name(args.cell)}), {len(cases)} case(s), preset {args.preset!r}, "
        f"device {device}")
    log(f"  {bm.describe_machine(info)}")
    doc = {
        "schema": SCHEMA,
        "machine": info,
        "config": {
            "cell": args.cell, "nonlinearity": args.nonlinearity,
            "preset": args.preset, "device": str(device), "backends": backends,
            "min_rounds": min_rounds, "max_rounds": max_rounds, "budget_s": budget,
            "memory": not args.no_memory, "cases": [c.as_dict() for c in cases],
            "disturbance_limits": {"other_cores": bm.OTHER_CORES_LIMIT,
                                   "spread": bm.SPREAD_LIMIT},
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "results": [],
        "complete": False,
    }
    json_path = os.path.join(args.out, JSON_NAME) if args.out else None
    start = time.perf_counter()
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        try:
            rows = bm.run_case(case, device, backends, min_rounds=min_rounds,
                               max_rounds=max_rounds, budget_s=budget,
                               memory=not args.no_memory)
        except KeyboardInterrupt:  # Ctrl-C or `timeout -s INT`: report what was measured
            log(f"interrupted at case {i + 1}/{len(cases)}: reporting the {i} done")
            doc["interrupted"] = True
            break
        except Exception as error:  # keep going: one broken case must not lose the others
            log(f"[{i + 1}/{len(cases)}] {case.shape} {case.dtype}: FAILED "
                f"{type(error).__name__}: {error}")
            doc.setdefault("errors", []).append(
                {"case": case.as_dict(), "error": f"{type(error).__name__}: {error}"})
            continue
        doc["results"].extend(rows)
        if json_path:
            _write_json(json_path, doc)  # partial results survive an interrupted run
        elapsed = time.perf_counter() - start
        eta = elapsed / (i + 1) * (len(cases) - i - 1)
        summary = ", ".join(
            f"{r['backend'] if bm.is_baseline(r['backend']) else _backend_label(r)} "
            + ("skip" if "skipped" in r else f"{r['speedup_train']:.2f}x")
            for r in rows if "skipped" not in r or r["backend"] == "auto")
        disturbed = len(disturbed_rows(rows))
        log(f"[{i + 1}/{len(cases)}] {case.shape} {case.dtype}: {time.perf_counter() - t0:.1f}s"
            f" (train speedup: {summary}); elapsed {elapsed:.0f}s, ~{eta:.0f}s left"
            + (f"; DISTURBED ({disturbed} rows)" if disturbed else ""))
    doc["complete"] = not doc.get("interrupted", False)
    doc["wall_s"] = time.perf_counter() - start
    if json_path:
        _write_json(json_path, doc)
        print(f"wrote {json_path}")
    status = _report(doc["results"], args.out, info, args.markdown, log)
    if doc.get("errors") or doc.get("interrupted"):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
