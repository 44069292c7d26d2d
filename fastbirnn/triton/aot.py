"""Ahead-of-time compilation of the Triton kernels for a GPU that need not be present.

``python -m fastbirnn.triton.aot [--arch 90 80] [--gated]`` compiles every multi-CTA
configuration the launcher can choose (``launcher_configurations``; with ``--gated`` the
LSTM/GRU kernels', ``gated_configurations``) with Triton's own toolchain (ptxas ships in the
wheel) and prints, per kernel, registers, spills, shared memory and what the PTX does (vector
loads, the grid barrier's memory semantics) as JSON; the exit status is 1 if any of them
fails its checks (``ok``).

Each kernel is compiled as it is at run time: the launcher builds the launch itself
(``launcher.forward_multicta_launch``, on meta tensors at a representative shape), and
Triton's own argument binder specialises it as ``kernel[grid](...)`` does (16-byte aligned
pointers and sizes divisible by 16 become ``tt.divisibility`` hints, which is what lets loads
vectorise), with the launcher's options (cooperative launch included). A compile without that
specialisation shows scalar loads and other register counts: not the binary that runs.

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
# The representative call: a sequence length divisible by 16, as in a typical training step.
SEQ_LEN = 64

# Pointers to fp32 scratch buffers and saved activations, whatever the input dtype.
_FP32_POINTERS = ("SAVED", "STATE", "CSTATE", "CARRY", "DC")


def launcher_configurations(num_sms: int = 132) -> list[dict]:
    """Every distinct multi-CTA configuration ``multicta_config`` yields for hidden sizes from
    MULTICTA_MIN_HIDDEN to 4096 and batch sizes up to MULTICTA_MAX_BATCH, per dtype and fp32
    precision, with the first shape (H, B) that yields it. Batch sizes are tried 16, 32, 64,
    then 1, so that a configuration is compiled at multiples of 16 where a training call has
    them.

    fp16 and bf16 compile alike (same widths); fp16 is left out to keep the check short.
    """
    from fastbirnn.triton import launcher

    seen, configs = set(), []
    for dtype, precisions in ((torch.float32, ("tf32", "ieee")), (torch.bfloat16, ("ieee",))):
        for precision in precisions:
            for H in (256, 384, 512, 768, 1024, 2048, 4096):
                for B in (16, 32, 64, 1):
                    if launcher.choose_path(H, B, dtype, precision, torch.device("cuda")) \
                            != "multicta":
                        continue
                    cfg = launcher.multicta_config(H, B, 2, dtype, num_sms, precision)
                    cfg.update(dtype=dtype, precision=precision)
                    key = tuple(sorted((k, str(v)) for k, v in cfg.items()))
                    if key not in seen:
                        seen.add(key)
                        configs.append(dict(cfg, H=H, B=B))
    return configs


def gated_configurations() -> list[dict]:
    """Every gated-cell (LSTM, GRU) kernel configuration the launcher can choose: per cell,
    dtype and fp32 precision, the on-chip kernels (forward and backward) at the largest
    hidden block that runs on chip (the most registers), where any does, and the streamed
    ones, whose tiles do not depend on H but on the pass (``backward`` set: that pass only)."""
    from fastbirnn.triton import launcher
    from fastbirnn.triton.cells import GATES

    configs = []
    for cell, gates in GATES.items():
        for dtype, precision in ((torch.float32, "tf32"), (torch.float32, "ieee"),
                                 (torch.bfloat16, "ieee")):
            common = dict(cell=cell, GATES=gates, dtype=dtype, precision=precision,
                          BLOCK_B=launcher.BLOCK_B, B=32)
            if launcher.uses_onchip(16, dtype, precision, gates):
                block_h = 16
                while launcher.uses_onchip(2 * block_h, dtype, precision, gates):
                    block_h *= 2
                configs.append(dict(common, path="onchip", H=block_h, BLOCK_H=block_h,
                                    num_warps=launcher._num_warps(block_h),
                                    num_stages=launcher.GATED_ONCHIP_NUM_STAGES))
            for backward in (False, True):
                configs.append(dict(common, path="streamed", H=1024, backward=backward,
                                    **launcher.gated_stream_config(4096, backward)))
    return configs


def compile_as_launched(kernel, args: tuple, kwargs: dict, arch: int, specialise: bool = True):
    """Compile ``kernel[grid](*args, **kwargs)`` for ``arch`` as that call would at run time:
    Triton's own binder specialises the arguments (divisibility of pointers and integers),
    ``kwargs`` are the constexprs and launch options. ``specialise=False`` drops the
    divisibility hints (what a bare ``triton.compile`` of the signature gives: for tests)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("compile ahead of time without TRITON_INTERPRET=1")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    if not specialise:
        attrs = {}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    divisible = [kernel.arg_names[path[0]] for path, hints in attrs.items()
                 if ["tt.divisibility", 16] in hints]
    return compiled, divisible


def _meta(*shape, dtype) -> torch.Tensor:
    # Shapes and dtypes without memory; data_ptr() 0, i.e. aligned as every CUDA allocation.
    return torch.empty(*shape, dtype=dtype, device="meta")


def multicta_launch(cfg: dict, backward: bool):
    """The launcher's own launch for ``cfg``'s representative shape (bidirectional)."""
    from fastbirnn.triton import launcher

    T, B, D, H, dtype = SEQ_LEN, cfg["B"], 2, cfg["H"], cfg["dtype"]
    seq, weights, state = (_meta(T, B, D, H, dtype=dtype), _meta(D, H, H, dtype=dtype),
                           _meta(D, B, H, dtype=dtype))
    lengths = _meta(B, dtype=torch.int64)
    if backward:
        return launcher.backward_multicta_launch(seq, seq, weights, lengths, seq, state, 0,
                                                 cfg["precision"], False)
    return launcher.forward_multicta_launch(seq, weights, state, lengths, seq, 0,
                                            cfg["precision"], False)


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


def _load_bytes(kind: str) -> int:
    """Bytes one thread moves with one load, from its PTX type: ``.v4.b32`` -> 16."""
    match = re.search(r"(?:\.v(\d))?\.[bfsu](\d+)$", kind)
    return int(match.group(1) or 1) * int(match.group(2)) // 8


def ptx_loads(ptx: str) -> dict:
    """Global loads by kind: vector (``.v2``/``.v4``) or scalar, and the widest of those that
    bypass L1 (``.cg``: the multi-CTA state, which other CTAs write), in bytes per thread."""
    loads = re.findall(r"\bld\.global((?:\.\w+)+)", ptx)
    vector = [x for x in loads if re.search(r"\.v[24]\.", x)]
    state = [_load_bytes(x) for x in loads if ".cg" in x]
    return {"vector_loads": len(vector), "scalar_loads": len(loads) - len(vector),
            "widest_state_load": max(state, default=0)}


def state_load_bytes(cfg: dict, num_warps: int) -> int:
    """How wide the state loads can be: one thread's share of the state tile the k loop reads
    ([BLOCK_K or BLOCK_H, BLOCK_B], contiguous along k), up to 16 bytes (``ld.v4.b32``)."""
    rows = cfg["BLOCK_H"] if cfg["W_RESIDENT"] else cfg["BLOCK_K"]
    item = torch.empty((), dtype=cfg["dtype"]).element_size()
    return min(16, rows * cfg["BLOCK_B"] * item // (32 * num_warps))


def barrier_semantics(ptx: str) -> dict:
    """The grid barrier as compiled: release arrivals (``red``/``atom`` ... ``.release`` ...
    ``.add``, GPU scope; Triton 3.9 writes ``red``, 3.6 ``atom``), acquire loads in the spin
    (``ld`` ... ``.acquire``, GPU scope: a load, not an atomic, per poll), and no volatile
    loads (``ld.volatile`` is not an acquire)."""
    lines = [line.strip() for line in ptx.splitlines()]
    release = [x for x in lines if re.search(r"\b(red|atom)\.", x) and ".release" in x
               and ".add" in x and ".gpu" in x]
    acquire = [x for x in lines if re.search(r"\bld\.", x) and ".acquire" in x and ".gpu" in x]
    volatile = [x for x in lines if re.search(r"\bld\.volatile", x)]
    return {"release_arrivals": len(release), "acquire_loads": len(acquire),
            "volatile_loads": len(volatile)}


def compile_config(cfg: dict, arch: int, backward: bool, specialise: bool = True) -> dict:
    """Compile one of ``launcher_configurations`` (the persistent launch) and check it."""
    launch = multicta_launch(cfg, backward)
    args, kwargs = launch.call(True, _meta(1, dtype=torch.int32))
    compiled, divisible = compile_as_launched(launch.kernel, args, kwargs, arch, specialise)
    ptx = compiled.asm["ptx"]
    usage = _ptxas_usage(ptx, arch)
    usage.update(barrier_semantics(ptx), **ptx_loads(ptx), shared=compiled.metadata.shared,
                 **launch.options, divisible=divisible,
                 cooperative=bool(getattr(compiled.metadata, "launch_cooperative_grid", False)))
    regs_per_warp = -(-usage["registers"] * 32 // 256) * 256
    usage["ctas_per_sm_by_regs"] = REGISTERS_PER_SM // (regs_per_warp * launch.options["num_warps"])
    usage["possible_state_load"] = state_load_bytes({**launch.meta, "dtype": cfg["dtype"]},
                                                    launch.options["num_warps"])
    usage["ok"] = (usage["spill_stores"] == 0 and usage["shared"] <= SHARED_LIMIT[arch]
                   and usage["ctas_per_sm_by_regs"] >= 1 and usage["release_arrivals"] > 0
                   and usage["acquire_loads"] > 0 and usage["volatile_loads"] == 0
                   and usage["widest_state_load"] >= usage["possible_state_load"]
                   and usage["cooperative"])
    return usage


def gated_arguments(kernel, cfg: dict) -> tuple:
    """The gated kernel's arguments as the launcher passes them (by name; see
    ``launcher.gated_forward``), on meta tensors at ``cfg``'s shape."""
    sizes = {"T": SEQ_LEN, "B": cfg["B"], "H": cfg["H"]}
    args = []
    for name in kernel.arg_names[: kernel.arg_names.index("H") + 1]:
        if name in sizes:
            args.append(sizes[name])
        elif name == "LENGTHS":
            args.append(_meta(cfg["B"], dtype=torch.int64))
        else:  # only dtypes and alignment shape the compiled kernel
            args.append(_meta(1, dtype=torch.float32 if name in _FP32_POINTERS else cfg["dtype"]))
    return tuple(args)


def compile_gated(cfg: dict, arch: int, backward: bool) -> dict:
    """Compile one of ``gated_configurations`` (the forward with SAVE, as in training)."""
    from fastbirnn.triton import gated_kernels

    name = f"gated_{'backward' if backward else 'forward'}_{cfg['path']}_kernel"
    kernel = getattr(gated_kernels, name)
    blocks = ("BLOCK_B", "BLOCK_H") if cfg["path"] == "onchip" else ("BLOCK_B", "BLOCK_N",
                                                                      "BLOCK_K")
    kwargs = dict(GATES=cfg["GATES"], PRECISION=cfg["precision"], UPCAST=False,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                  **{k: cfg[k] for k in blocks})
    if not backward:
        kwargs["SAVE"] = True
    compiled, divisible = compile_as_launched(kernel, gated_arguments(kernel, cfg), kwargs, arch)
    ptx = compiled.asm["ptx"]
    usage = _ptxas_usage(ptx, arch)
    usage.update(**ptx_loads(ptx), shared=compiled.metadata.shared, divisible=divisible,
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    usage["ok"] = (usage["spill_stores"] == 0 and usage["shared"] <= SHARED_LIMIT[arch]
                   and usage["vector_loads"] > 0)
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
