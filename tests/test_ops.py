"""The seam's custom ops: reference semantics, gradcheck, fake kernels, torch.compile."""

import pytest
import torch

from fastbirnn import FastBiRNN, ops, reference


def random_seam_inputs(T=5, B=3, D=2, H=4, lengths=(5, 2, 4), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(T, B, D, H, generator=g, dtype=dtype)
    W_hh = torch.randn(D, H, H, generator=g, dtype=dtype) * 0.5
    h0 = torch.randn(D, B, H, generator=g, dtype=dtype)
    return Z, W_hh, h0, torch.tensor(lengths, dtype=torch.int64)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("D", [1, 2])
def test_gradcheck_recurrence_op(nonlinearity, D):
    Z, W_hh, h0, lengths = random_seam_inputs(D=D)
    inputs = tuple(t.requires_grad_() for t in (Z, W_hh, h0))

    def f(Z, W_hh, h0):
        return ops.recurrence_forward(Z, W_hh, h0, lengths, nonlinearity, "reference")

    assert torch.autograd.gradcheck(f, inputs)


def test_reference_respects_lengths_and_direction():
    Z, W_hh, h0, lengths = random_seam_inputs()
    Hs = reference.recurrence_forward(Z, W_hh, h0, lengths, "tanh")
    # Zero past each row's length.
    assert torch.count_nonzero(Hs[2:, 1]) == 0 and torch.count_nonzero(Hs[4:, 2]) == 0
    # Row 1 (length 2) equals running it alone on its first 2 steps: the reverse
    # direction starts at its own last step, not at T-1.
    alone = reference.recurrence_forward(Z[:2, 1:2], W_hh, h0[:, 1:2], torch.tensor([2]), "tanh")
    torch.testing.assert_close(Hs[:2, 1:2], alone)


def test_fake_kernels_give_shapes_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        Z, W_hh, h0, lengths = (mode.from_tensor(t) for t in random_seam_inputs())
        Hs = ops.recurrence_forward(Z, W_hh, h0, lengths, "tanh", "reference")
        dZ, dh0 = ops.recurrence_backward(Hs, Hs, W_hh, lengths, "tanh", "reference")
    assert Hs.shape == dZ.shape == (5, 3, 2, 4) and dh0.shape == (2, 3, 4)


def test_opcheck_recurrence_forward():
    Z, W_hh, h0, lengths = random_seam_inputs()
    args = (Z.requires_grad_(), W_hh.requires_grad_(), h0.requires_grad_(), lengths, "tanh", "reference")
    torch.library.opcheck(ops.recurrence_forward, args)


@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_compile_fullgraph_forward_and_backward(batch_first):
    torch.manual_seed(0)
    # PackedSequence is left out: Dynamo refuses torch.nn.utils.rnn's packing functions.
    model = FastBiRNN(4, 6, num_layers=2, batch_first=batch_first, backend="reference").double()
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)

    def step(module, x):
        out, h_n = module(x)
        return out.square().sum() + h_n.sum()

    expected = step(model, x)
    expected_grads = torch.autograd.grad(expected, [x, *model.parameters()])
    torch._dynamo.reset()
    # Dynamo graph-breaks on every nn.RNN subclass unless told otherwise.
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        actual = compiled(model, x)
        actual_grads = torch.autograd.grad(actual, [x, *model.parameters()])
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_grads, expected_grads)
