"""Ahead-of-time compilation of the multi-CTA kernels for sm_80 and sm_90, without a GPU.

Every configuration the launcher can choose (``fastbirnn.triton.aot.launcher_configurations``)
is compiled with Triton's bundled toolchain for A100 (sm_80) and H100/H200 (sm_90), forward
and backward, as the launcher launches it: its own launch object, specialised by Triton's own
argument binder (aligned pointers, sizes divisible by 16), with the cooperative-launch option.
Checked on that binary: no register spills, shared memory within the architecture's limit, at
least one CTA per SM by registers, state loads as wide as the tile allows, and the grid
barrier compiled to a release arrival and acquire loads (no volatile loads). A subprocess,
because the interpreter (TRITON_INTERPRET=1, set for the other triton tests without a GPU)
replaces the kernels that ``triton.compile`` needs.
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

_ENV = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")


@pytest.fixture(scope="module")
def aot_results():
    return compile_ahead_of_time()


def compile_ahead_of_time(*args: str) -> list:
    """`python -m fastbirnn.triton.aot [args] --arch 90 80`: one result per kernel and arch."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastbirnn.triton.aot", *args, "--arch", "90", "80",
         "--jobs", "2"],
        capture_output=True, text=True, env=_ENV, timeout=900,
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


def test_compiled_as_launched(aot_results):
    """The binary checked is the one that runs: every pointer and the sizes (T, B, H: the
    representative shape's are multiples of 16) carry the divisibility hint, and the launch
    is cooperative."""
    pointers = {"Z", "W", "LENGTHS", "HS", "BUF", "COUNTERS", "ERR"}
    for row in aot_results:
        assert {"T", "B", "H"} <= set(row["divisible"]), row
        if row["kernel"] == "forward":
            assert pointers <= set(row["divisible"]), row
        assert row["cooperative"], row


def test_state_loads_are_as_wide_as_the_tile_allows(aot_results):
    """The state tile each step reads from L2 (other CTAs wrote it) is loaded with vector
    instructions: 16 bytes a thread (ld.global.cg.v4.b32) wherever the tile gives a thread
    that much."""
    bad = [r for r in aot_results if r["widest_state_load"] < r["possible_state_load"]]
    assert not bad, json.dumps(bad[:3], indent=1)
    assert any(r["widest_state_load"] == 16 for r in aot_results)


def test_barrier_compiles_to_release_arrive_and_acquire_spin(aot_results):
    """The grid barrier keeps its memory semantics through the compiler: a release atomic
    arrival (red/atom .release.gpu .add) and acquire loads (ld .acquire.gpu) in the spin,
    and no volatile loads."""
    bad = [r for r in aot_results
           if not r["release_arrivals"] or not r["acquire_loads"] or r["volatile_loads"]]
    assert not bad, json.dumps(bad[:3], indent=1)


def test_without_the_runtime_specialisation_the_state_loads_are_scalar():
    """Why the check compiles as launched: the same kernel compiled from its bare signature
    (no divisibility hints) loads the state one element at a time, a binary that never runs."""
    code = (
        "import json, torch\n"
        "from fastbirnn.triton import aot\n"
        "cfg = next(c for c in aot.launcher_configurations()\n"
        "           if c['W_RESIDENT'] and c['dtype'] == torch.float32)\n"
        "rows = [aot.compile_config(cfg, 90, False, specialise=s) for s in (True, False)]\n"
        "print(json.dumps([{k: r[k] for k in ('widest_state_load', 'possible_state_load',\n"
        "                  'ok')} for r in rows]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    specialised, bare = json.loads(proc.stdout.strip().splitlines()[-1])
    assert specialised == {"widest_state_load": 16, "possible_state_load": 16, "ok": True}
    assert bare["widest_state_load"] == 4 and not bare["ok"]
