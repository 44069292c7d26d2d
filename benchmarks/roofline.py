"""Where the fused CPU kernel stands against this machine's own GEMM rate, and where a tiny
training step spends its time: the profile behind the CPU-engine targets the kernel misses.

    python benchmarks/roofline.py --out benchmarks/results/targets/roofline.json
    python benchmarks/roofline.py --cell lstm --out benchmarks/results/targets/roofline-lstm.json

1. Peak: torch.mm on 2048 x 2048 fp32 matrices (MKL's sgemm) at 1 thread and at all threads.
2. The kernel (`cpp`, bidirectional fp32, one layer) at the design's shapes: the forward under
   no_grad and a training step (forward, backward of the output; input gradient included),
   their multiply-add counts, GFLOP/s at 1 thread (process CPU time) and at all threads (wall
   time), and the fraction of the peak.
3. The tutorial's tiny shape, a training step taken apart: zero_grad, the forward that records
   the graph, the backward; next to a backward of a one-multiply graph (autograd's fixed cost)
   and nn.RNN's whole step.

With ``--cell lstm``, in place of 2 and 3: issue 23's rows (B, T, I, H, layers, directions),
the kernel and nn.LSTM (oneDNN's fused LSTM) timed at all threads (each mode on its own,
contenders interleaved), the GFLOP/s
each reaches, and the rate the kernel would need for the issue's targets (inference 1.0x and
training 1.3x nn.LSTM; 1.3x / 1.5x at batch 1), as a fraction of the peak.

Medians of repeated timings after a warm-up; a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
from torch import nn

from fastbirnn import FastBiLSTM, FastBiRNN
from fastbirnn.benchmarking import forward_step, machine_info, measure_by_mode, train_step

SHAPES = [(64, 256, 256, 512), (32, 128, 128, 128)]  # (B, T, I, H)
TINY = (2, 4, 16, 32)
# Issue 23's rows: (B, T, I, H, layers, bidirectional) and its targets (inference, training).
LSTM_ROWS = [
    ((32, 40, 100, 128, 1, True), (1.0, 1.3)),  # the tagger
    ((32, 40, 100, 256, 2, True), (1.0, 1.3)),
    ((32, 128, 128, 128, 1, True), (1.0, 1.3)),
    ((16, 200, 80, 320, 3, True), (1.0, 1.3)),  # speech
    ((64, 250, 64, 512, 1, False), (1.0, 1.3)),
    ((1, 30, 300, 256, 2, True), (1.3, 1.5)),  # serving at batch 1
]


def median_seconds(fn: Callable[[], None], repeats: int, clock=time.perf_counter) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = clock()
        fn()
        samples.append(clock() - start)
    return statistics.median(samples)


def peak_gflops(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / median_seconds(lambda: torch.mm(a, b), 10) / 1e9


def stack_multiply_adds(B: int, T: int, I: int, H: int, layers: int, bidirectional: bool,
                        gates: int) -> dict:
    """Multiply-adds of a stack of layers: each layer's projection from its input width (I,
    then D * H) and its recurrence, per gate; the training step adds the BPTT products, dW_hh,
    dW_ih and the input gradient."""
    D, rows = (2 if bidirectional else 1), T * B
    forward = backward = 0
    for layer in range(layers):
        width = I if layer == 0 else D * H
        projection, recurrence = D * rows * gates * H * width, D * rows * gates * H * H
        forward += projection + recurrence
        backward += 2 * recurrence + 2 * projection
    return {"forward": forward, "train": forward + backward}


def lstm_rows(peak: float, threads: int, budget_s: float) -> list[dict]:
    """The kernel and nn.LSTM at issue 23's rows at ``threads`` threads (measure_by_mode)."""
    torch.set_num_threads(threads)
    entries = []
    for (B, T, I, H, layers, bidirectional), targets in LSTM_ROWS:
        torch.manual_seed(0)
        plain = nn.LSTM(I, H, layers, bidirectional=bidirectional)
        fused = FastBiLSTM(I, H, layers, bidirectional=bidirectional, backend="cpp")
        fused.load_state_dict(plain.state_dict())
        x = torch.randn(T, B, I, requires_grad=True)
        grad_out = torch.randn(T, B, (2 if bidirectional else 1) * H)
        fns = {}
        for name, model in (("nn.LSTM", plain), ("cpp", fused)):
            fns[(name, "forward")] = forward_step(model, x)
            fns[(name, "train")] = train_step(model, x, grad_out)
        timings = measure_by_mode(fns, "cpu", warmup=2, min_rounds=7, max_rounds=25,
                                  budget_s=budget_s)
        macs = stack_multiply_adds(B, T, I, H, layers, bidirectional, gates=4)
        entry = {"shape": [B, T, I, H, layers, bidirectional], "multiply_adds": macs,
                 "modes": {}}
        for mode, target in zip(("forward", "train"), targets):
            flops = 2 * macs[mode]
            nn_s, cpp_s = timings[("nn.LSTM", mode)].median, timings[("cpp", mode)].median
            needed = flops / (nn_s / target) / 1e9
            entry["modes"][mode] = {
                "nn_seconds": nn_s, "cpp_seconds": cpp_s, "speedup": nn_s / cpp_s,
                "nn_samples": timings[("nn.LSTM", mode)].samples,
                "cpp_samples": timings[("cpp", mode)].samples,
                "nn_gflops": flops / nn_s / 1e9, "cpp_gflops": flops / cpp_s / 1e9,
                "nn_fraction_of_peak": flops / nn_s / 1e9 / peak,
                "cpp_fraction_of_peak": flops / cpp_s / 1e9 / peak,
                "target": target, "target_gflops": needed,
                "target_fraction_of_peak": needed / peak,
            }
        entries.append(entry)
    return entries


def kernel_steps(B: int, T: int, I: int, H: int):
    torch.manual_seed(0)
    model = FastBiRNN(I, H, backend="cpp")
    x = torch.randn(T, B, I, requires_grad=True)
    grad_out = torch.randn(T, B, 2 * H)
    return {"forward": forward_step(model, x), "train": train_step(model, x, grad_out)}


def tiny_breakdown(repeats: int = 2000) -> dict:
    B, T, I, H = TINY
    torch.manual_seed(0)
    fused, plain = FastBiRNN(I, H, backend="cpp"), nn.RNN(I, H, bidirectional=True)
    x = torch.randn(T, B, I, requires_grad=True)
    grad_out = torch.randn(T, B, 2 * H)

    def per_call(fn: Callable[[], None], n: int = repeats) -> float:
        def many() -> None:
            for _ in range(n):
                fn()

        return median_seconds(many, 7) / n * 1e6  # microseconds

    def zero() -> None:
        fused.zero_grad(set_to_none=True)
        x.grad = None

    w = torch.randn(T, B, 2 * H, requires_grad=True)
    return {
        "shape": TINY,
        "fused_step_us": per_call(train_step(fused, x, grad_out)),
        "zero_grad_us": per_call(zero),
        "fused_forward_recording_graph_us": per_call(lambda: fused(x)),
        "one_multiply_backward_us": per_call(lambda: (w * 2).backward(grad_out)),
        "nn_rnn_step_us": per_call(train_step(plain, x, grad_out), repeats // 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file for the results")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cell", choices=("rnn", "lstm"), default="rnn",
                        help="rnn: the design's shapes and the tiny step; lstm: issue 23's rows")
    parser.add_argument("--budget", type=float, default=8.0,
                        help="--cell lstm: seconds of timed rounds per row, both modes")
    args = parser.parse_args()
    all_threads = args.threads
    result = {"machine": machine_info("cpu"), "peak_gflops": {}, "shapes": [], "tiny": None}
    for threads in (1, all_threads):
        result["peak_gflops"][threads] = peak_gflops(threads)
    if args.cell == "lstm":
        return report_lstm(result, all_threads, args)
    for shape in SHAPES:
        macs = stack_multiply_adds(*shape, layers=1, bidirectional=True, gates=1)
        steps = kernel_steps(*shape)
        entry = {"shape": shape, "multiply_adds": macs, "modes": {}}
        for mode, fn in steps.items():
            repeats = 5 if shape[3] >= 512 else 30
            torch.set_num_threads(1)
            cpu_1 = median_seconds(fn, repeats, clock=time.process_time)
            torch.set_num_threads(all_threads)
            wall = median_seconds(fn, repeats)
            flops = 2 * macs[mode]
            entry["modes"][mode] = {
                "cpu_seconds_1_thread": cpu_1,
                "gflops_1_thread": flops / cpu_1 / 1e9,
                "fraction_of_peak_1_thread": flops / cpu_1 / 1e9 / result["peak_gflops"][1],
                "wall_seconds_all_threads": wall,
                "gflops_all_threads": flops / wall / 1e9,
                "fraction_of_peak_all_threads": flops / wall / 1e9
                / result["peak_gflops"][all_threads],
                "scaling": cpu_1 / wall,
            }
        result["shapes"].append(entry)
    torch.set_num_threads(all_threads)
    result["tiny"] = tiny_breakdown()

    peak = result["peak_gflops"]
    print(f"peak (torch.mm 2048^3 fp32): {peak[1]:.1f} GFLOP/s at 1 thread, "
          f"{peak[all_threads]:.1f} at {all_threads}")
    for entry in result["shapes"]:
        for mode, m in entry["modes"].items():
            print(f"{entry['shape']} {mode:7s}: 1 thread {m['cpu_seconds_1_thread'] * 1e3:8.2f} ms "
                  f"CPU, {m['gflops_1_thread']:6.1f} GFLOP/s ({m['fraction_of_peak_1_thread']:.0%}); "
                  f"{all_threads} threads {m['wall_seconds_all_threads'] * 1e3:8.2f} ms, "
                  f"{m['gflops_all_threads']:6.1f} GFLOP/s ({m['fraction_of_peak_all_threads']:.0%}), "
                  f"scaling {m['scaling']:.2f}x")
    tiny = result["tiny"]
    print(f"tiny {TINY}: fused step {tiny['fused_step_us']:.1f} us = zero_grad "
          f"{tiny['zero_grad_us']:.1f} + forward recording the graph "
          f"{tiny['fused_forward_recording_graph_us']:.1f} + backward (the rest); a one-multiply "
          f"graph's backward {tiny['one_multiply_backward_us']:.1f} us; nn.RNN's step "
          f"{tiny['nn_rnn_step_us']:.1f} us")
    write_json(result, args.out)


def write_json(result: dict, path) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


def report_lstm(result: dict, threads: int, args) -> None:
    peak = result["peak_gflops"][threads]
    result["lstm_rows"] = lstm_rows(peak, threads, args.budget)
    print(f"peak (torch.mm 2048^3 fp32): {peak:.1f} GFLOP/s at {threads} threads")
    print("shape (B, T, I, H, layers, bi)  mode     nn.LSTM GFLOP/s  cpp GFLOP/s  cpp x   "
          "target  needs GFLOP/s")
    for entry in result["lstm_rows"]:
        for mode, m in entry["modes"].items():
            print(f"{str(tuple(entry['shape'])):31s} {mode:8s} {m['nn_gflops']:6.1f} "
                  f"({m['nn_fraction_of_peak']:4.0%})   {m['cpp_gflops']:6.1f} "
                  f"({m['cpp_fraction_of_peak']:4.0%}) {m['speedup']:5.2f}x  {m['target']:.1f}x  "
                  f"{m['target_gflops']:6.1f} ({m['target_fraction_of_peak']:4.0%})")
    write_json(result, args.out)


if __name__ == "__main__":
    main()
