"""Triton kernels for the forward recurrence (see ``fastbirnn.reference.recurrence_forward``).

Grid = (direction, batch tile): both directions run in the same launch, and each program
loops over time itself, so there is one launch per layer instead of one per step.

Layouts (all contiguous): Z, Hs [T, B, D, H]; W [D, H, H]; h0 [D, B, H]; lengths [B] int64.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _activation(z, ACT: tl.constexpr):
    # ACT: 0 = tanh, 1 = relu. tanh through exp(-2|z|) (no overflow, portable: the core
    # language has no tanh in every Triton version we support).
    if ACT == 0:
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(z < 0, -t, t)
    else:
        # Not tl.maximum: its default drops NaN (max(NaN, 0) = 0), nn.RNN's relu keeps it.
        # z < 0 is False for NaN, so NaN (and +inf) pass through; -inf gives 0.
        return tl.where(z < 0.0, 0.0, z)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # a is rounded to b's dtype (fp32 accumulation either way). UPCAST: the Triton
    # interpreter computes bf16 tl.dot wrongly (triton 3.9), so there the rounded operands
    # are multiplied in fp32, which is what bf16 tensor cores compute too.
    a = a.to(b.dtype)
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc=acc, input_precision=PRECISION)


@triton.jit
def _program_rows(B, BLOCK_B: tl.constexpr):
    """This program's direction d of D (grid axis 0) and its batch rows rb (axis 1), with
    their mask and 64-bit copy for offsets: the same in every recurrence kernel."""
    d = tl.program_id(0)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    return d, tl.num_programs(0), rb, rb < B, rb.to(tl.int64)


@triton.jit
def _time_step(s, d, T):
    # Forward direction visits t = s, reverse t = T-1-s. Arithmetic on the program id, not a
    # Python branch: the interpreter and the compiler agree on it. Steps t >= lengths[b] are
    # masked, so the reverse direction of a short row starts at its own lengths[b]-1.
    return s + d * (T - 1 - 2 * s)


@triton.jit
def forward_onchip_kernel(
    Z, W, H0, LENGTHS, HS,
    T, B, H,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """W_hh of this direction lives in registers for the whole sequence (H <= BLOCK_H)."""
    d, D, rb, mask_b, rb64 = _program_rows(B, BLOCK_B)
    rh = tl.arange(0, BLOCK_H)
    mask_h = rh < H
    mask = mask_b[:, None] & mask_h[None, :]

    # Transposed once: wt[k, j] = W[d, j, k], so a step is h @ wt. Padding is zero, so padded
    # hidden units stay at act(0) = 0 and never feed back into real ones.
    w_base = W + d.to(tl.int64) * H * H
    wt = tl.load(
        w_base + rh[None, :] * H + rh[:, None],
        mask=mask_h[:, None] & mask_h[None, :], other=0.0,
    )
    lengths = tl.load(LENGTHS + rb, mask=mask_b, other=0)
    # The state is carried in fp32; it is rounded to the weights' dtype only as a dot operand.
    h = tl.load(H0 + (d * B + rb64)[:, None] * H + rh[None, :], mask=mask, other=0.0)
    h = h.to(tl.float32)

    for s in range(T):
        t = _time_step(s, d, T)
        offs = ((t * B + rb64) * D + d)[:, None] * H + rh[None, :]
        z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        acc = _dot(h, wt, z, PRECISION, UPCAST)
        h_new = _activation(acc, ACT)
        active = (t < lengths)[:, None]
        h = tl.where(active, h_new, h)
        tl.store(HS + offs, tl.where(active, h_new, 0.0).to(HS.dtype.element_ty), mask=mask)


@triton.jit
def forward_streamed_kernel(
    Z, W, H0, LENGTHS, HS, STATE,
    T, B, H,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Any H: W_hh is streamed from L2 in [BLOCK_K, BLOCK_N] tiles at every step.

    Each program still owns whole rows (its batch tile, all H units), so no other program
    reads its state: a CTA barrier between steps is all the synchronisation needed. The
    state lives in STATE [2, D, B, H] fp32 (double buffer: step s reads s % 2, writes the
    other), loaded with .cg (L2) so no stale L1 line is read after the barrier.
    """
    d, D, rb, mask_b, rb64 = _program_rows(B, BLOCK_B)
    lengths = tl.load(LENGTHS + rb, mask=mask_b, other=0)
    w_base = W + d.to(tl.int64) * H * H
    buffer_size = D.to(tl.int64) * B * H
    state_rows = (d * B + rb64)[:, None] * H  # [BLOCK_B, 1] row offsets into one buffer

    for n0 in range(0, H, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        m = mask_b[:, None] & (rn < H)[None, :]
        h = tl.load(H0 + state_rows + rn[None, :], mask=m, other=0.0)
        tl.store(STATE + state_rows + rn[None, :], h.to(tl.float32), mask=m)
    tl.debug_barrier()

    for s in range(T):
        t = _time_step(s, d, T)
        src = STATE + (s % 2) * buffer_size + state_rows
        dst = STATE + ((s + 1) % 2) * buffer_size + state_rows
        rows = ((t * B + rb64) * D + d)[:, None] * H
        active = (t < lengths)[:, None]
        for n0 in range(0, H, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            mask_n = rn < H
            m = mask_b[:, None] & mask_n[None, :]
            acc = tl.load(Z + rows + rn[None, :], mask=m, other=0.0).to(tl.float32)
            for k0 in range(0, H, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                mask_k = rk < H
                hk = tl.load(src + rk[None, :], mask=mask_b[:, None] & mask_k[None, :],
                             other=0.0, cache_modifier=".cg")
                wt = tl.load(w_base + rn[None, :] * H + rk[:, None],
                             mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = _dot(hk, wt, acc, PRECISION, UPCAST)
            h_new = _activation(acc, ACT)
            h_old = tl.load(src + rn[None, :], mask=m, other=0.0, cache_modifier=".cg")
            tl.store(dst + rn[None, :], tl.where(active, h_new, h_old), mask=m)
            tl.store(HS + rows + rn[None, :],
                     tl.where(active, h_new, 0.0).to(HS.dtype.element_ty), mask=m)
        # Every unit of step s must be written before any is read at step s + 1.
        tl.debug_barrier()
