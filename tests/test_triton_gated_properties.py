"""Property-based differential test of the triton LSTM and GRU cells (interpreter, CPU).

The configuration space of tests/test_properties.py for the gated cells (layers, layouts,
lengths, h_0/c_0, bias, grad modes, dropout, NaN/inf, repeated calls), fp32, no LSTM
projections (the triton backend refuses them), with the path drawn too: on-chip W_hh, or
streamed in 16-wide tiles. Each draw is checked against nn.LSTM / nn.GRU with the same weights.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import test_properties as props  # noqa: E402
from fastbirnn import available_backends, backends  # noqa: E402

EXAMPLES = {"ci": 10, "deep": 200}[props.PROFILE]
# The default run's draws; the *_full variants (slow: CI runs them) draw EXAMPLES. (The
# third derandomized GRU draw took 8 s of the interpreter's time, 7 % of the default run.)
QUICK_EXAMPLES = 2


@contextlib.contextmanager
def _path(streamed: bool):
    from fastbirnn.triton import launcher

    saved = launcher.FORCE_PATH, launcher.STREAM_BLOCK_N, launcher.STREAM_BLOCK_K
    # Forced either way: in exact fp32 (the interpreter's) the rule puts only 16 units on chip.
    launcher.FORCE_PATH = "streamed" if streamed else "onchip"
    if streamed:
        launcher.STREAM_BLOCK_N, launcher.STREAM_BLOCK_K = 16, 16
    try:
        yield
    finally:
        launcher.FORCE_PATH, launcher.STREAM_BLOCK_N, launcher.STREAM_BLOCK_K = saved


def _gated_configs(cell: str):
    return props.configs(max_work=40_000, max_layers=2, max_seq=5, max_batch=20, max_hidden=40,
                         dtypes=(torch.float32,), cell=cell).map(
        lambda config: dataclasses.replace(config, proj_size=0))


def _property_test(cell: str, full: bool):
    @pytest.mark.skipif(available_backends().get("triton") is not None,
                        reason=f"triton unavailable: {available_backends().get('triton')}")
    @pytest.mark.skipif(not backends.triton_interpreter_enabled(),
                        reason="CPU tensors need the Triton interpreter; on a GPU "
                        "test_triton_gated.py runs the CUDA parity tests")
    # The interpreter computes with NumPy, which warns about the NaN/inf drawn into inputs.
    @pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
    @pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
    @props.property_settings(EXAMPLES if full or props.PROFILE != "ci" else QUICK_EXAMPLES)
    @given(config=_gated_configs(cell), streamed=st.booleans())
    def test(config, streamed):
        with _path(streamed):
            props.check_against_nn(config, "triton")

    return pytest.mark.slow(test) if full and props.PROFILE == "ci" else test


test_triton_lstm_matches_nn_lstm = _property_test("lstm", full=False)
test_triton_lstm_matches_nn_lstm_full = _property_test("lstm", full=True)
test_triton_gru_matches_nn_gru = _property_test("gru", full=False)
test_triton_gru_matches_nn_gru_full = _property_test("gru", full=True)
