"""Mixed precision on CPU: FastBiRNN / FastBiGRU / FastBiLSTM against nn.RNN / nn.GRU /
nn.LSTM with both under ``torch.autocast('cpu', dtype=torch.bfloat16)`` (issue 24).

    python benchmarks/bf16_autocast.py --json benchmarks/results/cpu/bf16.json
    python benchmarks/bf16_autocast.py --shape 32,128,128,128 --cell lstm

For each cell, shape (B, T, I, H; bidirectional, one layer) and mode (inference under
``no_grad``, training step: forward and backward) it times, interleaved with the same weights
and input (``fastbirnn.benchmarking.measure_interleaved``), the nn class under autocast and the
engine (``backend='cpp'``) under autocast; then, on its own, the nn class in plain fp32 for
reference. It reports the ratios nn-autocast / cpp-autocast (above 1: the engine is faster) and the backend
``'auto'`` selects under autocast for that call, and whether that was the faster of the two.

It also measures accuracy (``--accuracy-steps``, default 200, two layers): the RMS error,
relative to the fp64 result's RMS, of the outputs, final states and every gradient of each
contender under autocast against the same module in fp64, and the ratio engine / nn.

``--json PATH`` writes the machine (``lscpu``'s model name and vector flags, torch version,
git commit, thread count), the settings, every row with its samples, and the accuracy table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

# The checkout this script is in is what it measures.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastbirnn  # noqa: E402
from fastbirnn import benchmarking as bm  # noqa: E402

CLASSES = {
    "rnn": (torch.nn.RNN, fastbirnn.FastBiRNN),
    "gru": (torch.nn.GRU, fastbirnn.FastBiGRU),
    "lstm": (torch.nn.LSTM, fastbirnn.FastBiLSTM),
}
# The two shapes, the tagger's, and the speech shape (B, T, I, H).
DEFAULT_SHAPES = ((32, 128, 128, 128), (64, 256, 256, 512), (32, 40, 100, 128),
                  (16, 200, 80, 320))


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _modules(cell: str, I: int, H: int, layers: int = 1, seed: int = 0):
    nn_cls, fast_cls = CLASSES[cell]
    torch.manual_seed(seed)
    reference = nn_cls(I, H, num_layers=layers, bidirectional=True)
    fused = fast_cls(I, H, num_layers=layers, backend="cpp")
    auto = fast_cls(I, H, num_layers=layers)
    fused.load_state_dict(reference.state_dict())
    auto.load_state_dict(reference.state_dict())
    return reference, fused, auto


def _under_autocast(fn):
    def run():
        with _autocast():
            fn()
    return run


def _train_step(model, x, grad_out):
    def step():
        model.zero_grad(set_to_none=True)
        out, _ = model(x)
        out.float().backward(grad_out)
    return step


def time_row(cell: str, shape, training: bool, budget_s: float) -> dict:
    B, T, I, H = shape
    reference, fused, auto = _modules(cell, I, H)
    torch.manual_seed(1)
    x = torch.randn(T, B, I)
    grad_out = torch.randn(T, B, 2 * H)
    step = _train_step if training else lambda model, x, _: bm.forward_step(model, x)
    # The two contenders interleaved; the nn class in fp32 (context, not a contender) after
    # them, on its own: its large fp32 buffers would otherwise change what the next call of
    # the pair pays for fresh memory.
    fns = {"nn_bf16": _under_autocast(step(reference, x, grad_out)),
           "cpp_bf16": _under_autocast(step(fused, x, grad_out))}
    with torch.set_grad_enabled(training), _autocast():
        selected = auto.selected_backend(x)
    timings = bm.measure_interleaved(fns, "cpu", budget_s=budget_s)
    timings.update(bm.measure_interleaved({"nn_fp32": step(reference, x, grad_out)}, "cpu",
                                          budget_s=budget_s / 2))
    medians = {k: t.median for k, t in timings.items()}
    ratio = medians["nn_bf16"] / medians["cpp_bf16"]
    faster = "cpp" if ratio >= 1 else "torch"
    return {
        "cell": cell, "shape": {"B": B, "T": T, "I": I, "H": H, "layers": 1,
                                "bidirectional": True},
        "mode": "training" if training else "inference",
        "median_s": medians, "samples_s": {k: t.samples for k, t in timings.items()},
        "speedup_vs_nn_bf16": ratio,
        "nn_bf16_vs_nn_fp32": medians["nn_fp32"] / medians["nn_bf16"],
        "auto_selects": selected, "auto_picks_faster": selected == faster,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", action="append", choices=list(CLASSES),
                    help="cells to time (repeatable; default all)")
    ap.add_argument("--shape", action="append", metavar="B,T,I,H",
                    help="shapes to time (repeatable; default the issue's, tagger and speech)")
    ap.add_argument("--budget", type=float, default=4.0, help="seconds per row (default 4)")
    ap.add_argument("--accuracy-steps", type=int, default=200,
                    help="sequence length of the accuracy check (0 skips it)")
    ap.add_argument("--json", metavar="PATH", help="write the results here")
    args = ap.parse_args()
    cells = args.cell or list(CLASSES)
    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape
              else DEFAULT_SHAPES)
    info = bm.machine_info("cpu")
    print(bm.describe_machine(info))
    print(f"engine ISA {fastbirnn.backends.cpp_backend.cpu_isa()}, "
          f"{torch.get_num_threads()} threads")
    rows = []
    print(f"{'cell':5} {'B,T,I,H':>16} {'mode':10} {'nn fp32':>9} {'nn bf16':>9} "
          f"{'cpp bf16':>9} {'cpp/nn bf16':>11} {'auto':>6}")
    for cell in cells:
        for shape in shapes:
            for training in (False, True):
                row = time_row(cell, shape, training, args.budget)
                rows.append(row)
                m = row["median_s"]
                print(f"{cell:5} {','.join(map(str, shape)):>16} {row['mode']:10} "
                      f"{m['nn_fp32'] * 1e3:8.2f}m {m['nn_bf16'] * 1e3:8.2f}m "
                      f"{m['cpp_bf16'] * 1e3:8.2f}m {row['speedup_vs_nn_bf16']:10.2f}x "
                      f"{row['auto_selects']:>6}{'' if row['auto_picks_faster'] else ' (slower)'}",
                      flush=True)
    acc = []
    if args.accuracy_steps:
        for cell in cells:
            result = bm.bf16_accuracy(cell, args.accuracy_steps)
            acc.append(result)
            print(f"accuracy {cell}: worst RMS error ratio engine / nn over outputs, states and "
                  f"gradients: {result['worst_cpp_over_nn']:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": info, "isa": fastbirnn.backends.cpp_backend.cpu_isa(),
                       "threads": torch.get_num_threads(), "budget_s": args.budget,
                       "rows": rows, "accuracy": acc}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
