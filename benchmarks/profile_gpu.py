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
"""

from __future__ import annotations

import argparse
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
    args = p.parse_args(argv)

    device = bm.default_device() if args.device == "auto" else torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
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
