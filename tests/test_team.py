"""The C++ engine's team (csrc/team.h): how its workers wait changes speed only, never results.

- the caller's floating-point control (FTZ/DAZ from torch.set_flush_denormal) reaches every
  worker: results on inputs that produce subnormals are bit-identical for 1 and 2 threads and
  hold no subnormal;
- the inline mode (ATen without OpenMP, or FASTBIRNN_TEAM=inline) computes the same bits as
  the team;
- on a crowded machine (team waits that keep sleeping) the next runs go inline for a doubling
  stretch, with the team's bits;
- two Python threads calling at once (four workers on the machine's cores, each team's
  waiters sleeping when their partner is descheduled) neither deadlock nor change results.

A worker failing inside a team has no trigger from Python (the engine checks every argument
before its team starts), so the failure path is not tested here.
"""

import os
import subprocess
import sys
import threading

import pytest
import torch

import fastbirnn
from fastbirnn import FastBiGRU, FastBiRNN
from parity import with_threads

_C = pytest.importorskip("fastbirnn._C")

# Large enough for a team of two (one block per direction, H <= 64: the reverse direction runs
# on the second thread), small enough to be quick.
B, T, I, H = 8, 12, 16, 64
CELLS = {
    "rnn_relu": lambda bias: FastBiRNN(I, H, nonlinearity="relu", bias=bias, backend="cpp"),
    "rnn_tanh": lambda bias: FastBiRNN(I, H, bias=bias, backend="cpp"),
    "gru": lambda bias: FastBiGRU(I, H, bias=bias, backend="cpp"),
}


def _inputs(x_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g)
    # Every other batch row tiny: its products and states are subnormal unless flushed.
    scale = torch.tensor([x_scale if b % 2 else 1.0 for b in range(B)]).view(1, B, 1)
    grad_out = torch.randn(T, B, 2 * H, generator=g)
    return (x * scale).requires_grad_(True), grad_out


def _model(cell, x_scale=1.0):
    """The cell's model, the same weights every time. With tiny rows (x_scale) it has no
    biases, so those rows' states stay tiny too."""
    torch.manual_seed(0)
    return CELLS[cell](x_scale == 1.0)


def _results(cell, x_scale=1.0, grad=True, model=None):
    """Output, final state and (training) every gradient of one call, as a list."""
    model = model if model is not None else _model(cell, x_scale)
    x, grad_out = _inputs(x_scale)
    if not grad:
        with torch.no_grad():
            return list(model(x))
    out, h_n = model(x)
    grads = torch.autograd.grad((out * grad_out).sum() + h_n.sum(), [x, *model.parameters()])
    return [out.detach(), h_n.detach(), *grads]


def _assert_same_bits(expected, actual, what):
    assert len(expected) == len(actual)
    for i, (a, b) in enumerate(zip(expected, actual)):
        assert torch.equal(a, b), f"{what}: result {i} differs"


def _subnormals(tensors):
    tiny = torch.finfo(torch.float32).tiny
    return sum(int(((t != 0) & (t.abs() < tiny)).sum()) for t in tensors)


def _flush_denormal_is_on():
    # 1e-30 * 1e-10 is subnormal in float32: flushed to zero under FTZ.
    return bool((torch.tensor([1e-30]) * torch.tensor([1e-10])).item() == 0)


def test_team_mode_follows_aten_and_the_environment():
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    forced = os.environ.get("FASTBIRNN_TEAM") == "inline"
    assert _C.team_mode() == ("openmp" if openmp and not forced else "inline")


@pytest.mark.parametrize("cell", ["rnn_relu", "gru"])
def test_flush_denormal_reaches_every_worker(cell):
    if _C.team_mode() != "openmp":
        pytest.skip("teams run inline: no worker threads")
    was_on = _flush_denormal_is_on()
    x_scale = 1e-37  # products of these rows with weights of ~0.1: subnormal
    try:
        if not torch.set_flush_denormal(False):
            pytest.skip("this CPU cannot flush denormals")
        # Flush off first: 2 threads start the pool's threads (a new thread inherits its
        # creator's MXCSR, so threads started under FTZ would hide a missing carry) and must
        # not flush either.
        plain = with_threads(1, lambda: _results(cell, x_scale))
        plain_two = with_threads(2, lambda: _results(cell, x_scale))
        # The inputs do produce subnormals, so the test can tell flushed from not.
        assert _subnormals(plain) > 0
        torch.set_flush_denormal(True)
        assert _flush_denormal_is_on()
        one = with_threads(1, lambda: _results(cell, x_scale))
        two = with_threads(2, lambda: _results(cell, x_scale))
        one_inference = with_threads(1, lambda: _results(cell, x_scale, grad=False))
        two_inference = with_threads(2, lambda: _results(cell, x_scale, grad=False))
        # And off again: no worker keeps the caller's flush after the call.
        torch.set_flush_denormal(False)
        plain_again = with_threads(2, lambda: _results(cell, x_scale))
    finally:
        torch.set_flush_denormal(was_on)
    _assert_same_bits(plain, plain_two, "FTZ/DAZ off, 1 vs 2 threads")
    _assert_same_bits(plain, plain_again, "FTZ/DAZ off after on, 1 vs 2 threads")
    assert _flush_denormal_is_on() == was_on
    _assert_same_bits(one, two, "FTZ/DAZ on, 1 vs 2 threads")
    _assert_same_bits(one_inference, two_inference, "FTZ/DAZ on, inference, 1 vs 2 threads")
    assert _subnormals(two) + _subnormals(two_inference) == 0, "a worker computed without the caller's FTZ/DAZ"
    assert any(not torch.equal(a, b) for a, b in zip(plain, one)), "nothing was flushed"


_DUMP = """
import sys, torch
sys.path.insert(0, {tests!r})
import test_team
from fastbirnn import _C
torch.set_num_threads(2)
torch.save({{"mode": _C.team_mode(),
            "results": {{c: test_team._results(c) for c in test_team.CELLS}}}}, {path!r})
"""


def test_forced_inline_mode_is_bit_identical_to_the_team(tmp_path):
    if _C.team_mode() != "openmp":
        pytest.skip("teams already run inline here")
    path = str(tmp_path / "inline.pt")
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fastbirnn.__file__)))
    env = dict(os.environ, FASTBIRNN_TEAM="inline",
               PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    code = _DUMP.format(tests=os.path.dirname(os.path.abspath(__file__)), path=path)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    inline = torch.load(path)
    assert inline["mode"] == "inline"
    for cell in CELLS:
        team = with_threads(2, lambda: _results(cell))
        _assert_same_bits(team, inline["results"][cell], f"{cell}: team vs inline")


def test_two_python_threads_calling_at_once_agree_with_one_thread():
    cells = ("rnn_tanh", "gru")
    expected = {c: with_threads(1, lambda c=c: _results(c)) for c in cells}
    expected_inference = {c: with_threads(1, lambda c=c: _results(c, grad=False)) for c in cells}
    errors, done = [], []
    saved = torch.get_num_threads()
    torch.set_num_threads(2)

    def worker(cell, model):
        # The model is built beforehand: seeding torch's global generator in several threads
        # at once would draw different weights.
        try:
            for _ in range(8):
                _assert_same_bits(expected[cell], _results(cell, model=model),
                                  f"{cell} beside another caller")
                _assert_same_bits(expected_inference[cell], _results(cell, grad=False, model=model),
                                  f"{cell} inference beside another caller")
            done.append(cell)
        except Exception as error:  # reported below
            errors.append(error)

    try:
        threads = [threading.Thread(target=worker, args=(c, _model(c)), daemon=True)
                   for c in cells + cells]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
    finally:
        torch.set_num_threads(saved)
    assert not any(t.is_alive() for t in threads), "a team deadlocked"
    assert not errors, errors
    assert len(done) == len(threads)


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_directions_run_apart_without_a_barrier_per_step(cell):
    """A team of two on a bidirectional layer runs each direction whole on one worker
    (recurrence.h, steps_share_directions): its steps meet at no barrier, forward or BPTT, and
    give the bits a single thread gives. A unidirectional layer split over the same two
    workers meets once per step."""
    steps, hidden = 48, 128  # two column blocks per direction: a team of two either way
    classes = {"rnn": FastBiRNN, "gru": FastBiGRU}

    def barriers(bidirectional):
        torch.manual_seed(0)
        model = classes[cell](16, hidden, bidirectional=bidirectional, backend="cpp")
        x = torch.randn(steps, 8, 16, requires_grad=True)
        before = _C.team_barriers_met()
        out, h_n = model(x)
        (out.sum() + h_n.sum()).backward()
        return _C.team_barriers_met() - before, [out.detach(), h_n.detach(), x.grad,
                                                 *(p.grad for p in model.parameters())]

    _C.reset_team_crowding()
    (apart, results), (together, _) = with_threads(2, lambda: (barriers(True), barriers(False)))
    # Per layer and thread: the projection's (at most two) and the one before the first step.
    assert apart <= 2 * 2 * 3
    assert together >= 2 * (steps - 1)  # forward and BPTT, every step
    _, alone = with_threads(1, lambda: barriers(True))
    _assert_same_bits(alone, results, f"{cell}: directions apart on two threads vs one thread")


def test_small_bidirectional_steps_still_take_one_worker_per_direction():
    """Below the per-step work that pays for a barrier (16 k multiply-adds per worker), a
    bidirectional call still runs its directions on two workers, which meet at no barrier per
    step (geometry.h, team_size): each thread meets only the barrier before the first step.
    A unidirectional one of the same size runs on one worker."""
    def members(bidirectional):
        torch.manual_seed(0)
        model = FastBiRNN(16, 64, bidirectional=bidirectional, backend="cpp")  # 4 k per step
        x = torch.randn(128, 1, 16)
        before = _C.team_barriers_met()
        with torch.no_grad():
            model(x)
        return _C.team_barriers_met() - before

    _C.reset_team_crowding()
    assert with_threads(2, lambda: members(True)) == (2 if _C.team_mode() == "openmp" else 1)
    assert with_threads(2, lambda: members(False)) == 1


def test_crowded_teams_give_way_to_inline_runs_for_a_doubling_stretch():
    """A team run that lost more than a quarter of its time to stalled waits, with a worker
    preempted, sends the next runs inline, for a stretch that doubles while the crowding lasts
    and resets after a calm run (csrc/team.h, Crowding)."""
    ms = 1_000_000
    _C.reset_team_crowding()
    try:
        _C.record_team_run(ms - 1, ms - 1, preemptions=10**6)  # too short to judge
        assert _C.team_crowding()[:2] == (0, 4)
        _C.record_team_run(100 * ms, 25 * ms)  # a quarter stalled: calm
        assert _C.team_crowding()[:2] == (0, 4)
        _C.record_team_run(100 * ms, 26 * ms)
        assert _C.team_crowding()[:2] == (4, 8)
        _C.record_team_run(100 * ms, 90 * ms)
        assert _C.team_crowding()[:2] == (8, 16)
        _C.record_team_run(100 * ms, 0)
        assert _C.team_crowding()[:2] == (8, 4)
        for _ in range(10):
            _C.record_team_run(100 * ms, 100 * ms)
        assert _C.team_crowding()[:2] == (256, 256)  # the stretch stops doubling
        _C.reset_team_crowding()
        # Stalls in a run whose workers were seldom preempted (a partner slowed by page faults;
        # fewer than one preemption per 10 ms) are no crowding; an OS that does not count
        # preemptions (-1) leaves the stalls to decide.
        _C.record_team_run(100 * ms, 90 * ms, preemptions=0)
        _C.record_team_run(100 * ms, 90 * ms, preemptions=9)
        assert _C.team_crowding()[:2] == (0, 4)
        _C.record_team_run(100 * ms, 90 * ms, preemptions=10)
        assert _C.team_crowding()[:2] == (4, 8)
        _C.reset_team_crowding()
        _C.record_team_run(100 * ms, 90 * ms, preemptions=-1)
        assert _C.team_crowding()[:2] == (4, 8)
    finally:
        _C.reset_team_crowding()


@pytest.mark.skipif(_C.team_mode() != "openmp", reason="teams run inline here anyway")
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_runs_sent_inline_by_crowding_are_bit_identical_to_the_team(cell):
    """Forced crowding: every layer's forward and backward run inline for a while (counted),
    with the team's bits."""
    def team_then_crowded():
        _C.reset_team_crowding()
        team = _results(cell)
        try:
            _C.record_team_run(10**9, 10**9)
            _C.record_team_run(10**9, 10**9)  # a stretch of 8: both calls below fit in it
            before = _C.team_crowding()[2]
            crowded = [_results(cell), _results(cell, grad=False)]
            assert _C.team_crowding()[2] - before == 3  # forward+backward, then forward
        finally:
            _C.reset_team_crowding()
        return team, crowded

    team, crowded = with_threads(2, team_then_crowded)
    _assert_same_bits(team, crowded[0], "training call, inline")
    _assert_same_bits(team[:len(crowded[1])], crowded[1], "inference call, inline")
