"""torch.profiler traces of FastBiRNN vs nn.RNN: Chrome traces and a kernel summary.

    python benchmarks/profile_gpu.py --out prof/                       # CUDA if present
    python benchmarks/profile_gpu.py --shape 8,256,512,512:tf32 --backends triton --out prof/
    python benchmarks/profile_gpu.py --device cpu --shape 4,16,32,32:fp32 --out /tmp/prof

For each shape and contender (nn.RNN, then FastBiRNN per backend that can run it), after a
warm-up (Triton compiles on first use), two profiler sessions:

- ``--iters`` forwards under ``no_grad``: kernel launches per forward, time per kernel;
- ``--iters`` training steps (forward + backward): the same per step, and the Chrome trace
  (open in https://ui.perfetto.dev or chrome://tracing).

The summary (stdout and ``profile_summary.txt``) lists per contender: wall time per call under
the profiler (inflated by it; use fastbirnn.bench for timings), kernel launches per call and
the top kernels by device time. On CPU there are no kernels: it lists the top operators.

For hardware counters of the Triton kernels, run this script under Nsight Compute (ncu): see
benchmarks/README.md.

``--gated`` times the triton LSTM and GRU cells against cuDNN's nn.LSTM / nn.GRU (bidirectional,
T 256, B 1/8/32, H 128/256/512, fp32 with TF32 and bf16; forward under no_grad and a training
step; each also checked against cuDNN's output) and adds them to ``paths.json`` as "gated"::

    python benchmarks/profile_gpu.py --gated --out prof/
    TRITON_INTERPRET=1 python benchmarks/profile_gpu.py --gated --device cpu \
        --gated-shape 2,4,16 --gated-dtype fp32 --out /tmp/prof            # CPU dry run

``--paths`` instead times the Triton recurrence's paths against cuDNN (bidirectional nn.RNN,
same weights, interleaved, medians; forward under no_grad and a training step): the multi-CTA
kernel in persistent mode (grid barrier) and in step mode (one launch per step), the
single-CTA streamed kernel, and the on-chip one where it applies. Each is also checked against
nn.RNN's output. Writes ``paths.json`` (machine, versions, commit, shapes, times, ratios,
per-step microseconds, which mode really ran) into ``--out``::

    python benchmarks/profile_gpu.py --paths --out prof/                 # default grid
    python benchmarks/profile_gpu.py --paths --shape 16,256,1024,1024:bf16 --out prof/
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tarfile
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from fastbirnn import benchmarking as bm

DEFAULT_SHAPES = {
    # Where the fused kernel has most room (hidden >= 512, small batch), and long sequences.
    "cuda": ["8,256,512,512:tf32", "4,1024,256,256:bf16"],
    "cpu": ["4,32,64,64:fp32"],
}


def parse_shape(spec: str) -> bm.Case:
    dims, _, dtype = spec.partition(":")
    values = [int(v) for v in dims.split(",")]
    if len(values) not in (4, 5):
        raise SystemExit(f"shape wants B,T,I,H[,L][:dtype], got {spec!r}")
    return bm.Case(*values[:4], layers=values[4] if len(values) == 5 else 1,
                   dtype=dtype or "fp32")


def _device_events(prof):
    """(name, device µs) of every kernel / memcpy / memset the profiler saw on the GPU."""
    out = []
    for e in prof.events():
        if getattr(e, "device_type", None) == DeviceType.CUDA:
            out.append((e.name, e.time_range.elapsed_us()))
    if not out:  # older layouts: kernels hang off the CPU events that launched them
        for e in prof.events():
            for k in getattr(e, "kernels", None) or []:
                out.append((k.name, k.duration))
    return out


def _cpu_ops(prof):
    """(name, self CPU µs, calls) of the operators, for CPU runs."""
    rows = []
    for e in prof.key_averages():
        rows.append((e.key, e.self_cpu_time_total, e.count))
    return rows


def _summarise(prof, iters: int, on_gpu: bool, top: int) -> tuple[dict, list[str]]:
    lines = []
    stats: dict = {}
    if on_gpu:
        per_kernel = defaultdict(lambda: [0, 0.0])
        for name, us in _device_events(prof):
            per_kernel[name][0] += 1
            per_kernel[name][1] += us
        launches = sum(c for c, _ in per_kernel.values())
        total_us = sum(t for _, t in per_kernel.values())
        stats.update(launches=launches / iters, device_us=total_us / iters)
        lines.append(f"    kernels per call: {launches / iters:.1f}   device time per call: "
                     f"{total_us / iters / 1e3:.3f} ms   distinct kernels: {len(per_kernel)}")
        lines.append(f"    {'calls/it':>8} {'us/it':>10} {'us/call':>9} {'%':>5}  kernel")
        for name, (count, us) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:top]:
            lines.append(f"    {count / iters:8.1f} {us / iters:10.1f} {us / count:9.2f} "
                         f"{100 * us / max(total_us, 1e-9):5.1f}  {name[:90]}")
    else:
        rows = sorted(_cpu_ops(prof), key=lambda r: -r[1])
        total_us = sum(r[1] for r in rows)
        stats.update(ops=sum(r[2] for r in rows) / iters, cpu_us=total_us / iters)
        lines.append(f"    operator calls per call: {stats['ops']:.1f}   self CPU time per call: "
                     f"{total_us / iters / 1e3:.3f} ms")
        lines.append(f"    {'calls/it':>8} {'us/it':>10} {'%':>5}  operator")
        for name, us, count in rows[:top]:
            lines.append(f"    {count / iters:8.1f} {us / iters:10.1f} "
                         f"{100 * us / max(total_us, 1e-9):5.1f}  {name[:90]}")
    return stats, lines


def profile_case(case: bm.Case, device, backends, iters: int, trace_dir: str, top: int):
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    entries = bm.contenders(case, device, backends)
    names = [n for n, reason in entries if reason is None]
    lines = [f"== {case.shape} {case.dtype} on {device} =="]
    for name, reason in entries:
        if reason is not None:
            lines.append(f"  {name}: not run ({reason})")
    results = {}
    with bm.precision(case.dtype):
        models = bm.build_models(case, device, names)
        x, grad_out = bm.make_inputs(case, device)
        for name in names:
            model = models[name]
            fwd = bm.forward_step(model, x)
            train = bm.train_step(model, x, grad_out)
            for _ in range(2):  # warm-up: compilation, allocator, cuDNN plans
                fwd()
                train()
            bm.synchronize(device)
            label = name.replace(".", "_")
            resolved = bm.resolved_backend(model, x)
            lines.append(f"  {name} (runs {resolved}):")
            for mode, fn in (("forward", fwd), ("train step", train)):
                with profile(activities=activities) as prof:
                    start = time.perf_counter()
                    for _ in range(iters):
                        with record_function(f"{name} {mode}"):
                            fn()
                    bm.synchronize(device)
                    wall_ms = (time.perf_counter() - start) / iters * 1e3
                stats, summary = _summarise(prof, iters, on_gpu, top)
                stats["wall_ms_under_profiler"] = wall_ms
                results[(name, mode)] = stats
                lines.append(f"   {mode}: {wall_ms:.3f} ms per call under the profiler")
                lines.extend(summary)
                if mode == "train step" and trace_dir:
                    path = os.path.join(trace_dir, f"trace_{case.id}_{label}.json")
                    prof.export_chrome_trace(path)
                    lines.append(f"    chrome trace: {os.path.basename(path)}")
    if on_gpu and (bm.BASELINE, "forward") in results:
        for name in names:
            if name == bm.BASELINE:
                continue
            for mode in ("forward", "train step"):
                s, b = results[(name, mode)], results[(bm.BASELINE, mode)]
                lines.append(
                    f"  {name} vs nn.RNN, {mode}: kernels {s['launches']:.0f} vs "
                    f"{b['launches']:.0f}; device time {s['device_us'] / 1e3:.3f} vs "
                    f"{b['device_us'] / 1e3:.3f} ms ({b['device_us'] / max(s['device_us'], 1e-9):.2f}x)"
                )
    del models, x, grad_out
    return lines


# --paths: bidirectional, T = 256, H 512-1024, small batches: the issue-13 target grid.
PATH_SHAPES = [f"{b},256,{h},{h}:{dt}" for dt in ("tf32", "bf16") for h in (512, 1024)
               for b in (1, 32)]
# name -> (launcher.FORCE_PATH, launcher.FORCE_MULTICTA_MODE)
TRITON_PATHS = {
    "triton multicta persistent": ("multicta", "persistent"),
    "triton multicta step": ("multicta", "step"),
    "triton streamed (1 CTA)": ("streamed", None),
    "triton onchip (1 CTA)": ("onchip", None),
}


@contextlib.contextmanager
def _forced(path: str, mode):
    from fastbirnn.triton import launcher

    saved = launcher.FORCE_PATH, launcher.FORCE_MULTICTA_MODE
    launcher.FORCE_PATH, launcher.FORCE_MULTICTA_MODE = path, mode
    try:
        yield
    finally:
        launcher.FORCE_PATH, launcher.FORCE_MULTICTA_MODE = saved


def _with_path(fn, path, mode):
    def run():
        with _forced(path, mode):
            fn()
    return run


def compare_paths(case: bm.Case, device, budget_s: float, rounds: int = 3,
                  warmup: int = 2) -> dict:
    """Times (ms), ratios (cuDNN time / path time) and output errors of every Triton path."""
    from fastbirnn.triton import launcher

    entry: dict = {"shape": case.shape, "dtype": case.dtype, "batch": case.batch,
                   "seq": case.seq, "hidden": case.hidden, "bidirectional": True,
                   "paths": {}, "skipped": {}}
    dtype = bm.DTYPES[case.dtype][0]
    with bm.precision(case.dtype):
        precision = "tf32" if dtype == torch.float32 and launcher.use_tf32(device) else "ieee"
        entry["auto_path"] = launcher.choose_path(case.hidden, case.batch, dtype, precision, device)
        models = bm.build_models(case, device, [bm.BASELINE, "triton"])
        base, fused = models[bm.BASELINE], models["triton"]
        x, grad_out = bm.make_inputs(case, device)
        with torch.no_grad():
            want = base(x)[0].float()
        fns = {(bm.BASELINE, "forward"): bm.forward_step(base, x),
               (bm.BASELINE, "train"): bm.train_step(base, x, grad_out)}
        for name, (path, mode) in TRITON_PATHS.items():
            if path == "onchip" and not launcher.uses_onchip(case.hidden, dtype, precision):
                entry["skipped"][name] = "hidden size above the on-chip limit"
                continue
            try:
                launcher.LAST_MULTICTA.clear()
                with _forced(path, mode), torch.no_grad():
                    got = fused(x)[0].float()
                bm.synchronize(device)
                info = {"max_abs_err_vs_cudnn": (got - want).abs().max().item(),
                        "ran": dict(launcher.LAST_MULTICTA)}
            except Exception as error:  # record and keep the other paths
                entry["skipped"][name] = f"{type(error).__name__}: {error}"[:300]
                continue
            entry["paths"][name] = info
            fns[(name, "forward")] = _with_path(bm.forward_step(fused, x), path, mode)
            fns[(name, "train")] = _with_path(bm.train_step(fused, x, grad_out), path, mode)
        timings = bm.measure_by_mode(fns, device, warmup=warmup, min_rounds=rounds,
                                     max_rounds=max(rounds, 9), budget_s=budget_s)
    base_ms = {m: timings[(bm.BASELINE, m)].median * 1e3 for m in ("forward", "train")}
    entry["cudnn_ms"] = base_ms
    for name, info in entry["paths"].items():
        for m in ("forward", "train"):
            ms = timings[(name, m)].median * 1e3
            info[f"{m}_ms"] = ms
            info[f"{m}_per_step_us"] = ms * 1e3 / case.seq
            info[f"{m}_speedup_vs_cudnn"] = base_ms[m] / ms
    del models, x, grad_out
    return entry


def run_paths(args, device) -> int:
    from fastbirnn.triton import launcher, residency

    specs = args.shape or PATH_SHAPES
    report = {
        "machine": bm.machine_info(device),
        "launcher": {"MULTICTA_MIN_HIDDEN": {str(k): v for k, v in
                                             launcher.MULTICTA_MIN_HIDDEN.items()},
                     "MULTICTA_MAX_BATCH": launcher.MULTICTA_MAX_BATCH,
                     "MULTICTA_RESIDENT_ELEMENTS": {str(k): v for k, v in
                                                    launcher.MULTICTA_RESIDENT_ELEMENTS.items()},
                     "MULTICTA_BLOCK_K": launcher.MULTICTA_BLOCK_K,
                     "MULTICTA_NUM_WARPS": launcher.MULTICTA_NUM_WARPS,
                     "MULTICTA_NUM_WARPS_K_TILED": launcher.MULTICTA_NUM_WARPS_K_TILED,
                     "cooperative_launch": residency.COOPERATIVE_LAUNCH},
        "note": "speedup = cuDNN nn.RNN median time / path median time (>1: path faster)",
        "cases": [],
    }
    path = os.path.join(args.out or ".", "paths.json")
    deadline = time.monotonic() + args.paths_budget
    status = 0
    for spec in specs:
        case = parse_shape(spec)
        if time.monotonic() > deadline:
            report["cases"].append({"shape": spec, "skipped": "out of --paths-budget"})
            continue
        try:
            entry = compare_paths(case, device, budget_s=args.case_budget, rounds=args.rounds,
                                  warmup=args.warmup)
        except Exception as error:  # keep the other shapes
            status = 1
            entry = {"shape": spec, "failed": f"{type(error).__name__}: {error}"[:500]}
        report["cases"].append(entry)
        with open(path, "w") as f:  # after every case: a timeout keeps what was measured
            json.dump(report, f, indent=1)
        line = [f"{spec}: cuDNN {entry.get('cudnn_ms', {}).get('train', float('nan')):.2f} ms/train"]
        for name, info in entry.get("paths", {}).items():
            line.append(f"{name} {info.get('train_ms', float('nan')):.2f} ms "
                        f"({info.get('train_speedup_vs_cudnn', float('nan')):.2f}x, "
                        f"err {info['max_abs_err_vs_cudnn']:.1e}, ran {info['ran'].get('mode')})")
        for name, why in entry.get("skipped", {}).items():
            line.append(f"{name}: skipped ({why[:120]})")
        print("\n    ".join(line), flush=True)
    print(f"wrote {path}")
    return status


# --gated: the LSTM and GRU cells (issue 15), triton vs cuDNN's nn.LSTM / nn.GRU.
# (batch, seq, hidden); input size = hidden, bidirectional, one layer. "tf32" is fp32 with
# torch's default TF32 for cuDNN RNNs (which the kernels follow).
GATED_SHAPES = [(b, 256, h) for h in (128, 256, 512) for b in (1, 8, 32)]
GATED_DTYPES = ("tf32", "bf16")


def compare_gated(cell: str, batch: int, seq: int, hidden: int, dtype_label: str, device,
                  budget_s: float, rounds: int = 3, warmup: int = 2) -> dict:
    """Times (ms) and ratios (cuDNN time / triton time) of a forward under no_grad and of a
    training step, and the forward's largest deviation from cuDNN's output."""
    from torch import nn

    from fastbirnn import FastBiGRU, FastBiLSTM
    from fastbirnn.triton import launcher
    from fastbirnn.triton.cells import GATES

    nn_class, fast_class = (nn.LSTM, FastBiLSTM) if cell == "lstm" else (nn.GRU, FastBiGRU)
    dtype = bm.DTYPES[dtype_label][0]
    entry: dict = {"cell": cell, "batch": batch, "seq": seq, "hidden": hidden,
                   "dtype": dtype_label, "bidirectional": True}
    with bm.precision(dtype_label):
        precision = "tf32" if dtype == torch.float32 and launcher.use_tf32(device) else "ieee"
        entry["path"] = launcher.choose_path(hidden, batch, dtype, precision, device,
                                             gates=GATES[cell])
        torch.manual_seed(0)
        base = nn_class(hidden, hidden, bidirectional=True, device=device, dtype=dtype)
        fused = fast_class(hidden, hidden, bidirectional=True, device=device, dtype=dtype,
                           backend="triton")
        fused.load_state_dict(base.state_dict())
        x, grad_out = bm.make_inputs(bm.Case(batch, seq, hidden, hidden, dtype=dtype_label),
                                     device)
        with torch.no_grad():
            want, got = base(x)[0].float(), fused(x)[0].float()
        entry["max_abs_err_vs_cudnn"] = (got - want).abs().max().item()
        fns = {(name, mode): step
               for name, model in (("cudnn", base), ("triton", fused))
               for mode, step in (("forward", bm.forward_step(model, x)),
                                  ("train", bm.train_step(model, x, grad_out)))}
        timings = bm.measure_by_mode(fns, device, warmup=warmup, min_rounds=rounds,
                                     max_rounds=max(rounds, 9), budget_s=budget_s)
    for mode in ("forward", "train"):
        cudnn, triton_ms = (timings[(n, mode)].median * 1e3 for n in ("cudnn", "triton"))
        entry[f"cudnn_{mode}_ms"] = cudnn
        entry[f"triton_{mode}_ms"] = triton_ms
        entry[f"{mode}_speedup_vs_cudnn"] = cudnn / triton_ms
    return entry


def run_gated(args, device) -> int:
    """Adds a "gated" section to paths.json in --out (one file for every triton-vs-cuDNN
    comparison: the GPU run brings back at most 8 files), rewritten after every shape."""
    shapes = [tuple(int(v) for v in spec.split(",")) for spec in args.gated_shape] or GATED_SHAPES
    dtypes = args.gated_dtype or GATED_DTYPES
    path = os.path.join(args.out or ".", "paths.json")
    report = {}
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
    report.setdefault("machine", bm.machine_info(device))
    gated = report["gated"] = {
        "note": "speedup = cuDNN median time / triton median time (>1: triton faster); "
                "train = forward + backward of the output, no optimizer",
        "cases": [],
    }
    deadline = time.monotonic() + args.paths_budget
    status = 0
    # dtype first: where the budget runs out, the later dtype loses shapes, not every dtype.
    for dtype_label in dtypes:
        for batch, seq, hidden in shapes:
            for cell in ("lstm", "gru"):
                spec = {"cell": cell, "batch": batch, "seq": seq, "hidden": hidden,
                        "dtype": dtype_label}
                if time.monotonic() > deadline:
                    gated["cases"].append(dict(spec, skipped="out of --paths-budget"))
                    continue
                try:
                    entry = compare_gated(cell, batch, seq, hidden, dtype_label, device,
                                          args.case_budget, args.rounds, args.warmup)
                    print(f"{cell} B{batch} T{seq} H{hidden} {dtype_label} ({entry['path']}): "
                          f"train {entry['triton_train_ms']:.2f} ms vs cuDNN "
                          f"{entry['cudnn_train_ms']:.2f} ms "
                          f"({entry['train_speedup_vs_cudnn']:.2f}x), forward "
                          f"{entry['forward_speedup_vs_cudnn']:.2f}x, "
                          f"err {entry['max_abs_err_vs_cudnn']:.1e}", flush=True)
                except Exception as error:  # keep the other shapes
                    status = 1
                    entry = dict(spec, failed=f"{type(error).__name__}: {error}"[:500])
                    print(f"{spec}: FAILED {entry['failed']}", flush=True)
                gated["cases"].append(entry)
                with open(path, "w") as f:
                    json.dump(report, f, indent=1)
    print(f"wrote {path}")
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--shape", action="append", default=[], metavar="B,T,I,H[,L][:dtype]",
                   help="repeatable; dtype fp32, tf32, bf16 or fp16 (default: a preset per device)")
    p.add_argument("--backends", default=None,
                   help="comma-separated FastBiRNN backends (default: auto + every registered one)")
    p.add_argument("--iters", type=int, default=3, help="profiled calls per mode")
    p.add_argument("--top", type=int, default=8, help="kernels listed per contender and mode")
    p.add_argument("--out", default=None, help="folder for profile_summary.txt and the traces")
    p.add_argument("--bundle", action="store_true",
                   help="pack the Chrome traces into one profile_traces.tar.gz in --out")
    p.add_argument("--paths", action="store_true",
                   help="compare the Triton paths with cuDNN instead; writes paths.json")
    p.add_argument("--paths-budget", type=float, default=100.0,
                   help="--paths, --gated: seconds after which no new shape starts")
    p.add_argument("--case-budget", type=float, default=2.0,
                   help="--paths, --gated: timing seconds per shape")
    p.add_argument("--rounds", type=int, default=3,
                   help="--paths, --gated: timed rounds per shape at least")
    p.add_argument("--warmup", type=int, default=2,
                   help="--paths, --gated: untimed calls of each contender first")
    p.add_argument("--gated", action="store_true",
                   help="time the triton LSTM/GRU against cuDNN; adds 'gated' to paths.json")
    p.add_argument("--gated-shape", action="append", default=[], metavar="B,T,H",
                   help="--gated: repeatable (default: T 256, B 1/8/32, H 128/256/512)")
    p.add_argument("--gated-dtype", action="append", default=[], choices=list(bm.DTYPES),
                   help="--gated: repeatable (default: tf32 and bf16)")
    args = p.parse_args(argv)

    device = bm.default_device() if args.device == "auto" else torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.paths or args.gated:
        if args.out:
            os.makedirs(args.out, exist_ok=True)
        return run_paths(args, device) if args.paths else run_gated(args, device)
    specs = args.shape or DEFAULT_SHAPES.get(device.type, DEFAULT_SHAPES["cpu"])
    cases = [parse_shape(s) for s in specs]
    backends = args.backends.split(",") if args.backends else None

    trace_dir = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        trace_dir = os.path.join(args.out, "traces") if args.bundle else args.out
        os.makedirs(trace_dir, exist_ok=True)

    info = bm.machine_info(device)
    lines = [f"fastbirnn profile: {bm.describe_machine(info)}", ""]
    status = 0
    for case in cases:
        try:
            lines.extend(profile_case(case, device, backends, args.iters, trace_dir, args.top))
        except Exception as error:  # keep the other shapes' profiles
            status = 1
            lines.append(f"== {case.shape} {case.dtype}: FAILED {type(error).__name__}: {error}")
        lines.append("")
        print(f"profiled {case.shape} {case.dtype}", file=sys.stderr, flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(os.path.join(args.out, "profile_summary.txt"), "w") as f:
            f.write(text + "\n")
        if args.bundle:
            bundle = os.path.join(args.out, "profile_traces.tar.gz")
            with tarfile.open(bundle, "w:gz") as tar:
                for name in sorted(os.listdir(trace_dir)):
                    tar.add(os.path.join(trace_dir, name), arcname=name)
            for name in os.listdir(trace_dir):
                os.remove(os.path.join(trace_dir, name))
            os.rmdir(trace_dir)
            print(f"wrote {bundle}")
    return status


if __name__ == "__main__":
    sys.exit(main())
