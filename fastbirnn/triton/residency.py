"""Whether a persistent multi-CTA grid can be resident all at once, and the launch that makes
the driver guarantee it.

The persistent kernels' grid barrier waits for every CTA of a group: a CTA that is never
scheduled (its SM busy with another kernel: another stream, NCCL during DDP's backward, an MPS
client) never arrives. Two guards, host side:

- ``coresidency``: how many CTAs of the compiled kernel fit on the device at once, counted as
  the occupancy calculator counts them (registers, shared memory, threads, the blocks-per-SM
  limit). A grid above it is never launched persistently.
- a cooperative launch (``launch_cooperative_grid=True``, Triton 3.6 and 3.9 have it): the
  driver starts the grid only when all of its CTAs are resident, waiting for other kernels to
  leave room, and refuses a grid that could never be (``is_cooperative_refusal``).

The bounded spin in the barrier (``multicta._grid_barrier``) stays as the last guard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The runtime reserves this much shared memory per CTA beyond what the kernel asks for.
RESERVED_SHARED_PER_CTA = 1024
MAX_CTAS_PER_SM = 32
REGISTER_GRANULE = 256  # registers are allocated per warp in units of this many


def _has_cooperative_launch() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - a triton without the NVIDIA backend
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


# Whether this triton can launch a grid cooperatively (a launch option that Triton 3.6 and 3.9
# have; older releases may lack it).
COOPERATIVE_LAUNCH = _has_cooperative_launch()


@dataclass(frozen=True)
class Residency:
    """CTAs of one compiled kernel that a device holds at once."""

    per_sm: int
    num_sms: int
    limited_by: str  # "registers", "shared memory", "threads", "blocks per SM" (or several)
    registers: int  # per thread
    shared_bytes: int  # per CTA

    @property
    def max_ctas(self) -> int:
        return self.per_sm * self.num_sms

    def describe(self) -> str:
        return (f"at most {self.max_ctas} CTAs ({self.per_sm} per SM x {self.num_sms} SMs, "
                f"limited by {self.limited_by}: {self.registers} registers per thread, "
                f"{self.shared_bytes / 1024:.0f} KiB of shared memory per CTA)")


def residency(registers: int, num_warps: int, shared_bytes: int, props) -> Residency:
    """Residency from the compiled kernel's resources and the device's properties (a
    ``torch.cuda.get_device_properties`` result, or anything with the same fields)."""
    regs_per_warp = -(-max(registers, 1) * 32 // REGISTER_GRANULE) * REGISTER_GRANULE
    regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
    limits = {
        "registers": regs_per_sm // (regs_per_warp * num_warps),
        "shared memory": props.shared_memory_per_multiprocessor
        // (shared_bytes + RESERVED_SHARED_PER_CTA),
        "threads": props.max_threads_per_multi_processor // (32 * num_warps),
        "blocks per SM": MAX_CTAS_PER_SM,
    }
    per_sm = min(limits.values())
    limited_by = " and ".join(name for name, n in limits.items() if n == per_sm)
    return Residency(per_sm, props.multi_processor_count, limited_by, registers, shared_bytes)


def coresidency(compiled, device: torch.device) -> Residency:
    """Residency of a compiled Triton kernel (``kernel.warmup(...)``) on a CUDA device."""
    compiled._init_handles()  # loads the binary: fills n_regs
    return residency(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared,
                     torch.cuda.get_device_properties(device))


def is_cooperative_refusal(error: BaseException) -> bool:
    """Whether a launch failed because the driver will not make the grid co-resident
    (CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE: "too many blocks in cooperative launch")."""
    return isinstance(error, RuntimeError) and "cooperative launch" in str(error).lower()
