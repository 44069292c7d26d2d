"""Triton kernels of the gated cells' recurrence (LSTM, GRU): forward and BPTT.

The engine of the Elman kernels (``forward.py``, ``backward.py``: grid = (direction, batch
tile), time loop inside, both directions in one launch, lengths, the same time-step and dot
helpers) with G gate blocks of W_hh instead of one; the pointwise cell is ``cells.py``, picked
by the ``GATES`` constexpr (4: LSTM, 3: GRU). On-chip: all G blocks of this direction's W_hh
in registers for the whole sequence. Streamed: any H, W_hh read in tiles every step, the
state in global scratch (each program owns whole batch rows: a CTA barrier per step).

Layouts (contiguous): Z [T, B, D, G*H] (each direction's gates in nn's order, b_ih and b_hh
folded in except GRU's b_hn); W [D, G*H, H]; BHN [D, H] (GRU's b_hn, zeros without bias);
H0, C0 [D, B, H]; HS [T, B, D, H]; SAVED [T, B, D, 5, H] fp32 (``cells``: four values and the
previous state, written when SAVE); DZ [T, B, D, G*H]; DHN [T, B, D, H] (GRU: the gradient of
n's hidden part, r * dn, which W_hn and b_hn get instead of dn). The other cell's arguments
(LSTM: DHN; GRU: C0, CN, DCN, DC0, CSTATE, DC) are never touched, except BHN, which the LSTM
reads (a [D, H] tensor of zeros will do) but does not use.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastbirnn.triton.backward import _backward_time_step
from fastbirnn.triton.cells import cell_backward, cell_forward
from fastbirnn.triton.forward import _dot, _program_rows, _time_step


@triton.jit
def _gate_tile(W_dir, gate, H, rows, cols, mask):
    """W_dir[gate*H + rows, cols]: one gate's block of W_hh; ``rows`` and ``cols`` come
    broadcast-shaped, so the caller picks the orientation (forward: transposed)."""
    return tl.load(W_dir + (gate * H + rows) * H + cols, mask=mask, other=0.0)


@triton.jit
def _gate_inputs(z, H, mask, bhn, GATES: tl.constexpr):
    """Each gate accumulator's starting value: its input projection. GRU: n's hidden part
    starts from b_hn and its input part comes back fourth, outside the dot."""
    a0 = tl.load(z, mask=mask, other=0.0).to(tl.float32)
    a1 = tl.load(z + H, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(z + 2 * H, mask=mask, other=0.0).to(tl.float32)
    if GATES == 4:
        return a0, a1, x2, tl.load(z + 3 * H, mask=mask, other=0.0).to(tl.float32)
    else:
        return a0, a1, tl.zeros_like(x2) + bhn, x2


@triton.jit
def _store_saved(p, H, mask, s0, s1, s2, s3, s4):
    tl.store(p, s0, mask=mask)
    tl.store(p + H, s1, mask=mask)
    tl.store(p + 2 * H, s2, mask=mask)
    tl.store(p + 3 * H, s3, mask=mask)
    tl.store(p + 4 * H, s4, mask=mask)


@triton.jit
def _load_saved(p, H, mask):
    return (tl.load(p, mask=mask, other=0.0), tl.load(p + H, mask=mask, other=0.0),
            tl.load(p + 2 * H, mask=mask, other=0.0), tl.load(p + 3 * H, mask=mask, other=0.0),
            tl.load(p + 4 * H, mask=mask, other=0.0))


@triton.jit
def _store_gate_grads(dz, dhn, H, mask, active, g0, g1, g2, g3, g2_hidden,
                      GATES: tl.constexpr):
    """The gates' gradients of one step, zero past each row's length."""
    ty = dz.dtype.element_ty
    tl.store(dz, tl.where(active, g0, 0.0).to(ty), mask=mask)
    tl.store(dz + H, tl.where(active, g1, 0.0).to(ty), mask=mask)
    tl.store(dz + 2 * H, tl.where(active, g2, 0.0).to(ty), mask=mask)
    if GATES == 4:
        tl.store(dz + 3 * H, tl.where(active, g3, 0.0).to(ty), mask=mask)
    else:
        tl.store(dhn, tl.where(active, g2_hidden, 0.0).to(dhn.dtype.element_ty), mask=mask)


@triton.jit
def gated_forward_onchip_kernel(
    Z, W, BHN, H0, C0, LENGTHS, HS, SAVED, CN,
    T, B, H,
    GATES: tl.constexpr, SAVE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """All G gate blocks of W_hh in registers for the whole sequence (H <= BLOCK_H)."""
    d, D, rb, mask_b, rb64 = _program_rows(B, BLOCK_B)
    rh = tl.arange(0, BLOCK_H)
    mask_h = rh < H
    mask = mask_b[:, None] & mask_h[None, :]
    mask_w = mask_h[:, None] & mask_h[None, :]

    # Transposed once (w_k[i, j] = W[d, k*H + j, i]): a gate is h @ w_k. Zero padding keeps
    # padded units at h = c = 0 (LSTM: c = f*0 + i*tanh(0); GRU: h = (1-z)*tanh(0) + z*0).
    W_dir = W + d.to(tl.int64) * GATES * H * H
    w0 = _gate_tile(W_dir, 0, H, rh[None, :], rh[:, None], mask_w)
    w1 = _gate_tile(W_dir, 1, H, rh[None, :], rh[:, None], mask_w)
    w2 = _gate_tile(W_dir, 2, H, rh[None, :], rh[:, None], mask_w)
    if GATES == 4:
        w3 = _gate_tile(W_dir, 3, H, rh[None, :], rh[:, None], mask_w)
    bhn = tl.load(BHN + d * H + rh, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    lengths = tl.load(LENGTHS + rb, mask=mask_b, other=0)
    state = (d * B + rb64)[:, None] * H + rh[None, :]
    # fp32 state; rounded to the weights' dtype only as a dot operand.
    h = tl.load(H0 + state, mask=mask, other=0.0).to(tl.float32)
    c = h  # GRU: no cell state (not carried through the loop)
    if GATES == 4:
        c = tl.load(C0 + state, mask=mask, other=0.0).to(tl.float32)

    for s in range(T):
        t = _time_step(s, d, T)
        row = ((t * B + rb64) * D + d)[:, None]
        a0, a1, a2, a3 = _gate_inputs(Z + row * (GATES * H) + rh[None, :], H, mask, bhn, GATES)
        a0 = _dot(h, w0, a0, PRECISION, UPCAST)
        a1 = _dot(h, w1, a1, PRECISION, UPCAST)
        a2 = _dot(h, w2, a2, PRECISION, UPCAST)
        if GATES == 4:
            a3 = _dot(h, w3, a3, PRECISION, UPCAST)
        h_new, c_new, s0, s1, s2, s3, s4 = cell_forward(a0, a1, a2, a3, h, c, GATES)
        if SAVE:
            _store_saved(SAVED + row * (5 * H) + rh[None, :], H, mask, s0, s1, s2, s3, s4)
        active = (t < lengths)[:, None]
        h = tl.where(active, h_new, h)
        if GATES == 4:
            c = tl.where(active, c_new, c)
        tl.store(HS + row * H + rh[None, :], tl.where(active, h_new, 0.0).to(HS.dtype.element_ty),
                 mask=mask)
    if GATES == 4:
        tl.store(CN + state, c.to(CN.dtype.element_ty), mask=mask)


@triton.jit
def gated_forward_streamed_kernel(
    Z, W, BHN, H0, C0, LENGTHS, HS, SAVED, STATE, CSTATE,
    T, B, H,
    GATES: tl.constexpr, SAVE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Any H: the G gate blocks of W_hh streamed from L2 in [BLOCK_K, BLOCK_N] tiles.

    h in STATE [2, D, B, H] fp32 (double buffer, as the Elman streamed kernel); the LSTM's c
    in CSTATE [D, B, H] fp32, in place: unit j's c is read and written only by unit j's step.
    The final c is left in CSTATE.
    """
    d, D, rb, mask_b, rb64 = _program_rows(B, BLOCK_B)
    lengths = tl.load(LENGTHS + rb, mask=mask_b, other=0)
    W_dir = W + d.to(tl.int64) * GATES * H * H
    buffer_size = D.to(tl.int64) * B * H
    state_rows = (d * B + rb64)[:, None] * H

    for n0 in range(0, H, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        m = mask_b[:, None] & (rn < H)[None, :]
        h = tl.load(H0 + state_rows + rn[None, :], mask=m, other=0.0)
        tl.store(STATE + state_rows + rn[None, :], h.to(tl.float32), mask=m)
        if GATES == 4:
            c = tl.load(C0 + state_rows + rn[None, :], mask=m, other=0.0)
            tl.store(CSTATE + state_rows + rn[None, :], c.to(tl.float32), mask=m)
    tl.debug_barrier()

    for s in range(T):
        t = _time_step(s, d, T)
        src = STATE + (s % 2) * buffer_size + state_rows
        dst = STATE + ((s + 1) % 2) * buffer_size + state_rows
        row = ((t * B + rb64) * D + d)[:, None]
        active = (t < lengths)[:, None]
        for n0 in range(0, H, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            mask_n = rn < H
            m = mask_b[:, None] & mask_n[None, :]
            bhn = tl.load(BHN + d * H + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            a0, a1, a2, a3 = _gate_inputs(Z + row * (GATES * H) + rn[None, :], H, m, bhn, GATES)
            for k0 in range(0, H, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                mask_k = rk < H
                mask_w = mask_k[:, None] & mask_n[None, :]
                hk = tl.load(src + rk[None, :], mask=mask_b[:, None] & mask_k[None, :],
                             other=0.0, cache_modifier=".cg")
                a0 = _dot(hk, _gate_tile(W_dir, 0, H, rn[None, :], rk[:, None], mask_w), a0,
                          PRECISION, UPCAST)
                a1 = _dot(hk, _gate_tile(W_dir, 1, H, rn[None, :], rk[:, None], mask_w), a1,
                          PRECISION, UPCAST)
                a2 = _dot(hk, _gate_tile(W_dir, 2, H, rn[None, :], rk[:, None], mask_w), a2,
                          PRECISION, UPCAST)
                if GATES == 4:
                    a3 = _dot(hk, _gate_tile(W_dir, 3, H, rn[None, :], rk[:, None], mask_w),
                              a3, PRECISION, UPCAST)
            h_old = tl.load(src + rn[None, :], mask=m, other=0.0, cache_modifier=".cg")
            c_old = h_old  # GRU: unused
            if GATES == 4:
                c_old = tl.load(CSTATE + state_rows + rn[None, :], mask=m, other=0.0)
            h_new, c_new, s0, s1, s2, s3, s4 = cell_forward(a0, a1, a2, a3, h_old, c_old, GATES)
            if SAVE:
                _store_saved(SAVED + row * (5 * H) + rn[None, :], H, m, s0, s1, s2, s3, s4)
            tl.store(dst + rn[None, :], tl.where(active, h_new, h_old), mask=m)
            if GATES == 4:
                tl.store(CSTATE + state_rows + rn[None, :], tl.where(active, c_new, c_old),
                         mask=m)
            tl.store(HS + row * H + rn[None, :],
                     tl.where(active, h_new, 0.0).to(HS.dtype.element_ty), mask=m)
        # Every unit of step s must be written before any is read at step s + 1.
        tl.debug_barrier()


@triton.jit
def gated_backward_onchip_kernel(
    DHS, DCN, SAVED, W, LENGTHS, DZ, DHN, DH0, DC0,
    T, B, H,
    GATES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """W_hh's G gate blocks in registers. Per step (reverse of the forward order): the cell's
    backward from dh = dHs_t + carry (and the LSTM's dc), then carry = pointwise part +
    sum_k dgate_k @ W_k. The carry starts at 0 (h_n's gradient arrives through dHs), dc at
    dc_n's gradient."""
    d, D, rb, mask_b, rb64 = _program_rows(B, BLOCK_B)
    rh = tl.arange(0, BLOCK_H)
    mask_h = rh < H
    mask = mask_b[:, None] & mask_h[None, :]
    mask_w = mask_h[:, None] & mask_h[None, :]

    # w_k[j, i] = W[d, k*H + j, i]: the carry is dgate_k @ w_k (not transposed).
    W_dir = W + d.to(tl.int64) * GATES * H * H
    w0 = _gate_tile(W_dir, 0, H, rh[:, None], rh[None, :], mask_w)
    w1 = _gate_tile(W_dir, 1, H, rh[:, None], rh[None, :], mask_w)
    w2 = _gate_tile(W_dir, 2, H, rh[:, None], rh[None, :], mask_w)
    if GATES == 4:
        w3 = _gate_tile(W_dir, 3, H, rh[:, None], rh[None, :], mask_w)
    lengths = tl.load(LENGTHS + rb, mask=mask_b, other=0)
    state = (d * B + rb64)[:, None] * H + rh[None, :]
    carry = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    dc = carry  # GRU: no cell state (not carried through the loop)
    if GATES == 4:
        dc = tl.load(DCN + state, mask=mask, other=0.0).to(tl.float32)

    for s in range(T):
        t = _backward_time_step(s, d, T)
        row = ((t * B + rb64) * D + d)[:, None]
        dh = tl.load(DHS + row * H + rh[None, :], mask=mask, other=0.0).to(tl.float32) + carry
        s0, s1, s2, s3, s4 = _load_saved(SAVED + row * (5 * H) + rh[None, :], H, mask)
        g0, g1, g2, g3, g2_hidden, direct, dc_prev = cell_backward(dh, dc, s0, s1, s2, s3, s4,
                                                                   GATES)
        active = (t < lengths)[:, None]
        _store_gate_grads(DZ + row * (GATES * H) + rh[None, :], DHN + row * H + rh[None, :], H,
                          mask, active, g0, g1, g2, g3, g2_hidden, GATES)
        # Rows are independent in a dot: an inactive row's values are dropped by the where.
        step = _dot(g0, w0, direct, PRECISION, UPCAST)
        step = _dot(g1, w1, step, PRECISION, UPCAST)
        step = _dot(g2_hidden, w2, step, PRECISION, UPCAST)
        if GATES == 4:
            step = _dot(g3, w3, step, PRECISION, UPCAST)
        carry = tl.where(active, step, carry)
        if GATES == 4:
            dc = tl.where(active, dc_prev, dc)

    tl.store(DH0 + state, carry.to(DH0.dtype.element_ty), mask=mask)
    if GATES == 4:
        tl.store(DC0 + state, dc.to(DC0.dtype.element_ty), mask=mask)


@triton.jit
def gated_backward_streamed_kernel(
    DHS, SAVED, W, LENGTHS, DZ, DHN, CARRY, DC,
    T, B, H,
    GATES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Any H. CARRY [D, B, H] fp32 (zeroed): dh's carry; DC [D, B, H] fp32: the LSTM's dc,
    starting as dc_n's gradient; both hold dh0 / dc0 at the end. Two phases per step, each
    closed by a CTA barrier: (1) pointwise, per hidden block: the gates' gradients to DZ/DHN,
    dc updated, the carry replaced by its pointwise part (GRU: z * dh); (2) carry +=
    sum_k dgate_k @ W_k, reading the gradients back from DZ/DHN."""
    d, D, rb, mask_b, rb64 = _program_rows(B, BLOCK_B)
    lengths = tl.load(LENGTHS + rb, mask=mask_b, other=0)
    W_dir = W + d.to(tl.int64) * GATES * H * H
    state_rows = (d * B + rb64)[:, None] * H

    for s in range(T):
        t = _backward_time_step(s, d, T)
        row = ((t * B + rb64) * D + d)[:, None]
        active = (t < lengths)[:, None]
        for j0 in range(0, H, BLOCK_N):
            rj = j0 + tl.arange(0, BLOCK_N)
            m = mask_b[:, None] & (rj < H)[None, :]
            carry = tl.load(CARRY + state_rows + rj[None, :], mask=m, other=0.0,
                            cache_modifier=".cg")
            dh = tl.load(DHS + row * H + rj[None, :], mask=m, other=0.0).to(tl.float32) + carry
            dc = tl.zeros_like(dh)  # GRU: unused
            if GATES == 4:
                dc = tl.load(DC + state_rows + rj[None, :], mask=m, other=0.0)
            s0, s1, s2, s3, s4 = _load_saved(SAVED + row * (5 * H) + rj[None, :], H, m)
            g0, g1, g2, g3, g2_hidden, direct, dc_prev = cell_backward(dh, dc, s0, s1, s2, s3,
                                                                       s4, GATES)
            _store_gate_grads(DZ + row * (GATES * H) + rj[None, :], DHN + row * H + rj[None, :],
                              H, m, active, g0, g1, g2, g3, g2_hidden, GATES)
            tl.store(CARRY + state_rows + rj[None, :], tl.where(active, direct, carry), mask=m)
            if GATES == 4:
                tl.store(DC + state_rows + rj[None, :], tl.where(active, dc_prev, dc), mask=m)
        tl.debug_barrier()
        # GRU: n's hidden part has its own gradient (DHN), the other gates' are DZ's.
        dz_row = DZ + row * (GATES * H)
        g2_row = dz_row + 2 * H
        if GATES == 3:
            g2_row = DHN + row * H
        for n0 in range(0, H, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            mask_n = rn < H
            m = mask_b[:, None] & mask_n[None, :]
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                mask_k = rk < H
                mask_g = mask_b[:, None] & mask_k[None, :]
                mask_w = mask_k[:, None] & mask_n[None, :]
                g = tl.load(dz_row + rk[None, :], mask=mask_g, other=0.0, cache_modifier=".cg")
                acc = _dot(g, _gate_tile(W_dir, 0, H, rk[:, None], rn[None, :], mask_w), acc,
                           PRECISION, UPCAST)
                g = tl.load(dz_row + H + rk[None, :], mask=mask_g, other=0.0,
                            cache_modifier=".cg")
                acc = _dot(g, _gate_tile(W_dir, 1, H, rk[:, None], rn[None, :], mask_w), acc,
                           PRECISION, UPCAST)
                g = tl.load(g2_row + rk[None, :], mask=mask_g, other=0.0, cache_modifier=".cg")
                acc = _dot(g, _gate_tile(W_dir, 2, H, rk[:, None], rn[None, :], mask_w), acc,
                           PRECISION, UPCAST)
                if GATES == 4:
                    g = tl.load(dz_row + 3 * H + rk[None, :], mask=mask_g, other=0.0,
                                cache_modifier=".cg")
                    acc = _dot(g, _gate_tile(W_dir, 3, H, rk[:, None], rn[None, :], mask_w),
                               acc, PRECISION, UPCAST)
            old = tl.load(CARRY + state_rows + rn[None, :], mask=m, other=0.0,
                          cache_modifier=".cg")
            tl.store(CARRY + state_rows + rn[None, :], tl.where(active, old + acc, old), mask=m)
        tl.debug_barrier()
