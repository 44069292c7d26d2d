"""fastbirnn.autotune: 'auto' measures the fused kernel and the nn class on the first call of
each signature and keeps the faster one; the measuring leaves results, gradients and the RNG
as they would be without it."""

import os
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastbirnn
from fastbirnn import FastBiGRU, FastBiLSTM, FastBiRNN, tuning

pytestmark = pytest.mark.skipif(fastbirnn.available_backends()["cpp"] is not None,
                                reason="the calibration chooses between cpp and the nn class")


@pytest.fixture(autouse=True)
def calibration_on():
    tuning.clear()
    fastbirnn.autotune(True)
    yield
    fastbirnn.autotune(False)
    tuning.clear()


def _slowed(module, slow_backend, monkeypatch):
    """``module`` whose calibration runs of ``slow_backend`` take 10x longer on the clock the
    calibration reads (a fake one: real timings under load would make the test flaky); the
    backends that ran, in order."""
    runs, now = [], [0.0]
    forward_on = module._forward_on

    def timed(backend, input):
        runs.append(backend)
        now[0] += 1.0 if backend == slow_backend else 0.1
        return forward_on(backend, input)

    module._forward_on = timed
    monkeypatch.setattr(tuning, "_clock", lambda: now[0])
    return runs


@pytest.mark.parametrize("slow", ["cpp", "torch"])
@pytest.mark.parametrize("cls", [FastBiRNN, FastBiLSTM, FastBiGRU])
def test_the_faster_backend_is_kept_for_the_signature(cls, slow, monkeypatch):
    torch.manual_seed(0)
    model = cls(6, 8)
    runs = _slowed(model, slow, monkeypatch)
    x = torch.randn(5, 3, 6)
    faster = "torch" if slow == "cpp" else "cpp"
    assert model.selected_backend(x) == faster
    assert sorted(set(runs)) == ["cpp", "torch"] and len(runs) == 2 * (1 + tuning.ROUNDS)
    (winner, medians), = tuning.results().values()
    assert winner == faster and medians[slow] > medians[faster]
    model(x)
    assert model.selected_backend(x) == faster and len(runs) == 2 * (1 + tuning.ROUNDS)
    # Another module of the same configuration reuses the measurement; other shapes measure.
    other = cls(6, 8)
    assert other.selected_backend(x) == faster
    model.selected_backend(torch.randn(7, 3, 6))
    assert len(tuning.results()) == 2


def test_measuring_changes_no_result_gradient_or_random_state():
    """A training step with dropout, packed input: identical with the calibration on and off
    (the nn class and cpp give equal results only up to rounding, so the calibration is made
    to pick cpp, which 'auto' picks here anyway)."""

    def step():
        torch.manual_seed(1)
        model = FastBiLSTM(4, 16, num_layers=2, dropout=0.5)
        x = torch.randn(9, 3, 4, requires_grad=True)
        packed = pack_padded_sequence(x, [9, 6, 2])
        out, (h, c) = model(packed)
        assert all(p.grad is None for p in model.parameters()) and x.grad is None
        (out.data.sum() + h.sum() + c.sum()).backward()
        return [out.data, h, c, x.grad, *(p.grad for p in model.parameters()), torch.rand(3)]

    fastbirnn.autotune(False)
    plain = step()
    fastbirnn.autotune(True)
    measured = step()
    assert len(tuning.results()) == 1
    (winner, _), = tuning.results().values()
    if winner != "cpp":
        pytest.skip("the calibration picked nn.LSTM on this machine: results differ by rounding")
    for a, b in zip(plain, measured):
        assert torch.equal(a, b)


def test_turning_it_off_goes_back_to_the_rule(monkeypatch):
    model = FastBiGRU(6, 8)
    x = torch.randn(5, 3, 6)
    _slowed(model, "cpp", monkeypatch)
    assert model.selected_backend(x) == "torch"
    model(x)  # the hot path's cache remembers the calibrated choice...
    fastbirnn.autotune(False)
    assert model.selected_backend(x) == "cpp"  # ...but its key holds the switch: the rule's


def test_bad_input_still_raises_the_nn_error():
    model = FastBiRNN(6, 8)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        model(torch.randn(5, 3, 7))
    assert tuning.results() == {}


def test_environment_variable_turns_it_on_at_import():
    code = "import fastbirnn\nfrom fastbirnn import tuning\nprint(tuning.enabled())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "FASTBIRNN_AUTOTUNE": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
