"""Pure-PyTorch reference of the bidirectional recurrences: the executable spec.

Readable and slow (a Python loop over time). The layer stacks of every cell (``elman_stack``,
``lstm_stack``, ``gru_stack``, at the end) are the ``'reference'`` backend; autograd
differentiates them, to any order. The two recurrence functions first are the spec of the
seam a kernel backend may implement instead of a whole Elman stack (triton's does). Shapes and
conventions of the seam:

    Z        [T, B, D, H]  input projection with both biases already added
    W_hh     [D, H, H]     recurrent weights, direction 0 = forward, 1 = reverse
    h0       [D, B, H]     initial hidden state per direction
    lengths  [B] int64     valid steps per row (1 <= lengths[b] <= T)
    Hs       [T, B, D, H]  hidden states; zero at steps t >= lengths[b]

The reverse direction of row b runs t = lengths[b]-1 .. 0. Steps past lengths[b] leave h
unchanged, so the reverse direction simply starts from h0 at its first valid step.
"""

from __future__ import annotations

import torch
from torch import Tensor

NONLINEARITIES = ("tanh", "relu")


def activation(z: Tensor, nonlinearity: str) -> Tensor:
    return torch.tanh(z) if nonlinearity == "tanh" else torch.relu(z)


def activation_grad_from_output(h: Tensor, nonlinearity: str) -> Tensor:
    """act'(z) written in terms of h = act(z), so pre-activations need not be saved.

    ReLU follows autograd's threshold_backward: zero where h <= 0, one elsewhere, so a NaN
    h passes the gradient on exactly as nn.RNN's backward does.
    """
    return 1 - h * h if nonlinearity == "tanh" else (h <= 0).logical_not().to(h.dtype)


def time_order(direction: int, T: int) -> range:
    """Time steps in the order direction `direction` visits them in the forward pass."""
    return range(T) if direction == 0 else range(T - 1, -1, -1)


def recurrence_forward(
    Z: Tensor, W_hh: Tensor, h0: Tensor, lengths: Tensor, nonlinearity: str
) -> Tensor:
    T, B, D, H = Z.shape
    Hs = torch.zeros_like(Z)
    for d in range(D):
        h = h0[d]
        for t in time_order(d, T):
            active = (t < lengths).unsqueeze(1)  # [B, 1]
            h_new = activation(Z[t, :, d] + h @ W_hh[d].T, nonlinearity)
            h = torch.where(active, h_new, h)
            Hs[t, :, d] = torch.where(active, h_new, torch.zeros_like(h_new))
    return Hs


def recurrence_backward(
    dHs: Tensor, Hs: Tensor, W_hh: Tensor, lengths: Tensor, nonlinearity: str
) -> tuple[Tensor, Tensor]:
    """BPTT through the recurrence: returns dZ [T,B,D,H] and dh0 [D,B,H].

    The gradient of h_n reaches this function through dHs: h_n is a gather of Hs.
    """
    T, B, D, H = Hs.shape
    dZ = torch.zeros_like(Hs)
    dh0 = Hs.new_zeros(D, B, H)
    for d in range(D):
        carry = Hs.new_zeros(B, H)
        for t in reversed(time_order(d, T)):
            active = (t < lengths).unsqueeze(1)
            g = dHs[t, :, d] + carry
            dz = torch.where(active, g * activation_grad_from_output(Hs[t, :, d], nonlinearity), 0)
            dZ[t, :, d] = dz
            carry = torch.where(active, dz @ W_hh[d], carry)
        dh0[d] = carry
    return dZ, dh0


def previous_hidden(Hs: Tensor, h0: Tensor, lengths: Tensor) -> Tensor:
    """h_{t-1} as each direction saw it at step t ([T,B,D,H]); used for dW_hh.

    Zero at padded steps: dZ is zero there too, and 0 * 0 keeps a NaN or inf in the last
    valid state (forward) from leaking into dW_hh through a step nn.RNN never takes.
    """
    T, B, D, H = Hs.shape
    forward_prev = torch.cat([h0[0].unsqueeze(0), Hs[:-1, :, 0]], dim=0)
    if D == 1:
        h_prev = forward_prev.unsqueeze(2)
    else:
        # Reverse direction: the step after t in time came before it; at its first step
        # (t = lengths-1) the previous state is h0.
        shifted = torch.cat([Hs[1:, :, 1], Hs.new_zeros(1, B, H)], dim=0)
        steps = torch.arange(T, device=Hs.device).unsqueeze(1)
        first_step = steps == (lengths - 1).unsqueeze(0)
        reverse_prev = torch.where(first_step.unsqueeze(2), h0[1].unsqueeze(0), shifted)
        h_prev = torch.stack([forward_prev, reverse_prev], dim=2)
    active = torch.arange(T, device=Hs.device).unsqueeze(1) < lengths.unsqueeze(0)  # [T, B]
    return torch.where(active[:, :, None, None], h_prev, 0)


def hidden_weight_grad(dZ: Tensor, Hs: Tensor, h0: Tensor, lengths: Tensor) -> Tensor:
    """dW_hh[d] = sum_{t,b} dz_t^T h_{t-1}: one batched GEMM over all steps."""
    T, B, D, H = Hs.shape
    h_prev = previous_hidden(Hs, h0, lengths)
    dz = dZ.permute(2, 3, 0, 1).reshape(D, H, T * B)
    hp = h_prev.permute(2, 0, 1, 3).reshape(D, T * B, H)
    return torch.bmm(dz, hp)


# ---- the bf16 engine's rounding (csrc/bf16.h), as autograd functions ---------------------


class _RoundOperand(torch.autograd.Function):
    """A product operand rounded to bfloat16 (kept in its dtype); the gradient passes through
    unrounded, as the engine's backward treats the rounding."""

    @staticmethod
    def forward(ctx, t):
        return t.to(torch.bfloat16).to(t.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _RoundGradient(torch.autograd.Function):
    """Identity forward; the gradient rounded to bfloat16, as the engine rounds the gate
    gradients before every product that reads them."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(torch.bfloat16).to(grad.dtype)


def _identity(t: Tensor) -> Tensor:
    return t


class _TanhFromRoundedOutput(torch.autograd.Function):
    """tanh whose derivative reads its output rounded to bfloat16: the engine's Elman cell
    keeps no pre-activation and differentiates from its (bf16) output."""

    @staticmethod
    def forward(ctx, z):
        h = torch.tanh(z)
        ctx.save_for_backward(h.to(torch.bfloat16).to(h.dtype))
        return h

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return grad * (1 - h * h)


# ---- every cell: the layer stack in plain PyTorch ops (autograd differentiates it) --------


def elman_step(xz: Tensor, state: tuple[Tensor], w_hh: Tensor, b_hh, w_hr, nonlinearity: str,
               operand=_identity, gradient=_identity):
    """One Elman step, nn.RNN's equation: h = act(x W_ih^T + b_ih + h W_hh^T + b_hh)."""
    (h,) = state
    pre = gradient(xz + torch.nn.functional.linear(operand(h), w_hh, b_hh))
    if operand is not _identity and nonlinearity == "tanh":
        return (_TanhFromRoundedOutput.apply(pre),)
    return (activation(pre, nonlinearity),)


def lstm_step(xz: Tensor, state: tuple[Tensor, Tensor], w_hh: Tensor, b_hh, w_hr,
              operand=_identity, gradient=_identity):
    """One LSTM step, nn.LSTM's gate order (input, forget, cell, output) and equations."""
    h, c = state
    gates = gradient(xz + torch.nn.functional.linear(operand(h), w_hh, b_hh))
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if w_hr is not None:  # proj_size > 0: the state h is projected
        h = h @ w_hr.T
    return h, c


def gru_step(xz: Tensor, state: tuple[Tensor], w_hh: Tensor, b_hh, w_hr,
             operand=_identity, gradient=_identity):
    """One GRU step, nn.GRU's gate order (reset, update, new); b_hn stays inside r * (...)."""
    (h,) = state
    x_r, x_z, x_n = gradient(xz).chunk(3, dim=1)
    h_r, h_z, h_n = gradient(torch.nn.functional.linear(operand(h), w_hh, b_hh)).chunk(3, dim=1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    if operand is _identity:
        return ((1 - z) * n + z * h,)
    # The bf16 engine: h_t from the fp32 state, but its backward reads h_{t-1} from the
    # (rounded) outputs, so z's gradient is dh (round(h) - n): the same value, that gradient.
    h_rounded = operand(h)
    return (n + z * (h_rounded - n) + z.detach() * (h - h_rounded),)


def _layer_stack(step, num_states, x, lengths, states, flat_weights, *, num_layers,
                 num_directions, bias, batch_first=False, proj_size=0, bf16_products=False):
    """The layer stack of one cell (``fastbirnn.functional.run_stack``'s contract).

    x [T,B,I] (or [B,T,I] with batch_first); states: tuple of [L*D,B,*] or None (zeros).
    Returns output [T,B,D*P] (zero past each row's length) and the final states tuple.

    bf16_products: the cpp engine's bfloat16 semantics on fp32 tensors holding bf16 values
    (x, states, weights): h_{t-1}, the layers' outputs and the gate gradients rounded to bf16
    where a product reads them; the state, the cells and every sum in fp32.
    """
    operand, gradient = ((_RoundOperand.apply, _RoundGradient.apply) if bf16_products
                         else (_identity, _identity))
    if batch_first:
        x = x.transpose(0, 1)
    T, B, _ = x.shape
    D = num_directions
    per_direction = (4 if bias else 2) + (1 if proj_size else 0)
    H = flat_weights[1].size(1) if not proj_size else flat_weights[per_direction - 1].size(1)
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=x.device)
    layer_input = x
    finals: list[list[Tensor]] = []
    for layer in range(num_layers):
        outputs = []
        for d in range(D):
            index = layer * D + d
            w = flat_weights[index * per_direction :][:per_direction]
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
            w_hr = w[-1] if proj_size else None
            if states is None:  # zeros: h is [B, P] (projected) or [B, H]; LSTM's c is [B, H]
                state = (x.new_zeros(B, w_hh.size(1)), x.new_zeros(B, H))[:num_states]
            else:
                state = tuple(s[index] for s in states)
            projected = torch.nn.functional.linear(layer_input, w_ih, b_ih)
            hs = [None] * T
            for t in time_order(d, T):
                active = (t < lengths).unsqueeze(1)
                new = step(projected[t], state, w_hh, b_hh, w_hr, operand, gradient)
                state = tuple(torch.where(active, n, s) for n, s in zip(new, state))
                hs[t] = torch.where(active, new[0], torch.zeros_like(new[0]))
            outputs.append(torch.stack(hs))
            finals.append(list(state))
        layer_input = operand(torch.cat(outputs, dim=2))
    output = layer_input.transpose(0, 1) if batch_first else layer_input
    return output, tuple(torch.stack(parts) for parts in zip(*finals))


def elman_stack(x, lengths, states, flat_weights, *, nonlinearity="tanh", **config):
    def step(xz, state, w_hh, b_hh, w_hr, operand=_identity, gradient=_identity):
        return elman_step(xz, state, w_hh, b_hh, w_hr, nonlinearity, operand, gradient)

    return _layer_stack(step, 1, x, lengths, states, flat_weights, **config)


def lstm_stack(x, lengths, states, flat_weights, **config):
    return _layer_stack(lstm_step, 2, x, lengths, states, flat_weights, **config)


def gru_stack(x, lengths, states, flat_weights, **config):
    return _layer_stack(gru_step, 1, x, lengths, states, flat_weights, **config)


# The reference backend's stacks, by cell.
STACKS = {"rnn": elman_stack, "lstm": lstm_stack, "gru": gru_stack}
