"""The fused C++ CPU backend, ``'cpp'`` (``csrc/engine.cpp`` and its cells,
``csrc/cell_elman.h``, ``cell_lstm.h`` and ``cell_gru.h``, built into ``fastbirnn._C``).

The whole layer stack runs as one op, ``torch.ops.fastbirnn_cpp.stack``, with its autograd
node in C++ (one node for all layers and both directions) and fake kernels below, so
``torch.compile(fullgraph=True)`` keeps it as one opaque node. Training with dropout between
layers goes through the generic per-layer path and the recurrence seam instead (nn.RNN's
dropout masks are drawn per layer). The LSTM and GRU stacks are one op too,
``torch.ops.fastbirnn_cpp.gated_stack``; with dropout they run one layer at a time.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastbirnn import backends
from fastbirnn.backends import cpu_rule

try:
    from fastbirnn import _C
except Exception as _error:  # ImportError, or an OSError from a broken build
    _C = None
    _UNAVAILABLE: Optional[str] = (
        f"the C++ extension fastbirnn._C did not load ({_error}). Reinstall with a C++ "
        "compiler present: pip install --no-build-isolation -e ."
    )
else:
    _UNAVAILABLE = None

_DTYPES = (torch.float32, torch.float64)


def release_scratch() -> int:
    """Free the scratch buffers the C++ engine keeps for the calling thread between calls
    (those of 1 MiB and more, up to 128 MiB per thread); returns the bytes freed."""
    return 0 if _C is None else int(_C.release_scratch())

# Read once: a plain bool is traceable by Dynamo, a pybind call is not.
_HAS_BLAS = _C is not None and bool(_C.has_blas())


def unavailable_reason() -> Optional[str]:
    return _UNAVAILABLE


def unsupported_reason(x: Tensor) -> Optional[str]:
    if x.device.type != "cpu":
        return f"it runs on CPU tensors only, got a tensor on {x.device}"
    if x.dtype not in _DTYPES:
        return f"it supports float32 and float64 only, got {x.dtype}"
    return None


def preferred_for(x: Tensor, hidden_size: int, batch_size: int) -> bool:
    # Without the rest of the call (layers, directions, training) only a default: a
    # single-layer bidirectional training step of T = 1, judged by the grid's rule.
    return _HAS_BLAS and cpu_rule.prefer_cpp(cpu_rule.CallShape(
        batch_size, 1, hidden_size, 1, True, x.dtype, True, torch.get_num_threads()))


def preferred_for_call(x: Tensor, call: "cpu_rule.CallShape") -> bool:
    # Where the committed CPU grid shows the fused kernel at least as fast as nn.RNN
    # (fastbirnn/backends/cpu_rule.py); unsupported inputs never get here.
    return _HAS_BLAS and cpu_rule.prefer_cpp(call)


def _forward(Z, W_hh, h0, lengths, nonlinearity):
    return _C.recurrence_forward(Z, W_hh, h0, lengths, nonlinearity == "relu")


def _backward(dHs, Hs, W_hh, lengths, nonlinearity):
    return tuple(_C.recurrence_backward(dHs, Hs, W_hh, lengths, nonlinearity == "relu"))


def stack_forward(
    x,
    lengths,
    hx,
    flat_weights,
    *,
    num_layers,
    num_directions,
    bias,
    nonlinearity,
    dropout,
    training,
    batch_first=False,
):
    """fastbirnn.functional.birnn_forward as one fused op (same arguments and results)."""
    if dropout > 0 and training and num_layers > 1:
        from fastbirnn import functional

        return functional.per_layer_forward(
            x, lengths, hx, flat_weights, num_layers=num_layers,
            num_directions=num_directions, bias=bias, nonlinearity=nonlinearity,
            dropout=dropout, training=training, backend="cpp", batch_first=batch_first,
        )
    if (
        hx is None and lengths is None and _stack_eager is not None
        and not torch.compiler.is_compiling() and not torch._C._is_torch_function_mode_enabled()
    ):
        # The eager hot path: the same op through the dispatcher, minus the boxed Python call.
        return _stack_eager(
            x, flat_weights, num_layers, num_directions == 2, bias, nonlinearity == "relu",
            batch_first,
        )
    return _stack(
        x, hx, flat_weights, lengths, num_layers, num_directions == 2, bias,
        nonlinearity == "relu", batch_first,
    )


_stack_eager = None
if _C is not None:
    _stack = torch.ops.fastbirnn_cpp.stack.default
    _stack_eager = getattr(_C, "stack_eager", None)

    @torch.library.register_fake("fastbirnn_cpp::stack")
    def _stack_fake(x, hx, weights, lengths, num_layers, bidirectional, has_biases, relu,
                    batch_first):
        out, hn, _ = _stack_forward_impl_fake(
            x, hx, weights, lengths, num_layers, bidirectional, has_biases, relu, batch_first,
            False,
        )
        return out, hn

    @torch.library.register_fake("fastbirnn_cpp::stack_forward_impl")
    def _stack_forward_impl_fake(x, hx, weights, lengths, num_layers, bidirectional,
                                 has_biases, relu, batch_first, keep):
        D = 2 if bidirectional else 1
        H = weights[1].shape[0]
        B = x.shape[0] if batch_first else x.shape[1]
        out = x.new_empty(x.shape[0], x.shape[1], D * H)
        hn = x.new_empty(num_layers * D, B, H)
        mid = x.new_empty(num_layers - 1 if keep else 0, x.shape[0] * x.shape[1], D * H)
        return out, hn, mid

    @torch.library.register_fake("fastbirnn_cpp::stack_backward_impl")
    def _stack_backward_impl_fake(grad_out, grad_hn, x, hx, weights, lengths, out, mid,
                                  num_layers, bidirectional, has_biases, relu, batch_first,
                                  need_dx):
        D = 2 if bidirectional else 1
        H = weights[1].shape[0]
        B = x.shape[0] if batch_first else x.shape[1]
        dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
        dhx = x.new_empty(num_layers * D, B, H)
        return dx, dhx, [w.new_empty(w.shape) for w in weights]

    _gated = torch.ops.fastbirnn_cpp.gated_stack.default

    @torch.library.register_fake("fastbirnn_cpp::gated_stack")
    def _gated_stack_fake(cell, x, h0, c0, weights, lengths, num_layers, bidirectional,
                          has_biases, batch_first):
        return _gated_stack_forward_impl_fake(
            cell, x, h0, c0, weights, lengths, num_layers, bidirectional, has_biases,
            batch_first, False,
        )[:3]

    @torch.library.register_fake("fastbirnn_cpp::gated_stack_forward_impl")
    def _gated_stack_forward_impl_fake(cell, x, h0, c0, weights, lengths, num_layers,
                                       bidirectional, has_biases, batch_first, keep):
        D = 2 if bidirectional else 1
        gate_rows, H = weights[1].shape
        B = x.shape[0] if batch_first else x.shape[1]
        rows = x.shape[0] * x.shape[1]
        out = x.new_empty(x.shape[0], x.shape[1], D * H)
        hn = x.new_empty(num_layers * D, B, H)
        cn = x.new_empty(num_layers * D if cell == "lstm" else 0, B, H)
        kept = num_layers if keep else 0
        mid = x.new_empty(max(kept - 1, 0), rows, D * H)
        return out, hn, cn, mid, x.new_empty(kept, rows, D * gate_rows), x.new_empty(kept, rows, D * H)

    @torch.library.register_fake("fastbirnn_cpp::gated_stack_backward_impl")
    def _gated_stack_backward_impl_fake(cell, grad_out, grad_hn, grad_cn, x, h0, c0, weights,
                                        lengths, out, mid, gates, saved, num_layers,
                                        bidirectional, has_biases, batch_first, need_dx):
        D = 2 if bidirectional else 1
        H = weights[1].shape[1]
        B = x.shape[0] if batch_first else x.shape[1]
        dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
        dh0 = x.new_empty(num_layers * D, B, H)
        dc0 = x.new_empty(num_layers * D if cell == "lstm" else 0, B, H)
        return dx, dh0, dc0, [w.new_empty(w.shape) for w in weights]


def _gated_stack(cell: str):
    """The layer stack of a gated cell on the engine: the contract of ``cell_stacks``."""

    def stack(x, lengths, states, flat_weights, *, num_layers, num_directions, bias, dropout,
              training, batch_first=False, proj_size=0):
        if proj_size:
            raise RuntimeError(
                "fastbirnn backend 'cpp' has no LSTM with projections (proj_size > 0); use "
                "backend='auto' or 'torch', which run nn.LSTM for it"
            )
        h0, c0 = (None, None) if states is None else (states + (None,))[:2]
        if not (dropout > 0 and training and num_layers > 1):
            out, hn, cn = _gated(cell, x, h0, c0, flat_weights, lengths, num_layers,
                                 num_directions == 2, bias, batch_first)
            return out, ((hn, cn) if cell == "lstm" else (hn,))
        # Dropout between layers: one layer at a time, drawing the masks as nn.LSTM/nn.GRU do
        # (on time-major layer outputs, whatever batch_first says).
        config = (num_directions == 2, bias, False)
        if batch_first:
            x = x.transpose(0, 1)
        per_layer = len(flat_weights) // num_layers
        D = num_directions
        finals = []
        for layer in range(num_layers):
            rows = slice(layer * D, (layer + 1) * D)
            out, hn, cn = _gated(
                cell, x, None if h0 is None else h0[rows], None if c0 is None else c0[rows],
                flat_weights[layer * per_layer:(layer + 1) * per_layer], lengths, 1, *config,
            )
            finals.append((hn, cn))
            x = out
            if layer < num_layers - 1:
                x = torch.nn.functional.dropout(x, dropout, training=True)
        hn = torch.cat([f[0] for f in finals])
        if batch_first:
            x = x.transpose(0, 1)
        return x, ((hn, torch.cat([f[1] for f in finals])) if cell == "lstm" else (hn,))

    return stack


backends.register(
    backends.RecurrenceBackend(
        name="cpp",
        forward=_forward,
        backward=_backward,
        unavailable_reason=unavailable_reason,
        unsupported_reason=unsupported_reason,
        preferred_for=preferred_for,
        preferred_for_call=preferred_for_call,
        # Without the extension nothing is fused; unavailable_reason says why.
        stack_forward=stack_forward if _C is not None else None,
        cell_stacks={"lstm": _gated_stack("lstm"), "gru": _gated_stack("gru")},
    ),
    auto_priority=0,
)
