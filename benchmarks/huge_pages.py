"""Training steps with and without the C++ engine's huge-page advice (``FASTBIRNN_HUGE_PAGES``).

    python benchmarks/huge_pages.py --json benchmarks/results/cpu/huge_pages.json
    python benchmarks/huge_pages.py --rounds 2 --steps 6 --shape lstm,64,250,64,512,uni

Buffers of 32 MiB and more are fresh memory on every call (glibc maps them anew), and the
engine may advise them as transparent huge pages (csrc/buffers.h). Whether that pays depends
on the machine: where the hypervisor takes the guest's free memory back (a virtio balloon
with free page reporting), a huge page often lands on memory the host has to fault in again.
The advice is read once at load, so each setting runs in its own process: rounds alternate
the two settings (``1``: advice on, ``0``: off), each process times ``--steps`` training steps
(``backend='cpp'``, after one untimed step) of each shape. Every step counts: the mean is
what an epoch costs, the median what a typical step costs, the maximum the stalls.

``--json PATH`` writes the machine (``lscpu``'s model and flags, torch version, git commit),
whether the hypervisor reclaims free pages, the engine's default, and every step's time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = ("lstm,64,250,64,512,uni", "rnn,64,256,256,512,bi", "gru,128,128,512,512,bi")


def time_steps(shape: str, steps: int) -> list[float]:
    """Seconds of each of ``steps`` training steps of ``shape`` (cell,B,T,I,H,bi|uni)."""
    import torch

    import fastbirnn
    from fastbirnn.benchmarking import train_step

    cell, B, T, I, H, direction = shape.split(",")
    B, T, I, H = int(B), int(T), int(I), int(H)
    bidirectional = direction == "bi"
    module = {"rnn": fastbirnn.FastBiRNN, "gru": fastbirnn.FastBiGRU,
              "lstm": fastbirnn.FastBiLSTM}[cell]
    torch.manual_seed(0)
    model = module(I, H, bidirectional=bidirectional, backend="cpp")
    x = torch.randn(T, B, I, requires_grad=True)
    grad = torch.randn(T, B, (2 if bidirectional else 1) * H)
    step = train_step(model, x, grad)
    step()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return seconds


def child(shapes: list[str], steps: int) -> None:
    from fastbirnn import _C

    result = {"advised": bool(_C.advises_huge_pages()),
              "steps_s": {shape: time_steps(shape, steps) for shape in shapes}}
    print(json.dumps(result))


def run_setting(setting: str, shapes: list[str], steps: int) -> dict:
    env = dict(os.environ, FASTBIRNN_HUGE_PAGES=setting)
    command = [sys.executable, __file__, "--child", "--steps", str(steps)]
    for shape in shapes:
        command += ["--shape", shape]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["advised"] != (setting == "1"):
        raise RuntimeError(f"FASTBIRNN_HUGE_PAGES={setting} was not applied: {result}")
    return result["steps_s"]


def summary(seconds: list[float]) -> dict:
    return {"mean_ms": 1e3 * statistics.mean(seconds),
            "median_ms": 1e3 * statistics.median(seconds),
            "max_ms": 1e3 * max(seconds), "min_ms": 1e3 * min(seconds), "steps": len(seconds)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append",
                        help=f"cell,B,T,I,H,bi|uni (repeatable; default {', '.join(SHAPES)})")
    parser.add_argument("--rounds", type=int, default=3, help="processes per setting")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per process")
    parser.add_argument("--json", help="file for the machine, the settings and every step")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = args.shape or list(SHAPES)
    if args.child:
        child(shapes, args.steps)
        return 0

    import torch

    import fastbirnn.benchmarking as bm
    from fastbirnn import _C

    steps: dict = {setting: {shape: [] for shape in shapes} for setting in ("1", "0")}
    for r in range(args.rounds):
        for setting in (("1", "0") if r % 2 == 0 else ("0", "1")):
            for shape, seconds in run_setting(setting, shapes, args.steps).items():
                steps[setting][shape] += seconds
    rows = []
    print(f"{'shape':28s} {'advice':>6s} {'mean ms':>8s} {'median':>8s} {'max':>8s}")
    for shape in shapes:
        on, off = summary(steps["1"][shape]), summary(steps["0"][shape])
        rows.append({"shape": shape, "advice_on": on, "advice_off": off,
                     "mean_on_over_off": on["mean_ms"] / off["mean_ms"],
                     "median_on_over_off": on["median_ms"] / off["median_ms"],
                     "steps_s": {"on": steps["1"][shape], "off": steps["0"][shape]}})
        for label, s in (("on", on), ("off", off)):
            print(f"{shape:28s} {label:>6s} {s['mean_ms']:8.1f} {s['median_ms']:8.1f} "
                  f"{s['max_ms']:8.1f}")
        print(f"{'':28s} on/off: mean {rows[-1]['mean_on_over_off']:.3f}, "
              f"median {rows[-1]['median_on_over_off']:.3f}")
    reclaims = bool(_C.hypervisor_reclaims_free_pages())
    print(f"the hypervisor reclaims free pages here: {reclaims} (so the advice is "
          f"{'off' if reclaims else 'on'} unless FASTBIRNN_HUGE_PAGES says otherwise)")
    if args.json:
        doc = {"machine": bm.machine_info("cpu"),
               "hypervisor_reclaims_free_pages": reclaims,
               "config": {"shapes": shapes, "rounds": args.rounds, "steps": args.steps,
                          "threads": torch.get_num_threads()},
               "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
