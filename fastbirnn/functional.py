"""The layer stack through the seam: input GEMM, fused recurrence, h_n, dropout.

Written once for every recurrence backend. Tensors here are padded: ``x`` is [T, B, I]
(or [B, T, I] with ``batch_first``), ``lengths`` [B] int64 on ``x``'s device or None (every
row runs all T steps), ``hx`` [L*D, B, H] or None (zeros).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastbirnn import backends, ops


def final_hidden(Hs: Tensor, lengths: Tensor) -> Tensor:
    """h_n [D,B,H]: forward at step lengths-1, reverse at step 0."""
    T, B, D, H = Hs.shape
    last_step = [lengths - 1, torch.zeros_like(lengths)][:D]
    time_index = torch.stack(last_step)  # [D, B]
    batch_index = torch.arange(B, device=Hs.device).unsqueeze(0)
    direction_index = torch.arange(D, device=Hs.device).unsqueeze(1)
    return Hs[time_index, batch_index, direction_index]


def layer_weights(
    flat_weights: Sequence[Tensor], layer: int, num_directions: int, bias: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Both directions' weights of one layer, stacked for one GEMM / one kernel launch.

    Returns W_ih [D*H, I], W_hh [D, H, H] and the summed bias b_ih + b_hh [D*H] (or None).
    ``flat_weights`` is nn.RNN's order: per layer, per direction, w_ih, w_hh[, b_ih, b_hh].
    """
    per_direction = 4 if bias else 2
    groups = [
        flat_weights[(layer * num_directions + d) * per_direction :][:per_direction]
        for d in range(num_directions)
    ]
    W_ih = torch.cat([g[0] for g in groups]) if num_directions > 1 else groups[0][0]
    W_hh = torch.stack([g[1] for g in groups])
    b = torch.cat([g[2] + g[3] for g in groups]) if bias else None
    return W_ih, W_hh, b


def birnn_forward(
    x: Tensor,
    lengths: Optional[Tensor],
    hx: Optional[Tensor],
    flat_weights: Sequence[Tensor],
    *,
    backend: str,
    **config,
) -> tuple[Tensor, Tensor]:
    """The layer stack on ``backend``: its fused ``stack_forward`` where it has one, else
    layer by layer through the recurrence seam. ``config`` is ``per_layer_forward``'s keyword
    arguments (num_layers, num_directions, bias, nonlinearity, dropout, training, batch_first).
    """
    stack_forward = backends.get(backend).stack_forward
    if stack_forward is not None:
        return stack_forward(x, lengths, hx, flat_weights, **config)
    return per_layer_forward(x, lengths, hx, flat_weights, backend=backend, **config)


def per_layer_forward(
    x: Tensor,
    lengths: Optional[Tensor],
    hx: Optional[Tensor],
    flat_weights: Sequence[Tensor],
    *,
    num_layers: int,
    num_directions: int,
    bias: bool,
    nonlinearity: str,
    dropout: float,
    training: bool,
    backend: str,
    batch_first: bool = False,
) -> tuple[Tensor, Tensor]:
    """Returns output [T, B, D*H] ([B, T, D*H] with ``batch_first``; zero past each row's
    length) and h_n [L*D, B, H]. ``lengths=None``: every row runs all T steps; ``hx=None``:
    zeros."""
    if batch_first:
        x = x.transpose(0, 1)
    T, B, _ = x.shape
    D = num_directions
    H = flat_weights[1].size(0)  # W_hh is [H, H]
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=x.device)
    if hx is None:
        hx = x.new_zeros(num_layers * D, B, H)
    layer_input = x
    final_states = []
    for layer in range(num_layers):
        W_ih, W_hh, b = layer_weights(flat_weights, layer, D, bias)
        flat_input = layer_input.reshape(T * B, -1)
        # One GEMM projects the input for both directions.
        Z = torch.addmm(b, flat_input, W_ih.t()) if b is not None else flat_input @ W_ih.t()
        h0 = hx[layer * D : (layer + 1) * D]
        Hs = ops.recurrence_forward(
            Z.view(T, B, D, H), W_hh, h0, lengths, nonlinearity, backend
        )
        final_states.append(final_hidden(Hs, lengths))
        layer_input = Hs.view(T, B, D * H)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    output = layer_input.transpose(0, 1) if batch_first else layer_input
    return output, torch.cat(final_states)
