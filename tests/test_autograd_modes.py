"""Autograd beyond first-order backward: each fused backend either matches nn.RNN or raises.

Never a silent wrong answer: double backward and torch.func transforms are not implemented
by the fused kernels, so named fused backends refuse them and 'auto' hands transforms to
nn.RNN.
"""

import pytest
import torch
from torch import nn

import fastbirnn
from fastbirnn import FastBiRNN

FUSED = [n for n in ("cpp", "reference") if fastbirnn.available_backends().get(n, "") is None]


def pair(backend, **kwargs):
    torch.manual_seed(0)
    reference = nn.RNN(4, 5, bidirectional=True, dtype=torch.float64, **kwargs)
    fast = FastBiRNN(4, 5, dtype=torch.float64, backend=backend, **kwargs)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


X = torch.randn(6, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
V = torch.randn(6, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("backend", FUSED + ["auto"])
def test_double_backward_raises_instead_of_dropping_second_order_terms(backend):
    _, fast = pair(backend)
    x = X.clone().requires_grad_()
    out, _ = fast(x)
    with pytest.raises(RuntimeError, match="double backward"):
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
