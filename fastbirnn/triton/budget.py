"""The per-step budget of the multi-CTA kernels (``fastbirnn.triton.multicta``): an estimate.

H100/H200 SXM estimates, not measurements (``python -m fastbirnn.triton.budget`` prints the
table from ``step_budget``). Per CTA and step: read its group's previous state, BLOCK_B * H
elements, from L2 (plus its W block, BLOCK_N * H, when not resident), Z/dHs/Hs tiles of
BLOCK_N * BLOCK_B, then one barrier. Assumed: ~5.5 TB/s of L2 bandwidth over the GPU, mma.sync
at about half the tensor-core peak, ~1.5 us per barrier (release atomic to L2, acquire polls
at L2 latency, arrival skew). Bidirectional, forward step:

    H     B   dtype  CTAs  W on chip  KiB/CTA  MiB/step  us L2  us step  T=256 fwd
    512   16  fp32    64   yes          35       2.2     0.4     1.9     0.49 ms
    1024  16  fp32   128   yes          67       8.4     1.6     3.1     0.79 ms
    1024  32  fp32   128   no          198      24.8     4.7     6.2     1.59 ms
    512   16  bf16    64   yes          18       1.1     0.2     1.7     0.44 ms
    1024  16  bf16   128   no           66       8.2     1.6     3.1     0.78 ms
    1024  32  bf16   128   no           99      12.4     2.4     3.9     0.99 ms

The backward step moves the same bytes (dz instead of h) plus one tile more. Up to H = 1024
and B = 16 a step is barrier-bound (the arithmetic is < 0.3 us); above, L2-bound. cuDNN's
STANDARD algorithm (H > 384) launches one [B x H] x [H x H] GEMM per step and direction,
~5-10 us each with launch gaps, i.e. ~2.5-5 ms for T = 256 forward at H = 1024: the 2x
target needs the barrier at or below ~1.5-2 us. For comparison, a public persistent Triton GRU
with this kind of barrier ran 2x slower than cuDNN at T 64, B 32, H 512 fp32: only the GPU run
(benchmarks/gpu_run.sh, stage ``paths``) can say which side of the line this kernel is.

Kept apart from the kernels: it reads the launcher's tiling, and the launcher imports the
kernels, so the kernels' module imports neither.
"""

from __future__ import annotations

import torch
import triton

from fastbirnn.triton import launcher

# H100/H200 SXM: L2 -> SM bandwidth (aggregate, sustained), dense TF32 / bf16 tensor-core
# FLOP/s through mma.sync (about half of wgmma's peak), one grid barrier (release atomic at
# L2 + acquire polls at L2 latency + arrival skew).
L2_BYTES_PER_S = 5.5e12
MMA_FLOPS = {4: 250e12, 2: 500e12}
BARRIER_US = 1.5


def step_budget(H: int, B: int, dtype, precision: str = "tf32", D: int = 2,
                num_sms: int = 132) -> dict:
    """Bytes and estimated microseconds of one forward step of the multi-CTA kernel."""
    cfg = launcher.multicta_config(H, B, D, dtype, num_sms, precision)
    item = torch.empty((), dtype=dtype).element_size()
    K, NB = triton.cdiv(H, cfg["BLOCK_N"]), triton.cdiv(B, cfg["BLOCK_B"])
    ctas = D * K * NB
    state = cfg["BLOCK_B"] * H * item  # the group's previous state, from L2
    weights = 0 if cfg["W_RESIDENT"] else cfg["BLOCK_N"] * H * item
    io = 3 * cfg["BLOCK_N"] * cfg["BLOCK_B"] * item  # Z in, h to BUF and HS
    total = ctas * (state + weights + io)
    flops = 2 * D * H * H * max(B, 16)
    exact = dtype == torch.float32 and precision == "ieee"
    us_mem = total / L2_BYTES_PER_S * 1e6
    us_math = flops / (MMA_FLOPS[item] / (8 if exact else 1)) * 1e6
    return dict(H=H, B=B, dtype=str(dtype).replace("torch.", ""), precision=precision,
                ctas=ctas, resident=cfg["W_RESIDENT"], kib_per_cta=(state + weights + io) / 1024,
                mib_per_step=total / 2**20, us_l2=us_mem, us_math=us_math,
                us_barrier=BARRIER_US, us_step=max(us_mem, us_math) + BARRIER_US)


if __name__ == "__main__":  # python -m fastbirnn.triton.budget: the table
    print(f"{'H':>5} {'B':>3} {'dtype':>9} {'CTAs':>4} {'W on chip':>9} {'KiB/CTA':>8} "
          f"{'MiB/step':>8} {'us L2':>6} {'us math':>7} {'us step':>7} {'T=256 fwd ms':>12}")
    for dtype, precision in ((torch.float32, "tf32"), (torch.bfloat16, "ieee")):
        for H in (512, 1024, 2048):
            for B in (1, 16, 32, 64):
                r = step_budget(H, B, dtype, precision)
                print(f"{H:5d} {B:3d} {r['dtype']:>9} {r['ctas']:4d} {str(r['resident']):>9} "
                      f"{r['kib_per_cta']:8.1f} {r['mib_per_step']:8.2f} {r['us_l2']:6.2f} "
                      f"{r['us_math']:7.2f} {r['us_step']:7.2f} {r['us_step'] * 256 / 1e3:12.2f}")
