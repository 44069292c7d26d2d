"""Property-based differential test of the multi-CTA Triton path (step mode, interpreter).

The configuration space of tests/test_properties.py (layers, layouts, lengths, grad modes,
dropout, NaN/inf, repeated calls) with the path forced to 'multicta' and its tiling drawn
too: hidden blocks, batch tiles, k tiles, W block resident or re-read. Each draw is checked
against nn.RNN with the same weights. CPU tensors only: it runs where the interpreter does.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

# Like tests/test_properties.py, whose strategies and checks this reuses.
pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import test_properties as props  # noqa: E402
from fastbirnn import available_backends, backends  # noqa: E402

EXAMPLES = {"ci": 12, "deep": 300}[props.PROFILE]
# The default run's draws; the _full variant (slow: CI runs it) draws EXAMPLES.
QUICK_EXAMPLES = 4


@contextlib.contextmanager
def _multicta(overrides: dict):
    from fastbirnn.triton import launcher

    saved = launcher.FORCE_PATH, launcher.MULTICTA_OVERRIDES
    launcher.FORCE_PATH, launcher.MULTICTA_OVERRIDES = "multicta", overrides
    try:
        yield
    finally:
        launcher.FORCE_PATH, launcher.MULTICTA_OVERRIDES = saved


TILINGS = st.fixed_dictionaries({
    "BLOCK_N": st.sampled_from([16, 32]),
    "BLOCK_B": st.sampled_from([16, 32]),
    "BLOCK_K": st.sampled_from([16, 32]),
    "W_RESIDENT": st.booleans(),
})


def _property_test(full: bool):
    @pytest.mark.skipif(available_backends().get("triton") is not None,
                        reason=f"triton unavailable: {available_backends().get('triton')}")
    @pytest.mark.skipif(not backends.triton_interpreter_enabled(),
                        reason="CPU tensors need the Triton interpreter; on a GPU the CUDA tests "
                        "of test_triton.py run the multi-CTA path")
    @props.property_settings(EXAMPLES if full or props.PROFILE != "ci" else QUICK_EXAMPLES)
    @given(
        config=props.configs(max_work=40_000, max_layers=2, max_seq=5, max_batch=40,
                             max_hidden=70, dtypes=(torch.float32,)),
        tiling=TILINGS,
    )
    def test(config, tiling):
        with _multicta(tiling):
            props.check_against_nn(config, "triton")

    return pytest.mark.slow(test) if full and props.PROFILE == "ci" else test


test_triton_multicta_matches_nn_rnn = _property_test(full=False)
test_triton_multicta_matches_nn_rnn_full = _property_test(full=True)
