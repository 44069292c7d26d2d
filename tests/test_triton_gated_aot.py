"""Ahead-of-time compilation of the LSTM/GRU kernels for sm_80 and sm_90, without a GPU.

Every gated configuration the launcher can choose (``fastbirnn.triton.aot.gated_configurations``:
on-chip at its largest hidden block, streamed with each pass's tiles), per cell, dtype and fp32
precision, compiled with Triton's bundled toolchain for A100 (sm_80) and H100/H200 (sm_90) as
launched (Triton's own binder specialises the arguments: aligned pointers, sizes divisible by
16): no register spills, shared memory within the architecture's limit, vector loads. A
subprocess, as in tests/test_triton_aot.py (the interpreter replaces the kernels that
``triton.compile`` needs).
"""

from __future__ import annotations

import json

import pytest

from test_triton_aot import _toolchain_missing, compile_ahead_of_time

pytestmark = pytest.mark.skipif(_toolchain_missing() is not None,
                                reason=str(_toolchain_missing()))


@pytest.fixture(scope="module")
def aot_results():
    return compile_ahead_of_time("--gated")


def test_every_gated_configuration_is_compiled(aot_results):
    from fastbirnn.triton import aot

    configs = aot.gated_configurations()
    passes = sum(1 if "backward" in cfg else 2 for cfg in configs)
    assert len(aot_results) == passes * 2  # x sm_90/sm_80
    seen = {(r["cell"], r["path"], r["kernel"], r["dtype"], r["precision"]) for r in aot_results}
    for cell in ("lstm", "gru"):
        for path in ("onchip", "streamed"):
            for kernel in ("forward", "backward"):
                for dtype, precision in (("torch.float32", "tf32"), ("torch.float32", "ieee"),
                                         ("torch.bfloat16", "ieee")):
                    # Exact fp32 never runs the gated cells on chip (see the launcher).
                    if (path, precision, dtype) != ("onchip", "ieee", "torch.float32"):
                        assert (cell, path, kernel, dtype, precision) in seen


@pytest.mark.parametrize("arch", [90, 80])
def test_no_spills_and_shared_memory_fits(aot_results, arch):
    from fastbirnn.triton.aot import SHARED_LIMIT

    rows = [r for r in aot_results if r["arch"] == arch]
    assert rows
    bad = [r for r in rows if r["spill_stores"] or r["shared"] > SHARED_LIMIT[arch]]
    assert not bad, json.dumps(bad, indent=1)


def test_compiled_as_launched_with_vector_loads(aot_results):
    for row in aot_results:
        assert {"T", "B", "H", "W", "LENGTHS"} <= set(row["divisible"]), row
        assert row["vector_loads"] > 0, row
