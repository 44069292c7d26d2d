"""The C++ engine's results, bit for bit, against the last accepted ones (see
tests/engine_digests.py: every cell, fp32/fp64, padded/packed/batch_first, dropout, inference).
Compared only on a machine with the fingerprint they were computed on."""

import json

import engine_digests
import pytest

from fastbirnn import available_backends

pytestmark = pytest.mark.skipif(
    available_backends()["cpp"] is not None, reason="the C++ extension is not built"
)


def test_engine_results_are_bit_identical_to_the_accepted_ones():
    with open(engine_digests.PATH) as f:
        stored = json.load(f)
    here = engine_digests.fingerprint()
    if stored["fingerprint"] != here:
        pytest.skip(f"digests were computed on {stored['fingerprint']}, this is {here}")
    diffs = engine_digests.differences(stored["digests"], engine_digests.compute())
    assert not diffs, "results changed:\n" + "\n".join(diffs[:40])
