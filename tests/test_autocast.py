"""Under torch.autocast('cpu', bfloat16) FastBiRNN behaves as nn.RNN does.

What nn.RNN does there (torch 2.13): autocast casts the input, h_0 and all weights of
``rnn_tanh``/``rnn_relu`` to bfloat16, so ``output`` and ``h_n`` are bfloat16 whatever the
dtypes of the input and h_0 (an fp32 input with a bf16 h_0 is fine, and the reverse);
parameter gradients stay float32 and the input's gradient has the input's dtype.

Every backend must give the same dtypes, values within bf16 tolerance, and run backward.
'cpp' computes with bf16 products and fp32 state (its bf16 path, tests/test_bf16.py); the
reference computes in the autocast dtype; 'auto' runs what the CPU rule picks for bf16.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastbirnn
from fastbirnn import FastBiRNN

FUSED = [n for n in ("cpp", "reference") if fastbirnn.available_backends().get(n, "") is None]
BACKENDS = ["auto", *FUSED]
BF16 = torch.bfloat16
I, H, LAYERS, B, T = 12, 16, 2, 3, 5

# (x dtype, h_0 dtype or None, packed)
CASES = {
    "fp32 x": (torch.float32, None, False),
    "bf16 x": (BF16, None, False),
    "fp32 x, fp32 h0": (torch.float32, torch.float32, False),
    "bf16 x, fp32 h0": (BF16, torch.float32, False),
    "fp32 x, bf16 h0": (torch.float32, BF16, False),
    "packed fp32 x": (torch.float32, None, True),
}

def _params(case_names):
    return [
        pytest.param(backend, case, id=f"{backend}-{case}")
        for backend in BACKENDS
        for case in case_names
    ]


def _pair(backend):
    torch.manual_seed(0)
    reference = nn.RNN(I, H, LAYERS, batch_first=True, bidirectional=True)
    fast = FastBiRNN(I, H, LAYERS, batch_first=True, backend=backend)
    fast.load_state_dict(reference.state_dict(), strict=True)
    return reference, fast


def _inputs(case):
    x_dtype, h_dtype, packed = CASES[case]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, I, generator=generator).to(x_dtype)
    hx = None if h_dtype is None else (0.5 * torch.randn(2 * LAYERS, B, H, generator=generator)).to(h_dtype)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([2, 5, 3]), batch_first=True, enforce_sorted=False)
    return x, hx


def _run(module, x, hx):
    with torch.autocast("cpu", dtype=BF16):
        output, h_n = module(x, hx)
    return (output.data if isinstance(output, PackedSequence) else output), h_n


@pytest.mark.parametrize("backend, case", _params(CASES))
def test_autocast_forward_like_nn_rnn(backend, case):
    reference, fast = _pair(backend)
    x, hx = _inputs(case)
    want_out, want_h = _run(reference, x, hx)
    got_out, got_h = _run(fast, x, hx)

    assert want_out.dtype == BF16 and want_h.dtype == BF16  # nn.RNN's rule, see the docstring
    assert got_out.dtype == want_out.dtype
    assert got_h.dtype == want_h.dtype
    # Both compute in bf16 (8-bit mantissa); outputs lie in (-1, 1).
    torch.testing.assert_close(got_out.float(), want_out.float(), rtol=0, atol=4e-2)
    torch.testing.assert_close(got_h.float(), want_h.float(), rtol=0, atol=4e-2)


@pytest.mark.parametrize("backend, case", _params(["backward"]))
def test_autocast_backward_like_nn_rnn(backend, case):
    reference, fast = _pair(backend)
    results = []
    for module in (reference, fast):
        x = torch.randn(B, T, I, generator=torch.Generator().manual_seed(2), requires_grad=True)
        output, h_n = _run(module, x, None)
        assert output.dtype == BF16
        (output.float().square().sum() + h_n.float().sum()).backward()
        results.append((x.grad, {n: p.grad for n, p in module.named_parameters()}))
    (want_dx, want_grads), (got_dx, got_grads) = results
    assert got_dx.dtype == want_dx.dtype == torch.float32
    torch.testing.assert_close(got_dx, want_dx, rtol=5e-2, atol=5e-2)
    for name, want in want_grads.items():
        assert got_grads[name].dtype == want.dtype == torch.float32, name
        torch.testing.assert_close(got_grads[name], want, rtol=5e-2, atol=1e-1,
                                   msg=lambda m: f"{name}: {m}")


def test_auto_runs_the_bf16_rule_under_autocast():
    _, fast = _pair("auto")
    x = torch.randn(B, T, I)
    with torch.autocast("cpu", dtype=BF16):
        selected = fast.selected_backend(x)
    # The Elman cell's bf16 rule is its fp32 rule where the bf16 tiles run, else nn.RNN
    # (fastbirnn/backends/cpu_rule.py).
    from fastbirnn.backends import cpp_backend
    expected = fast.selected_backend(x) if cpp_backend.has_bf16_tiles() else "torch"
    assert selected == expected
