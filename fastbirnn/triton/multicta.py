"""Multi-CTA recurrence for large hidden sizes: each direction's hidden units split over K CTAs.

Grid = (direction d, hidden block j, batch tile b). The CTA (d, j, b) owns output units
``j*BLOCK_N .. +BLOCK_N`` of direction d for batch rows ``b*BLOCK_B .. +BLOCK_B``: it needs only
that block of W_hh's rows (forward) / columns (backward), which it keeps in registers for the
whole launch (``W_RESIDENT``) or re-reads from L2 in [BLOCK_N, BLOCK_K] tiles each step.

Per step the CTA reads the whole previous state of its batch tile (all H units, written by the
K CTAs of its (d, b) group at the previous step) and computes its block with the hidden block
as tl.dot's M dimension::

    forward   acc[n, r] = Z[t, r, d, n] + sum_k W[d, n, k] * h_{t-1}[r, k]      (W_blk @ h^T)
    backward  carry[n, r] = sum_k W[d, k, n] * dz_last[r, k]                  (W_blk^T @ dz^T)

so tensor cores are used at any batch size (M = BLOCK_N >= 16, N = BLOCK_B >= 16).

The state lives in a global double buffer ``BUF [2, D, B, H]`` (weights' dtype: it is only ever
a dot operand, which is rounded to that dtype anyway). Step s reads ``BUF[s % 2]`` and writes
``BUF[(s+1) % 2]``. Rows past their length keep their value (forward: h; backward: the last
active dz, so that ``dh0 = dz_last @ W`` falls out of one extra step s = T at the end).

The same tile code runs in two launch modes (one kernel, ``PERSISTENT`` constexpr):

- persistent: one cooperative launch, time loop inside, a grid barrier per (d, b) group
  between steps. Every CTA must be co-resident (the launcher checks it from the compiled
  kernel, and the cooperative launch makes the driver guarantee it); the barrier is a release
  ``atomic_add`` arrival on a counter that only grows (target ``K * (steps done)``, so no
  reset race) and an acquire ``atomic_add(ptr, 0)`` spin (compiled to ``ld.acquire.gpu``; a
  volatile load is not an acquire), bounded by ``MAX_SPIN`` polls: past it the CTA sets
  ``ERR`` and stops waiting (later steps do not wait either), and the host raises.
- step mode: one launch per step, no barrier (kernel boundaries order the steps). This is
  what the Triton interpreter runs in CI (it runs programs one after another, so a spin
  barrier would deadlock there); on a GPU only when forced (tests, benchmarks).

Double-buffer safety: a CTA writes ``BUF[(s+1)%2]`` at step s while others may still read
``BUF[s%2]``; it writes ``BUF[s%2]`` again only at step s+1, after the barrier that every CTA
of its group reaches only once done reading step s.

The per-step budget of these kernels (bytes from L2, barrier cost, an estimate against cuDNN)
is in ``fastbirnn.triton.budget``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastbirnn.triton.backward import _activation_backward, _backward_time_step
from fastbirnn.triton.forward import _activation, _dot, _time_step


@triton.jit
def _grid_barrier(counter, target, ok, MAX_SPIN):
    """Wait until ``counter`` reaches ``target`` (each CTA of the group adds 1 per step).

    Returns False once a wait has exceeded MAX_SPIN polls (then never waits again).
    """
    # Every thread's stores of this step are done (CTA scope) before the one release
    # arrival, which orders them at GPU scope for whoever acquires the counter.
    tl.debug_barrier()
    tl.atomic_add(counter, 1, sem="release", scope="gpu")
    limit = tl.where(ok, MAX_SPIN, 0)
    seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    spins = limit * 0  # an i32 tensor from the start: loop-carried types must not change
    while (seen < target) & (spins < limit):
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        spins += 1
    tl.debug_barrier()
    return ok & (seen >= target)


@triton.jit
def _block_dot(acc, w, W_blk, rn, mask_n, src_rows, mask_b, H, k_stride, n_stride,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_H: tl.constexpr, W_RESIDENT: tl.constexpr):
    """acc[n, r] += sum_k Wblk[n, k] * src[r, k]; Wblk[n, k] at W_blk + n*n_stride + k*k_stride.

    ``src_rows`` [1, BLOCK_B] are the state rows' base pointers; the state is read with .cg
    (L2, never a stale L1 line written by another CTA).
    """
    if W_RESIDENT:
        rk = tl.arange(0, BLOCK_H)
        srcT = tl.load(src_rows + rk[:, None], mask=(rk < H)[:, None] & mask_b[None, :],
                       other=0.0, cache_modifier=".cg")
        acc = _dot(w, srcT, acc, PRECISION, UPCAST)
    else:
        for k0 in range(0, H, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < H
            wk = tl.load(W_blk + rn[:, None] * n_stride + rk[None, :] * k_stride,
                         mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            srcT = tl.load(src_rows + rk[:, None], mask=mask_k[:, None] & mask_b[None, :],
                           other=0.0, cache_modifier=".cg")
            acc = _dot(wk, srcT, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _load_w_block(W_blk, rn, mask_n, H, k_stride, n_stride, BLOCK_H: tl.constexpr,
                  W_RESIDENT: tl.constexpr):
    if W_RESIDENT:
        rk = tl.arange(0, BLOCK_H)
        return tl.load(W_blk + rn[:, None] * n_stride + rk[None, :] * k_stride,
                       mask=mask_n[:, None] & (rk < H)[None, :], other=0.0)
    else:
        return 0.0


@triton.jit
def _forward_tile(s, w, Z, W_blk, LENGTHS, HS, BUF, T, B, H, d, D, rn, rb,
                  ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, W_RESIDENT: tl.constexpr):
    """One forward step of one CTA: h_t[rb, rn] for direction d (tile is [BLOCK_N, BLOCK_B])."""
    t = _time_step(s, d, T)
    mask_n = rn < H
    mask_b = rb < B
    m = mask_n[:, None] & mask_b[None, :]
    rb64 = rb.to(tl.int64)
    buffer_size = D.to(tl.int64) * B * H
    state_rows = ((d * B + rb64) * H)[None, :]  # [1, BLOCK_B]
    src = BUF + (s % 2) * buffer_size + state_rows
    dst = BUF + ((s + 1) % 2) * buffer_size + state_rows
    io = (((t * B + rb64) * D + d) * H)[None, :] + rn[:, None]  # Z/HS [T, B, D, H], transposed
    lengths = tl.load(LENGTHS + rb, mask=mask_b, other=0)
    active = (t < lengths)[None, :]

    acc = tl.load(Z + io, mask=m, other=0.0).to(tl.float32)
    acc = _block_dot(acc, w, W_blk, rn, mask_n, src, mask_b, H, 1, H,
                     PRECISION, UPCAST, BLOCK_K, BLOCK_H, W_RESIDENT)
    h_new = _activation(acc, ACT)
    h_old = tl.load(src + rn[:, None], mask=m, other=0.0, cache_modifier=".cg")
    tl.store(dst + rn[:, None], tl.where(active, h_new.to(BUF.dtype.element_ty), h_old), mask=m)
    tl.store(HS + io, tl.where(active, h_new, 0.0).to(HS.dtype.element_ty), mask=m)


@triton.jit
def _backward_tile(s, w, DHS, HS, W_blk, LENGTHS, DZ, DH0, BUF, T, B, H, d, D, rn, rb,
                   ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, W_RESIDENT: tl.constexpr):
    """One backward step of one CTA (s = T: the final dh0 = dz_last @ W)."""
    mask_n = rn < H
    mask_b = rb < B
    m = mask_n[:, None] & mask_b[None, :]
    rb64 = rb.to(tl.int64)
    buffer_size = D.to(tl.int64) * B * H
    state_rows = ((d * B + rb64) * H)[None, :]
    src = BUF + (s % 2) * buffer_size + state_rows
    dst = BUF + ((s + 1) % 2) * buffer_size + state_rows

    carry = tl.zeros((rn.shape[0], rb.shape[0]), dtype=tl.float32)
    # carry[n, r] = sum_k dz_last[r, k] W[d, k, n]: the block of W's columns (k stride H).
    carry = _block_dot(carry, w, W_blk, rn, mask_n, src, mask_b, H, H, 1,
                       PRECISION, UPCAST, BLOCK_K, BLOCK_H, W_RESIDENT)
    if s < T:
        t = _backward_time_step(s, d, T)
        io = (((t * B + rb64) * D + d) * H)[None, :] + rn[:, None]
        lengths = tl.load(LENGTHS + rb, mask=mask_b, other=0)
        active = (t < lengths)[None, :]
        g = tl.load(DHS + io, mask=m, other=0.0).to(tl.float32) + carry
        h = tl.load(HS + io, mask=m, other=0.0).to(tl.float32)
        dz = tl.where(active, _activation_backward(g, h, ACT), 0.0)
        tl.store(DZ + io, dz.to(DZ.dtype.element_ty), mask=m)
        old = tl.load(src + rn[:, None], mask=m, other=0.0, cache_modifier=".cg")
        tl.store(dst + rn[:, None], tl.where(active, dz.to(BUF.dtype.element_ty), old), mask=m)
    else:
        tl.store(DH0 + state_rows + rn[:, None], carry.to(DH0.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["S_BEGIN", "S_END"])
def forward_multicta_kernel(
    Z, W, LENGTHS, HS, BUF, COUNTERS, ERR,
    T, B, H, S_BEGIN, S_END, MAX_SPIN,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr, W_RESIDENT: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """Steps S_BEGIN..S_END-1. BUF [2, D, B, H]: BUF[S_BEGIN % 2] holds the state on entry."""
    d = tl.program_id(0)
    D = tl.num_programs(0)
    K = tl.num_programs(1)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    W_blk = W + d.to(tl.int64) * H * H
    w = _load_w_block(W_blk, rn, rn < H, H, 1, H, BLOCK_H, W_RESIDENT)
    counter = COUNTERS + d * tl.num_programs(2) + tl.program_id(2)
    ok = tl.program_id(0) >= 0  # a scalar i1 tensor (True), not a constexpr
    for s in range(S_BEGIN, S_END):
        _forward_tile(s, w, Z, W_blk, LENGTHS, HS, BUF, T, B, H, d, D, rn, rb,
                      ACT, PRECISION, UPCAST, BLOCK_K, BLOCK_H, W_RESIDENT)
        if PERSISTENT:
            if s + 1 < S_END:  # nothing reads the state after the last step
                ok = _grid_barrier(counter, K * (s + 1 - S_BEGIN), ok, MAX_SPIN)
    if PERSISTENT:
        tl.atomic_max(ERR, tl.where(ok, 0, 1))


@triton.jit(do_not_specialize=["S_BEGIN", "S_END"])
def backward_multicta_kernel(
    DHS, HS, W, LENGTHS, DZ, DH0, BUF, COUNTERS, ERR,
    T, B, H, S_BEGIN, S_END, MAX_SPIN,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr, W_RESIDENT: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """Steps S_BEGIN..S_END-1 of T + 1 (the last writes DH0). BUF[S_BEGIN % 2] zero at s = 0."""
    d = tl.program_id(0)
    D = tl.num_programs(0)
    K = tl.num_programs(1)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    W_blk = W + d.to(tl.int64) * H * H
    w = _load_w_block(W_blk, rn, rn < H, H, H, 1, BLOCK_H, W_RESIDENT)
    counter = COUNTERS + d * tl.num_programs(2) + tl.program_id(2)
    ok = tl.program_id(0) >= 0  # a scalar i1 tensor (True), not a constexpr
    for s in range(S_BEGIN, S_END):
        _backward_tile(s, w, DHS, HS, W_blk, LENGTHS, DZ, DH0, BUF, T, B, H, d, D, rn, rb,
                       ACT, PRECISION, UPCAST, BLOCK_K, BLOCK_H, W_RESIDENT)
        if PERSISTENT:
            if s + 1 < S_END:  # nothing reads the state after the last step
                ok = _grid_barrier(counter, K * (s + 1 - S_BEGIN), ok, MAX_SPIN)
    if PERSISTENT:
        tl.atomic_max(ERR, tl.where(ok, 0, 1))
