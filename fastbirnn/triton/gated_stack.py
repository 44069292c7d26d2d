"""The LSTM and GRU layer stacks on the Triton kernels: ``cell_stacks`` of the 'triton' backend.

Per layer, as for the Elman cell (``fastbirnn.functional.per_layer_forward``): one GEMM
projects the input for both directions and every gate (autograd differentiates it), the
kernels run the recurrence (``_GatedRecurrence``, an autograd Function around
``launcher.gated_forward`` / ``gated_backward``), the weight gradients are GEMMs over all
steps at once, and dropout between layers is ``F.dropout`` (the same masks as nn.LSTM on CPU;
cuDNN draws its own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastbirnn.functional import final_hidden
from fastbirnn.reference import previous_hidden
from fastbirnn.triton import launcher
from fastbirnn.triton.cells import GATES


class _GatedRecurrence(torch.autograd.Function):
    """(Z, W_hh, b_hn, h0, c0, lengths) -> (Hs, c_n); see ``launcher.gated_forward``.
    GRU: c0 is not read and c_n is empty."""

    @staticmethod
    def forward(ctx, Z, W_hh, b_hn, h0, c0, lengths, cell, save):
        Hs, cn, saved = launcher.gated_forward(Z, W_hh, b_hn, h0, c0, lengths, cell, save)
        ctx.cell = cell
        if save:
            ctx.save_for_backward(W_hh, h0, lengths, Hs, saved)
        return Hs, (cn if cell == "lstm" else Hs.new_empty(0))

    @staticmethod
    @once_differentiable
    def backward(ctx, dHs, dcn):
        W_hh, h0, lengths, Hs, saved = ctx.saved_tensors
        lstm = ctx.cell == "lstm"
        dZ, dhn, dh0, dc0 = launcher.gated_backward(
            dHs, dcn if lstm else h0, saved, W_hh, lengths, ctx.cell
        )
        dW_hh = db_hn = None
        if ctx.needs_input_grad[1]:
            # What each gate's hidden part received: dZ, except GRU's n (r * dn, from the kernel).
            H = Hs.shape[-1]
            d_hidden = dZ if lstm else torch.cat([dZ[..., : 2 * H], dhn], dim=-1)
            dW_hh = _sum_over_steps(d_hidden, previous_hidden(Hs, h0, lengths))
        if ctx.needs_input_grad[2] and not lstm:
            db_hn = dhn.sum(dim=(0, 1))
        return dZ, dW_hh, db_hn, dh0, (dc0 if lstm else None), None, None, None


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
                dropout, training, batch_first=False, proj_size=0):
    """``RecurrenceBackend.cell_stacks``' contract (see ``reference._gated_stack``)."""
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
        Hs, cn = _GatedRecurrence.apply(Z.view(T, B, D, G * H), W_hh, b_hn, h0, c0, lengths,
                                        cell, save)
        final_h.append(final_hidden(Hs, lengths))
        final_c.append(cn)
        layer_input = Hs.view(T, B, D * H)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    output = layer_input.transpose(0, 1) if batch_first else layer_input
    if cell == "lstm":
        return output, (torch.cat(final_h), torch.cat(final_c))
    return output, (torch.cat(final_h),)


def lstm_stack(x, lengths, states, flat_weights, **config):
    return gated_stack("lstm", x, lengths, states, flat_weights, **config)


def gru_stack(x, lengths, states, flat_weights, **config):
    return gated_stack("gru", x, lengths, states, flat_weights, **config)
