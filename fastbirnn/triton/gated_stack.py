"""The LSTM and GRU layer stacks on the Triton kernels: ``cell_stacks`` of the 'triton' backend.

Per layer, as for the Elman cell (``fastbirnn.functional.seam_stack``): one GEMM projects the
input for both directions and every gate (autograd differentiates it), the kernels run the
recurrence (``fastbirnn::gated_recurrence_forward``, a ``torch.library`` custom op with its
autograd, as ``fastbirnn.ops`` registers the Elman seam, around ``launcher.gated_forward`` /
``gated_backward``), and the weight gradients are GEMMs over all steps at once. Dropout
between layers is ``fastbirnn.functional.run_stack``'s, as for every backend (the same masks
as nn.LSTM on CPU; cuDNN draws its own).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastbirnn.functional import final_hidden
from fastbirnn.reference import previous_hidden
from fastbirnn.triton import launcher
from fastbirnn.triton.cells import GATES, SAVED_SLOTS


@torch.library.custom_op("fastbirnn::gated_recurrence_forward", mutates_args=())
def gated_recurrence_forward(
    Z: Tensor, W_hh: Tensor, b_hn: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor, cell: str,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(Hs, c_n, saved): ``launcher.gated_forward``, with an empty c_n for the GRU (an op
    returns no input)."""
    Hs, cn, saved = launcher.gated_forward(Z, W_hh, b_hn, h0, c0, lengths, cell, save)
    return Hs, (cn if cell == "lstm" else Hs.new_empty(0)), saved


@gated_recurrence_forward.register_fake
def _gated_recurrence_forward_fake(Z, W_hh, b_hn, h0, c0, lengths, cell, save):
    T, B, D, _ = Z.shape
    H = W_hh.shape[-1]
    saved_shape = (T, B, D, SAVED_SLOTS, H) if save else (0,)
    return (Z.new_empty(T, B, D, H), c0.new_empty(c0.shape) if cell == "lstm" else Z.new_empty(0),
            Z.new_empty(saved_shape, dtype=torch.float32))


@torch.library.custom_op("fastbirnn::gated_recurrence_backward", mutates_args=())
def gated_recurrence_backward(
    dHs: Tensor, dcn: Tensor, saved: Tensor, W_hh: Tensor, lengths: Tensor, cell: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dZ, dHN, dh0, dc0): ``launcher.gated_backward``, with an empty dc0 for the GRU."""
    dZ, dhn, dh0, dc0 = launcher.gated_backward(dHs, dcn, saved, W_hh, lengths, cell)
    return dZ, dhn, dh0, (dc0 if cell == "lstm" else dh0.new_empty(0))


@gated_recurrence_backward.register_fake
def _gated_recurrence_backward_fake(dHs, dcn, saved, W_hh, lengths, cell):
    T, B, D, H = dHs.shape
    lstm = cell == "lstm"
    return (dHs.new_empty(T, B, D, W_hh.shape[1]), dHs.new_empty((0,) if lstm else (T, B, D, H)),
            dHs.new_empty(D, B, H), dHs.new_empty((D, B, H) if lstm else (0,)))


def _setup_context(ctx, inputs, output):
    Z, W_hh, b_hn, h0, c0, lengths, cell, save = inputs
    Hs, _, saved = output
    ctx.mark_non_differentiable(saved)
    ctx.set_materialize_grads(False)  # no zero gradient of the (large) saved activations
    ctx.save_for_backward(W_hh, h0, lengths, Hs, saved)
    ctx.cell = cell


def _backward(ctx, dHs, dcn, _):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fastbirnn: double backward (create_graph=True) is not supported by backend "
            "'triton'; backend='auto', 'cpp', 'reference' or 'torch' compute gradients of "
            "gradients"
        )
    W_hh, h0, lengths, Hs, saved = ctx.saved_tensors
    lstm = ctx.cell == "lstm"
    if dHs is None:
        dHs = torch.zeros_like(Hs)
    if not lstm:
        dcn = h0  # not read
    elif dcn is None:
        dcn = torch.zeros_like(h0)
    dZ, dhn, dh0, dc0 = gated_recurrence_backward(dHs, dcn, saved, W_hh, lengths, ctx.cell)
    dW_hh = db_hn = None
    if ctx.needs_input_grad[1]:
        # What each gate's hidden part received: dZ, except GRU's n (r * dn, from the kernel).
        H = Hs.shape[-1]
        d_hidden = dZ if lstm else torch.cat([dZ[..., : 2 * H], dhn], dim=-1)
        dW_hh = _sum_over_steps(d_hidden, previous_hidden(Hs, h0, lengths))
    if ctx.needs_input_grad[2] and not lstm:
        db_hn = dhn.sum(dim=(0, 1))
    return dZ, dW_hh, db_hn, dh0, (dc0 if lstm else None), None, None, None


gated_recurrence_forward.register_autograd(_backward, setup_context=_setup_context)


def _sum_over_steps(d_gates, h_prev):
    """dW[d] = sum over (t, b) of d_gates[t, b, d]^T h_prev[t, b, d]: one batched GEMM."""
    T, B, D, GH = d_gates.shape
    lhs = d_gates.permute(2, 3, 0, 1).reshape(D, GH, T * B)
    rhs = h_prev.permute(2, 0, 1, 3).reshape(D, T * B, -1)
    return torch.bmm(lhs, rhs)


def _layer_weights(flat_weights, layer, D, bias, cell, H):
    """W_ih [D*G*H, I], W_hh [D, G*H, H], the folded bias [D*G*H] (or None), b_hn [D, H]
    (GRU with bias; else None)."""
    per_direction = 4 if bias else 2
    groups = [flat_weights[(layer * D + d) * per_direction:][:per_direction] for d in range(D)]
    W_ih = torch.cat([g[0] for g in groups])
    W_hh = torch.stack([g[1] for g in groups])
    if not bias:
        return W_ih, W_hh, None, None
    if cell == "lstm":
        return W_ih, W_hh, torch.cat([g[2] + g[3] for g in groups]), None
    # GRU: b_hn stays inside r * (W_hn h + b_hn): only r's and z's hidden biases fold in.
    folded = torch.cat([torch.cat([g[2][: 2 * H] + g[3][: 2 * H], g[2][2 * H:]]) for g in groups])
    return W_ih, W_hh, folded, torch.stack([g[3][2 * H:] for g in groups])


def gated_stack(cell, x, lengths, states, flat_weights, *, num_layers, num_directions, bias,
                batch_first=False, proj_size=0):
    """``RecurrenceBackend.cell_stacks``' contract (``fastbirnn.functional.run_stack``)."""
    if proj_size:
        raise RuntimeError(
            "fastbirnn backend 'triton' has no LSTM with proj_size > 0; use backend='torch' "
            "(nn.LSTM) or 'reference' for projections"
        )
    if batch_first:
        x = x.transpose(0, 1)
    T, B, _ = x.shape
    D = num_directions
    G = GATES[cell]
    H = flat_weights[1].size(1)
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=x.device)
    if states is None:
        states = tuple(x.new_zeros(num_layers * D, B, H) for _ in range(2 if cell == "lstm" else 1))
    layer_input = x
    final_h, final_c = [], []
    for layer in range(num_layers):
        W_ih, W_hh, b, b_hn = _layer_weights(flat_weights, layer, D, bias, cell, H)
        flat_input = layer_input.reshape(T * B, -1)
        Z = torch.addmm(b, flat_input, W_ih.t()) if b is not None else flat_input @ W_ih.t()
        h0 = states[0][layer * D:(layer + 1) * D]
        c0 = states[1][layer * D:(layer + 1) * D] if cell == "lstm" else h0
        if b_hn is None:
            b_hn = x.new_zeros(D, H)
        inputs = (Z, W_hh, b_hn, h0, c0)
        save = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        Hs, cn, _ = gated_recurrence_forward(Z.view(T, B, D, G * H), W_hh, b_hn, h0, c0,
                                             lengths, cell, save)
        final_h.append(final_hidden(Hs, lengths))
        final_c.append(cn)
        layer_input = Hs.view(T, B, D * H)
    output = layer_input.transpose(0, 1) if batch_first else layer_input
    if cell == "lstm":
        return output, (torch.cat(final_h), torch.cat(final_c))
    return output, (torch.cat(final_h),)


def lstm_stack(x, lengths, states, flat_weights, **config):
    return gated_stack("lstm", x, lengths, states, flat_weights, **config)


def gru_stack(x, lengths, states, flat_weights, **config):
    return gated_stack("gru", x, lengths, states, flat_weights, **config)
