"""FastBiRNN matches nn.RNN: outputs, h_n and gradients, over the whole contract."""

import pytest
import torch
from torch import nn

from fastbirnn import FastBiRNN
from parity import PARITY_CASES, Case, assert_parity, make_inputs, make_pair, run

# 'auto' resolves to whatever is fastest here; 'reference' always runs the fused seam.
BACKENDS = ["reference", "auto", "torch"]


@pytest.mark.parametrize("case", PARITY_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_fp64(case, backend):
    assert_parity(case, backend, torch.float64)


@pytest.mark.parametrize("case", PARITY_CASES[::3], ids=str)
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_parity_fp32(case, backend):
    assert_parity(case, backend, torch.float32)


def test_default_is_bidirectional_and_output_shapes():
    rnn = FastBiRNN(16, 32, batch_first=True)
    out, h_n = rnn(torch.randn(2, 4, 16))
    assert rnn.bidirectional
    assert out.shape == (2, 4, 64)
    assert h_n.shape == (2, 2, 32)


@pytest.mark.parametrize("backend", ["reference", "auto", "cpp"])
def test_dropout_eval_is_identity_and_train_matches_nn_rnn(backend):
    case = Case(num_layers=3, extra=dict(dropout=0.5), with_hx=False)
    reference, fast = make_pair(case, backend)
    x, lengths, hx = make_inputs(case)
    reference.eval(), fast.eval()
    torch.testing.assert_close(run(fast, case, x, lengths, hx), run(reference, case, x, lengths, hx))

    # In training both draw one dropout mask per layer output of the same shape,
    # so with the same seed they agree exactly, gradients included.
    reference.train(), fast.train()
    results = []
    for module in (reference, fast):
        torch.manual_seed(123)
        out, h_n = run(module, case, x, lengths, hx)
        grads = torch.autograd.grad(out.sum() + h_n.sum(), [x, *module.parameters()])
        results.append((out, h_n, grads))
    torch.testing.assert_close(results[1], results[0])
    reference.eval()
    assert not torch.allclose(results[0][0], run(reference, case, x, lengths, hx)[0])


def test_packed_training_dropout_zeroes_a_fraction_of_the_next_layer():
    # Packed + dropout draws its mask over a different layout than nn.RNN's packed data,
    # so compare statistics: p=1 - (kept units) in the layer-2 input.
    torch.manual_seed(0)
    rnn = FastBiRNN(4, 64, num_layers=2, dropout=0.999999, backend="reference").double()
    rnn.train()
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(x, [6, 5, 2], enforce_sorted=False)
    out, _ = rnn(packed)
    # Every input to layer 2 is dropped, so layer 2 sees zeros: its output is act(bias) chains.
    rnn.eval()
    out_eval, _ = rnn(packed)
    assert not torch.allclose(out.data, out_eval.data)
    zero_input = nn.utils.rnn.pack_padded_sequence(
        torch.zeros(6, 3, 128, dtype=torch.float64), [6, 5, 2], enforce_sorted=False
    )
    layer2 = FastBiRNN(128, 64, backend="reference").double()
    layer2.load_state_dict(
        {k.replace("_l1", "_l0"): v for k, v in rnn.state_dict().items() if "_l1" in k}
    )
    torch.testing.assert_close(out.data, layer2(zero_input)[0].data)


def test_long_sequence_reference_runs():
    rnn = FastBiRNN(3, 4, backend="reference")
    out, h_n = rnn(torch.randn(300, 2, 3))
    assert torch.isfinite(out).all() and out.shape == (300, 2, 8)
