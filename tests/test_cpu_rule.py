"""'auto' on CPU: the rule (fastbirnn/backends/cpu_rule.py), how 'auto' applies it, and the
hot-path cache of the choice. These test the rule's behaviour and plumbing, not the
committed grid's numbers (those are benchmarks: benchmarks/cpu_grid.py --check)."""

import itertools
from dataclasses import asdict, replace

import pytest
import torch
from torch import nn

from fastbirnn import FastBiRNN
from fastbirnn.backends import cpu_rule
from fastbirnn.backends.cpu_rule import CallShape

pytest.importorskip("fastbirnn._C")


def shape(**kw):
    base = dict(batch=32, seq=128, hidden=128, layers=1, bidirectional=True,
                dtype=torch.float32, training=True, threads=2)
    base.update(kw)
    return CallShape(**base)


def test_rule_is_a_pure_function_of_the_call():
    s = shape()
    assert cpu_rule.prefer_cpp(s) == cpu_rule.prefer_cpp(shape())
    assert isinstance(cpu_rule.prefer_cpp(s), bool)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("threads", [1, 2, 16])
def test_small_and_medium_problems_are_fused(training, dtype, threads):
    # Dispatch-bound problems are where the fused kernel wins most: never handed away.
    for B, H, bi in [(2, 32, True), (1, 128, True), (32, 128, True), (8, 64, False)]:
        s = shape(batch=B, hidden=H, bidirectional=bi, training=training, dtype=dtype,
                  threads=threads)
        assert cpu_rule.prefer_cpp(s), s


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 16])
def test_rule_is_monotone_in_problem_size(training, threads, isa):
    # Once nn.RNN is preferred for a per-step size, it stays preferred for larger ones (the
    # fused kernel's edge is the per-step overhead it saves, which shrinks with the step).
    for bi, layers, dtype in itertools.product((False, True), (1, 3),
                                               (torch.float32, torch.float64)):
        for H in (32, 64, 128, 256, 512, 1024, 2048):
            picks = [cpu_rule.prefer_cpp(shape(batch=B, hidden=H, bidirectional=bi,
                                               layers=layers, dtype=dtype, training=training,
                                               threads=threads, isa=isa))
                     for B in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
            first_torch = picks.index(False) if False in picks else len(picks)
            assert all(not p for p in picks[first_torch:]), (H, picks)


def _pair(bidirectional=True, hidden=16):
    torch.manual_seed(0)
    ref = nn.RNN(8, hidden, bidirectional=bidirectional)
    fast = FastBiRNN(8, hidden, bidirectional=bidirectional)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("prefer", [False, True])
def test_auto_follows_the_rule_and_matches_nn_rnn_either_way(monkeypatch, prefer):
    seen = []

    def rule(call):
        seen.append(call)
        return prefer

    monkeypatch.setattr(cpu_rule, "prefer_cpp", rule)
    ref, fast = _pair()
    x = torch.randn(5, 3, 8, requires_grad=True)
    assert fast.selected_backend(x) == ("cpp" if prefer else "torch")
    call = seen[-1]
    assert (call.batch, call.seq, call.hidden, call.layers, call.bidirectional) == (3, 5, 16, 1, True)
    assert call.dtype == torch.float32 and call.training and call.threads == torch.get_num_threads()
    out, h = fast(x)
    expected, h_ref = ref(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(h, h_ref)
    g = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(g, torch.autograd.grad(expected.sum(), x)[0])


def test_rule_sees_inference_training_threads_and_packed(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_rule, "prefer_cpp", lambda c: calls.append(c) or True)
    _, fast = _pair()
    x = torch.randn(7, 4, 8)
    with torch.no_grad():
        fast.selected_backend(x)
    assert calls[-1].training is False
    fast.selected_backend(x)
    assert calls[-1].training is True  # the weights require grad
    _, frozen = _pair()
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.selected_backend(x)
    assert calls[-1].training is False  # frozen weights, input without grad
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fast.selected_backend(x)
        assert calls[-1].threads == 1
    finally:
        torch.set_num_threads(saved)
    packed = nn.utils.rnn.pack_padded_sequence(x, [7, 5, 2, 1])
    fast.selected_backend(packed)
    assert (calls[-1].batch, calls[-1].seq) == (4, 7)


def test_choice_is_cached_per_signature_and_redecided_when_it_changes(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_rule, "prefer_cpp", lambda c: calls.append(c) or c.batch < 4)
    ref, fast = _pair()
    small, big = torch.randn(5, 2, 8), torch.randn(5, 6, 8)
    for _ in range(3):
        torch.testing.assert_close(fast(small)[0], ref(small)[0])
    assert len(calls) == 1  # decided once for this signature
    for _ in range(3):
        torch.testing.assert_close(fast(big)[0], ref(big)[0])  # nn.RNN runs this one
    assert len(calls) == 2
    with torch.no_grad():
        fast(small)
    assert len(calls) == 3 and calls[-1].training is False
    fast.double()  # new weight dtype: new signature, checks run again
    with pytest.raises((RuntimeError, ValueError), match="dtype"):
        fast(small)  # float input, double weights: nn.RNN's own error, not a stale fast path
    torch.testing.assert_close(fast(small.double())[0], ref.double()(small.double())[0])


def test_hot_path_still_checks_weights_swapped_by_functional_call():
    ref, fast = _pair()
    x = torch.randn(5, 2, 8)
    fast(x)
    fast(x)  # cached signature
    params = {k: torch.zeros_like(v) for k, v in fast.named_parameters()}
    out, _ = torch.func.functional_call(fast, params, (x,))
    assert torch.count_nonzero(out) == 0
    torch.testing.assert_close(fast(x)[0], ref(x)[0])


def test_cached_module_pickles_and_deep_copies():
    import copy
    import pickle

    ref, fast = _pair()
    x = torch.randn(5, 2, 8)
    fast(x)
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        torch.testing.assert_close(clone(x)[0], ref(x)[0])




@pytest.mark.parametrize("training", [False, True])
def test_lstm_taggers_both_directions_are_fused_up_to_the_measured_limit(training):
    """Issue 23's grid (cpu-grid-tagger-lstm): a bidirectional tagger step up to 640 k
    multiply-adds per worker runs the kernel in both modes (a 16-step batch-1 one too: 5.31x
    nn.LSTM in inference in 0495a1a's grid); above 1 M per worker the inference of long
    sequences (test_lstm_inference_of_short_sequences_is_fused_up_to_4_m) and one direction
    keep nn.LSTM (one direction's training from batch 16 on a team runs the kernel:
    test_lstm_training_steps_with_one_direction_on_a_team_are_fused_from_batch_16)."""
    lstm = dict(cell="lstm", training=training)
    assert cpu_rule.prefer_cpp(shape(batch=16, seq=30, hidden=100, **lstm))  # 640 k
    assert cpu_rule.prefer_cpp(shape(batch=8, seq=128, hidden=128, **lstm))  # 524 k
    assert cpu_rule.prefer_cpp(shape(batch=1, seq=30, hidden=256, layers=2, **lstm))
    assert cpu_rule.prefer_cpp(shape(batch=16, seq=30, hidden=100, bidirectional=False,
                                     **lstm)) == training
    # 2.1 M over 128 steps: the training step only (test_lstm_training_steps_of_taggers_are_fused)
    assert cpu_rule.prefer_cpp(shape(batch=32, seq=128, hidden=128, **lstm)) == training
    assert cpu_rule.prefer_cpp(shape(batch=1, seq=16, hidden=256, **lstm))
    assert cpu_rule.prefer_cpp(shape(batch=1, seq=128, hidden=512, **lstm)) == training  # 1 M


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gated_fp64_steps_are_fused_below_the_measured_limit(cell, training, bidirectional):
    """fp64 gated steps below 16.8 M multiply-adds per worker run the kernel (the grids: 1.08x
    to 3.07x the nn class from 393 k to 4.2 M), from T = 16; the grids' largest fp64 step
    (100-134 M: 0.85-1.07x) keeps the nn class."""
    fp64 = dict(cell=cell, dtype=torch.float64, training=training, bidirectional=bidirectional)
    gates, directions = cpu_rule.GATES[cell], 2 if bidirectional else 1
    assert cpu_rule.prefer_cpp(shape(batch=8, hidden=128, **fp64))
    assert cpu_rule.prefer_cpp(shape(batch=32, seq=16, hidden=256, **fp64))
    assert not cpu_rule.prefer_cpp(shape(batch=32, seq=15, hidden=256, **fp64))  # short
    # gates * D * B * 256^2 over 2 workers reaches 16.8 M at this batch
    at_limit = -(-2 ** 25 // (gates * directions * 256 ** 2))
    assert cpu_rule.prefer_cpp(shape(batch=at_limit - 1, hidden=256, **fp64))
    assert not cpu_rule.prefer_cpp(shape(batch=at_limit, hidden=256, **fp64))
    assert not cpu_rule.prefer_cpp(shape(batch=128, hidden=512, **fp64))


def test_gru_fp32_steps_are_fused_at_every_size_on_avx512():
    """The GRU grid at 5a9275d: the kernel won at every fp32 point, B 128 with H 128-512
    included (1.10-1.68x). On AVX2 its grid at 2e2e190 was near a tie from 8.4 M multiply-adds
    per worker (0.66-1.21x) and lost at B 128 from 4.2 M (0.79-1.03x in training): nn.GRU
    there."""
    gru = dict(cell="gru", batch=128, hidden=512)
    for training in (False, True):
        for bidirectional in (False, True):
            call = dict(gru, training=training, bidirectional=bidirectional)
            assert cpu_rule.prefer_cpp(shape(**call))
            assert not cpu_rule.prefer_cpp(shape(isa="avx2", **call))
    avx2 = dict(cell="gru", hidden=128, isa="avx2")  # 3 * 2 * B * 128^2 / 2 per worker
    assert cpu_rule.prefer_cpp(shape(batch=127, **avx2))  # 6.2 M
    assert not cpu_rule.prefer_cpp(shape(batch=128, **avx2))  # B 128 from 4.2 M
    assert cpu_rule.prefer_cpp(shape(batch=128, **{**avx2, "hidden": 64}))  # 1.6 M
    assert cpu_rule.prefer_cpp(shape(batch=42, hidden=256, cell="gru", isa="avx2"))  # 8.26 M
    assert not cpu_rule.prefer_cpp(shape(batch=43, hidden=256, cell="gru", isa="avx2"))


def test_grid_check_flags_a_rule_that_picks_the_slower_contender(grid, monkeypatch):
    p = grid.Point(8, 16, 32, 32, 1, True, "fp32", 2)
    row = {"point": asdict(p), "label": p.label, "cpp_infer_x": 0.8, "cpp_train_x": 1.5}
    monkeypatch.setattr(cpu_rule, "prefer_cpp", lambda c: True)
    problems = grid.check([row])
    assert len(problems) == 1 and "infer" in problems[0]
    monkeypatch.setattr(cpu_rule, "prefer_cpp", lambda c: not c.training)
    assert len(grid.check([row])) == 2
    monkeypatch.setattr(cpu_rule, "prefer_cpp", lambda c: c.training)
    assert grid.check([row]) == []


def test_grid_covers_the_space_it_claims(grid):
    points = grid.points(2, 4e9)
    assert {p.bidirectional for p in points} == {False, True}
    assert {p.layers for p in points} == {1, 2, 3}
    assert {p.dtype for p in points} == {"fp32", "fp64"}
    assert {p.threads for p in points} == {1, 2}
    assert min(p.batch for p in points) == 1 and max(p.batch for p in points) == 256
    assert min(p.seq for p in points) == 4 and max(p.seq for p in points) == 512
    assert min(p.hidden for p in points) == 32 and max(p.hidden for p in points) == 1024
    named = {tuple(n) for n in grid.NAMED}
    assert all(p.macs <= 4e9 or p.seq == 4
               or (p.batch, p.seq, p.input, p.hidden, p.bidirectional) in named for p in points)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_outside_the_measured_machines_the_rule_is_conservative(cell, training):
    """An instruction set no grid measured gets the nn class; more threads than any grid
    measured fuse only small steps, and only where the measured thread count fuses too."""
    for B, H, bi in itertools.product((1, 8, 32, 128), (32, 128, 512), (False, True)):
        base = dict(batch=B, hidden=H, bidirectional=bi, cell=cell, training=training)
        assert not cpu_rule.prefer_cpp(shape(isa="scalar", **base))
        measured = cpu_rule.prefer_cpp(shape(threads=cpu_rule.MEASURED_MAX_THREADS, **base))
        many = shape(threads=64, **base)
        expected = measured and many.step_macs <= cpu_rule.UNMEASURED_STEP_LIMIT
        assert cpu_rule.prefer_cpp(many) == expected, many
    # The tagger's and the tutorial's small steps stay fused on a 64-thread machine.
    assert cpu_rule.prefer_cpp(shape(batch=32, hidden=128, threads=64))
    assert not cpu_rule.prefer_cpp(shape(batch=64, hidden=512, threads=64))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_avx2_fuses_only_where_avx512_does(cell, training):
    """The AVX2 grids measured smaller margins than AVX-512's: on AVX2 the rule fuses a subset
    of what it fuses on AVX-512, never more."""
    declined = 0
    for B, T, H, bi, dtype in itertools.product((1, 8, 32, 128), (4, 16, 128),
                                                (32, 128, 512, 1024), (False, True),
                                                (torch.float32, torch.float64)):
        s = shape(batch=B, seq=T, hidden=H, bidirectional=bi, dtype=dtype, cell=cell,
                  training=training)
        on_avx2 = cpu_rule.prefer_cpp(replace(s, isa="avx2"))
        assert not on_avx2 or cpu_rule.prefer_cpp(s), s
        declined += cpu_rule.prefer_cpp(s) and not on_avx2
    assert declined > 0  # the AVX2 limits are in force for every cell and mode


@pytest.mark.parametrize("cell", ["rnn", "gru"])
@pytest.mark.parametrize("training", [False, True])
def test_avx2_fuses_the_issue_shapes(cell, training):
    # The tutorial's shape and (32, 128, 128, 128) bidirectional (1.8-2.0x nn on AVX2).
    for B, T, H in [(2, 4, 32), (32, 128, 128)]:
        assert cpu_rule.prefer_cpp(shape(batch=B, seq=T, hidden=H, cell=cell, isa="avx2",
                                         training=training))


def test_avx2_limits():
    """The shapes behind each AVX2 limit (cpu_rule._avx2_declines) go to the nn class there and
    stay fused on AVX-512."""
    limited = [
        dict(batch=64, seq=16, hidden=512, bidirectional=False, dtype=torch.float64, training=False),
        dict(batch=256, seq=4, hidden=512, dtype=torch.float64, training=False, threads=1),
        dict(batch=1, seq=4, hidden=1024, dtype=torch.float64, threads=1),
        dict(batch=32, seq=16, hidden=512, cell="gru"),
        dict(batch=1, seq=128, hidden=256, cell="lstm"),
        dict(batch=32, seq=128, hidden=64, cell="lstm", training=False),
    ]
    for kw in limited:
        assert cpu_rule.prefer_cpp(shape(**kw)), kw
        assert not cpu_rule.prefer_cpp(shape(isa="avx2", **kw)), kw
    # Below the LSTM's AVX2 limit both directions at once stay fused (1.64x / 1.45x at B 8).
    assert cpu_rule.prefer_cpp(shape(batch=8, seq=128, hidden=64, cell="lstm", isa="avx2"))


def test_lstm_inference_of_short_sequences_is_fused_up_to_4_m():
    """Both directions' inference over fewer than 64 steps runs the kernel below 4.2 M
    multiply-adds per worker and step (every such grid and tagger point of the last three
    engines won: 1.06-3.25x nn.LSTM, the tagger's (32, 40, 100, 128) 1.08-1.12x); at 4.2 M,
    over 64 steps or more, with one direction, on AVX2 and in fp64 or bf16 the rule is as
    before."""
    tagger = dict(batch=32, seq=40, hidden=128, cell="lstm", training=False)  # 2.1 M
    assert cpu_rule.prefer_cpp(shape(**tagger))
    assert cpu_rule.prefer_cpp(shape(**{**tagger, "seq": 16}))
    assert cpu_rule.prefer_cpp(shape(**{**tagger, "seq": 63}))
    assert not cpu_rule.prefer_cpp(shape(**{**tagger, "seq": 64}))
    assert not cpu_rule.prefer_cpp(shape(**{**tagger, "seq": 15}))
    assert cpu_rule.prefer_cpp(shape(**{**tagger, "batch": 63}))  # 4.13 M
    assert not cpu_rule.prefer_cpp(shape(**{**tagger, "batch": 64}))  # 4.19 M
    assert cpu_rule.prefer_cpp(shape(batch=1, seq=16, hidden=512, cell="lstm", training=False))
    assert not cpu_rule.prefer_cpp(shape(**{**tagger, "bidirectional": False}))
    assert not cpu_rule.prefer_cpp(shape(**{**tagger, "isa": "avx2"}))
    assert not cpu_rule.prefer_cpp(shape(**{**tagger, "dtype": torch.bfloat16}))


def test_lstm_inference_is_fused_where_every_layer_projects_step_by_step():
    """Both directions' fp32 inference runs the kernel where every layer projects its input
    step by step (csrc/layer_gemms.h, projects_per_step: batch >= 16, I <= 2H) with at most
    4 MiB of W_ih and W_hh per direction (bidirectional grid points up to H 256: 1.00-2.11x
    nn.LSTM at 2d1a135; at H 512 0.84-1.02x), on AVX2 too (1.05-1.73x on Zen 5's AVX2 grid and
    tagger preset at db4521c); one direction, training on AVX2, fp64, sequences under 16 steps
    and a call whose input size is unknown are as before."""
    mid = dict(batch=32, seq=128, hidden=256, input=256, cell="lstm", training=False)  # 8.4 M
    assert cpu_rule.prefer_cpp(shape(**mid))
    assert not cpu_rule.prefer_cpp(shape(**{**mid, "input": None}))
    assert not cpu_rule.prefer_cpp(shape(**{**mid, "batch": 15}))
    assert cpu_rule.prefer_cpp(shape(**{**mid, "batch": 16}))
    assert cpu_rule.prefer_cpp(shape(**{**mid, "input": 512}))  # I = 2H: 3 MiB
    assert not cpu_rule.prefer_cpp(shape(**{**mid, "input": 513}))
    assert not cpu_rule.prefer_cpp(shape(**{**mid, "seq": 15}))
    assert not cpu_rule.prefer_cpp(shape(**{**mid, "bidirectional": False}))
    assert not cpu_rule.prefer_cpp(shape(**{**mid, "dtype": torch.float64, "batch": 256}))
    # On AVX2 the same clause, for inference alone (its training steps: 0.82-1.33x).
    avx2 = {**mid, "isa": "avx2"}
    assert cpu_rule.prefer_cpp(shape(**avx2))
    assert cpu_rule.prefer_cpp(shape(**{**avx2, "batch": 16, "input": 512}))
    assert cpu_rule.prefer_cpp(shape(**{**avx2, "layers": 2}))  # layer 2: I = 2H, 3 MiB
    for off in ({"batch": 15}, {"input": 513}, {"input": None}, {"training": True},
                {"bidirectional": False}, {"hidden": 512, "input": 512},
                {"dtype": torch.float64}, {"seq": 15}):
        assert not cpu_rule.prefer_cpp(shape(**{**avx2, **off})), off
    # Within 4 MiB per direction: H 300 with I 300 (2.7 MiB) but not H 512 with I 512 (8 MiB).
    assert cpu_rule.prefer_cpp(shape(**{**mid, "hidden": 300, "input": 300}))
    assert not cpu_rule.prefer_cpp(shape(**{**mid, "hidden": 512, "input": 512}))
    # Stacked layers read 2H inputs: two layers of H 256 (3 MiB) are fused, of H 300 (4.1 MiB)
    # not.
    assert cpu_rule.prefer_cpp(shape(**{**mid, "layers": 2}))
    assert not cpu_rule.prefer_cpp(shape(**{**mid, "layers": 2, "hidden": 300, "input": 300}))


def test_lstm_training_steps_of_taggers_are_fused():
    """Both directions' training steps over 16 steps or more run the kernel at every size (the
    tagger's (32, 40, 100, 128): 1.11-1.55x nn.LSTM in three runs timed per mode; above 8.4 M
    multiply-adds per worker and step 0.99-1.20x in 2106332's grid and 1.01-1.17x at the tagger
    preset's I != H rows); their inference and shorter sequences stay with nn.LSTM, and so
    does one direction's training at batch 8 (the team clause starts at batch 16)."""
    tagger = dict(batch=32, seq=40, hidden=128, cell="lstm")
    assert cpu_rule.prefer_cpp(shape(training=True, **tagger))
    assert not cpu_rule.prefer_cpp(shape(training=False, **{**tagger, "seq": 128}))
    assert cpu_rule.prefer_cpp(shape(training=True, **{**tagger, "seq": 16}))
    assert not cpu_rule.prefer_cpp(shape(training=True, **{**tagger, "seq": 15}))
    assert not cpu_rule.prefer_cpp(
        shape(training=True, **{**tagger, "batch": 8, "hidden": 256, "bidirectional": False}))
    assert cpu_rule.prefer_cpp(shape(training=True, **{**tagger, "batch": 64}))  # 4.2 M
    two_layers = dict(batch=32, seq=40, hidden=256, layers=2, cell="lstm", training=True)
    assert cpu_rule.prefer_cpp(shape(**two_layers))  # 8.4 M
    assert cpu_rule.prefer_cpp(shape(training=True, **{**tagger, "batch": 256}))  # 16.8 M
    big = dict(batch=128, seq=128, hidden=512, cell="lstm")  # 134 M per worker: 1.00x
    assert cpu_rule.prefer_cpp(shape(training=True, **big))
    assert not cpu_rule.prefer_cpp(shape(training=False, **big))
    assert not cpu_rule.prefer_cpp(shape(training=True, **{**big, "seq": 15}))
    assert not cpu_rule.prefer_cpp(shape(training=True, dtype=torch.float64, **big))


def test_lstm_training_steps_with_one_direction_are_fused_up_to_262_k():
    """One direction's training steps run the kernel up to 262 k multiply-adds per worker and
    step (B 8 at H 64 and 128: 1.11-1.99x nn.LSTM in the last five Zen 4 grids and on Zen 5);
    at 524 k (B 32 H 64, T 128: 0.88-0.92x) and in inference they stay with nn.LSTM, as on
    AVX2, in fp64 and below T = 16."""
    uni = dict(cell="lstm", bidirectional=False, training=True, seq=128)
    assert cpu_rule.prefer_cpp(shape(batch=8, hidden=64, **uni))  # 131 k on one worker
    assert cpu_rule.prefer_cpp(shape(batch=8, hidden=128, **uni))  # 262 k on each of two
    assert cpu_rule.prefer_cpp(shape(batch=1, hidden=256, **uni))
    assert not cpu_rule.prefer_cpp(shape(batch=9, hidden=128, **uni))
    assert not cpu_rule.prefer_cpp(shape(batch=32, hidden=64, **uni))  # 524 k
    assert not cpu_rule.prefer_cpp(shape(batch=8, hidden=128, **{**uni, "training": False}))
    assert not cpu_rule.prefer_cpp(shape(batch=8, hidden=128, **{**uni, "seq": 15}))
    assert not cpu_rule.prefer_cpp(shape(batch=8, hidden=128, isa="avx2", **uni))
    assert cpu_rule.prefer_cpp(shape(batch=8, hidden=128, dtype=torch.float64, **uni))  # fp64 rule


def test_lstm_training_steps_with_one_direction_on_a_team_are_fused_from_batch_16():
    """Where the forward and BPTT of one direction on a team split the batch (e3887d3), its
    fp32 training steps run the kernel from batch 16 at every size, from T = 16 (Zen 5 grid at
    e3887d3: B 32 and 128, H 128-512, 1.01-1.47x, one point 0.95x that read 1.39x interleaved);
    at batch 8 and 9, on one worker (H <= 64) above 262 k, in inference, below T = 16 and on
    AVX2 they stay with nn.LSTM."""
    uni = dict(cell="lstm", bidirectional=False, training=True, seq=128)
    assert cpu_rule.prefer_cpp(shape(batch=16, hidden=65, **uni))  # two blocks: a team
    assert cpu_rule.prefer_cpp(shape(batch=64, hidden=512, **{**uni, "seq": 250}))  # issue 23
    assert cpu_rule.prefer_cpp(shape(batch=128, hidden=1024, layers=3, **{**uni, "seq": 16}))
    assert not cpu_rule.prefer_cpp(shape(batch=15, hidden=256, **uni))
    assert not cpu_rule.prefer_cpp(shape(batch=9, hidden=512, **uni))
    assert not cpu_rule.prefer_cpp(shape(batch=128, hidden=64, **uni))  # one block, one worker
    assert not cpu_rule.prefer_cpp(shape(batch=64, hidden=256, threads=1, **uni))
    assert not cpu_rule.prefer_cpp(shape(batch=64, hidden=256, **{**uni, "training": False}))
    assert not cpu_rule.prefer_cpp(shape(batch=64, hidden=256, **{**uni, "seq": 15}))
    assert not cpu_rule.prefer_cpp(shape(batch=64, hidden=256, isa="avx2", **uni))


@pytest.mark.parametrize("threads", [1, 2])
def test_short_elman_sequences_are_fused_but_one_direction_s_inference_on_a_team(threads):
    """Fewer than 16 steps with large steps run the kernel (both machines' Elman grids:
    1.00-1.60x on Zen 4, 1.02-2.46x on Zen 5), but one direction's inference over fewer than 8
    steps on a team from 8.4 M multiply-adds per worker (0.90-0.97x on Zen 4); AVX2 keeps the
    earlier limits (0.68-0.84x there)."""
    big = dict(batch=64, seq=4, hidden=1024, layers=2, threads=threads)
    for training in (False, True):
        assert cpu_rule.prefer_cpp(shape(training=training, **big))  # both directions
        assert cpu_rule.prefer_cpp(shape(training=training, **{**big, "seq": 8,
                                                                "bidirectional": False}))
    one_direction = dict(big, bidirectional=False)
    assert cpu_rule.prefer_cpp(shape(training=True, **one_direction))
    # On two threads one direction of H = 1024 is a team of two (33.5 M per worker).
    assert cpu_rule.prefer_cpp(shape(training=False, **one_direction)) == (threads == 1)
    assert cpu_rule.prefer_cpp(shape(training=False, **{**one_direction, "batch": 15}))  # 7.9 M
    assert not cpu_rule.prefer_cpp(shape(isa="avx2", training=True, **big))
    assert cpu_rule.prefer_cpp(shape(isa="avx2", training=True, **{**big, "seq": 16}))
