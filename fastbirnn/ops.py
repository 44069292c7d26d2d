"""The recurrence as ``torch.library`` custom ops, with fake kernels and autograd.

This is the seam between the layer stack and the kernels of a backend that implements only
the recurrence (triton's Elman kernels; ``fastbirnn.functional.seam_stack``): the stack does
the input GEMM before and the weight GEMMs after (autograd differentiates those); the ops run
the sequential part on the backend named by ``backend``. Registering them as custom ops lets
``torch.compile`` (``fullgraph=True``) and ``torch.export`` treat each as one opaque node.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastbirnn import backends
from fastbirnn.reference import hidden_weight_grad


@torch.library.custom_op("fastbirnn::recurrence_forward", mutates_args=())
def recurrence_forward(
    Z: Tensor, W_hh: Tensor, h0: Tensor, lengths: Tensor, nonlinearity: str, backend: str
) -> Tensor:
    """Hs[T,B,D,H] from Z[T,B,D,H], W_hh[D,H,H], h0[D,B,H], lengths[B]."""
    return backends.get(backend).forward(
        Z.contiguous(), W_hh.contiguous(), h0.contiguous(), lengths, nonlinearity
    )


@recurrence_forward.register_fake
def _recurrence_forward_fake(Z, W_hh, h0, lengths, nonlinearity, backend):
    return torch.empty_like(Z, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastbirnn::recurrence_backward", mutates_args=())
def recurrence_backward(
    dHs: Tensor, Hs: Tensor, W_hh: Tensor, lengths: Tensor, nonlinearity: str, backend: str
) -> tuple[Tensor, Tensor]:
    """(dZ[T,B,D,H], dh0[D,B,H]): BPTT through the recurrence, time reversed."""
    return backends.get(backend).backward(
        dHs.contiguous(), Hs, W_hh.contiguous(), lengths, nonlinearity
    )


@recurrence_backward.register_fake
def _recurrence_backward_fake(dHs, Hs, W_hh, lengths, nonlinearity, backend):
    T, B, D, H = Hs.shape
    return torch.empty_like(Hs, memory_format=torch.contiguous_format), Hs.new_empty(D, B, H)


def _setup_context(ctx, inputs, output):
    Z, W_hh, h0, lengths, nonlinearity, backend = inputs
    # Only the outputs are saved: the activation's derivative is computed from them.
    ctx.save_for_backward(W_hh, h0, lengths, output)
    ctx.nonlinearity = nonlinearity
    ctx.backend = backend


def _backward(ctx, dHs):
    if torch.is_grad_enabled():
        # create_graph=True: the kernels' gradients are not differentiable, so refuse now
        # rather than hand back a graph that fails (or is wrong) one step later.
        raise RuntimeError(
            f"fastbirnn: double backward (create_graph=True) is not supported by backend "
            f"{ctx.backend!r}; backend='auto', 'cpp', 'reference' or 'torch' compute gradients "
            "of gradients"
        )
    W_hh, h0, lengths, Hs = ctx.saved_tensors
    dZ, dh0 = recurrence_backward(dHs, Hs, W_hh, lengths, ctx.nonlinearity, ctx.backend)
    dW_hh = hidden_weight_grad(dZ, Hs, h0, lengths) if ctx.needs_input_grad[1] else None
    return dZ, dW_hh, dh0, None, None, None


recurrence_forward.register_autograd(_backward, setup_context=_setup_context)
