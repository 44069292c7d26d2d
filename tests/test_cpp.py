"""The fused C++ CPU backend ('cpp'): parity with nn.RNN, gradients, determinism, compile.

These fail (rather than skip) when fastbirnn._C is not built: CI builds it.
"""

import subprocess
import sys

import pytest
import torch
from torch import nn

import fastbirnn
from fastbirnn import FastBiRNN, backends
from parity import PARITY_CASES, Case, assert_parity, make_inputs, make_pair, run


def test_extension_is_built():
    assert fastbirnn.available_backends()["cpp"] is None, fastbirnn.available_backends()["cpp"]
    from fastbirnn import _C

    assert _C.has_blas()


@pytest.mark.parametrize("case", PARITY_CASES, ids=str)
def test_parity_fp64(case):
    assert_parity(case, "cpp", torch.float64)


@pytest.mark.parametrize("case", PARITY_CASES, ids=str)
def test_parity_fp32(case):
    assert_parity(case, "cpp", torch.float32)


# Larger cases reach the threaded paths (both directions at once, row-blocked GEMMs).
BIG_CASES = [
    Case(batch=16, seq_len=40, input_size=24, hidden_size=64, num_layers=2),
    Case(batch=16, seq_len=40, input_size=24, hidden_size=64, batch_first=True, bias=False),
    Case(batch=16, seq_len=40, input_size=24, hidden_size=64, layout="packed_unsorted",
         nonlinearity="relu", num_layers=2),
    Case(batch=16, seq_len=40, input_size=24, hidden_size=64, bidirectional=False),
]


@pytest.mark.parametrize("case", BIG_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_parity_threaded(case, dtype):
    assert_parity(case, "cpp", dtype)


def _stack_inputs(L=2, D=2, batch_first=False, bias=True, T=5, B=3, I=4, H=3, lengths=None):
    g = torch.Generator().manual_seed(0)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(L * D, B, H, generator=g, dtype=torch.float64, requires_grad=True)
    weights = []
    for layer in range(L):
        for _ in range(D):
            size = I if layer == 0 else D * H
            weights += [torch.randn(H, size, generator=g, dtype=torch.float64), torch.randn(H, H, generator=g, dtype=torch.float64) * 0.5]
            if bias:
                weights += [torch.randn(H, generator=g, dtype=torch.float64) for _ in range(2)]
    weights = [w.requires_grad_() for w in weights]
    lengths = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)
    return x, hx, weights, lengths


@pytest.mark.parametrize(
    "L,D,batch_first,bias,relu,lengths",
    [
        (2, 2, False, True, False, None),
        (1, 2, True, False, False, None),
        (2, 1, False, True, True, None),
        (2, 2, False, True, False, [5, 2, 4]),
        (1, 2, True, True, True, [1, 5, 3]),
    ],
)
def test_gradcheck_stack_op(L, D, batch_first, bias, relu, lengths):
    x, hx, weights, lengths = _stack_inputs(L, D, batch_first, bias, lengths=lengths)
    n = len(weights)

    def f(x, hx, *weights):
        out, h_n, _ = torch.ops.fastbirnn_cpp.stack(
            "rnn_relu" if relu else "rnn_tanh", x, hx, None, list(weights), lengths, L, D == 2,
            bias, batch_first
        )
        if relu:  # keep away from relu's kink, where finite differences are wrong
            return out * 1.0, h_n
        return out, h_n

    assert len(weights) == n
    torch.autograd.gradcheck(f, (x, hx, *weights))


def test_opcheck_stack():
    x, hx, weights, lengths = _stack_inputs(lengths=[5, 2, 4])
    torch.library.opcheck(
        torch.ops.fastbirnn_cpp.stack.default,
        ("rnn_tanh", x, hx, None, weights, lengths, 2, True, True, False),
    )


def _fwd_bwd(model, x, lengths=None):
    if lengths is not None:
        x = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, h_n = model(x)
    if lengths is not None:
        out = nn.utils.rnn.pad_packed_sequence(out)[0]
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + h_n.square().sum()
    return [out, h_n, *torch.autograd.grad(loss, [x.data if lengths is not None else x, *model.parameters()])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("packed", [False, True])
def test_bit_identical_across_thread_counts_and_runs(dtype, packed):
    torch.manual_seed(0)
    model = FastBiRNN(32, 64, num_layers=2, backend="cpp", dtype=dtype)
    x = torch.randn(48, 16, 32, dtype=dtype, requires_grad=True)
    lengths = [48 - 3 * (b % 7) for b in range(16)] if packed else None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = _fwd_bwd(model, x, lengths)
        again = _fwd_bwd(model, x, lengths)
        torch.set_num_threads(1)
        single = _fwd_bwd(model, x, lengths)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


def test_long_sequence_batch_one():
    torch.manual_seed(0)
    T = 20000
    reference = nn.RNN(3, 4, bidirectional=True)
    fast = FastBiRNN(3, 4, backend="cpp")
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(T, 1, 3, requires_grad=True)
    out, h_n = fast(x)
    assert out.shape == (T, 1, 8)
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(out, expected[0], rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(h_n, expected[1], rtol=1e-4, atol=2e-5)
    (out.sum() + h_n.sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())


@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_compile_fullgraph_forward_and_backward(batch_first):
    torch.manual_seed(0)
    model = FastBiRNN(4, 6, num_layers=2, batch_first=batch_first, backend="cpp").double()
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 5 if batch_first else 3, 6, dtype=torch.float64, requires_grad=True)

    def step(module, x, h0):
        out, h_n = module(x, h0)
        return out.square().sum() + h_n.sum()

    inputs = [x, h0, *model.parameters()]
    expected = step(model, x, h0)
    expected_grads = torch.autograd.grad(expected, inputs)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        actual = compiled(model, x, h0)
        actual_grads = torch.autograd.grad(actual, inputs)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_grads, expected_grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_auto_picks_cpp_on_cpu(dtype):
    """At the tutorial's shape 'auto' runs the fused kernel, on an instruction set a committed
    grid measured (AVX-512, AVX2); elsewhere (FASTBIRNN_ISA=scalar) the rule hands it to
    nn.RNN."""
    from fastbirnn.backends import cpp_backend, cpu_rule

    expected = "cpp" if cpp_backend.cpu_isa() in cpu_rule.MEASURED_ISAS else "torch"
    rnn = FastBiRNN(16, 32, batch_first=True, dtype=dtype)
    x = torch.randn(2, 4, 16, dtype=dtype)
    assert rnn.selected_backend(x) == expected
    assert FastBiRNN(16, 32, bidirectional=False, dtype=dtype).selected_backend(x) == expected


def test_auto_falls_back_for_unsupported_dtype():
    rnn = FastBiRNN(16, 32, dtype=torch.float16)
    x = torch.randn(4, 2, 16, dtype=torch.float16)
    assert rnn.selected_backend(x) == "torch"
    out, _ = rnn(x)
    assert out.dtype == torch.float16


def test_named_cpp_backend_rejects_unsupported_input_clearly():
    rnn = FastBiRNN(16, 32, dtype=torch.float16, backend="cpp")
    with pytest.raises(RuntimeError, match=r"'cpp'.*float32, float64 and bfloat16"):
        rnn(torch.randn(4, 2, 16, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"'cpp'.*CPU tensors only"):
        backends.require("cpp", torch.empty(4, 2, 16, device="meta"))


def test_bit_identical_across_thread_counts_large_hidden_with_hx():
    # H = 1024 splits each direction's weight gradients into row blocks (each gathering its
    # own h0 columns) and goes through BLAS for the per-step products.
    torch.manual_seed(0)
    model = FastBiRNN(8, 1024, backend="cpp")
    x = torch.randn(3, 4, 8, requires_grad=True)
    h0 = torch.randn(2, 4, 1024, requires_grad=True)
    lengths = torch.tensor([3, 2, 2, 1])

    def run():
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths)
        out, h_n = model(packed, h0)
        out = nn.utils.rnn.pad_packed_sequence(out)[0]
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + h_n.square().sum()
        return [out, h_n, *torch.autograd.grad(loss, [x, h0, *model.parameters()])]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, single):
        assert torch.equal(a, b)


def test_missing_extension_falls_back_with_one_warning_and_named_cpp_says_why():
    # A fresh interpreter in which fastbirnn._C cannot be imported, as after a failed build.
    code = """
import sys, warnings
sys.modules["fastbirnn._C"] = None
import torch, fastbirnn
from fastbirnn import FastBiRNN
assert "fastbirnn._C" in fastbirnn.available_backends()["cpp"]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    rnn = FastBiRNN(4, 8)
    for _ in range(3):
        assert rnn(torch.randn(5, 2, 4))[0].shape == (5, 2, 16)
assert rnn.selected_backend(torch.randn(5, 2, 4)) == "torch"
messages = [str(w.message) for w in caught if "backend 'cpp' is not available" in str(w.message)]
assert len(messages) == 1, messages
try:
    FastBiRNN(4, 8, backend="cpp")
except RuntimeError as error:
    assert "not available" in str(error) and "fastbirnn._C" in str(error), error
else:
    raise AssertionError("backend='cpp' without the extension must raise")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
