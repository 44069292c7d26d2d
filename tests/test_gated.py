"""FastBiLSTM and FastBiGRU against nn.LSTM and nn.GRU: the FastBiRNN contract for gated cells.

Parity of outputs, final states (h_n, and c_n for the LSTM) and every gradient over the input
forms; the same errors as the nn class; module behaviour (state_dict both ways, pickle, repr);
dropout; autocast; which backends have the cells. The property-based tests over the whole
configuration space are in test_properties.py.
"""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastbirnn import FastBiGRU, FastBiLSTM, FastBiRNN, backends, reference
from parity import tolerances

CELLS = {"lstm": (FastBiLSTM, nn.LSTM), "gru": (FastBiGRU, nn.GRU)}
# 'auto' runs the nn class until a fused gated cell is measured faster; 'reference' is the spec;
# 'cpp' the C++ CPU engine's cells (csrc/cell_lstm.h, cell_gru.h).
BACKENDS = ["reference", "cpp", "auto", "torch"]

pytestmark = pytest.mark.filterwarnings(
    "ignore:LSTM with projections is not supported with oneDNN"  # nn.LSTM's own notice
)


def make_pair(cell, backend, dtype=torch.float64, **kwargs):
    fast_class, nn_class = CELLS[cell]
    kwargs.setdefault("bidirectional", True)
    torch.manual_seed(0)
    expected = nn_class(dtype=dtype, **kwargs)
    fast = fast_class(dtype=dtype, backend=backend, **kwargs)
    fast.load_state_dict(expected.state_dict(), strict=True)
    return expected, fast


def states_for(cell, num_states_shape, dtype, proj_size=0, seed=3):
    g = torch.Generator().manual_seed(seed)
    *lead, hidden = num_states_shape
    h = torch.randn(*lead, proj_size or hidden, generator=g, dtype=dtype)
    if cell == "lstm":
        return (h, torch.randn(*lead, hidden, generator=g, dtype=dtype))
    return h


def _leaves(hx):
    return [] if hx is None else list(hx) if isinstance(hx, tuple) else [hx]


def forward_backward(module, x, hx, layout, lengths, batch_first):
    x = x.detach().clone().requires_grad_()
    if hx is not None:
        hx = tuple(s.detach().clone().requires_grad_() for s in _leaves(hx))
        hx = hx if len(hx) > 1 else hx[0]
    if layout.startswith("packed"):
        packed = pack_padded_sequence(
            x, lengths, batch_first=batch_first, enforce_sorted=layout == "packed"
        )
        out, final = module(packed, hx)
        out = pad_packed_sequence(out, batch_first=batch_first)[0]
    else:
        out, final = module(x, hx)
    final = _leaves(final)
    g = torch.Generator().manual_seed(9)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    for state in final:
        loss = loss + (state * torch.randn(state.shape, generator=g, dtype=state.dtype)).sum()
    grads = torch.autograd.grad(loss, [x, *_leaves(hx), *module.parameters()])
    return out, final, grads


CASES = [
    dict(),
    dict(layout="packed"),
    dict(layout="packed_unsorted", batch_first=True),
    dict(layout="unbatched"),
    dict(num_layers=3, with_hx=False),
    dict(bidirectional=False, num_layers=2),
    dict(bias=False, batch_first=True),
    dict(num_layers=2, layout="packed_unsorted", with_hx=False),
    dict(proj_size=2, num_layers=2),  # LSTM only
    dict(proj_size=3, layout="packed_unsorted"),  # LSTM only
]


def _case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items()) or "default"


CELL_CASES = [
    pytest.param(cell, case, id=f"{cell}-{_case_id(case)}")
    for cell in CELLS
    for case in CASES
    if cell == "lstm" or "proj_size" not in case  # proj_size is nn.LSTM's
]


@pytest.mark.parametrize("cell,case", CELL_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_parity(cell, backend, case, dtype):
    if backend == "cpp" and "proj_size" in case:
        pytest.skip("the cpp engine has no projections: test_cpp_refuses_projections")
    case = dict(case)
    layout = case.pop("layout", "padded")
    with_hx = case.pop("with_hx", True)
    kwargs = {**dict(input_size=4, hidden_size=5, num_layers=1, bidirectional=True), **case}
    expected_module, fast = make_pair(cell, backend, dtype, **kwargs)
    T, B = 6, 3
    D = 2 if kwargs["bidirectional"] else 1
    batch_first = kwargs.get("batch_first", False)
    g = torch.Generator().manual_seed(1)
    if layout == "unbatched":
        x = torch.randn(T, 4, generator=g, dtype=dtype)
        state_shape = (kwargs["num_layers"] * D, 5)
    else:
        x = torch.randn(*((B, T) if batch_first else (T, B)), 4, generator=g, dtype=dtype)
        state_shape = (kwargs["num_layers"] * D, B, 5)
    hx = states_for(cell, state_shape, dtype, kwargs.get("proj_size", 0)) if with_hx else None
    lengths = [6, 2, 4] if layout == "packed_unsorted" else [6, 4, 2]
    actual = forward_backward(fast, x, hx, layout, lengths, batch_first)
    expected = forward_backward(expected_module, x, hx, layout, lengths, batch_first)
    torch.testing.assert_close(actual, expected, **tolerances(dtype))


@pytest.mark.parametrize("cell", CELLS)
def test_auto_follows_the_gated_rule(cell):
    # A small step: the fused cell, as the gated grids measured for both cells.
    _, fast = make_pair(cell, "auto", input_size=4, hidden_size=5)
    assert fast.selected_backend(torch.randn(3, 2, 4)) == "cpp"
    from fastbirnn.backends.cpu_rule import CallShape, prefer_cpp

    shape = dict(batch=32, seq=128, hidden=128, layers=1, bidirectional=True,
                 dtype=torch.float32, training=True, threads=2)
    # The design's mid-size shape: the GRU kernel beats nn.GRU; oneDNN's nn.LSTM keeps the
    # inference, and the LSTM's training step (2.1 M per worker; both directions' training
    # steps are fused at every size from T = 16) is fused.
    assert prefer_cpp(CallShape(**shape, cell=cell))
    assert prefer_cpp(CallShape(**dict(shape, training=False), cell=cell)) == (cell == "gru")
    # LSTM training at batch 1 is fused; its inference is not.
    one = dict(shape, batch=1, hidden=512, cell=cell)
    assert prefer_cpp(CallShape(**one)) and prefer_cpp(CallShape(**dict(one, training=False))) == (
        cell == "gru")
    # ... except one direction over a long sequence, where nn.LSTM was as fast.
    assert prefer_cpp(CallShape(**dict(one, bidirectional=False))) == (cell == "gru")
    assert prefer_cpp(CallShape(**dict(one, bidirectional=False, seq=16)))
    # Large fp64 steps, and short sequences with large steps: the nn class.
    assert not prefer_cpp(CallShape(**dict(shape, batch=128, hidden=512, dtype=torch.float64,
                                           cell=cell)))
    assert not prefer_cpp(CallShape(**dict(shape, seq=8, cell=cell)))
    # Projections stay on nn.LSTM.
    assert not prefer_cpp(CallShape(**shape, cell=cell, proj_size=3))


@pytest.mark.parametrize("cell", CELLS)
def test_backends_without_the_cell_are_refused_at_construction(cell, monkeypatch):
    # Every kernel backend has both cells now: a stand-in without them.
    backend = "elman_only"
    monkeypatch.setitem(backends._REGISTRY, backend, backends.RecurrenceBackend(
        name=backend, cell_stacks={"rnn": reference.elman_stack},
        unavailable_reason=lambda: None, unsupported_reason=lambda x: None))
    fast_class, _ = CELLS[cell]
    with pytest.raises(ValueError, match=f"no {cell.upper()} cell yet.*'reference'"):
        fast_class(4, 5, backend=backend)
    module = fast_class(4, 5)
    with pytest.raises(ValueError, match="cell yet"):
        module.backend = backend
    assert module.backend == "auto"


@pytest.mark.parametrize("cell", CELLS)
def test_module_contract(cell):
    fast_class, nn_class = CELLS[cell]
    fast = fast_class(4, 5, num_layers=2)
    assert isinstance(fast, nn_class) and fast.bidirectional
    # state_dict both ways, strict.
    plain = nn_class(4, 5, num_layers=2, bidirectional=True)
    plain.load_state_dict(fast.state_dict(), strict=True)
    fast.load_state_dict(plain.state_dict(), strict=True)
    # Copies keep the backend.
    fast.backend = "reference"
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert clone.backend == "reference"
        x = torch.randn(3, 2, 4)
        torch.testing.assert_close(clone(x), fast(x))
    assert repr(fast).startswith(f"{fast_class.__name__}(4, 5, num_layers=2")
    assert "backend='reference'" in repr(fast)


def test_same_initialisation_as_the_nn_class():
    for cell, (fast_class, nn_class) in CELLS.items():
        torch.manual_seed(0)
        fast = fast_class(4, 5, num_layers=2)
        torch.manual_seed(0)
        plain = nn_class(4, 5, num_layers=2, bidirectional=True)
        for (name, a), (_, b) in zip(fast.named_parameters(), plain.named_parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{cell} {name}")


def _bad_calls(cell):
    h = lambda *shape: torch.randn(*shape)  # noqa: E731
    state = (lambda *s: (h(*s), h(*s))) if cell == "lstm" else h
    return {
        "4d_input": (h(2, 3, 4, 5), None),
        "1d_input": (h(4), None),
        "wrong_input_size": (h(3, 2, 7), None),
        "hx_wrong_batch": (h(3, 2, 4), state(2, 5, 5)),
        "hx_wrong_hidden": (h(3, 2, 4), state(2, 2, 6)),
        "hx_2d_for_batched": (h(3, 2, 4), state(2, 5)),
        "hx_3d_for_unbatched": (h(3, 4), state(2, 1, 5)),
        "hx_float64": (h(3, 2, 4), tuple(s.double() for s in state(2, 2, 5))
                       if cell == "lstm" else state(2, 2, 5).double()),
    }


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", ["reference", "cpp", "auto"])
def test_bad_input_raises_what_the_nn_class_raises(cell, backend):
    fast_class, nn_class = CELLS[cell]
    fast = fast_class(4, 5, backend=backend)
    plain = nn_class(4, 5, bidirectional=True)
    for name, (x, hx) in _bad_calls(cell).items():
        with pytest.raises(Exception) as expected:
            plain(x, hx)
        with pytest.raises(expected.type) as actual:
            fast(x, hx)
        if name != "hx_float64":  # nn's words there come from its kernels (oneDNN, matmul)
            assert str(actual.value) == str(expected.value), name


def test_lstm_cell_state_shape_errors():
    fast, plain = FastBiLSTM(4, 5, backend="reference"), nn.LSTM(4, 5, bidirectional=True)
    x, hx = torch.randn(3, 2, 4), (torch.randn(2, 2, 5), torch.randn(2, 2, 6))
    with pytest.raises(RuntimeError) as expected:
        plain(x, hx)
    with pytest.raises(RuntimeError, match=re.escape(str(expected.value))):
        fast(x, hx)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
def test_training_dropout_matches_nn_class_for_the_same_seed(cell, backend, batch_first):
    expected_module, fast = make_pair(cell, backend, input_size=4, hidden_size=5,
                                      num_layers=3, dropout=0.5, bidirectional=True,
                                      batch_first=batch_first)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    hx = states_for(cell, (6, 6 if batch_first else 3, 5), torch.float64)
    results = []
    for module in (expected_module, fast):
        module.train()
        torch.manual_seed(123)
        results.append(forward_backward(module, x, hx, "padded", None, batch_first))
    torch.testing.assert_close(results[1], results[0])
    fast.eval()
    assert not torch.allclose(fast(x)[0], results[1][0])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_inference_modes(cell, backend, mode):
    # 3+ layers and repeated calls: inference alternates between freed and reused buffers.
    expected_module, fast = make_pair(cell, backend, input_size=4, hidden_size=5,
                                      num_layers=4)
    if mode == "frozen":
        expected_module.requires_grad_(False), fast.requires_grad_(False)
    context = torch.enable_grad if mode == "frozen" else getattr(torch, mode)
    for call in range(3):
        x = torch.randn(6, 3, 4, dtype=torch.float64)
        with context():
            actual = fast(x)
            torch.testing.assert_close(actual, expected_module(x))
        assert not actual[0].requires_grad


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", ["reference", "cpp", "auto"])
def test_cpu_autocast_follows_the_nn_class(cell, backend):
    expected_module, fast = make_pair(cell, backend, torch.float32, input_size=4, hidden_size=5)
    x = torch.randn(6, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual, expected = fast(x), expected_module(x)
    assert actual[0].dtype == expected[0].dtype
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)


def test_registry_reports_the_cells():
    for name in ("reference", "cpp"):
        assert backends.get(name).supports("lstm") and backends.get(name).supports("gru")
    assert all(backends.get(name).supports("rnn") for name in ("reference", "cpp"))
    assert FastBiRNN.cell == "rnn" and FastBiLSTM.cell == "lstm" and FastBiGRU.cell == "gru"


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend,compiler", [
    ("cpp", "inductor"),
    # Dynamo and AOTAutograd trace the pure-PyTorch loop into one graph here; Inductor then
    # compiles its many small kernels (about 20 s of CPU time with a cold cache), so that
    # variant runs with the slow tests.
    ("reference", "aot_eager"),
    pytest.param("reference", "inductor", marks=pytest.mark.slow),
])
@pytest.mark.filterwarnings("ignore:The tensor attributes self._flat_weights")  # nn's, on export
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch's imports
def test_compile_fullgraph_and_export(cell, backend, compiler):
    fast_class, _ = CELLS[cell]
    torch.manual_seed(0)
    module = fast_class(4, 5, batch_first=True, backend=backend)
    x = torch.randn(2, 3, 4)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):  # Dynamo's rule for nn.RNNBase subclasses
        compiled = torch.compile(module, fullgraph=True, backend=compiler)
        xc = x.clone().requires_grad_()
        out = compiled(xc)
        out[0].sum().backward()
        xe = x.clone().requires_grad_()
        expected = module(xe)
        expected[0].sum().backward()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(xc.grad, xe.grad)
        exported = torch.export.export(module, (x,))
    torch.testing.assert_close(exported.module()(x), module(x))


def test_cpp_refuses_projections_and_auto_hands_them_to_nn_lstm():
    fast = FastBiLSTM(4, 5, proj_size=3, backend="cpp")
    with pytest.raises(RuntimeError, match="'cpp' has no LSTM with projections.*'auto'"):
        fast(torch.randn(6, 3, 4))
    expected_module, auto = make_pair("lstm", "auto", torch.float32, input_size=4,
                                      hidden_size=5, proj_size=3)
    x = torch.randn(6, 3, 4)
    assert auto.selected_backend(x) == "torch"
    torch.testing.assert_close(auto(x), expected_module(x))


@pytest.mark.parametrize("cell", CELLS)
def test_cpp_stack_op_checks_every_tensor(cell):
    # The op behind the seam refuses what would read out of bounds, with its own words.
    _, fast = make_pair(cell, "cpp", torch.float32, input_size=4, hidden_size=5)
    weights = list(fast._flat_weights)
    x = torch.randn(6, 3, 4)
    op = torch.ops.fastbirnn_cpp.stack
    h = torch.zeros(2, 3, 5)
    c = h if cell == "lstm" else None
    bad = {
        "weight shape": (x, h, c, [weights[0][:, :3]] + weights[1:], None),
        "dtype": (x.double(), h, c, weights, None),
        "h0 shape": (x, h[:, :2], c, weights, None),
        "lengths range": (x, h, c, weights, torch.tensor([6, 7, 1])),
        "lengths size": (x, h, c, weights, torch.tensor([6, 1])),
    }
    if cell == "lstm":
        bad["c0 shape"] = (x, h, h[:1], weights, None)
    else:
        bad["c0 for a GRU"] = (x, h, h, weights, None)
    for name, (xi, hi, ci, wi, li) in bad.items():
        with pytest.raises(RuntimeError, match="fastbirnn cpp backend"):
            op(cell, xi, hi, ci, wi, li, 1, True, True, False)
    with pytest.raises(RuntimeError, match="unknown cell"):
        op("rnn", x, h, None, weights, None, 1, True, True, False)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("hidden_size", [5, 70])
def test_cpp_op_takes_unsorted_lengths(cell, hidden_size):
    # Packing hands the engine sorted lengths; the op itself must not rely on it (rows that
    # finished early sit between active ones, the engine's partial-carry path).
    _, fast = make_pair(cell, "cpp", input_size=4, hidden_size=hidden_size)
    weights = [w.detach().requires_grad_() for w in fast._flat_weights]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 4, 4, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 4, hidden_size, generator=g, dtype=torch.float64)
    c0 = h0.flip(2) if cell == "lstm" else None
    lengths = torch.tensor([3, 6, 1, 5])
    order = torch.argsort(lengths, descending=True)

    out_weight = torch.randn(6, 4, 2 * hidden_size, generator=g, dtype=torch.float64)

    def run(x, h0, c0, lengths, out_weight):
        leaves = [t.detach().requires_grad_() for t in (x, h0)]
        out, hn, cn = torch.ops.fastbirnn_cpp.stack(
            cell, leaves[0], leaves[1], c0, weights, lengths, 1, True, True, False)
        loss = (out * out_weight).sum() + hn.square().sum() + cn.square().sum()
        return [out, hn, cn, *torch.autograd.grad(loss, leaves + weights)]

    unsorted = run(x, h0, c0, lengths, out_weight)
    permuted = run(x[:, order], h0[:, order], None if c0 is None else c0[:, order],
                   lengths[order], out_weight[:, order])
    inverse = torch.argsort(order)
    for i, (a, b) in enumerate(zip(unsorted, permuted)):
        if i in (0, 1, 2, 3, 4) and b.dim() == 3 and b.numel():  # batch is dimension 1
            b = b[:, inverse]
        torch.testing.assert_close(a, b, msg=lambda m: f"result {i}: {m}")
