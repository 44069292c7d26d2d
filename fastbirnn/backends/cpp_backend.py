"""The fused C++ CPU backend, ``'cpp'`` (``csrc/engine.cpp`` and its cells, such as
``csrc/cell_elman.h``, built into ``fastbirnn._C``).

The whole layer stack runs as one op, ``torch.ops.fastbirnn_cpp.stack``, with its autograd
node in C++ (one node for all layers and both directions) and fake kernels below, so
``torch.compile(fullgraph=True)`` keeps it as one opaque node. Training with dropout between
layers goes through the generic per-layer path and the recurrence seam instead (nn.RNN's
dropout masks are drawn per layer).
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
    ),
    auto_priority=0,
)
