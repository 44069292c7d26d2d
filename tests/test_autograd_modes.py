"""Autograd beyond first-order backward: each fused backend either matches the nn class or
raises.

Never a silent wrong answer. Gradients of gradients (create_graph=True) are exact on 'auto',
'cpp' and 'reference' for every cell ('cpp' recomputes the stack with the reference under
grad mode) and 'triton' raises; torch.func transforms are not implemented by the fused kernels, so named fused
backends refuse them and 'auto' hands transforms to the nn class.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastbirnn
from fastbirnn import FastBiGRU, FastBiLSTM, FastBiRNN

FUSED = [n for n in ("cpp", "reference") if fastbirnn.available_backends().get(n, "") is None]
CELLS = {"rnn": (nn.RNN, FastBiRNN), "lstm": (nn.LSTM, FastBiLSTM), "gru": (nn.GRU, FastBiGRU)}


def pair(backend, **kwargs):
    torch.manual_seed(0)
    reference = nn.RNN(4, 5, bidirectional=True, dtype=torch.float64, **kwargs)
    fast = FastBiRNN(4, 5, dtype=torch.float64, backend=backend, **kwargs)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


X = torch.randn(6, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
V = torch.randn(6, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def _cell_pair(cell, backend, num_layers=1):
    nn_class, fast_class = CELLS[cell]
    torch.manual_seed(0)
    expected = nn_class(3, 3, num_layers=num_layers, bidirectional=True, dtype=torch.float64)
    fast = fast_class(3, 3, num_layers=num_layers, dtype=torch.float64, backend=backend)
    fast.load_state_dict(expected.state_dict())
    return expected, fast


def _states(cell, num_layers, batch, generator):
    h = torch.randn(2 * num_layers, batch, 3, dtype=torch.float64, generator=generator)
    return (h, h.flip(2).clone()) if cell == "lstm" else (h,)


def _run(module, cell, x, states, packed):
    hx = states if cell == "lstm" else states[0]
    if packed:
        out, final = module(pack_padded_sequence(x, [4, 2], enforce_sorted=False), hx)
        out = pad_packed_sequence(out, total_length=x.shape[0])[0]
    else:
        out, final = module(x, hx)
    return out, (final if isinstance(final, tuple) else (final,))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", FUSED + ["auto"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradients_of_gradients_are_exact(cell, backend, packed):
    """gradgradcheck on x, h_0 and the recurrent weight, and second-order gradients equal to
    the nn class's (a gradient penalty: d/dparams of |d loss / d x|^2)."""
    expected_module, fast = _cell_pair(cell, backend, num_layers=2 if packed else 1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 2, 3, dtype=torch.float64, generator=g)
    states = _states(cell, fast.num_layers, 2, g)
    if backend == "auto":
        assert fast.selected_backend(x) == "cpp"  # the fused path is the one under test
    name = "weight_hh_l0"

    def function(module):
        def f(x, w_hh, *states):
            params = {n: p for n, p in module.named_parameters()}
            params[name] = w_hh
            out, final = torch.func.functional_call(
                module, params, (x, states if cell == "lstm" else states[0]))
            return (out, *(final if isinstance(final, tuple) else (final,)))

        return f

    inputs = (x.requires_grad_(), getattr(fast, name).detach().clone().requires_grad_(),
              *(s.requires_grad_() for s in states))
    if not packed:
        assert torch.autograd.gradgradcheck(function(fast), inputs)

    def penalty_grads(module):
        xs = x.detach().requires_grad_()
        out, final = _run(module, cell, xs, tuple(s.detach() for s in states), packed)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        loss = loss + sum(f.square().sum() for f in final)
        (dx,) = torch.autograd.grad(loss, xs, create_graph=True)
        params = list(module.parameters())
        return [dx, *torch.autograd.grad(dx.square().sum(), [xs, *params])]

    torch.testing.assert_close(penalty_grads(fast), penalty_grads(expected_module))


@pytest.mark.parametrize("cell", CELLS)
def test_triton_refuses_double_backward_with_a_clear_error(cell):
    """'triton' (here through the interpreter) keeps its kernels' gradients non-differentiable:
    create_graph=True raises, naming the backends that compute gradients of gradients."""
    if fastbirnn.available_backends().get("triton", "") is not None:
        pytest.skip("triton not available here")
    _, fast = _cell_pair(cell, "triton")
    fast = fast.float()
    x = torch.randn(4, 2, 3, requires_grad=True)
    out = fast(x)[0]
    with pytest.raises(RuntimeError, match="double backward.*'triton'.*'auto', 'cpp'"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


def test_auto_matches_nn_rnn_under_torch_func_jvp_and_grad():
    reference, fast = pair("auto")
    _, expected = torch.func.jvp(lambda t: reference(t)[0], (X,), (V,))
    _, actual = torch.func.jvp(lambda t: fast(t)[0], (X,), (V,))
    torch.testing.assert_close(actual, expected)

    params = {name: p.detach() for name, p in fast.named_parameters()}

    def loss(module):
        return lambda p: torch.func.functional_call(module, p, (X,))[0].square().sum()

    expected = torch.func.grad(loss(reference))(params)
    actual = torch.func.grad(loss(fast))(params)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("backend", FUSED)
def test_named_fused_backend_refuses_transforms(backend):
    _, fast = pair(backend)
    with pytest.raises(RuntimeError, match="does not support torch.func transforms"):
        torch.func.jvp(lambda t: fast(t)[0], (X,), (V,))
    with pytest.raises(RuntimeError, match="does not support torch.func transforms"):
        torch.func.vmap(lambda t: fast(t)[0])(X.unsqueeze(0))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(X, V)
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            fast(dual)


@pytest.mark.parametrize("backend", FUSED + ["auto"])
@pytest.mark.parametrize("needs_grad", ["hx only", "input only", "frozen weights"])
def test_partial_requires_grad_matches_nn_rnn(backend, needs_grad):
    reference, fast = pair(backend, num_layers=2)
    hx = torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for module in (reference, fast):
        x = X.clone().requires_grad_(needs_grad != "hx only")
        h = hx.clone().requires_grad_(needs_grad != "input only")
        for p in module.parameters():
            p.requires_grad_(needs_grad != "frozen weights")
        out, h_n = module(x, h)
        wanted = [t for t in (x, h, *module.parameters()) if t.requires_grad]
        results.append((out, h_n, torch.autograd.grad(out.square().sum() + h_n.sum(), wanted)))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("backend", FUSED + ["auto"])
def test_float64_under_autocast_stays_float64_like_nn_rnn(backend):
    reference, fast = pair(backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = reference(X), fast(X)
    assert actual[0].dtype == expected[0].dtype == torch.float64
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("backend", FUSED)
def test_activation_follows_the_constructed_mode_like_nn_rnn(backend):
    # nn.RNN reads self.mode (fixed at construction), not the nonlinearity attribute.
    reference, fast = pair(backend, nonlinearity="relu")
    reference.nonlinearity = fast.nonlinearity = "tanh"
    torch.testing.assert_close(fast(X), reference(X))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("used", ["out", "h_n", "c_n"])
def test_a_loss_on_one_output_matches_nn(cell, backend, used):
    """The outputs a loss does not use reach the backward as no gradient at all (the node does
    not materialise zeros): first- and second-order gradients still match nn."""
    if used == "c_n" and cell != "lstm":
        pytest.skip("only the LSTM has c_n")
    expected, fast = _cell_pair(cell, backend, num_layers=2)
    x = X[:, :, :3].clone().requires_grad_(True)

    def loss(module):
        out, state = module(x)
        finals = state if isinstance(state, tuple) else (state,)
        picked = {"out": out, "h_n": finals[0], "c_n": finals[-1]}[used]
        return picked.pow(2).sum()

    want_inputs, got_inputs = [x, *expected.parameters()], [x, *fast.parameters()]
    # First order (the engine's own backward), then second order (create_graph: the
    # differentiable recomputation), each through the same single output.
    torch.testing.assert_close(torch.autograd.grad(loss(fast), got_inputs),
                               torch.autograd.grad(loss(expected), want_inputs))
    want = torch.autograd.grad(loss(expected), want_inputs, create_graph=True)
    got = torch.autograd.grad(loss(fast), got_inputs, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(got[0].sum(), x),
                               torch.autograd.grad(want[0].sum(), x))
