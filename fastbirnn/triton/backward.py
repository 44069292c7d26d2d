"""Triton kernels for BPTT through the recurrence (``fastbirnn.reference.recurrence_backward``).

Grid = (direction, batch tile), time loop inside, visiting steps in the reverse of the
forward order. Per step:  g = dHs_t + carry;  dz = g * act'(h_t) (from the saved output, no
pre-activations needed);  carry = dz @ W_hh  (rows past their length keep their carry).
Each program owns whole rows and accumulates in a fixed order: results are deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastbirnn.triton.forward import _dot, _program_rows


@triton.jit
def _activation_backward(g, h, ACT: tl.constexpr):
    # dz = g * act'(z), from h = act(z), with autograd's exact non-finite semantics:
    # tanh_backward is g * (1 - h^2); relu's is threshold_backward, (h <= 0) ? 0 : g, a
    # select, not a product: a NaN h passes g through, an inf g at h <= 0 gives 0 (not NaN).
    if ACT == 0:
        return g * (1.0 - h * h)
    else:
        return tl.where(h <= 0.0, 0.0, g)


@triton.jit
def _backward_time_step(s, d, T):
    # The reverse of the forward visiting order: forward direction t = T-1-s, reverse t = s.
    return (T - 1 - s) - d * (T - 1 - 2 * s)


@triton.jit
def backward_onchip_kernel(
    DHS, HS, W, LENGTHS, DZ, DH0,
    T, B, H,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """W_hh of this direction in registers for the whole sequence (H <= BLOCK_H)."""
    d, D, rb, mask_b, rb64 = _program_rows(B, BLOCK_B)
    rh = tl.arange(0, BLOCK_H)
    mask_h = rh < H
    mask = mask_b[:, None] & mask_h[None, :]

    # w[j, k] = W[d, j, k]: the carry is dz @ W (not transposed, unlike the forward).
    w = tl.load(
        W + d.to(tl.int64) * H * H + rh[:, None] * H + rh[None, :],
        mask=mask_h[:, None] & mask_h[None, :], other=0.0,
    )
    lengths = tl.load(LENGTHS + rb, mask=mask_b, other=0)
    carry = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)

    for s in range(T):
        t = _backward_time_step(s, d, T)
        offs = ((t * B + rb64) * D + d)[:, None] * H + rh[None, :]
        g = tl.load(DHS + offs, mask=mask, other=0.0).to(tl.float32) + carry
        h = tl.load(HS + offs, mask=mask, other=0.0).to(tl.float32)
        active = (t < lengths)[:, None]
        dz = tl.where(active, _activation_backward(g, h, ACT), 0.0)
        tl.store(DZ + offs, dz.to(DZ.dtype.element_ty), mask=mask)
        step = _dot(dz, w, None, PRECISION, UPCAST)
        carry = tl.where(active, step, carry)

    tl.store(DH0 + (d * B + rb64)[:, None] * H + rh[None, :],
             carry.to(DH0.dtype.element_ty), mask=mask)


@triton.jit
def backward_streamed_kernel(
    DHS, HS, W, LENGTHS, DZ, CARRY,
    T, B, H,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Any H: W_hh streamed in tiles each step; CARRY [D, B, H] fp32 (zeroed) holds the carry.

    Two phases per step, each closed by a CTA barrier: (1) dz for every hidden unit, written
    to DZ; (2) carry = dz @ W, reading dz back from DZ. Only this program touches its rows.
    """
    d, D, rb, mask_b, rb64 = _program_rows(B, BLOCK_B)
    lengths = tl.load(LENGTHS + rb, mask=mask_b, other=0)
    w_base = W + d.to(tl.int64) * H * H
    carry_ptr = CARRY + (d * B + rb64)[:, None] * H

    for s in range(T):
        t = _backward_time_step(s, d, T)
        rows = ((t * B + rb64) * D + d)[:, None] * H
        active = (t < lengths)[:, None]
        for j0 in range(0, H, BLOCK_N):
            rj = j0 + tl.arange(0, BLOCK_N)
            m = mask_b[:, None] & (rj < H)[None, :]
            g = tl.load(DHS + rows + rj[None, :], mask=m, other=0.0).to(tl.float32)
            g += tl.load(carry_ptr + rj[None, :], mask=m, other=0.0, cache_modifier=".cg")
            h = tl.load(HS + rows + rj[None, :], mask=m, other=0.0).to(tl.float32)
            dz = tl.where(active, _activation_backward(g, h, ACT), 0.0)
            tl.store(DZ + rows + rj[None, :], dz.to(DZ.dtype.element_ty), mask=m)
        tl.debug_barrier()
        for n0 in range(0, H, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            mask_n = rn < H
            m = mask_b[:, None] & mask_n[None, :]
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                mask_k = rk < H
                dzk = tl.load(DZ + rows + rk[None, :], mask=mask_b[:, None] & mask_k[None, :],
                              other=0.0, cache_modifier=".cg")
                w = tl.load(w_base + rk[:, None] * H + rn[None, :],
                            mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = _dot(dzk, w, acc, PRECISION, UPCAST)
            old = tl.load(carry_ptr + rn[None, :], mask=m, other=0.0, cache_modifier=".cg")
            tl.store(carry_ptr + rn[None, :], tl.where(active, acc, old), mask=m)
        tl.debug_barrier()
