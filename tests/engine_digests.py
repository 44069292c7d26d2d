"""Digests of the C++ engine's results on a fixed set of configurations.

A refactor of the engine must leave its results bit-identical. ``compute()`` runs each
configuration (every cell, fp32/fp64, padded/packed/batch_first, 1-3 layers, hidden sizes on
both sides of the engine's block thresholds, h_0 or not, dropout, inference) with
``backend='cpp'`` and hashes the bytes of every output, final state and gradient.
``tests/data/engine_digests.json`` holds the digests of the last accepted engine together
with the machine they were computed on: the engine's bits depend on the CPU's instruction
set and on MKL's code path for it, so ``tests/test_engine_digests.py`` compares only on a
machine with the same fingerprint and skips elsewhere.

    python tests/engine_digests.py --write   # accept the current engine's results
    python tests/engine_digests.py           # compare, print what differs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastbirnn import FastBiGRU, FastBiLSTM, FastBiRNN

PATH = os.path.join(os.path.dirname(__file__), "data", "engine_digests.json")

CELLS = {
    "rnn_tanh": (FastBiRNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (FastBiRNN, {"nonlinearity": "relu"}),
    "lstm": (FastBiLSTM, {}),
    "gru": (FastBiGRU, {}),
}

# (name, batch, steps, input, hidden, layers, layout, with_hx, dropout, bidirectional)
SHAPES = [
    ("small", 3, 5, 4, 6, 1, "padded", True, 0.0, True),
    ("h32-bf", 4, 7, 16, 32, 2, "batch_first", False, 0.0, True),
    ("h65-packed", 5, 9, 8, 65, 3, "packed_unsorted", True, 0.0, True),
    ("h130-uni", 3, 6, 12, 130, 2, "padded", True, 0.0, False),
    ("h64-long", 2, 80, 10, 64, 1, "padded", False, 0.0, True),
    ("dropout", 4, 6, 8, 40, 3, "packed_unsorted", True, 0.3, True),
    # Few rows (T * B < 64): the forward multiplies W_hh on BLAS instead of packed tiles.
    ("h300-short", 3, 5, 20, 300, 1, "padded", True, 0.0, True),
    # H > 256: the gated cells' per-step products in K chunks, a last block of one column.
    ("h257-long", 4, 20, 16, 257, 1, "batch_first", False, 0.0, True),
]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def fingerprint() -> dict:
    """What the engine's bits depend on besides its code."""
    model = ""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"))
    return {
        "cpu": model,
        "isa": isa,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "isa_override": os.environ.get("FASTBIRNN_ISA", ""),
    }


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def run_case(cell: str, dtype_name: str, shape: tuple) -> dict:
    name, B, T, I, H, L, layout, with_hx, dropout, bi = shape
    cls, extra = CELLS[cell]
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    module = cls(I, H, num_layers=L, batch_first=layout == "batch_first", dropout=dropout,
                 bidirectional=bi, dtype=dtype, backend="cpp", **extra)
    g = torch.Generator().manual_seed(1)
    D = 2 if bi else 1
    x_shape = (B, T, I) if layout == "batch_first" else (T, B, I)
    x = torch.randn(*x_shape, generator=g, dtype=dtype).requires_grad_()
    states = []
    if with_hx:
        for _ in range(2 if cell == "lstm" else 1):
            states.append(torch.randn(L * D, B, H, generator=g, dtype=dtype).requires_grad_())
    hx = None if not states else (tuple(states) if cell == "lstm" else states[0])
    lengths = [T - (i * 3) % T for i in range(B)]

    def forward():
        if layout == "packed_unsorted":
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            out, final = module(packed, hx)
            out = pad_packed_sequence(out, total_length=T)[0]
        else:
            out, final = module(x, hx)
        return out, (final if isinstance(final, tuple) else (final,))

    result = {}
    module.eval()
    with torch.no_grad():
        out, final = forward()
    result["eval.out"] = _digest(out)
    for i, s in enumerate(final):
        result[f"eval.state{i}"] = _digest(s)
    module.train()
    torch.manual_seed(2)  # dropout masks
    out, final = forward()
    result["train.out"] = _digest(out)
    for i, s in enumerate(final):
        result[f"train.state{i}"] = _digest(s)
    loss = (out * torch.randn(out.shape, generator=g, dtype=dtype)).sum()
    for s in final:
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=dtype)).sum()
    inputs = [x, *states, *module.parameters()]
    names = ["x", *[f"state{i}" for i in range(len(states))],
             *[n for n, _ in module.named_parameters()]]
    for n, grad in zip(names, torch.autograd.grad(loss, inputs)):
        result[f"grad.{n}"] = _digest(grad)
    return result


def compute() -> dict:
    out = {}
    for cell in CELLS:
        for dtype_name in DTYPES:
            for shape in SHAPES:
                out[f"{cell}/{dtype_name}/{shape[0]}"] = run_case(cell, dtype_name, shape)
    return out


def differences(expected: dict, actual: dict) -> list[str]:
    diffs = []
    for case in sorted(set(expected) | set(actual)):
        e, a = expected.get(case, {}), actual.get(case, {})
        for key in sorted(set(e) | set(a)):
            if e.get(key) != a.get(key):
                diffs.append(f"{case} {key}: {e.get(key)} -> {a.get(key)}")
    return diffs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="accept the current results")
    args = parser.parse_args(argv)
    digests = compute()
    if args.write:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(PATH)).stdout.strip()
        with open(PATH, "w") as f:
            json.dump({"fingerprint": fingerprint(), "commit": commit, "digests": digests}, f,
                      indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {len(digests)} configurations to {PATH}")
        return 0
    with open(PATH) as f:
        stored = json.load(f)
    if stored["fingerprint"] != fingerprint():
        print(f"different machine: stored {stored['fingerprint']}, here {fingerprint()}")
        return 2
    diffs = differences(stored["digests"], digests)
    print("\n".join(diffs) if diffs else f"all {len(digests)} configurations bit-identical")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
