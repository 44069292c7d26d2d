"""Ahead-of-time compilation of the multi-CTA kernels for sm_80 and sm_90, without a GPU.

Every configuration the launcher can choose (``fastbirnn.triton.aot.launcher_configurations``)
is compiled with Triton's bundled toolchain for A100 (sm_80) and H100/H200 (sm_90), forward
and backward, persistent variant: no register spills, shared memory within the architecture's
limit, at least one CTA per SM by registers, and the grid barrier compiled to a release
arrival and acquire reads (no volatile loads). A subprocess, because the interpreter
(TRITON_INTERPRET=1, set for the other triton tests without a GPU) replaces the kernels that
``triton.compile`` needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _toolchain_missing() -> str | None:
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return f"triton's compiler cannot be imported: {error}"
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")):
        return f"no ptxas in {bin_dir}: this triton wheel ships no CUDA toolchain"
    return None


pytestmark = pytest.mark.skipif(_toolchain_missing() is not None,
                                reason=str(_toolchain_missing()))


@pytest.fixture(scope="module")
def aot_results():
    return compile_ahead_of_time()


def compile_ahead_of_time(*args: str) -> list:
    """`python -m fastbirnn.triton.aot [args] --arch 90 80`: one result per kernel and arch."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fastbirnn.triton.aot", *args, "--arch", "90", "80",
         "--jobs", "2"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_every_launcher_configuration_is_compiled(aot_results):
    from fastbirnn.triton import aot

    configs = aot.launcher_configurations()
    assert configs, "the launcher offers no multi-CTA configuration"
    assert len(aot_results) == len(configs) * 2 * 2  # forward/backward x sm_90/sm_80
    assert any(r["W_RESIDENT"] for r in aot_results)  # both variants are checked
    assert any(not r["W_RESIDENT"] for r in aot_results)


@pytest.mark.parametrize("arch", [90, 80])
def test_no_spills_and_shared_memory_fits(aot_results, arch):
    from fastbirnn.triton.aot import SHARED_LIMIT

    rows = [r for r in aot_results if r["arch"] == arch]
    assert rows
    bad = [r for r in rows if r["spill_stores"] or r["shared"] > SHARED_LIMIT[arch]
           or r["ctas_per_sm_by_regs"] < 1]
    assert not bad, json.dumps(bad, indent=1)


def test_barrier_compiles_to_release_arrive_and_acquire_spin(aot_results):
    """The grid barrier keeps its memory semantics through the compiler: a release atomic
    arrival and acquire reads at GPU scope in the PTX, and no volatile loads."""
    bad = [r for r in aot_results
           if not r["release_arrivals"] or not r["acquire_reads"] or r["volatile_loads"]]
    assert not bad, json.dumps(bad[:3], indent=1)
