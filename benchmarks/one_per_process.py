"""Each contender alone in a process of its own, as a user's training script runs it:
FastBiLSTM (``backend='cpp'`` or ``'auto'``) against nn.LSTM.

    python benchmarks/one_per_process.py                  # issue 23's rows, LSTM
    python benchmarks/one_per_process.py --rounds 3 --shape lstm,32,40,100,128,1,bi
    python benchmarks/one_per_process.py --json benchmarks/results/zen5/one_per_process.json

The other benchmarks time both contenders interleaved in one process, which keeps the
comparison fair against a machine whose speed drifts; but then each contender runs on memory
the allocator's history shaped for both. glibc hands freed memory of 128 KiB and more back to
the kernel, or keeps it, depending on that history, and memory handed back is faulted in
again (4 KiB pages zeroed by the kernel) at the next step's first write. A process that runs
one model sees only that model's history. Here each round starts one process per contender,
in rotating order; each builds its model (the same seed, so the same weights), an SGD
optimizer and one batch, runs ``--warmup`` training steps (``zero_grad(set_to_none=True)``,
forward, a loss on the output, backward, ``step``), then times ``--steps`` training steps and
``--steps`` inferences (``torch.no_grad``) one by one, and counts the minor page faults of
each phase (``getrusage``). The row's time is the median over rounds of each process's
median step; the ratio is nn.LSTM's over the contender's (above 1: faster).

``--json PATH`` writes the machine (``lscpu``'s model name and flags, torch version, git
commit, thread count), the settings and every process's step times and fault counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# The checkout this script is in is what it measures (run as a script, sys.path[0] is
# benchmarks/, and an installed fastbirnn elsewhere would be imported instead).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, ROOT)

# Issue 23's rows: (cell, B, T, I, H, layers, bi|uni).
DEFAULT_SHAPES = [
    "lstm,32,40,100,128,1,bi",    # tagger
    "lstm,32,40,100,256,2,bi",    # 2-layer tagger
    "lstm,32,128,128,128,1,bi",
    "lstm,16,200,80,320,3,bi",    # speech
    "lstm,64,250,64,512,1,uni",
    "lstm,1,30,300,256,2,bi",     # batch-1 serving
]
CONTENDERS = ("nn", "cpp", "auto")


def run_one(shape: str, contender: str, warmup: int, steps: int, threads: int) -> dict:
    """In this process: one contender's training steps and inferences at `shape`."""
    import resource

    import torch

    import fastbirnn

    torch.set_num_threads(threads)
    cell, B, T, I, H, L, direction = shape.split(",")
    B, T, I, H, L = int(B), int(T), int(I), int(H), int(L)
    bidirectional = direction == "bi"
    torch.manual_seed(0)
    nn_class = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]
    if contender == "nn":
        model = nn_class(I, H, num_layers=L, bidirectional=bidirectional)
    else:
        fused = {"lstm": fastbirnn.FastBiLSTM, "gru": fastbirnn.FastBiGRU,
                 "rnn": fastbirnn.FastBiRNN}[cell]
        model = fused(I, H, num_layers=L, bidirectional=bidirectional, backend=contender)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(T, B, I)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        out = model(x)[0]
        out.square().mean().backward()
        optimizer.step()

    def infer():
        with torch.no_grad():
            model(x)

    def timed(fn) -> tuple[list[float], float]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return seconds, faults / steps

    for _ in range(warmup):
        train_step()
    train, train_faults = timed(train_step)
    infer()
    inference, infer_faults = timed(infer)
    return {"train_s": train, "train_faults_per_step": train_faults,
            "infer_s": inference, "infer_faults_per_call": infer_faults}


def in_child(shape: str, contender: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", shape, contender,
               "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append",
                        help="cell,B,T,I,H,layers,bi|uni (repeatable; default: issue 23's rows)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contenders", default="nn,cpp,auto",
                        help="comma-separated, of " + ", ".join(CONTENDERS))
    parser.add_argument("--json", help="write the machine, settings and every process here")
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "CONTENDER"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(*args.child, args.warmup, args.steps, args.threads)))
        return
    contenders = args.contenders.split(",")
    unknown = set(contenders) - set(CONTENDERS)
    if unknown or "nn" not in contenders:
        parser.error(f"--contenders: nn and any of {CONTENDERS}, got {args.contenders}")
    shapes = args.shape or DEFAULT_SHAPES
    rows = []
    for shape in shapes:
        runs = {c: [] for c in contenders}
        for r in range(args.rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for contender in order:
                runs[contender].append(in_child(shape, contender, args))

        def median_ms(contender, key):
            return 1e3 * statistics.median(statistics.median(run[key]) for run in runs[contender])

        row = {"shape": shape, "runs": runs, "median_ms": {}, "faults": {}, "ratio_vs_nn": {}}
        for c in contenders:
            row["median_ms"][c] = {mode: median_ms(c, f"{mode}_s") for mode in ("train", "infer")}
            row["faults"][c] = {
                "train": statistics.median(run["train_faults_per_step"] for run in runs[c]),
                "infer": statistics.median(run["infer_faults_per_call"] for run in runs[c])}
        for c in contenders:
            if c != "nn":
                row["ratio_vs_nn"][c] = {
                    mode: row["median_ms"]["nn"][mode] / row["median_ms"][c][mode]
                    for mode in ("train", "infer")}
        rows.append(row)
        cells = " | ".join(
            f"{c} train {row['median_ms'][c]['train']:.2f} ms ({row['faults'][c]['train']:.0f} "
            f"faults) infer {row['median_ms'][c]['infer']:.2f} ms"
            for c in contenders)
        ratios = " ".join(f"{c} {v['train']:.2f}x / {v['infer']:.2f}x"
                          for c, v in row["ratio_vs_nn"].items())
        print(f"{shape}: {cells} || vs nn (train / infer): {ratios}", flush=True)
    if args.json:
        import torch

        from fastbirnn import benchmarking as bm

        record = {"machine": bm.machine_info(torch.device("cpu")),
                  "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                  "settings": {"rounds": args.rounds, "warmup": args.warmup,
                               "steps": args.steps, "threads": args.threads,
                               "contenders": contenders},
                  "rows": rows}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
