"""FastBiRNN is an nn.RNN: parameters, state_dict, copies, serialisation, repr."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import fastbirnn
from fastbirnn import FastBiRNN


def same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


def test_is_an_nn_rnn_with_the_same_parameter_names_and_init():
    fast = FastBiRNN(5, 7, num_layers=2)
    plain = nn.RNN(5, 7, num_layers=2, bidirectional=True)
    assert isinstance(fast, nn.RNN)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert "weight_hh_l1_reverse" in dict(fast.named_parameters())
    for p in fast.parameters():  # nn.RNN's init: U(-1/sqrt(H), 1/sqrt(H))
        assert p.abs().max() <= 7**-0.5
    assert fast.all_weights[3][1] is fast.weight_hh_l1_reverse  # [layer * 2 + direction]


@pytest.mark.parametrize("bidirectional", [True, False])
def test_state_dict_loads_both_ways_strictly(bidirectional):
    kwargs = dict(num_layers=3, bias=True, bidirectional=bidirectional)
    fast = FastBiRNN(4, 6, **kwargs)
    plain = nn.RNN(4, 6, **kwargs)
    plain.load_state_dict(fast.state_dict(), strict=True)
    same_weights(fast, plain)
    fresh = FastBiRNN(4, 6, **kwargs)
    fresh.load_state_dict(nn.RNN(4, 6, **kwargs).state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        FastBiRNN(4, 6, num_layers=3).load_state_dict(nn.RNN(4, 6, num_layers=3).state_dict())


def test_constructor_matches_nn_rnn_positional_order():
    fast = FastBiRNN(3, 4, 2, "relu", False, True, 0.25, False)
    assert (fast.num_layers, fast.nonlinearity, fast.bias, fast.batch_first) == (2, "relu", False, True)
    assert (fast.dropout, fast.bidirectional, fast.backend) == (0.25, False, "auto")
    assert fast.mode == "RNN_RELU"


def test_repr_is_nn_rnn_style():
    assert repr(FastBiRNN(16, 32, batch_first=True)) == (
        "FastBiRNN(16, 32, batch_first=True, bidirectional=True)"
    )
    assert repr(FastBiRNN(16, 32, backend="reference")).endswith("backend='reference')")


def outputs(module, x):
    with torch.no_grad():
        return module(x)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_deepcopy_pickle_and_torch_save_round_trip(backend):
    fast = FastBiRNN(4, 6, num_layers=2, backend=backend)
    x = torch.randn(5, 3, 4)
    expected = outputs(fast, x)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    copies = [
        copy.deepcopy(fast),
        pickle.loads(pickle.dumps(fast)),
        torch.load(buffer, weights_only=False),
    ]
    for clone in copies:
        assert type(clone) is FastBiRNN and clone.backend == backend
        torch.testing.assert_close(outputs(clone, x), expected, rtol=0, atol=0)
        same_weights(clone, fast)
        clone.weight_hh_l0.data.add_(1)  # independent storage
        assert not torch.equal(clone.weight_hh_l0, fast.weight_hh_l0)


def test_state_dict_through_torch_save_weights_only():
    fast = FastBiRNN(4, 6)
    buffer = io.BytesIO()
    torch.save(fast.state_dict(), buffer)
    buffer.seek(0)
    plain = nn.RNN(4, 6, bidirectional=True)
    plain.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(outputs(plain, x), outputs(fast, x))


def test_flatten_parameters_and_dtype_conversion():
    fast = FastBiRNN(4, 6, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast.flatten_parameters()
    fast = fast.double()
    out, h_n = fast(torch.randn(3, 2, 4, dtype=torch.float64))
    assert out.dtype == h_n.dtype == torch.float64


def test_functional_call_uses_the_given_weights():
    fast = FastBiRNN(4, 6, backend="reference")
    x = torch.randn(3, 2, 4)
    zeros = {name: torch.zeros_like(p) for name, p in fast.named_parameters()}
    out, h_n = torch.func.functional_call(fast, zeros, (x,))
    assert torch.count_nonzero(out) == 0 and torch.count_nonzero(h_n) == 0
    assert torch.count_nonzero(fast(x)[0]) > 0


def test_backend_can_be_switched_after_construction():
    fast = FastBiRNN(4, 6)
    x = torch.randn(3, 2, 4)
    expected = outputs(fast, x)
    fast.backend = "reference"
    assert fast.selected_backend(x) == "reference"
    torch.testing.assert_close(outputs(fast, x), expected)
    with pytest.raises(ValueError, match="Unknown backend"):
        fast.backend = "cuda"
    assert fast.backend == "reference"


def test_available_backends_reports_every_name():
    status = fastbirnn.available_backends()
    assert {"auto", "torch", "reference"} <= status.keys()
    assert status["auto"] is None and status["torch"] is None and status["reference"] is None
    for name, reason in status.items():
        assert reason is None or isinstance(reason, str) and reason, name


def test_auto_uses_nn_rnn_under_float16_autocast_and_for_empty_input():
    # (bf16 autocast on CPU has the engine's bf16 path: tests/test_bf16.py)
    fast = FastBiRNN(4, 6)
    with torch.autocast("cpu", dtype=torch.float16):
        assert fast.selected_backend(torch.randn(3, 2, 4)) == "torch"
    assert fast.selected_backend(torch.randn(3, 0, 4)) == "torch"
