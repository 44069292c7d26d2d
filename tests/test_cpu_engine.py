"""The C++ CPU engine's thread team: results equal nn.RNN's and are bit-identical for any
thread count (1-4, also above the core count), for every block layout the engine uses
(one block per direction at H <= 64, 64-column blocks above, a partial last block), and the
team never deadlocks (concurrent callers, more threads than cores).
"""

import os
import threading
import time

import pytest
import torch
from torch import nn

from fastbirnn import FastBiGRU, FastBiLSTM, FastBiRNN
from parity import with_threads

pytest.importorskip("fastbirnn._C")

THREADS = [1, 2, 3, 4]

# (B, T, I, H, layers, bidirectional, nonlinearity, batch_first, packed, h0)
CONFIGS = [
    (5, 9, 7, 48, 1, True, "tanh", False, False, False),  # small H: one block per direction
    (8, 12, 16, 64, 3, True, "relu", True, True, True),  # 3 layers, packed, h0
    (6, 10, 12, 96, 2, False, "tanh", False, True, True),  # uni, a 64 + 32 split
    (9, 7, 20, 200, 1, True, "tanh", True, False, True),  # 4 blocks per direction, partial
    (16, 20, 32, 256, 2, True, "relu", False, False, False),  # several workers per step
    (3, 5, 8, 520, 1, False, "tanh", False, True, False),  # 9 blocks of a uni layer
    # rows >= 512: the projection on register tiles from W_ih^T; I and D*H > 256: products
    # summed over K in chunks; a 64 + 64 + 22 split
    (32, 17, 300, 150, 2, True, "tanh", False, True, True),
    # a uni layer of one block: a recurrence team of one, the projection on every thread
    (16, 60, 64, 48, 1, False, "tanh", False, False, False),
    # weight gradients in column blocks (dW_hh 1 x 3 at 64 + 64 + 2 columns, dW_ih 1 x 4),
    # per batch row (batch_first), packed, h0's term per block
    (64, 40, 200, 130, 1, True, "tanh", True, True, True),
    # and in row and column blocks (dW_hh 2 x 2 at 150 rows, 192 + 108 columns)
    (16, 20, 64, 300, 1, True, "tanh", True, True, True),
]


def _ids(c):
    B, T, I, H, L, bi, act, bf, packed, h0 = c
    return f"B{B}T{T}I{I}H{H}L{L}{'bi' if bi else 'uni'}-{act}{'-bf' if bf else ''}{'-packed' if packed else ''}{'-h0' if h0 else ''}"


def _run(model, x, h0, lengths, batch_first, grad=True):
    inp = x
    if lengths is not None:
        inp = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=batch_first,
                                                enforce_sorted=False)
    out, h_n = model(inp, h0)
    if lengths is not None:
        out = nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first)[0]
    if not grad:
        return [out, h_n]
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * weight).sum() + h_n.square().sum()
    inputs = [x, *model.parameters()] + ([h0] if h0 is not None else [])
    return [out, h_n, *torch.autograd.grad(loss, inputs)]


def _setup(config, dtype, backend="cpp", seed=0):
    B, T, I, H, L, bi, act, bf, packed, with_h0 = config
    torch.manual_seed(seed)
    ref = nn.RNN(I, H, L, nonlinearity=act, batch_first=bf, bidirectional=bi, dtype=dtype)
    fast = FastBiRNN(I, H, L, nonlinearity=act, batch_first=bf, bidirectional=bi, dtype=dtype,
                     backend=backend)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(*((B, T, I) if bf else (T, B, I)), dtype=dtype, requires_grad=True)
    h0 = (torch.randn(L * (2 if bi else 1), B, H, dtype=dtype, requires_grad=True)
          if with_h0 else None)
    lengths = [max(1, T - (3 * b) % T) for b in range(B)] if packed else None
    return ref, fast, x, h0, lengths, bf


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bit_identical_for_1_to_4_threads_and_equal_to_nn_rnn(config, dtype):
    ref, fast, x, h0, lengths, bf = _setup(config, dtype)
    results = {n: with_threads(n, lambda: _run(fast, x, h0, lengths, bf)) for n in THREADS}
    for n in THREADS[1:]:
        for i, (a, b) in enumerate(zip(results[1], results[n])):
            assert torch.equal(a, b), f"result {i} differs between 1 and {n} threads"
    expected = _run(ref, x, h0, lengths, bf)
    tol = {} if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    for a, b in zip(results[2], expected):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[4]], ids=_ids)
def test_inference_bit_identical_across_threads(config):
    _, fast, x, h0, lengths, bf = _setup(config, torch.float32)
    with torch.inference_mode():
        results = [with_threads(n, lambda: _run(fast, x, h0, lengths, bf, grad=False))
                   for n in THREADS]
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


@pytest.mark.parametrize("cell", [FastBiRNN, FastBiLSTM, FastBiGRU], ids=lambda c: c.__name__)
def test_training_with_dropout_bit_identical_across_threads(cell):
    # Dropout between layers runs the stack op once per layer, on the same team, with the
    # same masks for every thread count (drawn by the calling thread).
    torch.manual_seed(0)
    model = cell(12, 200, num_layers=3, dropout=0.4, backend="cpp")
    x = torch.randn(9, 5, 12, requires_grad=True)
    lengths = [9, 3, 7, 1, 9]

    def step():
        torch.manual_seed(1)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, final = model(packed)
        out = nn.utils.rnn.pad_packed_sequence(out)[0]
        h_n = final[0] if isinstance(final, tuple) else final
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + h_n.square().sum()
        return [out, h_n, *torch.autograd.grad(loss, [x, *model.parameters()])]

    results = [with_threads(n, step) for n in THREADS]
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


def test_concurrent_callers_do_not_deadlock_and_agree():
    # Several Python threads each start their own team (more workers than cores in all).
    _, fast, x, h0, lengths, bf = _setup(CONFIGS[4], torch.float32)
    with torch.no_grad():
        expected = _run(fast, x, h0, lengths, bf, grad=False)
    results, errors = [], []

    def worker():
        try:
            with torch.no_grad():
                for _ in range(3):
                    results.append(_run(fast, x, h0, lengths, bf, grad=False))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a team deadlocked"
    assert not errors, errors
    assert len(results) == 9
    for r in results:
        for a, b in zip(expected, r):
            assert torch.equal(a, b)


# ---- the gated cells on the same engine --------------------------------------------------

# (cell, B, T, I, H, layers, bidirectional, batch_first, packed, h0): H on both sides of the
# one-block limit (64) and of the 64-column blocks, with a partial last block.
GATED_CONFIGS = [
    ("lstm", 3, 5, 4, 1, 1, True, False, True, True),
    ("gru", 5, 7, 6, 63, 2, True, True, True, False),
    ("lstm", 4, 6, 9, 64, 1, False, False, False, True),
    ("gru", 6, 5, 8, 65, 1, True, False, True, True),
    # The forward packs W_hh's gate blocks for the register tiles from T * B >= 16 rows in
    # fp32, more for weights past 1.5 MiB (geometry.h, packs_weights), from 64 in fp64; fewer
    # rows multiply W_hh as it is: 15 and 16 rows at H 130; LSTM H 400 (2.4 MiB in fp32: 26
    # rows) at 20 and 32 rows
    ("lstm", 3, 5, 10, 130, 2, True, True, True, True),
    ("gru", 4, 4, 12, 130, 1, False, False, False, False),
    ("lstm", 4, 5, 8, 400, 1, True, False, True, True),
    ("lstm", 4, 8, 8, 400, 1, True, True, False, True),
    ("lstm", 8, 9, 10, 130, 2, True, True, True, True),
    # 128 rows: the input projection on the register tiles from W_ih^T in fp32 (fewer: BLAS;
    # fp64 from 512)
    ("gru", 8, 16, 12, 65, 1, True, False, True, False),
    # weight gradients in row and column blocks: GRU dW_hh 2 x 2 (the bias gradients with
    # each row block's first, n's hidden-side ones apart), LSTM dW_ih 1 x 3 at 64 + 64 + 2
    ("gru", 60, 90, 16, 100, 1, True, False, True, True),
    ("lstm", 48, 30, 130, 40, 1, True, True, True, True),
]


def _gated_ids(c):
    cell, B, T, I, H, L, bi, bf, packed, h0 = c
    return (f"{cell}-B{B}T{T}I{I}H{H}L{L}{'bi' if bi else 'uni'}{'-bf' if bf else ''}"
            f"{'-packed' if packed else ''}{'-h0' if h0 else ''}")


def _gated_run(config, dtype, threads, grad=True):
    from fastbirnn import FastBiGRU, FastBiLSTM

    cell, B, T, I, H, L, bi, bf, packed, with_h0 = config
    nn_class, fast_class = (nn.LSTM, FastBiLSTM) if cell == "lstm" else (nn.GRU, FastBiGRU)
    torch.manual_seed(0)
    ref = nn_class(I, H, L, batch_first=bf, bidirectional=bi, dtype=dtype)
    fast = fast_class(I, H, L, batch_first=bf, bidirectional=bi, dtype=dtype, backend="cpp")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(*((B, T, I) if bf else (T, B, I)), dtype=dtype)
    states = [torch.randn(L * (2 if bi else 1), B, H, dtype=dtype)
              for _ in range(2 if cell == "lstm" else 1)] if with_h0 else []
    lengths = [max(1, T - (3 * b) % T) for b in range(B)] if packed else None

    def run(model):
        xi = x.clone().requires_grad_(grad)
        hx = [s.clone().requires_grad_(grad) for s in states]
        inp = xi
        if lengths is not None:
            inp = nn.utils.rnn.pack_padded_sequence(xi, lengths, batch_first=bf,
                                                    enforce_sorted=False)
        with torch.set_grad_enabled(grad):
            out, final = model(inp, (tuple(hx) if len(hx) == 2 else hx[0]) if hx else None)
        if lengths is not None:
            out = nn.utils.rnn.pad_packed_sequence(out, batch_first=bf)[0]
        final = list(final) if isinstance(final, tuple) else [final]
        if not grad:
            return [out, *final]
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        loss = (out * weight).sum() + sum(s.square().sum() for s in final)
        return [out, *final, *torch.autograd.grad(loss, [xi, *model.parameters(), *hx])]

    return with_threads(threads, lambda: run(fast)), run(ref)


@pytest.mark.parametrize("config", GATED_CONFIGS, ids=_gated_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gated_bit_identical_for_1_to_4_threads_and_equal_to_nn(config, dtype):
    results = {n: _gated_run(config, dtype, n) for n in THREADS}
    for n in THREADS[1:]:
        for i, (a, b) in enumerate(zip(results[1][0], results[n][0])):
            assert torch.equal(a, b), f"result {i} differs between 1 and {n} threads"
    tol = {} if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    for a, b in zip(*results[2]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("config", [GATED_CONFIGS[1], GATED_CONFIGS[4]], ids=_gated_ids)
def test_gated_inference_bit_identical_across_threads(config):
    results = [_gated_run(config, torch.float32, n, grad=False)[0] for n in THREADS]
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


@pytest.mark.parametrize("cell,poisoned", [("rnn", "h0"), ("rnn", "x"), ("gru", "h0")])
def test_nonfinite_hidden_weight_gradients_in_blocks_match_nn(cell, poisoned):
    # dW_hh in row and column blocks (1 x 3 at H 130, 2 x 2 at H 100) with a NaN or inf in
    # play, against nn for every thread count. An inf in one element of Elman's h0 leaves the
    # states finite (tanh(inf) = 1): the fast path's h0 term makes one column non-finite. A
    # NaN in x (Elman), or an inf in GRU's h0 (carried into h_t), makes states non-finite:
    # the exact dW_hh path (layer_gemms.h) runs, and dW_hh is NaN throughout.
    hidden = 130 if cell == "rnn" else 100
    fused_class, nn_class = (FastBiRNN, nn.RNN) if cell == "rnn" else (FastBiGRU, nn.GRU)
    torch.manual_seed(0)
    ref = nn_class(200, hidden, bidirectional=True, dtype=torch.float64)
    fast = fused_class(200, hidden, bidirectional=True, dtype=torch.float64, backend="cpp")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(90, 64, 200, dtype=torch.float64)
    h0 = torch.randn(2, 64, hidden, dtype=torch.float64)
    if poisoned == "h0":
        h0[1, 2, 4] = float("inf")
    else:
        x[5, 3, 7] = float("nan")
    x.requires_grad_(), h0.requires_grad_()
    lengths = [90 - b % 7 for b in range(64)]

    expected = _run(ref, x, h0, lengths, False)  # out, h_n, dx, parameter grads, dh0
    names = [name for name, _ in ref.named_parameters()]
    dW_hh_reverse = expected[3 + names.index("weight_hh_l0_reverse")]
    assert not torch.isfinite(dW_hh_reverse).all()
    assert torch.isfinite(dW_hh_reverse).any() == (cell == "rnn" and poisoned == "h0")
    for threads in THREADS:
        torch.testing.assert_close(with_threads(threads, lambda: _run(fast, x, h0, lengths, False)),
                                   expected, equal_nan=True, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("cell", ["rnn", "gru"])
@pytest.mark.parametrize("direction", [0, 1])
def test_a_nan_in_any_chunk_of_the_gate_gradients_takes_the_exact_hidden_weight_path(
        cell, direction):
    # A NaN in the output gradient at a direction's first step only (t = 0 forward, T - 1
    # reverse), no h0: nn's dW_hh multiplies that step's gate gradients by the zero h0 (NaN);
    # the fast path, which skips the zero h0 term, would stay finite there. The scan that
    # finds the NaN runs in chunks on every thread (layer_gemms.h, all_finite_on_threads);
    # the two directions put it in the first and in the last chunk.
    fused_class, nn_class = (FastBiRNN, nn.RNN) if cell == "rnn" else (FastBiGRU, nn.GRU)
    T, B, H = 64, 32, 64
    torch.manual_seed(0)
    ref = nn_class(16, H, bidirectional=True)
    fast = fused_class(16, H, bidirectional=True, backend="cpp")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, 16)
    grad = torch.randn(T, B, 2 * H)
    grad[0 if direction == 0 else T - 1, B - 1, direction * H + 5] = float("nan")

    def grads(model):
        model.zero_grad(set_to_none=True)
        model(x)[0].backward(grad)
        return [p.grad for p in model.parameters()]

    expected = grads(ref)
    name = "weight_hh_l0" + ("_reverse" if direction else "")
    dW_hh = expected[[n for n, _ in ref.named_parameters()].index(name)]
    assert not torch.isfinite(dW_hh).all() and torch.isfinite(dW_hh).any()
    for threads in THREADS:
        torch.testing.assert_close(with_threads(threads, lambda: grads(fast)), expected,
                                   equal_nan=True, rtol=2e-4, atol=2e-5)


def _fused_and_nn(cell, hidden, layers, dtype, seed):
    import fastbirnn

    fused_class, nn_class = {
        "rnn": (fastbirnn.FastBiRNN, nn.RNN),
        "lstm": (fastbirnn.FastBiLSTM, nn.LSTM),
        "gru": (fastbirnn.FastBiGRU, nn.GRU),
    }[cell]
    torch.manual_seed(seed)
    expected = nn_class(24, hidden, num_layers=layers, bidirectional=True, dtype=dtype)
    fused = fused_class(24, hidden, num_layers=layers, backend="cpp", dtype=dtype)
    fused.load_state_dict(expected.state_dict())
    return fused, expected


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_scratch_buffers_kept_between_calls_never_leak_into_results(cell):
    """The engine keeps its scratch buffers of 1 MiB and more per thread between calls (gates,
    gate gradients, dZ, layer-to-layer activations and gradients). Calls that alternate sizes,
    dtypes, layer counts and inference/training on one thread must each give what a fresh
    call gives: nn's results, and bit for bit their own first answer."""
    # T*B = 1024 rows of 2*K*H columns: 1-8 MiB per buffer, above the cache's minimum.
    calls = [(130, 3, torch.float32, 0), (64, 2, torch.float64, 1), (130, 3, torch.float32, 0),
             (200, 1, torch.float32, 2), (64, 2, torch.float64, 1)]
    first = {}
    for hidden, layers, dtype, seed in calls:
        fused, expected = _fused_and_nn(cell, hidden, layers, dtype, seed=hidden)
        x = torch.randn(64, 16, 24, dtype=dtype, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            inference = fused(x)[0]
        x.requires_grad_()
        out = fused(x)[0]
        out.square().sum().backward()
        answer = [inference, out.detach(), x.grad] + [p.grad for p in fused.parameters()]
        x_nn = x.detach().requires_grad_()
        out_nn = expected(x_nn)[0]
        out_nn.square().sum().backward()
        reference = [out_nn.detach(), out_nn.detach(), x_nn.grad] + [
            p.grad for p in expected.parameters()]
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
        torch.testing.assert_close(answer, reference, **tol)
        key = (hidden, layers, dtype, seed)
        if key in first:
            for a, b in zip(answer, first[key]):
                assert torch.equal(a, b)
        first[key] = answer
    # What the thread kept can be handed back (the benchmarks' peak memory does this first).
    from fastbirnn.backends.cpp_backend import release_scratch

    assert release_scratch() >= 1 << 20
    assert release_scratch() == 0


def _overlap_model(cell, dtype):
    """Two layers at B32 T64 H130: the kept layer outputs (2 MiB in fp32), gates and saved
    values are past the scratch minimum, so they come from the thread's kept slots."""
    fused_class = {"rnn": FastBiRNN, "lstm": FastBiLSTM, "gru": FastBiGRU}[cell]
    torch.manual_seed(0)
    return fused_class(24, 130, num_layers=2, backend="cpp").to(dtype)


def _step_grads(model, x, out_grad, retain_graph=False):
    x = x.detach().requires_grad_()
    out = model(x)[0]
    return out, x, lambda: torch.autograd.grad(out, [x, *model.parameters()], out_grad,
                                               retain_graph=retain_graph)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_forwards_whose_graphs_overlap_keep_their_own_saved_buffers(cell, dtype):
    """What a forward keeps for its backward lives in a kept scratch slot only while no graph
    still holds it: a second forward while the first graph lives, a backward of each in the
    other order, and a retained graph's second backward after a third forward all give,
    bit for bit, what each step gives alone."""
    model = _overlap_model(cell, dtype)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, 32, 24, generator=g).to(dtype) for _ in range(3)]
    out_grads = [torch.randn(64, 32, 260, generator=g).to(dtype) for _ in range(3)]
    alone = []
    for x, out_grad in zip(xs, out_grads):
        out, _, backward = _step_grads(model, x, out_grad)
        alone.append([out.detach(), *backward()])

    out0, _, backward0 = _step_grads(model, xs[0], out_grads[0], retain_graph=True)
    out1, _, backward1 = _step_grads(model, xs[1], out_grads[1])
    overlapping = {1: [out1.detach(), *backward1()], 0: [out0.detach(), *backward0()]}
    out2, _, backward2 = _step_grads(model, xs[2], out_grads[2])
    again = [out0.detach(), *backward0()]  # the retained graph, after another forward
    overlapping[2] = [out2.detach(), *backward2()]
    for i in range(3):
        for a, b in zip(overlapping[i], alone[i], strict=True):
            assert torch.equal(a, b), i
    for a, b in zip(again, alone[0], strict=True):
        assert torch.equal(a, b)


def test_repeated_bf16_calls_reuse_their_working_copies():
    """A bf16 call's fp32 working copies and bf16 operands come from kept slots: the second
    call of a shape keeps no more than the first (it reuses them rather than faulting fresh
    pages in), and a call of another shape between two of the first gives the same answer."""
    from fastbirnn.backends import cpp_backend

    model = _overlap_model("gru", torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 32, 24, generator=g).to(torch.bfloat16)
    other = torch.randn(100, 48, 24, generator=g).to(torch.bfloat16)
    out_grad = torch.randn(64, 32, 260, generator=g).to(torch.bfloat16)
    cpp_backend.release_scratch()
    previous = cpp_backend.set_scratch_limit(1 << 30)
    try:
        before = cpp_backend.kept_scratch_bytes()
        first = _step_grads(model, x, out_grad)
        first = [first[0].detach(), *first[2]()]
        kept = cpp_backend.kept_scratch_bytes() - before
        assert kept >= 4 << 20  # the widened input and output, the gate gradients, ...
        second = _step_grads(model, x, out_grad)
        second = [second[0].detach(), *second[2]()]
        assert cpp_backend.kept_scratch_bytes() - before == kept
        _step_grads(model, other, None)[0].float().sum().backward()
        third = _step_grads(model, x, out_grad)
        third = [third[0].detach(), *third[2]()]
        for a, b, c in zip(first, second, third, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c)
    finally:
        cpp_backend.release_scratch()
        cpp_backend.set_scratch_limit(previous)


def test_sizes_past_32_bit_blas_raise_before_any_work_and_auto_declines_them():
    """With batch_first the gate buffer's rows of one step lie T * gates * D * H apart: past
    2^31 - 1, BLAS's int leading dimension would overflow. The op refuses before allocating
    (an expanded 1-element input: no 16 GiB output is made), and 'auto' never picks it."""
    model = FastBiRNN(1, 1024, batch_first=True, backend="cpp")
    x = torch.zeros(1, 1, 1).expand(1, 2**21, 1)  # T * 1 gate * 2 * 1024 = 2^32
    with torch.no_grad(), pytest.raises(RuntimeError, match="leading dimension T \\* gates"):
        model(x)
    model.backend = "auto"
    assert model.selected_backend(x) == "torch"
    from fastbirnn.backends import cpp_backend, cpu_rule

    if cpp_backend.cpu_isa() in cpu_rule.MEASURED_ISAS:  # else the rule picks nn.RNN anyway
        assert model.selected_backend(x[:, : 2**10]) == "cpp"  # the same model, shorter input


def test_a_buffer_that_does_not_fit_beside_idle_ones_frees_them():
    """A thread keeps no more scratch than the process cap (128 MiB here). After a training
    step of one shape (its 50 MiB of gates and 12.5 MiB of saved values kept, idle once the
    backward is done), an inference of another needs a 100 MiB gate buffer (batch 8 projects
    before its steps: layer_gemms.h, projects_per_step): the thread frees its idle buffers for
    it, so later calls of that shape reuse it instead of faulting 100 MiB of fresh pages in on
    every call (before, it was not kept)."""
    from fastbirnn.backends import cpp_backend

    cpp_backend.release_scratch()
    previous = cpp_backend.set_scratch_limit(128 << 20)
    try:
        torch.manual_seed(0)
        x = torch.randn(200, 64, 64)
        trained = FastBiLSTM(64, 128, backend="cpp")
        trained(x.requires_grad_())[0].sum().backward()  # gates: 12,800 x 1,024 fp32
        assert cpp_backend.kept_scratch_bytes() >= 50 << 20
        with torch.no_grad():
            FastBiLSTM(64, 256, backend="cpp")(x.view(1600, 8, 64))  # gates: 12,800 x 2,048
        assert 100 << 20 <= cpp_backend.kept_scratch_bytes() <= 128 << 20
    finally:
        cpp_backend.release_scratch()
        cpp_backend.set_scratch_limit(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_backward_that_frees_its_graph_writes_the_gate_gradients_over_the_gates(cell, dtype):
    """Without retain_graph the autograd engine frees the graph right after the backward, so
    a gated cell's kept gates take its gate gradients in place (stack.cpp, gates_take_dG): the
    backward keeps no gate gradient buffer of its own. With retain_graph the gates stay for the
    next backward and the gradients get that buffer (one layer's rows x D*K*H, kept as
    scratch). Both give the same bits, packed too, and so does the retained graph's second
    backward."""
    from fastbirnn.backends import cpp_backend

    torch.manual_seed(0)
    fused = {"lstm": FastBiLSTM, "gru": FastBiGRU}[cell]
    model = fused(16, 64, num_layers=2, backend="cpp").to(dtype)
    T, B = 100, 48
    x = torch.randn(T, B, 16, dtype=dtype)
    lengths = torch.tensor([T - 7 * (b % 5) for b in range(B)])
    out_grad = torch.randn(T, B, 128, dtype=dtype)
    gate_grad_bytes = T * B * 2 * model.weight_hh_l0.shape[0] * x.element_size()

    def step(retain, packed):
        cpp_backend.release_scratch()
        leaf = x.clone().requires_grad_()
        inp = nn.utils.rnn.pack_padded_sequence(leaf, lengths, enforce_sorted=False) if packed \
            else leaf
        out = model(inp)[0]
        if packed:
            out = nn.utils.rnn.pad_packed_sequence(out, total_length=T)[0]
        wrt = [leaf, *model.parameters()]
        grads = torch.autograd.grad(out, wrt, out_grad, retain_graph=retain)
        kept = cpp_backend.kept_scratch_bytes()
        again = torch.autograd.grad(out, wrt, out_grad) if retain else None
        return kept, grads, again

    previous = cpp_backend.set_scratch_limit(1 << 30)
    try:
        for packed in (False, True):
            kept_freed, freed, _ = step(retain=False, packed=packed)
            kept_retained, retained, again = step(retain=True, packed=packed)
            assert kept_retained - kept_freed == gate_grad_bytes, packed
            for a, b, c in zip(freed, retained, again, strict=True):
                assert torch.equal(a, b) and torch.equal(a, c), packed
    finally:
        cpp_backend.release_scratch()
        cpp_backend.set_scratch_limit(previous)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_activation_checkpointing_gives_the_gradients_of_the_plain_step(cell, use_reentrant):
    """torch.utils.checkpoint runs the forward again inside the backward, in a graph task of
    its own (reentrant) or under the outer one (not), and BPTT may write the gate gradients
    over those recomputed gates: the gradients are those of the plain step, bit for bit, and
    so are a retained outer graph's two backwards (each recomputes its forward)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    fused = {"lstm": FastBiLSTM, "gru": FastBiGRU}[cell]
    model = fused(16, 64, num_layers=2, backend="cpp")
    x = torch.randn(60, 24, 16)
    out_grad = torch.randn(60, 24, 128)

    def grads(checkpointed, retain=False):
        leaf = x.clone().requires_grad_()
        out = (checkpoint(lambda v: model(v)[0], leaf, use_reentrant=use_reentrant)
               if checkpointed else model(leaf)[0])
        wrt = [leaf, *model.parameters()]
        results = []
        for keep in ([True, False] if retain else [False]):
            for t in wrt:
                t.grad = None
            out.backward(out_grad, retain_graph=keep)  # (reentrant checkpoints refuse .grad())
            results.append([t.grad for t in wrt])
        return results

    plain = grads(checkpointed=False)[0]
    for result in (*grads(checkpointed=True), *grads(checkpointed=True, retain=True)):
        for a, b in zip(result, plain, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("B", [27, 33])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_one_direction_on_a_team_splits_the_batch(cell, packed, batch_first, B, training):
    """One direction on a team of two splits the batch (recurrence.h, batch_splits): each
    worker runs the whole recurrence, forward and BPTT, on its own rows, so the team meets no
    barrier per step. Two layers of H 100 (blocks of 64 and 36 columns) at batch 27 (parts of
    13 and 14 rows) and 33 (where the Elman cell also projects step by step, into its output
    rows; at the scalar level the team keeps its column blocks), in inference and in a
    training step from given initial states with a loss on every output: the outputs, final
    states and (training) every gradient at 2-4 threads equal one thread's (the column blocks
    on one worker) bit for bit, padded and packed, time-major and batch_first, and match the
    nn class."""
    from fastbirnn import _C

    torch.manual_seed(0)
    fused_class = {"rnn": FastBiRNN, "lstm": FastBiLSTM, "gru": FastBiGRU}[cell]
    nn_class = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
    fused = fused_class(24, 100, num_layers=2, bidirectional=False, batch_first=batch_first,
                        backend="cpp")
    plain = nn_class(24, 100, num_layers=2, batch_first=batch_first)
    plain.load_state_dict(fused.state_dict())
    T = 40
    x = torch.randn(B, T, 24) if batch_first else torch.randn(T, B, 24)
    lengths = [T - 3 * (b % 9) for b in range(B)]
    initial = [torch.randn(2, B, 100) for _ in range(2 if cell == "lstm" else 1)]

    def run(model):
        model.zero_grad(set_to_none=True)
        inputs = [t.clone().requires_grad_(training) for t in (x, *initial)]
        inp = nn.utils.rnn.pack_padded_sequence(inputs[0], lengths, batch_first=batch_first,
                                                enforce_sorted=False) if packed else inputs[0]
        state = tuple(inputs[1:]) if cell == "lstm" else inputs[1]
        with torch.set_grad_enabled(training):
            out, final = model(inp, state)
        if packed:
            out = nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first)[0]
        results = [out, *(final if isinstance(final, tuple) else (final,))]
        if training:
            loss = sum((r * torch.linspace(-1, 1, r.numel()).view_as(r)).sum() for r in results)
            loss.backward()
            results = [r.detach() for r in results] + [t.grad for t in inputs]
            results += [p.grad for p in model.parameters()]
        return results

    alone = with_threads(1, lambda: run(fused))
    for threads in (2, 3, 4):
        before = _C.team_barriers_met()
        split = with_threads(threads, lambda: run(fused))
        if _C.cpu_isa() != "scalar":  # (only on the register tiles)
            assert _C.team_barriers_met() - before < T, threads  # not one per step and layer
        for a, b in zip(split, alone, strict=True):
            assert torch.equal(a, b), threads
    # fp32 against fp32: the weight and bias gradients sum up to 1,320 rows through two layers.
    for a, b in zip(alone, run(plain), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def _scratch_user(seed):
    """An LSTM whose inference keeps one 8.2 MiB gate buffer as scratch: B15 T140 H128 bi
    (a batch below 16 projects before the steps, into that buffer: layer_gemms.h,
    projects_per_step)."""
    torch.manual_seed(seed)
    model = FastBiLSTM(32, 128, backend="cpp")
    x = torch.randn(140, 15, 32)
    return model, x


def test_scratch_kept_by_many_threads_stays_under_the_process_cap():
    """Eight Python threads each keep an 8.2 MiB gate buffer: under a 20 MiB cap the caches of
    the threads that called least recently are freed, so at most two are kept at any time, and
    every result still equals the one computed alone."""
    from fastbirnn.backends import cpp_backend

    model, x = _scratch_user(0)
    with torch.no_grad():
        expected = model(x)[0]
    cpp_backend.release_scratch()
    previous = cpp_backend.set_scratch_limit(20 << 20)
    try:
        kept, results = [], []
        lock = threading.Lock()

        def call():
            with torch.no_grad():
                out = model(x)[0]
            with lock:
                results.append(out)
                kept.append(cpp_backend.kept_scratch_bytes())

        for _ in range(2):  # the second round reuses or evicts what the first kept
            threads = [threading.Thread(target=call) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert len(results) == 16 and 8 << 20 <= max(kept) <= 20 << 20  # cached, capped
        # A thread's caches go when it ends (its thread-local destructor may run just after
        # join returns).
        deadline = time.monotonic() + 5
        while cpp_backend.kept_scratch_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cpp_backend.kept_scratch_bytes() == 0
        for out in results:
            assert torch.equal(out, expected)
        cpp_backend.set_scratch_limit(0)  # keep nothing: frees what is kept, and results hold
        assert cpp_backend.kept_scratch_bytes() == 0
        with torch.no_grad():
            assert torch.equal(model(x)[0], expected)
        assert cpp_backend.kept_scratch_bytes() == 0
    finally:
        cpp_backend.set_scratch_limit(previous)
    with pytest.raises(RuntimeError, match="scratch limit must be >= 0"):
        cpp_backend.set_scratch_limit(-1)


def _balloon_reports_free_pages() -> bool:
    """The probe of csrc/buffers.h, read here independently: a virtio balloon device whose
    features (one '0'/'1' per bit in sysfs) include free page reporting (bit 5)."""
    import glob

    for path in glob.glob("/sys/bus/virtio/drivers/virtio_balloon/*/features"):
        with open(path) as f:
            bits = f.read().strip()
        if len(bits) > 5 and bits[5] == "1":
            return True
    return False


def test_environment_sets_the_scratch_cap_and_the_huge_page_advice():
    """FASTBIRNN_SCRATCH_MIB and FASTBIRNN_HUGE_PAGES are read at load (a fresh process);
    unset, the advice is on unless the hypervisor reclaims free pages; results do not change
    with either; a value the engine does not know is an error at import."""
    import subprocess
    import sys

    script = (
        "import torch, fastbirnn\n"
        "from fastbirnn import _C\n"
        "from fastbirnn.backends import cpp_backend\n"
        "print(_C.advises_huge_pages(), _C.hypervisor_reclaims_free_pages(),\n"
        "      cpp_backend.set_scratch_limit(0) >> 20)\n"
        "torch.manual_seed(0)\n"
        "m = fastbirnn.FastBiRNN(8, 64, backend='cpp')\n"  # 64 MiB of outputs: advised
        "x = torch.randn(256, 512, 8)\n"
        "with torch.no_grad(): print(float(m(x)[0].double().square().sum()))\n"
    )

    def start(code, **env):  # the processes run side by side
        environment = {k: v for k, v in os.environ.items()
                       if k not in ("FASTBIRNN_HUGE_PAGES", "FASTBIRNN_SCRATCH_MIB")}
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**environment, **env})

    default = start(script)
    opted_in = start(script, FASTBIRNN_HUGE_PAGES="1")
    opted_out = start(script, FASTBIRNN_HUGE_PAGES="0", FASTBIRNN_SCRATCH_MIB="64")
    bad = start("from fastbirnn import _C\n_C.kept_scratch_bytes()", FASTBIRNN_SCRATCH_MIB="lots")
    bad_advice = start("import fastbirnn", FASTBIRNN_HUGE_PAGES="yes")

    def output(process):
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        return stdout.split()

    reclaims = str(_balloon_reports_free_pages())
    advised, probed, default_mib, total = output(default)
    assert (advised, probed, default_mib) == (str(reclaims == "False"), reclaims, "256")
    assert output(opted_in) == ["True", reclaims, "256", total]
    assert output(opted_out) == ["False", reclaims, "64", total]
    _, stderr = bad.communicate(timeout=120)
    assert bad.returncode != 0 and "FASTBIRNN_SCRATCH_MIB must be a whole number" in stderr
    _, stderr = bad_advice.communicate(timeout=120)
    assert bad_advice.returncode != 0 and "FASTBIRNN_HUGE_PAGES=yes is not '1' or '0'" in stderr


def _weight_grads_step(model, x):
    """A training step as a loop runs it: gradients set to None, forward, backward; the
    output and every gradient."""
    model.zero_grad(set_to_none=True)
    out = model(x)[0]
    out.square().sum().backward()
    return [out.detach()] + [p.grad for p in model.parameters()]


def test_dropped_results_are_recycled_and_never_shared_while_alive():
    """Outputs and gradients of 128 KiB and more come from recycled memory (buffers.h,
    RecycledResults): once dropped, the next call's results of that size take it. Results
    still alive are never handed out again: a step's results held through two more steps keep
    their values and share no memory with the later ones, and every step still equals nn."""
    from fastbirnn.backends import cpp_backend

    torch.manual_seed(0)
    fused = FastBiLSTM(300, 256, num_layers=2, backend="cpp")  # 1-2 MiB weight gradients
    plain = nn.LSTM(300, 256, num_layers=2, bidirectional=True)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(30, 1, 300)
    cpp_backend.release_scratch()
    held = _weight_grads_step(fused, x)
    copies = [t.clone() for t in held]
    addresses = {t.data_ptr() for t in held}
    large = [t for t in held if t.nbytes >= 128 << 10]
    assert len(large) == 8  # the weights' gradients
    dropped = {t.data_ptr() for t in large}  # every large result's, dropped by the end
    for _ in range(2):
        later = _weight_grads_step(fused, x)
        assert not addresses & {t.data_ptr() for t in later}
        for a, b in zip(held, copies, strict=True):
            assert torch.equal(a, b)
        torch.testing.assert_close(later, _weight_grads_step(plain, x), rtol=1e-4, atol=1e-4)
        dropped |= {t.data_ptr() for t in later if t.nbytes >= 128 << 10}
    del held, later, large
    assert cpp_backend.idle_result_bytes() >= 8 << 20
    again = _weight_grads_step(fused, x)
    assert {t.data_ptr() for t in again if t.nbytes >= 128 << 10} <= dropped  # all came back
    cpp_backend.release_scratch()
    assert cpp_backend.idle_result_bytes() == 0


def test_recycled_results_behave_as_any_tensor():
    """A result in recycled memory can be resized, pickled, moved to shared memory and kept
    after the module is gone; with the scratch limit at 0 nothing dropped is kept."""
    import io

    from fastbirnn.backends import cpp_backend

    torch.manual_seed(0)
    fused = FastBiRNN(64, 512, backend="cpp")
    x = torch.randn(40, 8, 64)
    with torch.no_grad():
        out = fused(x)[0]  # 320 KiB
    expected = out.clone()
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), expected)
    shared = out.clone().share_memory_()
    assert shared.is_shared() and torch.equal(shared, expected)
    out.resize_(2 * out.numel())
    assert torch.equal(out[: expected.numel()].view_as(expected), expected)
    del fused
    assert torch.equal(out[: expected.numel()].view_as(expected), expected)
    storage = out.untyped_storage()
    storage.resize_(0)  # an allocation of no bytes, then of some again
    storage.resize_(64)
    assert storage.nbytes() == 64
    previous = cpp_backend.set_scratch_limit(0)
    try:
        assert cpp_backend.idle_result_bytes() == 0
        with torch.no_grad():
            FastBiRNN(64, 512, backend="cpp")(x)
        assert cpp_backend.idle_result_bytes() == 0
    finally:
        cpp_backend.set_scratch_limit(previous)


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer replaces malloc (and quarantines freed memory): "
                           "the page faults counted here are glibc's allocator's")
def test_a_training_loop_faults_in_no_fresh_pages():
    """In a process that runs nothing else, a training step of the 2-layer (1, 30, 300, 256)
    BiLSTM faulted in fresh 4 KiB pages before its results were recycled (glibc handed their
    10.5 MB back to the kernel between steps): 1,800-3,700 per step with a given output
    gradient, 383 in this loop with SGD; now 0-5 after the first few steps (minor faults
    counted by getrusage)."""
    import subprocess
    import sys

    script = (
        "import resource, torch, fastbirnn\n"
        "torch.manual_seed(0)\n"
        "m = fastbirnn.FastBiLSTM(300, 256, num_layers=2, backend='cpp')\n"
        "opt = torch.optim.SGD(m.parameters(), lr=1e-3)\n"
        "x = torch.randn(30, 1, 300)\n"
        "def step():\n"
        "    opt.zero_grad(set_to_none=True)\n"
        "    m(x)[0].square().mean().backward()\n"
        "    opt.step()\n"
        "for _ in range(5): step()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20): step()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 100
