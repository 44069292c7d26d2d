"""The 'triton' backend's LSTM and GRU cells against nn.LSTM and nn.GRU.

Outputs, final states (h_n, c_n) and every gradient (input, h_0/c_0, all parameters) with the
same weights, on both single-CTA paths (on-chip W_hh, streamed W_hh). Without a GPU the
kernels run on CPU tensors under the Triton interpreter (conftest sets TRITON_INTERPRET=1):
tiny shapes. With CUDA the same tests run on GPU tensors at larger shapes against cuDNN, in
exact fp32, and once each with TF32 and in bf16 (benchmarks/gpu_run.sh runs them). Also: the
custom op's registration (opcheck) and torch.compile(fullgraph=True).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastbirnn import FastBiGRU, FastBiLSTM, FastBiRNN, backends
from fastbirnn.backends import triton_backend

pytestmark = pytest.mark.skipif(
    triton_backend._unavailable_reason() is not None, reason="triton not importable"
)

CELLS = {"lstm": (FastBiLSTM, nn.LSTM), "gru": (FastBiGRU, nn.GRU)}
# Variants that only repeat shared code under the interpreter: slow tests there (CI runs them),
# part of the default run on a GPU.
SLOW_ON_CPU = () if torch.cuda.is_available() else pytest.mark.slow
DEVICES = (["cpu"] if backends.triton_interpreter_enabled() else []) + (
    ["cuda"] if torch.cuda.is_available() else []
)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def exact_fp32():
    """cuDNN/cuBLAS and the kernels in exact fp32 (the kernels follow cuDNN's TF32 flag)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def streamed(monkeypatch):
    """The streamed (W_hh read in tiles every step) kernels at small H, 16-wide tiles."""
    from fastbirnn.triton import launcher

    monkeypatch.setattr(launcher, "FORCE_PATH", "streamed")
    monkeypatch.setattr(launcher, "STREAM_BLOCK_N", 16)
    monkeypatch.setattr(launcher, "STREAM_BLOCK_K", 16)


@pytest.fixture
def onchip(device, monkeypatch):
    """The on-chip kernels on CPU at any test size: the interpreter computes in exact fp32,
    where the rule never keeps the gated cells on chip. On CUDA the rule decides (TF32 and
    bf16 up to 64 units)."""
    from fastbirnn.triton import launcher

    if device.type == "cpu":
        monkeypatch.setattr(launcher, "FORCE_PATH", "onchip")


@dataclass(frozen=True)
class Case:
    batch: int = 3
    seq_len: int = 5
    input_size: int = 4
    hidden_size: int = 20
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    bidirectional: bool = True
    packed: bool = False
    with_hx: bool = True
    cuda_hidden: int = 0  # hidden size on CUDA; 0: 5x the CPU one

    def __str__(self):
        return (f"B{self.batch}T{self.seq_len}H{self.hidden_size}L{self.num_layers}-"
                f"bias{int(self.bias)}-bf{int(self.batch_first)}-bi{int(self.bidirectional)}-"
                f"packed{int(self.packed)}-hx{int(self.with_hx)}")


CASES = [
    Case(),  # H and B not multiples of 16, h_0 (and c_0)
    Case(batch=5, num_layers=2, packed=True),  # unsorted packed, variable lengths, 2 layers
    # Two batch tiles, no bias, zero initial states.
    Case(batch=17, seq_len=3, hidden_size=16, bias=False, with_hx=False, cuda_hidden=16),
    Case(bidirectional=False, batch_first=True, num_layers=2, seq_len=4),
]
STREAMED_CASES = [
    Case(batch=4, hidden_size=33, packed=True),  # 3 hidden tiles, the last one ragged
    Case(seq_len=4, bidirectional=False, batch_first=True, bias=False, with_hx=False),
]


def sized(case: Case, device: torch.device) -> Case:
    if device.type != "cuda":
        return case
    return replace(case, batch=case.batch * 7, seq_len=48, input_size=32,
                   hidden_size=case.cuda_hidden or case.hidden_size * 5)


def lengths_for(case: Case) -> torch.Tensor:
    g = torch.Generator().manual_seed(case.batch)
    lengths = torch.randint(1, case.seq_len + 1, (case.batch,), generator=g)
    lengths[case.batch // 2] = case.seq_len
    return lengths


def modules(cell: str, case: Case, device, dtype=torch.float32):
    fast_class, nn_class = CELLS[cell]
    kwargs = dict(num_layers=case.num_layers, bias=case.bias, batch_first=case.batch_first,
                  bidirectional=case.bidirectional, device=device, dtype=dtype)
    torch.manual_seed(0)
    expected = nn_class(case.input_size, case.hidden_size, **kwargs)
    fast = fast_class(case.input_size, case.hidden_size, backend="triton", **kwargs)
    fast.load_state_dict(expected.state_dict())
    return expected, fast


def make_input(cell: str, case: Case, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shape = (case.batch, case.seq_len) if case.batch_first else (case.seq_len, case.batch)
    x = torch.randn(*shape, case.input_size, generator=g).to(device, dtype)
    if not case.with_hx:
        return x, None
    D = 2 if case.bidirectional else 1
    states = [torch.randn(case.num_layers * D, case.batch, case.hidden_size, generator=g)
              for _ in range(2 if cell == "lstm" else 1)]
    states = tuple(s.to(device, dtype) for s in states)
    return x, states if cell == "lstm" else states[0]


def _tuple(hx):
    return () if hx is None else hx if isinstance(hx, tuple) else (hx,)


def run(module, case: Case, x, hx, grad=True):
    """Output (padded), final states and the gradients of a random loss of both."""
    x = x.detach().clone().requires_grad_(grad)
    leaves = tuple(s.detach().clone().requires_grad_(grad) for s in _tuple(hx))
    hx = None if not leaves else leaves if len(leaves) > 1 else leaves[0]
    inp = x
    if case.packed:
        inp = pack_padded_sequence(x, lengths_for(case), batch_first=case.batch_first,
                                   enforce_sorted=False)
    out, final = module(inp, hx)
    if case.packed:
        out = pad_packed_sequence(out, batch_first=case.batch_first,
                                  total_length=case.seq_len)[0]
    final = _tuple(final)
    if not grad:
        return out, final, ()
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g).to(out)).sum()
    for state in final:
        loss = loss + (state * torch.randn(state.shape, generator=g).to(state)).sum()
    grads = torch.autograd.grad(loss, [x, *leaves, *module.parameters()])
    return out.detach(), tuple(s.detach() for s in final), grads


def tolerances(device, tf32=False):
    if tf32:
        return dict(rtol=2e-2, atol=2e-2)
    if device.type == "cuda":
        return dict(rtol=1e-3, atol=2e-4)
    return dict(rtol=1e-4, atol=2e-5)


def _flat(result):
    out, final, grads = result
    names = ["output", *(f"final state {i}" for i in range(len(final))),
             *(f"gradient {i}" for i in range(len(grads)))]
    return names, [out, *final, *grads]


def assert_same(got, want, **tol):
    names, got = _flat(got)
    assert len(got) == len(_flat(want)[1])
    for name, a, b in zip(names, got, _flat(want)[1]):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}", **tol)


def check_parity(cell: str, case: Case, device):
    case = sized(case, device)
    expected, fast = modules(cell, case, device)
    x, hx = make_input(cell, case, device)
    assert fast.selected_backend(x) == "triton"
    assert_same(run(fast, case, x, hx), run(expected, case, x, hx), **tolerances(device))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_parity_onchip(cell, case, device, exact_fp32, onchip):
    check_parity(cell, case, device)


@pytest.mark.parametrize("case", STREAMED_CASES, ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_parity_streamed(cell, case, device, exact_fp32, streamed):
    if device.type == "cuda":
        pytest.skip("16-wide tile boundaries are the interpreter's job; on CUDA the parity "
                    "cases above past the on-chip limit run the streamed kernels as chosen")
    check_parity(cell, case, device)


@pytest.mark.parametrize("cell", CELLS)
def test_inference_saves_nothing_and_matches(cell, device, exact_fp32, monkeypatch):
    """Under no_grad the kernels do not write the backward's saved activations."""
    from fastbirnn.triton import launcher

    calls = []
    forward = launcher.gated_forward
    monkeypatch.setattr(launcher, "gated_forward",
                        lambda *a: calls.append(a[-1]) or forward(*a))
    case = sized(Case(packed=True), device)
    expected, fast = modules(cell, case, device)
    x, hx = make_input(cell, case, device)
    with torch.no_grad():
        got, want = run(fast, case, x, hx, grad=False), run(expected, case, x, hx, grad=False)
    assert calls == [False]
    assert_same(got, want, **tolerances(device))


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_between_layers_matches_nn(cell, device, exact_fp32):
    """F.dropout between layers draws the same random numbers as the nn class on CPU. cuDNN
    draws its own masks: on CUDA the reference backend (also F.dropout) is the comparison."""
    case = sized(Case(num_layers=3, seq_len=4), device)
    expected, fast = modules(cell, case, device)
    if device.type == "cuda":
        expected = CELLS[cell][0](case.input_size, case.hidden_size, num_layers=case.num_layers,
                                  device=device, backend="reference")
        expected.load_state_dict(fast.state_dict())
    for m in (expected, fast):
        m.dropout = 0.5
    x, hx = make_input(cell, case, device)
    torch.manual_seed(7)
    got = run(fast, case, x, hx)
    torch.manual_seed(7)
    want = run(expected, case, x, hx)
    assert_same(got, want, **tolerances(device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_low_precision_close_to_fp32(cell, dtype, device):
    """fp16/bf16 weights and activations, fp32 state and accumulation: close to nn in fp32."""
    case = sized(Case(num_layers=2, packed=True, batch=4), device)
    expected, fast = modules(cell, case, device)
    fast = fast.to(dtype)
    x, hx = make_input(cell, case, device)
    low_hx = tuple(s.to(dtype) for s in _tuple(hx))
    out, final, grads = run(fast, case, x.to(dtype), low_hx if len(low_hx) > 1 else low_hx[0])
    out_e, final_e, grads_e = run(expected, case, x, hx)
    assert out.dtype == dtype and all(s.dtype == dtype for s in final)
    tol = dict(rtol=3e-2, atol=2e-2) if dtype == torch.float16 else dict(rtol=1e-1, atol=8e-2)
    torch.testing.assert_close(out.float(), out_e, **tol)
    torch.testing.assert_close(tuple(s.float() for s in final), final_e, **tol)
    # Gradients sum over steps and rows: relative to their scale.
    for name, a, b in zip(["input", "hx", "hx"] + [n for n, _ in fast.named_parameters()],
                          grads, grads_e):
        err = (a.float() - b).abs().max() / b.abs().max().clamp_min(1e-3)
        assert err < (0.05 if dtype == torch.float16 else 0.15), (name, float(err))


# Both cells on CUDA; under the interpreter (deterministic by construction) the LSTM's run is
# a slow test.
@pytest.mark.parametrize("cell", ["gru", pytest.param("lstm", marks=SLOW_ON_CPU)])
def test_deterministic(cell, device):
    case = sized(Case(batch=17, num_layers=2, packed=True), device)
    _, fast = modules(cell, case, device)
    x, hx = make_input(cell, case, device)
    for a, b in zip(_flat(run(fast, case, x, hx))[1], _flat(run(fast, case, x, hx))[1]):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists only on CUDA")
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("hidden_size", [64, 256])  # on-chip and streamed with TF32
def test_cuda_tf32_matches_cudnn(cell, hidden_size):
    device = torch.device("cuda")
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        from fastbirnn.triton.launcher import use_tf32

        assert use_tf32(device)
        case = Case(batch=32, seq_len=128, input_size=64, hidden_size=hidden_size, num_layers=2)
        expected, fast = modules(cell, case, device)
        x, hx = make_input(cell, case, device)
        assert_same(run(fast, case, x, hx), run(expected, case, x, hx),
                    **tolerances(device, tf32=True))
    finally:
        torch.backends.cudnn.allow_tf32 = saved


# --- selection and errors -------------------------------------------------------------------


def test_gated_paths():
    from fastbirnn.triton import launcher

    cpu = torch.device("cpu")
    # G blocks of W_hh on chip within one Elman block's budget; no multi-CTA gated kernel.
    assert launcher.choose_path(64, 8, torch.float32, "tf32", cpu, gates=4) == "onchip"
    assert launcher.choose_path(65, 8, torch.float32, "tf32", cpu, gates=4) == "streamed"
    # Exact fp32 streams W_hh at any size (Triton 3.9 aborts compiling the on-chip LSTM).
    assert launcher.choose_path(16, 8, torch.float32, "ieee", cpu, gates=4) == "streamed"
    assert launcher.choose_path(16, 8, torch.float32, "ieee", cpu, gates=3) == "streamed"
    assert launcher.choose_path(64, 8, torch.float32, "ieee", cpu, gates=1) == "onchip"
    assert launcher.choose_path(64, 8, torch.bfloat16, "ieee", cpu, gates=4) == "onchip"
    assert launcher.choose_path(128, 8, torch.bfloat16, "ieee", cpu, gates=4) == "streamed"
    assert launcher.choose_path(1024, 8, torch.bfloat16, "ieee", cpu, gates=3) == "streamed"
    assert launcher.choose_path(1024, 8, torch.bfloat16, "ieee", cpu, gates=1) == "multicta"


def test_auto_never_picks_triton_for_gated_cells(monkeypatch):
    """Even where 'auto' would pick triton for the Elman cell, the gated cells do not go to
    triton until their own GPU measurement exists (on CPU tensors the CPU rule decides)."""
    preferring = dataclasses.replace(backends.get("triton"), auto_devices=None,
                                     preferred_for=lambda x, call: True)
    monkeypatch.setitem(backends._REGISTRY, "triton", preferring)
    x = torch.randn(5, 3, 4)
    assert FastBiRNN(4, 8).selected_backend(x) == "triton"  # the stand-in does prefer it
    for fast_class, _ in CELLS.values():
        assert fast_class(4, 8).selected_backend(x) in ("cpp", "torch")


def test_proj_size_is_a_clear_error(device):
    module = FastBiLSTM(4, 8, proj_size=3, backend="triton", device=device)
    with pytest.raises(RuntimeError, match="proj_size"):
        module(torch.randn(5, 3, 4, device=device))


@pytest.mark.parametrize("cell", CELLS)
def test_unsupported_dtype_is_a_clear_error(cell, device):
    module = CELLS[cell][0](4, 8, backend="triton", device=device, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        module(torch.randn(5, 3, 4, device=device, dtype=torch.float64))


# --- the recurrence as a torch.library custom op ----------------------------------------------


@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("cell", CELLS)
def test_custom_op_passes_opcheck(cell, save, device):
    """Schema, fake (meta) kernel and autograd registration of fastbirnn::gated_recurrence_*."""
    if device.type == "cuda":
        pytest.skip("the registration is device-independent: checked on CPU (interpreter)")
    from fastbirnn.triton.cells import GATES
    from fastbirnn.triton.gated_stack import gated_recurrence_forward

    T, B, D, H = 3, 2, 2, 16
    g = torch.Generator().manual_seed(0)
    Z, W, b_hn, h0, c0 = (torch.randn(*shape, generator=g).to(device).requires_grad_(save)
                          for shape in ((T, B, D, GATES[cell] * H), (D, GATES[cell] * H, H),
                                        (D, H), (D, B, H), (D, B, H)))
    lengths = torch.tensor([3, 2], device=device)
    torch.library.opcheck(gated_recurrence_forward, (Z, W, b_hn, h0, c0, lengths, cell, save),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


# Dynamo's notice about triton_backend's cached availability check, read while tracing.
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a .functools.lru_cache")
# The op registration is shared by both cells: under the interpreter the LSTM's trace is a
# slow test.
@pytest.mark.parametrize("cell", ["gru", pytest.param("lstm", marks=SLOW_ON_CPU)])
def test_compile_fullgraph_matches_eager(cell, device, exact_fp32):
    """torch.compile(fullgraph=True) traces the triton LSTM/GRU as one op per layer
    (aot_eager: the graph capture and AOT autograd, without code generation)."""
    case = Case(num_layers=2, seq_len=4)
    _, fast = modules(cell, case, device)
    x, hx = make_input(cell, case, device)
    want = run(fast, case, x, hx)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(allow_rnn=True):
            got = run(torch.compile(fast, fullgraph=True, backend="aot_eager"), case, x, hx)
    finally:
        torch._dynamo.reset()
    assert_same(got, want, **tolerances(device))
