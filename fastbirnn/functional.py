"""The layer stack, written once for every cell and backend.

A backend runs a cell's layer stack as one function (``RecurrenceBackend.cell_stacks``):

    stack(x, lengths, states, flat_weights, *, num_layers, num_directions, bias,
          batch_first=False, **cell_config) -> (output, final states)

Tensors are padded: ``x`` is [T, B, I] (or [B, T, I] with ``batch_first``), ``lengths`` [B]
int64 on ``x``'s device or None (every row runs all T steps), ``states`` a tuple of
[L*D, B, H] tensors -- ``(h_0,)`` for RNN and GRU, ``(h_0, c_0)`` for LSTM -- or None (zeros).
``output`` is [T, B, D*H] (zero past each row's length; [B, T, D*H] with ``batch_first``), the
final states a tuple like ``states``. ``cell_config`` is the cell's own: ``nonlinearity`` for
the Elman cell, ``proj_size`` for the LSTM.

``run_stack`` adds dropout between layers, the same way for every backend: one call of the
stack per layer, with nn's masks in between. ``seam_stack`` is the Elman stack of a backend
whose kernels implement only the recurrence seam (``fastbirnn.ops``): the input GEMM, the
fused recurrence and h_n, layer by layer.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastbirnn import ops


def run_stack(
    stack: Callable,
    x: Tensor,
    lengths: Optional[Tensor],
    states: Optional[tuple[Tensor, ...]],
    flat_weights: Sequence[Tensor],
    *,
    num_layers: int,
    dropout: float,
    training: bool,
    batch_first: bool = False,
    **config,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``stack`` over all layers, with dropout between them when training as the nn classes
    do; ``config`` is the stack's other keyword arguments."""
    if not (dropout > 0 and training and num_layers > 1):
        return stack(x, lengths, states, flat_weights, num_layers=num_layers,
                     batch_first=batch_first, **config)
    # One layer at a time, drawing the masks as nn does: on time-major layer outputs,
    # whatever batch_first says.
    if batch_first:
        x = x.transpose(0, 1)
    per_layer = len(flat_weights) // num_layers
    D = config["num_directions"]
    finals = []
    for layer in range(num_layers):
        rows = slice(layer * D, (layer + 1) * D)
        x, final = stack(
            x, lengths, None if states is None else tuple(s[rows] for s in states),
            flat_weights[layer * per_layer:(layer + 1) * per_layer], num_layers=1,
            batch_first=False, **config,
        )
        finals.append(final)
        if layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    if batch_first:
        x = x.transpose(0, 1)
    return x, tuple(torch.cat(parts) for parts in zip(*finals))


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


def seam_stack(backend: str) -> Callable:
    """The Elman layer stack on ``backend``'s recurrence seam (``stack``'s contract)."""

    def stack(x, lengths, states, flat_weights, *, num_layers, num_directions, bias,
              batch_first=False, nonlinearity="tanh"):
        if batch_first:
            x = x.transpose(0, 1)
        T, B, _ = x.shape
        D = num_directions
        H = flat_weights[1].size(1)  # W_hh is [H, H]
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64, device=x.device)
        hx = x.new_zeros(num_layers * D, B, H) if states is None else states[0]
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
        output = layer_input.transpose(0, 1) if batch_first else layer_input
        return output, (torch.cat(final_states),)

    return stack
