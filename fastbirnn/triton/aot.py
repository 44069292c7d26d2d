"""Ahead-of-time compilation of the multi-CTA kernels for a GPU that need not be present.

``python -m fastbirnn.triton.aot [--arch 90 80] [--gated]`` compiles every configuration the
launcher can choose (``launcher_configurations``; with ``--gated`` the LSTM/GRU kernels',
``gated_configurations``) with Triton's own toolchain (ptxas ships in the
wheel) and prints registers, spills and shared memory per kernel as JSON; the exit status is
1 if any of them spills or exceeds the shared memory of its architecture.
tests/test_triton_aot.py runs it in a subprocess: it must not run under TRITON_INTERPRET=1
(the interpreter replaces the kernels that triton.compile needs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

# Largest dynamic shared memory per CTA (opt-in), bytes: A100 (sm_80), H100/H200 (sm_90).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
REGISTERS_PER_SM = 65536

_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def launcher_configurations(num_sms: int = 132) -> list[dict]:
    """Every distinct multi-CTA configuration ``multicta_config`` yields for hidden sizes from
    MULTICTA_MIN_HIDDEN to 4096 and batch sizes 1..MULTICTA_MAX_BATCH, per dtype and fp32 precision.

    fp16 and bf16 compile alike (same widths); fp16 is left out to keep the check short.
    """
    from fastbirnn.triton import launcher

    seen, configs = set(), []
    for dtype, precisions in ((torch.float32, ("tf32", "ieee")), (torch.bfloat16, ("ieee",))):
        for precision in precisions:
            for H in (256, 384, 512, 768, 1024, 2048, 4096):
                for B in (1, 16, 32, 64):
                    if launcher.choose_path(H, B, dtype, precision, torch.device("cuda")) \
                            != "multicta":
                        continue
                    cfg = launcher.multicta_config(H, B, 2, dtype, num_sms, precision)
                    cfg.update(dtype=dtype, precision=precision)
                    key = tuple(sorted((k, str(v)) for k, v in cfg.items()))
                    if key not in seen:
                        seen.add(key)
                        configs.append(cfg)
    return configs


def gated_configurations() -> list[dict]:
    """Every gated-cell (LSTM, GRU) kernel configuration the launcher can choose: per cell,
    dtype and fp32 precision, the on-chip kernels (forward and backward) at the largest
    hidden block that runs on chip (the most registers), and the streamed ones, whose tiles
    do not depend on H but on the pass (``backward`` set: that pass only)."""
    from fastbirnn.triton import launcher
    from fastbirnn.triton.cells import GATES

    configs = []
    for cell, gates in GATES.items():
        for dtype, precision in ((torch.float32, "tf32"), (torch.float32, "ieee"),
                                 (torch.bfloat16, "ieee")):
            block_h = 16
            while launcher.uses_onchip(2 * block_h, dtype, precision, gates):
                block_h *= 2
            common = dict(cell=cell, GATES=gates, dtype=dtype, precision=precision,
                          BLOCK_B=launcher.BLOCK_B)
            configs.append(dict(common, path="onchip", BLOCK_H=block_h,
                                num_warps=launcher._num_warps(block_h),
                                num_stages=launcher.GATED_ONCHIP_NUM_STAGES))
            for backward in (False, True):
                configs.append(dict(common, path="streamed", backward=backward,
                                    **launcher.gated_stream_config(4096, backward)))
    return configs


# Scratch buffers and saved activations are fp32 whatever the input dtype.
_FP32_POINTERS = ("SAVED", "STATE", "CSTATE", "CARRY", "DC")


def _signature(kernel, dtype, constexprs):
    ty = _TRITON_TYPE[dtype]
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "LENGTHS":
            sig[name] = "*i64"
        elif name in ("COUNTERS", "ERR"):
            sig[name] = "*i32"
        elif name.isupper() and name in ("T", "B", "H", "S_BEGIN", "S_END", "MAX_SPIN"):
            sig[name] = "i32"
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        else:
            sig[name] = f"*{ty}"
    return sig


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes, from ptxas -v on the kernel's PTX."""
    import triton

    try:  # the ptxas triton itself uses for this architecture (it wrote the PTX version)
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            ptxas = get_ptxas(arch).path
        except TypeError:  # releases whose get_ptxas takes no architecture
            ptxas = get_ptxas().path
    except (ImportError, AttributeError):  # pragma: no cover - other layouts
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr[-2000:]}")
    log = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    return {"registers": regs, "spill_stores": stores, "spill_loads": loads}


def _barrier_semantics(ptx: str) -> dict:
    """The grid barrier as compiled: release arrivals (``red``/``atom`` ... ``.release`` ...
    ``add``) and acquire reads (``ld.acquire`` or an acquire atomic) at GPU scope, and no
    volatile loads (``ld.volatile`` is not an acquire)."""
    lines = [line.strip() for line in ptx.splitlines()]
    release = [x for x in lines if re.search(r"\b(red|atom)\.", x) and ".release" in x
               and ".add" in x and ".gpu" in x]
    acquire = [x for x in lines if re.search(r"\b(ld|atom)\.", x) and ".acquire" in x
               and ".gpu" in x]
    volatile = [x for x in lines if re.search(r"\bld\.volatile", x)]
    return {"release_arrivals": len(release), "acquire_reads": len(acquire),
            "volatile_loads": len(volatile)}


def compile_config(cfg: dict, arch: int, backward: bool) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastbirnn.triton import launcher
    from fastbirnn.triton.multicta import backward_multicta_kernel, forward_multicta_kernel

    kernel = backward_multicta_kernel if backward else forward_multicta_kernel
    fn = getattr(kernel, "fn", kernel)
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("compile ahead of time without TRITON_INTERPRET=1")
    dtype, precision = cfg["dtype"], cfg["precision"]
    constexprs = dict(
        ACT=0, PRECISION=precision, UPCAST=False, PERSISTENT=True,
        **{k: cfg[k] for k in ("BLOCK_B", "BLOCK_N", "BLOCK_K", "BLOCK_H", "W_RESIDENT")},
    )
    src = ASTSource(kernel, _signature(kernel, dtype, constexprs), constexprs)
    num_warps = cfg.get("num_warps", launcher.MULTICTA_NUM_WARPS)
    num_stages = cfg.get("num_stages", launcher.MULTICTA_NUM_STAGES)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    usage = _ptxas_usage(ptx, arch)
    usage.update(_barrier_semantics(ptx))
    usage.update(shared=compiled.metadata.shared, num_warps=num_warps, num_stages=num_stages)
    regs_per_warp = -(-usage["registers"] * 32 // 256) * 256
    usage["ctas_per_sm_by_regs"] = REGISTERS_PER_SM // (regs_per_warp * num_warps)
    usage["ok"] = (usage["spill_stores"] == 0 and usage["shared"] <= SHARED_LIMIT[arch]
                   and usage["ctas_per_sm_by_regs"] >= 1 and usage["release_arrivals"] > 0
                   and usage["acquire_reads"] > 0 and usage["volatile_loads"] == 0)
    del fn
    return usage


def compile_gated(cfg: dict, arch: int, backward: bool) -> dict:
    """Compile one of ``gated_configurations`` (the forward with SAVE, as in training)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastbirnn.triton import gated_kernels

    name = f"gated_{'backward' if backward else 'forward'}_{cfg['path']}_kernel"
    kernel = getattr(gated_kernels, name)
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("compile ahead of time without TRITON_INTERPRET=1")
    blocks = ("BLOCK_B", "BLOCK_H") if cfg["path"] == "onchip" else ("BLOCK_B", "BLOCK_N",
                                                                      "BLOCK_K")
    constexprs = dict(GATES=cfg["GATES"], PRECISION=cfg["precision"], UPCAST=False,
                      **{k: cfg[k] for k in blocks})
    if not backward:
        constexprs["SAVE"] = True
    src = ASTSource(kernel, _signature(kernel, cfg["dtype"], constexprs), constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg["num_warps"],
                                       "num_stages": cfg["num_stages"]})
    usage = _ptxas_usage(compiled.asm["ptx"], arch)
    usage.update(shared=compiled.metadata.shared, num_warps=cfg["num_warps"],
                 num_stages=cfg["num_stages"])
    usage["ok"] = usage["spill_stores"] == 0 and usage["shared"] <= SHARED_LIMIT[arch]
    return usage


def _task(job: tuple) -> dict:
    cfg, arch, backward = job
    compile_fn = compile_gated if "GATES" in cfg else compile_config
    usage = compile_fn(cfg, arch, backward)
    row = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in cfg.items()}
    row.update(arch=arch, kernel="backward" if backward else "forward", **usage)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--limit", type=int, default=0, help="first N configurations only")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--gated", action="store_true",
                        help="the LSTM/GRU single-CTA kernels instead of the multi-CTA ones")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile ahead of time", file=sys.stderr)
        return 2
    configs = gated_configurations() if args.gated else launcher_configurations()
    if args.limit:
        configs = configs[: args.limit]
    jobs = [(cfg, arch, backward) for arch in args.arch for cfg in configs
            for backward in ((cfg["backward"],) if "backward" in cfg else (False, True))]
    if args.jobs > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            results = list(pool.map(_task, jobs))
    else:
        results = [_task(job) for job in jobs]
    ok = all(row["ok"] for row in results)
    json.dump(results, sys.stdout, indent=1)
    print()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
