"""Every ISA path of the C++ engine (csrc/simd.h: 'avx512', 'avx2', 'scalar'), each forced with
FASTBIRNN_ISA in a subprocess (the level is decided once, when the extension loads): the probe
reports the forced level, and RNN/LSTM/GRU match the nn classes (outputs, final states, every
gradient; fp32 and fp64; padded and packed; hidden sizes across the tile thresholds) and give
bit-identical results on 1 and 2 threads.

The same file is the subprocess's script: ``python tests/test_isa_paths.py LEVEL PROFILE``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

LEVELS = ("avx512", "avx2", "scalar")  # highest first, as in csrc/simd.h
HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))

# Hidden sizes on both sides of the tiles' thresholds: 1 lane, AVX2's 8 fp32 / 4 fp64 lanes
# and their partial neighbours, AVX-512's 16, AVX2's 16-column panel, the one-block limit (64).
DEFAULT_HIDDEN = (1, 7, 8, 9, 16, 17, 33, 64, 65)
SLOW_HIDDEN = DEFAULT_HIDDEN + (3, 4, 5, 24, 31, 32, 48, 63, 100, 128, 129, 257)


# --- the subprocess ----------------------------------------------------------------------


def _cases(profile: str):
    """(cell, dtype, layout, batch, steps, input, hidden, layers, batch_first) to check: by
    default every (cell, dtype, layout) once, the hidden sizes dealt round-robin over them
    (each at least once); the slow profile is the full product over more sizes and shapes."""
    combos = [(cell, dtype, layout) for cell in ("rnn", "lstm", "gru")
              for dtype in (torch.float32, torch.float64) for layout in ("padded", "packed")]
    shape = (7, 10, 5, 1, False)  # T * B = 70: the forward packs W_hh for the tiles
    if profile == "default":
        for i in range(max(len(combos), len(DEFAULT_HIDDEN))):
            B, T, I, L, bf = shape
            yield (*combos[i % len(combos)], B, T, I, DEFAULT_HIDDEN[i % len(DEFAULT_HIDDEN)],
                   L, bf)
        return
    # Few rows (the forward's products on BLAS above 64 units), 2 layers batch_first, and
    # two full 6-row tiles plus one row.
    shapes = [shape, (3, 5, 9, 2, True), (13, 6, 20, 1, False)]
    for combo in combos:
        for B, T, I, L, bf in shapes:
            for H in SLOW_HIDDEN:
                yield (*combo, B, T, I, H, L, bf)


def _run(module, x, hx, lengths, layout, batch_first):
    """Outputs, final states and the gradients of x, h_0 and every parameter."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    hx = tuple(h.clone().requires_grad_() for h in hx)
    state = hx if len(hx) == 2 else hx[0]
    if layout == "packed":
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        out, final = module(packed, state)
        out = pad_packed_sequence(out, batch_first=batch_first)[0]
    else:
        out, final = module(x, state)
    final = final if isinstance(final, tuple) else (final,)
    g = torch.Generator().manual_seed(3)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + sum((s * (i + 2)).sum() for i, s in enumerate(final))
    grads = torch.autograd.grad(loss, [x, *hx, *module.parameters()])
    return [t.detach() for t in (out, *final, *grads)]


def check_level(level: str, profile: str) -> int:
    import fastbirnn
    from fastbirnn.backends import cpp_backend

    assert cpp_backend.cpu_isa() == level, (cpp_backend.cpu_isa(), level)
    classes = {"rnn": (fastbirnn.FastBiRNN, torch.nn.RNN),
               "lstm": (fastbirnn.FastBiLSTM, torch.nn.LSTM),
               "gru": (fastbirnn.FastBiGRU, torch.nn.GRU)}
    checked = 0
    for cell, dtype, layout, B, T, I, H, L, bf in _cases(profile):
        fast_cls, nn_cls = classes[cell]
        torch.manual_seed(0)
        ref = nn_cls(I, H, num_layers=L, bidirectional=True, batch_first=bf, dtype=dtype)
        fast = fast_cls(I, H, num_layers=L, bidirectional=True, batch_first=bf, dtype=dtype,
                        backend="cpp")
        fast.load_state_dict(ref.state_dict())
        g = torch.Generator().manual_seed(1)
        x = torch.randn(*((B, T) if bf else (T, B)), I, generator=g, dtype=dtype)
        hx = tuple(torch.randn(2 * L, B, H, generator=g, dtype=dtype)
                   for _ in range(2 if cell == "lstm" else 1))
        lengths = [T - (3 * b) % T for b in range(B)]
        if layout == "padded":  # padded input runs every row the full T steps
            lengths = [T] * B
        what = f"{level} {cell} {dtype} {layout} B{B} T{T} I{I} H{H} L{L} bf{int(bf)}"
        torch.set_num_threads(1)  # nn too: OpenMP on a loaded machine costs it 10x
        expected = _run(ref, x, hx, lengths, layout, bf)
        one = _run(fast, x, hx, lengths, layout, bf)
        torch.set_num_threads(2)
        two = _run(fast, x, hx, lengths, layout, bf)
        tol = dict(rtol=1e-7, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
        for i, (a, b, e) in enumerate(zip(one, two, expected)):
            assert torch.equal(a, b), f"{what}: result {i} differs between 1 and 2 threads"
            torch.testing.assert_close(a, e, **tol, msg=lambda m: f"{what}, result {i}: {m}")
        checked += 1
    return checked


if __name__ == "__main__":
    print("checked", check_level(sys.argv[1], sys.argv[2]))
    sys.exit(0)


# --- the tests ---------------------------------------------------------------------------

cpp_backend = pytest.importorskip("fastbirnn.backends.cpp_backend")
pytestmark = pytest.mark.skipif(cpp_backend.cpu_isa() is None,
                                reason="the C++ extension is not built")


def _env(isa):
    """This environment with FASTBIRNN_ISA=isa (None: unset), importing the fastbirnn this
    process imported (a script's sys.path starts at its own folder, not at the checkout)."""
    import fastbirnn

    env = {k: v for k, v in os.environ.items() if k != "FASTBIRNN_ISA"}
    if isa is not None:
        env["FASTBIRNN_ISA"] = isa
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fastbirnn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _children(commands):
    """Runs {key: (arguments, FASTBIRNN_ISA)} side by side (each child is mostly
    one-threaded Python); returns {key: (returncode, output)}."""
    running = {
        key: subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(isa), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for key, (args, isa) in commands.items()
    }
    results = {}
    for key, child in running.items():
        output, _ = child.communicate(timeout=1800)
        results[key] = (child.returncode, output)
    return results


_PRINT_ISA = ["-c", "from fastbirnn.backends import cpp_backend; print(cpp_backend.cpu_isa())"]


@pytest.fixture(scope="module")
def machine_level():
    """The probe's own level: this process's, unless FASTBIRNN_ISA lowered it here."""
    if "FASTBIRNN_ISA" not in os.environ:
        return cpp_backend.cpu_isa()
    code, output = _children({"probe": (_PRINT_ISA, None)})["probe"]
    assert code == 0, output
    return output.split()[-1]


def test_the_override_only_lowers_the_level_and_rejects_unknown_values(machine_level):
    """Asking for more than the CPU has gives what it has (each lower level is checked by the
    test below); the case of the value does not matter; an unknown value fails the import."""
    results = _children({"avx512": (_PRINT_ISA, "avx512"), "AVX2": (_PRINT_ISA, "AVX2"),
                         "unknown": (["-c", "import fastbirnn"], "avx3")})
    code, output = results["avx512"]
    assert code == 0 and output.split()[-1] == machine_level, output
    code, output = results["AVX2"]
    want = LEVELS[max(LEVELS.index("avx2"), LEVELS.index(machine_level))]
    assert code == 0 and output.split()[-1] == want, output
    code, output = results["unknown"]
    assert code != 0
    assert "FASTBIRNN_ISA=avx3 is not one of 'avx512', 'avx2', 'scalar'" in output


def _check_levels(profile, machine_level):
    """Every level up to the machine's, each in its own process (check_level above)."""
    levels = LEVELS[LEVELS.index(machine_level):]
    results = _children({level: ([HERE, level, profile], level) for level in levels})
    failures = [f"--- {level}:\n{output[-4000:]}" for level, (code, output) in results.items()
                if code != 0]
    assert not failures, "\n".join(failures)


def test_every_isa_path_matches_nn_and_is_thread_count_independent(machine_level):
    _check_levels("default", machine_level)


@pytest.mark.slow
def test_every_isa_path_matches_nn_on_the_larger_sweep(machine_level):
    _check_levels("slow", machine_level)
