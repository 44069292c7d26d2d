"""The step projection (csrc/recurrence.h, StepProjection): an inference with a gated cell
projects its input one step at a time inside the recurrence where csrc/layer_gemms.h's
projects_per_step says so (batch >= 16, I <= 2H, W_ih and W_hh within 8 MiB per direction,
the projection on the register tiles, or on the bf16 tiles for a bf16 call, and on the
recurrence's team; never in a gated cell's training). The in-place Elman cell steps from
batch 32, in training too: each step's projection goes to its output rows. It runs the
projection's own products, so an inference equals the grad-mode forward (which keeps a gated
cell's gates and projects before the steps) bit for bit, and an Elman layer's results and
gradients are the same at 1-2 threads (stepped) as at 3-4 (the projection on more threads,
before the steps): checked on both sides of every condition, in every inference mode, for
bf16 modules and under autocast, and over hypothesis's draws.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fastbirnn import FastBiGRU, FastBiLSTM, FastBiRNN
from parity import with_threads
from test_properties import PROFILE, property_settings

_C = pytest.importorskip("fastbirnn._C")
from fastbirnn.backends import cpp_backend  # noqa: E402

# The step projection runs on the register tiles: none at the scalar level (FASTBIRNN_ISA);
# a bf16 call's on the bf16 tiles (AVX512-BF16, and not lowered by FASTBIRNN_ISA).
TILES = _C.cpu_isa() != "scalar"
BF16_TILES = cpp_backend.has_bf16_tiles()


def _expected(stepped_layers, dtype):
    return stepped_layers if (BF16_TILES if dtype == torch.bfloat16 else TILES) else 0

MODULES = {"lstm": FastBiLSTM, "gru": FastBiGRU, "rnn": FastBiRNN}
INFERENCE_MODES = ["no_grad", "inference_mode", "frozen"]


def _forwards(cell, B, T, I, H, layers=1, bi=True, batch_first=False, lengths=None, bias=True,
              h0=False, dtype=torch.float32, mode="no_grad", threads=2):
    """The outputs and final states of an inference in `mode` and of the grad-mode forward
    (same module, same input), and how many layers the inference projected step by step."""
    torch.manual_seed(0)
    model = MODULES[cell](I, H, layers, bias=bias, batch_first=batch_first, bidirectional=bi,
                          dtype=dtype, backend="cpp")
    x = torch.randn(*((B, T, I) if batch_first else (T, B, I)), dtype=dtype)
    states = [torch.randn(layers * (2 if bi else 1), B, H, dtype=dtype)
              for _ in range(2 if cell == "lstm" else 1)] if h0 else []

    def run(inp):
        if lengths is not None:
            inp = nn.utils.rnn.pack_padded_sequence(inp, lengths, batch_first=batch_first,
                                                    enforce_sorted=False)
        hx = (tuple(states) if cell == "lstm" else states[0]) if states else None
        out, final = model(inp, hx)
        if lengths is not None:
            out = nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first)[0]
        return [out, *(final if isinstance(final, tuple) else [final])]

    def inference():
        if mode == "no_grad":
            with torch.no_grad():
                return run(x)
        if mode == "inference_mode":
            with torch.inference_mode():
                return run(x)
        model.requires_grad_(False)  # frozen: nothing the forward reads requires grad
        try:
            return run(x)
        finally:
            model.requires_grad_(True)

    before = _C.step_projected_layers()
    inferred = with_threads(threads, inference)
    stepped = _C.step_projected_layers() - before
    trained = with_threads(threads, lambda: run(x.clone().requires_grad_(True)))
    return inferred, [t.detach() for t in trained], stepped


def _assert_same_bits(inferred, trained):
    for i, (a, b) in enumerate(zip(inferred, trained)):
        assert torch.equal(a, b), f"result {i} differs between the inference and the forward"


# (cell, B, T, I, H, layers, bidirectional, dtype, layers projected step by step at 2 threads)
THRESHOLDS = [
    ("lstm", 16, 8, 64, 96, 1, True, torch.float32, 1),
    ("lstm", 15, 9, 64, 96, 1, True, torch.float32, 0),  # batch below 16
    ("lstm", 16, 7, 64, 96, 1, True, torch.float32, 0),  # 112 rows: the projection on BLAS
    ("gru", 16, 8, 80, 40, 1, True, torch.float32, 1),  # I = 2H
    ("gru", 16, 8, 81, 40, 1, True, torch.float32, 0),  # I = 2H + 1
    ("lstm", 16, 8, 512, 512, 1, False, torch.float32, 1),  # W_ih + W_hh: 8 MiB
    ("lstm", 16, 8, 513, 512, 1, False, torch.float32, 0),  # 8 MiB + 8 KiB
    ("lstm", 16, 32, 499, 320, 1, False, torch.float64, 1),  # 8 MiB - 2 KiB in fp64
    ("lstm", 16, 32, 500, 320, 1, False, torch.float64, 0),  # 8 MiB + 8 KiB
    ("lstm", 17, 8, 100, 50, 2, True, torch.float32, 2),  # the second layer's I = 2H
    ("gru", 20, 8, 30, 70, 2, False, torch.float32, 2),
    # The in-place Elman cell from batch 32.
    ("rnn", 32, 8, 64, 96, 1, True, torch.float32, 1),
    ("rnn", 31, 8, 64, 96, 1, True, torch.float32, 0),
    ("rnn", 32, 9, 129, 64, 2, False, torch.float32, 1),  # the first layer's I = 2H + 1
    # bf16 on the bf16 tiles: the same limits, its weights' bf16 bytes against 8 MiB.
    ("lstm", 16, 7, 64, 96, 1, True, torch.bfloat16, 1),  # 112 rows: on the bf16 tiles still
    # 32 rows: the recurrence's products in fp32 on rounded operands, the projection's stepped
    ("gru", 16, 2, 640, 640, 1, True, torch.bfloat16, 1),
    ("lstm", 15, 9, 64, 96, 1, True, torch.bfloat16, 0),  # batch below 16
    ("gru", 16, 8, 80, 40, 2, True, torch.bfloat16, 2),
    ("gru", 16, 8, 81, 40, 1, True, torch.bfloat16, 0),  # I = 2H + 1
    ("lstm", 16, 8, 998, 640, 1, False, torch.bfloat16, 1),  # 8 MiB - 2.5 KiB in bf16
    ("lstm", 16, 8, 999, 640, 1, False, torch.bfloat16, 0),  # 8 MiB + 2.5 KiB
    ("rnn", 32, 8, 64, 96, 1, True, torch.bfloat16, 1),
    ("rnn", 31, 8, 64, 96, 1, True, torch.bfloat16, 0),
]


@pytest.mark.parametrize("mode", INFERENCE_MODES)
@pytest.mark.parametrize(
    "case", THRESHOLDS,
    ids=lambda c: f"{c[0]}-B{c[1]}T{c[2]}I{c[3]}H{c[4]}L{c[5]}{'bi' if c[6] else 'uni'}-"
                  f"{str(c[7])[6:]}")
def test_inference_equals_the_forward_on_both_sides_of_every_condition(case, mode):
    cell, B, T, I, H, layers, bi, dtype, expected = case
    inferred, trained, stepped = _forwards(cell, B, T, I, H, layers, bi, dtype=dtype, mode=mode)
    assert stepped == _expected(expected, dtype)
    _assert_same_bits(inferred, trained)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padded_packed_and_initial_states_project_step_by_step_too(cell):
    lengths = [max(1, 12 - (5 * b) % 12) for b in range(24)]
    for batch_first in (False, True):
        inferred, trained, stepped = _forwards(cell, 24, 12, 48, 80, 2, True, batch_first,
                                               lengths, bias=False, h0=True)
        assert stepped == (2 if TILES else 0)
        _assert_same_bits(inferred, trained)


def _nn_twin(cell, I, H, layers):
    """The nn class (bidirectional) and the module with its weights, backend 'cpp'."""
    torch.manual_seed(0)
    ref = (nn.LSTM if cell == "lstm" else nn.GRU)(I, H, layers, bidirectional=True)
    fast = MODULES[cell](I, H, layers, backend="cpp")
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("mode", INFERENCE_MODES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_three_stepped_layers_match_nn_on_repeated_calls(cell, mode):
    # Every layer projects step by step (batch 16, I <= 2H); two calls on the same module,
    # against the nn class with the same weights, in each inference mode.
    ref, fast = _nn_twin(cell, 40, 72, 3)
    x = torch.randn(12, 16, 40)
    with torch.no_grad():
        expected = ref(x)
    before = _C.step_projected_layers()
    for _ in range(2):
        if mode == "frozen":
            fast.requires_grad_(False)
            got = with_threads(2, lambda: fast(x))
            fast.requires_grad_(True)
        else:
            context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
            with context:
                got = with_threads(2, lambda: fast(x))
        torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-5)
    assert _C.step_projected_layers() - before == (6 if TILES else 0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_autocast_inference_projects_step_by_step_on_the_bf16_tiles(cell):
    # An fp32 module under bf16 autocast: the bf16 call steps where the bf16 tiles run it,
    # with the bits of the same call in grad mode, and within bf16's error of the nn class
    # under the same autocast.
    ref, fast = _nn_twin(cell, 48, 64, 2)
    x = torch.randn(10, 16, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = _C.step_projected_layers()
        with torch.no_grad():
            inferred = with_threads(2, lambda: fast(x))
        stepped = _C.step_projected_layers() - before
        trained = with_threads(2, lambda: fast(x))
        with torch.no_grad():
            expected = ref(x)
    def flat(result):
        out, final = result
        return [out, *(final if isinstance(final, tuple) else [final])]

    assert stepped == (2 if BF16_TILES else 0)
    _assert_same_bits(flat(inferred), [t.detach() for t in flat(trained)])
    # bf16 outputs: a few units of bf16's roundoff (2^-8) over two layers.
    torch.testing.assert_close(inferred[0].float(), expected[0].float(), rtol=0, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_at_1_to_4_threads_with_and_without_the_step_projection(dtype):
    # At 3-4 threads the projection takes more workers than the recurrence's team (2 blocks),
    # so it runs before the steps: both paths are compared.
    results, stepped = {}, {}
    for threads in (1, 2, 3, 4):
        results[threads], _, stepped[threads] = _forwards("lstm", 16, 64, 64, 40, dtype=dtype,
                                                          threads=threads)
    assert set(stepped.values()) == ({0, 1} if _expected(1, dtype) else {0})
    for threads in (2, 3, 4):
        _assert_same_bits(results[1], results[threads])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_elman_training_steps_with_the_bits_of_projecting_first(nonlinearity, dtype):
    # Training: at 1-2 threads each Elman layer projects step by step into its output rows;
    # at 3-4 the projection takes more workers than the team (2 blocks) and runs first. The
    # outputs, final states and every gradient are the same bits either way.
    def train():
        torch.manual_seed(0)
        model = FastBiRNN(64, 40, 2, nonlinearity=nonlinearity, dtype=dtype, backend="cpp")
        x = torch.randn(64, 32, 64, dtype=dtype, requires_grad=True)
        before = _C.step_projected_layers()
        out, hn = model(x)
        (out.float().square().sum() + hn.float().sum()).backward()
        stepped = _C.step_projected_layers() - before
        return [out.detach(), hn.detach(), x.grad, *(p.grad for p in model.parameters())], stepped

    results, stepped = {}, {}
    for threads in (1, 2, 3, 4):
        results[threads], stepped[threads] = with_threads(threads, train)
    assert [stepped[t] for t in (1, 2, 3, 4)] == [_expected(2, dtype)] * 2 + [0, 0]
    for threads in (2, 3, 4):
        _assert_same_bits(results[1], results[threads])


@pytest.mark.parametrize("mode", ["train", *INFERENCE_MODES])
def test_stepped_elman_layers_match_nn_rnn_packed_with_nan(mode):
    # Three stepped Elman layers (batch 32) on a packed batch, two calls on one module, against
    # nn.RNN with the same weights: outputs, h_n and (training) every gradient; then a NaN in
    # one sequence's input, which reaches that sequence's outputs as in nn.RNN and no other's.
    torch.manual_seed(0)
    ref = nn.RNN(40, 72, 3, bidirectional=True)
    fast = FastBiRNN(40, 72, 3, backend="cpp")
    fast.load_state_dict(ref.state_dict())
    lengths = [12 - b % 5 for b in range(32)]
    x = torch.randn(12, 32, 40)
    x_nan = x.clone()
    x_nan[3, 5, 7] = float("nan")

    def run(module, inp):
        packed = nn.utils.rnn.pack_padded_sequence(inp, lengths, enforce_sorted=False)
        if mode == "train":
            module.zero_grad()
            out, hn = module(packed)
            padded = nn.utils.rnn.pad_packed_sequence(out)[0]
            (padded.square().sum() + hn.sum()).backward()
            return [padded.detach(), hn.detach(), *(p.grad.clone() for p in module.parameters())]
        if mode == "frozen":
            module.requires_grad_(False)
            try:
                out, hn = module(packed)
            finally:
                module.requires_grad_(True)
        else:
            with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
                out, hn = module(packed)
        return [nn.utils.rnn.pad_packed_sequence(out)[0], hn]

    expected = run(ref, x)
    before = _C.step_projected_layers()
    for _ in range(2):
        got = with_threads(2, lambda: run(fast, x))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=2e-4, atol=2e-5)
    assert _C.step_projected_layers() - before == (6 if TILES else 0)
    got, expected = with_threads(2, lambda: run(fast, x_nan)), run(ref, x_nan)
    torch.testing.assert_close(got[0].isnan(), expected[0].isnan(), rtol=0, atol=0)
    assert got[0][:, 5].isnan().any() and not got[0][:, 6].isnan().any()


@st.composite
def _configs(draw):
    H = draw(st.integers(1, 140))
    return dict(
        cell=draw(st.sampled_from(["lstm", "gru", "rnn"])),
        B=draw(st.sampled_from([1, 8, 15, 16, 17, 33])),
        T=draw(st.integers(1, 12)),
        I=draw(st.sampled_from([max(1, 2 * H - 1), 2 * H, 2 * H + 1]) | st.integers(1, 200)),
        H=H, layers=draw(st.integers(1, 2)), bi=draw(st.booleans()),
        batch_first=draw(st.booleans()), bias=draw(st.booleans()), h0=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        mode=draw(st.sampled_from(INFERENCE_MODES)),
        packed=draw(st.booleans()),
    )


@property_settings(60 if PROFILE != "ci" else 25)
@given(config=_configs())
def test_inference_equals_the_forward_bit_for_bit(config):
    packed = config.pop("packed")
    B, T = config["B"], config["T"]
    lengths = [max(1, T - (3 * b) % T) for b in range(B)] if packed else None
    inferred, trained, _ = _forwards(lengths=lengths, **config)
    _assert_same_bits(inferred, trained)
