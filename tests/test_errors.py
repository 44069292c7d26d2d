"""Bad input raises what nn.RNN raises (same exception type), never a silent wrong answer."""

import re
import warnings

import pytest
import torch
from torch import nn

from fastbirnn import FastBiRNN, backends, reference

BAD_CALLS = {
    "4-D input": lambda m: m(torch.randn(2, 3, 4, 1)),
    "1-D input": lambda m: m(torch.randn(4)),
    "wrong feature size": lambda m: m(torch.randn(3, 2, 5)),
    "wrong hx batch": lambda m: m(torch.randn(3, 2, 4), torch.randn(2, 3, 8)),
    "wrong hx layers": lambda m: m(torch.randn(3, 2, 4), torch.randn(1, 2, 8)),
    "wrong hx hidden": lambda m: m(torch.randn(3, 2, 4), torch.randn(2, 2, 7)),
    "2-D hx for 3-D input": lambda m: m(torch.randn(3, 2, 4), torch.randn(2, 8)),
    "3-D hx for 2-D input": lambda m: m(torch.randn(3, 4), torch.randn(2, 1, 8)),
    "input dtype": lambda m: m(torch.randn(3, 2, 4, dtype=torch.float64)),
    "integer input": lambda m: m(torch.ones(3, 2, 4, dtype=torch.long)),
    "hx dtype": lambda m: m(torch.randn(3, 2, 4), torch.randn(2, 2, 8, dtype=torch.float64)),
    "hx device": lambda m: m(torch.randn(3, 2, 4), torch.randn(2, 2, 8, device="meta")),
    "input device": lambda m: m(torch.randn(3, 2, 4, device="meta")),
    "zero-length sequence": lambda m: m(torch.randn(0, 2, 4)),
    "packed wrong hx batch": lambda m: m(
        nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 4), [3, 2]), torch.randn(2, 3, 8)
    ),
    "packed wrong feature size": lambda m: m(
        nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 5), [3, 2])
    ),
}


def raised(call, module):
    try:
        call(module)
    except Exception as error:  # noqa: BLE001 - the type is what we compare
        return error
    return None


@pytest.mark.parametrize("backend", ["reference", "auto", "torch"])
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_like_nn_rnn(name, backend):
    torch.manual_seed(0)
    expected = raised(BAD_CALLS[name], nn.RNN(4, 8, bidirectional=True))
    assert expected is not None, f"nn.RNN accepted {name}; the case is wrong"
    actual = raised(BAD_CALLS[name], FastBiRNN(4, 8, backend=backend))
    assert type(actual) is type(expected), f"{name}: nn.RNN raised {expected!r}, got {actual!r}"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(nonlinearity="gelu"),
        dict(dropout=1.5),
        dict(dropout=-0.1),
        dict(hidden_size=0),
        dict(num_layers=0),
    ],
    ids=str,
)
def test_bad_constructor_arguments_raise_like_nn_rnn(kwargs):
    args = dict(input_size=4, hidden_size=8) | kwargs
    with pytest.raises(ValueError) as expected:
        nn.RNN(**args)
    with pytest.raises(ValueError) as actual:
        FastBiRNN(**args)
    assert str(actual.value) == str(expected.value)


@pytest.mark.parametrize("name", ["cuda", "", None, 3, "Torch"])
def test_unknown_backend_is_a_value_error_naming_the_choices(name):
    with pytest.raises(ValueError, match="Unknown backend.*'auto'"):
        FastBiRNN(4, 8, backend=name)


@pytest.fixture
def broken_backend():
    """A registered backend that reports itself unavailable, as a failed build would."""
    name = "test-broken"
    backends.register(
        backends.RecurrenceBackend(
            name=name,
            cell_stacks={"rnn": reference.elman_stack},
            unavailable_reason=lambda: "its extension failed to build (test)",
            unsupported_reason=lambda x: None,
            preferred_for=lambda x, call: True,
        ),
        auto_priority=0,
    )
    yield name
    del backends._REGISTRY[name]
    backends._AUTO_ORDER.remove(name)
    backends._warned_fallbacks.discard(name)


def test_unavailable_backend_by_name_says_why(broken_backend):
    with pytest.raises(RuntimeError, match="test-broken.*not available.*failed to build"):
        FastBiRNN(4, 8, backend=broken_backend)


def test_auto_skips_an_unavailable_backend_with_one_warning(broken_backend):
    rnn = FastBiRNN(4, 8)
    with pytest.warns(RuntimeWarning, match="'test-broken' is not available.*failed to build"):
        assert rnn.selected_backend(torch.randn(3, 2, 4)) != broken_backend
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every call
        out, _ = rnn(torch.randn(3, 2, 4))
    assert out.shape == (3, 2, 16)


def test_backend_that_cannot_run_the_input_says_why():
    name = "test-fp32-only"
    backends.register(
        backends.RecurrenceBackend(
            name=name,
            cell_stacks={"rnn": reference.elman_stack},
            unavailable_reason=lambda: None,
            unsupported_reason=lambda x: None if x.dtype == torch.float32 else "fp32 only (test)",
        )
    )
    try:
        rnn = FastBiRNN(4, 8, backend=name)
        assert rnn(torch.randn(2, 1, 4))[0].shape == (2, 1, 16)
        with pytest.raises(RuntimeError, match="'test-fp32-only' cannot run this input: fp32 only"):
            rnn.double()(torch.randn(2, 1, 4, dtype=torch.float64))
    finally:
        del backends._REGISTRY[name]


# hx of the wrong rank or form, for each input form: (input, hx) from (x3, x2, h3, h2).
HX_CALLS = {
    "2-D hx, 3-D input": lambda x3, x2, h3, h2: (x3, h2),
    "3-D hx, 2-D input": lambda x3, x2, h3, h2: (x2, h3),
    "4-D hx": lambda x3, x2, h3, h2: (x3, h3.unsqueeze(0)),
    "a tensor for (h, c)": lambda x3, x2, h3, h2: (x3, h3),
    "a tensor for (h, c), 2-D input": lambda x3, x2, h3, h2: (x2, h2),
    "(2-D, 2-D) for 3-D input": lambda x3, x2, h3, h2: (x3, (h2, h2)),
    "(3-D, 2-D) for 3-D input": lambda x3, x2, h3, h2: (x3, (h3, h2)),
    "(3-D, 3-D) for 2-D input": lambda x3, x2, h3, h2: (x2, (h3, h3)),
    "(h,) alone": lambda x3, x2, h3, h2: (x3, (h3,)),
    "(h, c, h)": lambda x3, x2, h3, h2: (x3, (h3, h3, h3)),
    "a list [h, c]": lambda x3, x2, h3, h2: (x3, [h3, h3]),
    "packed, a tensor for (h, c)": lambda x3, x2, h3, h2: (_packed(x3), h3),
    "packed, (2-D, 2-D)": lambda x3, x2, h3, h2: (_packed(x3), (h2, h2)),
    "packed sorted, (2-D, 2-D)": lambda x3, x2, h3, h2: (_packed(x3, sort=True), (h2, h2)),
    "packed sorted, 2-D hx": lambda x3, x2, h3, h2: (_packed(x3, sort=True), h2),
    "packed, (h, c)": lambda x3, x2, h3, h2: (_packed(x3), (h3, h3)),
}


def _packed(x, sort=False):
    return nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]), enforce_sorted=sort)


@pytest.mark.parametrize("backend", ["auto", "cpp", "reference", "torch", "triton"])
@pytest.mark.parametrize("cell", ["RNN", "LSTM", "GRU"])
def test_hx_of_the_wrong_rank_or_form_raises_the_nn_class_error(cell, backend):
    """Exception type and message as the nn class's, for every hx it refuses (issue 26)."""
    import fastbirnn

    try:
        fast = getattr(fastbirnn, {"RNN": "FastBiRNN"}.get(cell, f"FastBi{cell}"))(
            4, 3, backend=backend
        )
    except RuntimeError as error:  # a backend this machine cannot run (cpp not built)
        pytest.skip(str(error))
    plain = getattr(nn, cell)(4, 3, bidirectional=True)
    plain.load_state_dict(fast.state_dict())
    torch.manual_seed(0)
    tensors = torch.randn(5, 2, 4), torch.randn(5, 4), torch.randn(2, 2, 3), torch.randn(2, 3)
    refused = 0
    for name, make in HX_CALLS.items():
        x, hx = make(*tensors)
        expected = raised(lambda m: m(x, hx), plain)
        if expected is None:  # nn takes this hx (e.g. a tuple for the LSTM): so must we
            fast(x, hx)
            continue
        refused += 1
        with pytest.raises(type(expected), match=f"^{re.escape(str(expected))}$"):
            fast(x, hx)
    assert refused >= 8
