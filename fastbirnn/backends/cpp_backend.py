"""The fused C++ CPU backend, ``'cpp'`` (``csrc/``, built into ``fastbirnn._C``).

Every cell's whole layer stack runs as one op, ``torch.ops.fastbirnn_cpp.stack``, with its
autograd node in C++ (one node for all layers and both directions) and fake kernels below, so
``torch.compile(fullgraph=True)`` keeps it as one opaque node. Dropout between layers runs the
op once per layer (``fastbirnn.functional.run_stack``). Gradients of gradients
(``create_graph=True``) come from recomputing the stack with the pure-PyTorch reference, which
the node calls under grad mode (``_differentiable_backward``).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from fastbirnn import backends, reference
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

# bfloat16 runs the fp32 engine with bf16-rounded product operands (csrc/bf16.h).
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def release_scratch() -> int:
    """Free the scratch buffers the C++ engine keeps for the calling thread between calls
    (those of 1 MiB and more, within the process-wide cap), and the memory of dropped results
    kept for the next call's; returns the bytes freed."""
    return 0 if _C is None else int(_C.release_scratch())


def kept_scratch_bytes() -> int:
    """The bytes of scratch buffers all threads keep together between calls."""
    return 0 if _C is None else int(_C.kept_scratch_bytes())


def idle_result_bytes() -> int:
    """The bytes of results (outputs, gradients; 128 KiB and more) that their users dropped,
    kept for the next call's results so that their pages stay mapped."""
    return 0 if _C is None else int(_C.idle_result_bytes())


def set_scratch_limit(nbytes: int) -> int:
    """Cap the scratch buffers all threads keep together (default 256 MiB, or
    ``FASTBIRNN_SCRATCH_MIB`` read at load); the caches of the threads that called least
    recently are freed to meet it. The memory of dropped results kept for reuse has the same
    cap, apart (the longest idle freed first). 0 keeps nothing. Returns the previous cap."""
    if _C is None:
        raise RuntimeError(f"fastbirnn: the cpp backend is not available: {_UNAVAILABLE}")
    return int(_C.set_scratch_limit(int(nbytes)))

# Read once: a plain bool is traceable by Dynamo, a pybind call is not.
_HAS_BLAS = _C is not None and bool(_C.has_blas())
_HAS_BF16_TILES = _C is not None and bool(_C.has_bf16_tiles())


def has_bf16_tiles() -> bool:
    """Whether bf16 calls run their products on AVX512-BF16 register tiles here (csrc/
    tiles_bf16.h); else as fp32 products on bf16-rounded operands, the same products summed
    in another order. Off where FASTBIRNN_ISA lowers the level below 'avx512'."""
    return _HAS_BF16_TILES

# The engine's instruction-set level, decided once when _C loads (csrc/simd.h): the best of
# 'avx512', 'avx2' (AVX2 + FMA), 'scalar' that the CPU and libtorch's SLEEF support, lowered
# by the environment variable FASTBIRNN_ISA (read at load; it can only lower it, so CI and
# benchmarks can run the AVX2 path on an AVX-512 machine). An unknown value is an error here,
# at import, rather than a silently different path.
_CPU_ISA = None if _C is None else str(_C.cpu_isa())
if _C is not None and _C.cpu_isa_error():
    raise ValueError(f"fastbirnn: {_C.cpu_isa_error()}")
if _C is not None and _C.huge_pages_error():
    raise ValueError(f"fastbirnn: {_C.huge_pages_error()}")


def cpu_isa() -> Optional[str]:
    """The C++ engine's instruction-set level: ``'avx512'``, ``'avx2'`` or ``'scalar'`` (the
    CPU's best, lowered by ``FASTBIRNN_ISA``), or None where the extension did not load."""
    return _CPU_ISA


def unavailable_reason() -> Optional[str]:
    return _UNAVAILABLE


def unsupported_reason(x: Tensor) -> Optional[str]:
    if x.device.type != "cpu":
        return f"it runs on CPU tensors only, got a tensor on {x.device}"
    if x.dtype not in _DTYPES:
        return f"it supports float32, float64 and bfloat16 only, got {x.dtype}"
    return None


def preferred_for(x: Tensor, call: "cpu_rule.CallShape") -> bool:
    # Where the committed CPU grid shows the fused kernel at least as fast as the nn class
    # (fastbirnn/backends/cpu_rule.py); unsupported inputs never get here.
    return _HAS_BLAS and _fits_32bit_blas(x, call) and cpu_rule.prefer_cpp(call)


_INT32_MAX = 2**31 - 1


def _fits_32bit_blas(x: Tensor, call: "cpu_rule.CallShape") -> bool:
    """Whether the engine's sizes and leading dimensions fit 32-bit BLAS (csrc/checks.h
    refuses the call otherwise), counted as for the widest cell (4 gates) laid out batch
    first, so that 'auto' never picks a call the engine would refuse."""
    directions = 2 if call.bidirectional else 1
    gate_columns = 4 * directions * call.hidden
    return (call.seq * call.batch <= _INT32_MAX and x.shape[-1] <= _INT32_MAX
            and call.seq * gate_columns <= _INT32_MAX)


def _stack(cell, x, lengths, states, flat_weights, *, num_layers, num_directions, bias,
           batch_first=False, nonlinearity="tanh", proj_size=0):
    """The layer stack of ``cell`` on the engine (``functional.run_stack``'s contract)."""
    if proj_size:
        raise RuntimeError(
            "fastbirnn backend 'cpp' has no LSTM with projections (proj_size > 0); use "
            "backend='auto' or 'torch', which run nn.LSTM for it"
        )
    name = cell if cell != "rnn" else "rnn_relu" if nonlinearity == "relu" else "rnn_tanh"
    h0, c0 = (None, None) if states is None else (states + (None,))[:2]
    if (
        h0 is None and c0 is None and lengths is None and _stack_eager is not None
        and not torch.compiler.is_compiling()
        and not torch._C._is_torch_function_mode_enabled()
    ):
        # The eager hot path: the same op through the dispatcher, minus the boxed call.
        out, hn, cn = _stack_eager(name, x, flat_weights, num_layers, num_directions == 2,
                                   bias, batch_first)
    else:
        out, hn, cn = _stack_op(name, x, h0, c0, flat_weights, lengths, num_layers,
                                num_directions == 2, bias, batch_first)
    return out, ((hn, cn) if cell == "lstm" else (hn,))


def _differentiable_backward(cell, inputs, grads, num_layers, bidirectional, has_biases,
                             batch_first):
    """The stack op's gradients for create_graph=True, themselves differentiable: the same
    stack recomputed with the reference (plain autograd ops) from the saved inputs, and its
    gradients taken with create_graph=True, so second-order terms are exact. One gradient
    per input (x, h0, c0, then the weights), None where there is none."""
    x, h0, c0, *weights, lengths = inputs
    lstm = cell == "lstm"
    if lstm and (h0 is None) != (c0 is None):
        h0 = torch.zeros_like(c0) if h0 is None else h0
        c0 = torch.zeros_like(h0) if c0 is None else c0
    states = None if h0 is None else ((h0, c0) if lstm else (h0,))
    wrt = [(i, t) for i, t in enumerate((x, h0, c0, *weights))
           if t is not None and t.requires_grad]
    result = [None] * (3 + len(weights))
    with torch.enable_grad():
        config = dict(num_layers=num_layers, num_directions=2 if bidirectional else 1,
                      bias=has_biases, batch_first=batch_first)
        stack_cell = cell
        if cell.startswith("rnn_"):
            stack_cell, config["nonlinearity"] = "rnn", cell[len("rnn_"):]
        out, finals = reference.STACKS[stack_cell](x, lengths, states, weights, **config)
        pairs = [(o, g) for o, g in zip((out, *finals), grads) if g is not None]
        if not wrt or not pairs:
            return result
        found = torch.autograd.grad([o for o, _ in pairs], [t for _, t in wrt],
                                    [g for _, g in pairs], create_graph=True, allow_unused=True)
    for (i, _), grad in zip(wrt, found):
        result[i] = grad
    return result


_stack_eager = None
if _C is not None:
    _stack_op = torch.ops.fastbirnn_cpp.stack.default
    _stack_eager = _C.stack_eager
    _C.set_differentiable_backward(_differentiable_backward)

    @torch.library.register_fake("fastbirnn_cpp::stack")
    def _stack_fake(cell, x, h0, c0, weights, lengths, num_layers, bidirectional, has_biases,
                    batch_first):
        return _stack_forward_impl_fake(
            cell, x, h0, c0, weights, lengths, num_layers, bidirectional, has_biases,
            batch_first, False,
        )[:3]

    @torch.library.register_fake("fastbirnn_cpp::stack_forward_impl")
    def _stack_forward_impl_fake(cell, x, h0, c0, weights, lengths, num_layers, bidirectional,
                                 has_biases, batch_first, keep):
        D = 2 if bidirectional else 1
        gate_rows, H = weights[1].shape
        B = x.shape[0] if batch_first else x.shape[1]
        rows = x.shape[0] * x.shape[1]
        out = x.new_empty(x.shape[0], x.shape[1], D * H)
        hn = x.new_empty(num_layers * D, B, H)
        cn = x.new_empty(num_layers * D if cell == "lstm" else 0, B, H)
        # What backward keeps is fp32 for a bf16 call (the engine's state and gates).
        kept_dtype = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
        mid = x.new_empty(num_layers - 1 if keep else 0, rows, D * H, dtype=kept_dtype)
        # The gated cells keep their gates and saved values; the Elman cell only its outputs.
        kept = num_layers if keep and not cell.startswith("rnn") else 0
        gates = x.new_empty(kept, rows, D * gate_rows, dtype=kept_dtype)
        return out, hn, cn, mid, gates, x.new_empty(kept, rows, D * H, dtype=kept_dtype)

    @torch.library.register_fake("fastbirnn_cpp::stack_backward_impl")
    def _stack_backward_impl_fake(cell, grad_out, grad_hn, grad_cn, x, h0, c0, weights,
                                  lengths, out, mid, gates, saved, num_layers, bidirectional,
                                  has_biases, batch_first, need_dx):
        D = 2 if bidirectional else 1
        H = weights[1].shape[1]
        B = x.shape[0] if batch_first else x.shape[1]
        dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
        dh0 = x.new_empty(num_layers * D, B, H)
        dc0 = x.new_empty(num_layers * D if cell == "lstm" else 0, B, H)
        return dx, dh0, dc0, [w.new_empty(w.shape) for w in weights]


backends.register(
    backends.RecurrenceBackend(
        name="cpp",
        # partials of a module-level function: a module's call cache holds them and pickles.
        cell_stacks={cell: functools.partial(_stack, cell) for cell in ("rnn", "lstm", "gru")},
        unavailable_reason=unavailable_reason,
        unsupported_reason=unsupported_reason,
        preferred_for=preferred_for,
    ),
    auto_priority=0,
)
