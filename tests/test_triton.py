"""The 'triton' backend against nn.RNN and the pure-PyTorch reference.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (conftest sets
TRITON_INTERPRET=1), which is slow: shapes stay tiny there. With CUDA the same tests run on
GPU tensors at larger shapes, against cuDNN with TF32 off (exact comparisons) and once with
TF32 on (TF32-sized tolerances).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastbirnn import FastBiRNN, backends, reference
from fastbirnn.backends import triton_backend

pytestmark = pytest.mark.skipif(
    triton_backend._unavailable_reason() is not None, reason="triton not importable"
)

DEVICES = []
if backends.triton_interpreter_enabled():
    DEVICES.append("cpu")
if torch.cuda.is_available():
    DEVICES.append("cuda")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def exact_fp32():
    """cuDNN and cuBLAS in exact fp32, so nn.RNN and the kernels (which follow the flag,
    see fastbirnn.triton.launcher.use_tf32) are compared without TF32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def streamed(monkeypatch):
    """Force the large-hidden (streamed W_hh) kernels at small H, with 16-wide tiles."""
    from fastbirnn.triton import launcher

    monkeypatch.setattr(launcher, "MAX_ONCHIP_HIDDEN", {dt: 16 for dt in launcher.SUPPORTED_DTYPES})
    monkeypatch.setattr(launcher, "STREAM_BLOCK_N", 16)
    monkeypatch.setattr(launcher, "STREAM_BLOCK_K", 16)
    assert not launcher.uses_onchip(17, torch.float32)


@dataclass(frozen=True)
class Case:
    batch: int = 3
    seq_len: int = 5
    input_size: int = 4
    hidden_size: int = 20
    num_layers: int = 1
    nonlinearity: str = "tanh"
    bias: bool = True
    batch_first: bool = False
    bidirectional: bool = True
    packed: bool = False
    cuda_hidden: int = 0  # hidden size on CUDA; 0: 5x the CPU one

    def __str__(self):
        return (
            f"B{self.batch}T{self.seq_len}H{self.hidden_size}L{self.num_layers}-"
            f"{self.nonlinearity}-bias{int(self.bias)}-bf{int(self.batch_first)}-"
            f"bi{int(self.bidirectional)}-packed{int(self.packed)}"
        )


# CPU (interpreter) shapes; on CUDA each is scaled up (see sized()).
CASES = [
    Case(num_layers=2),  # H and B not multiples of 16
    # Two batch tiles; on CUDA exactly the largest exact-fp32 on-chip size.
    Case(batch=17, hidden_size=16, nonlinearity="relu", bias=False, cuda_hidden=64),
    # On CUDA past the fp32 on-chip limit: the streamed kernel without forcing it.
    Case(bidirectional=False, batch_first=True, hidden_size=24, cuda_hidden=300),
    Case(batch=5, num_layers=2, packed=True),  # unsorted packed, variable lengths
    Case(batch=20, seq_len=16, hidden_size=64, input_size=8, nonlinearity="relu", packed=True),
]
STREAMED_CASES = [
    Case(batch=18, hidden_size=40, packed=True),  # 3 hidden tiles, ragged last one
    Case(hidden_size=33, nonlinearity="relu", bidirectional=False, batch_first=True),
]


def sized(case: Case, device: torch.device) -> Case:
    if device.type != "cuda":
        return case
    return replace(
        case,
        batch=case.batch * 7,
        seq_len=64,
        input_size=32,
        hidden_size=case.cuda_hidden or case.hidden_size * 5,
    )


def lengths_for(case: Case) -> torch.Tensor:
    g = torch.Generator().manual_seed(case.batch)
    lengths = torch.randint(1, case.seq_len + 1, (case.batch,), generator=g)
    lengths[case.batch // 2] = case.seq_len
    return lengths


def make_input(case: Case, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.seq_len) if case.batch_first else (case.seq_len, case.batch)
    x = torch.randn(*shape, case.input_size, generator=g).to(device, dtype)
    D = 2 if case.bidirectional else 1
    h0 = torch.randn(case.num_layers * D, case.batch, case.hidden_size, generator=g)
    return x, h0.to(device, dtype)


def run(module, case: Case, x, h0, seed=1):
    """Forward + backward of a random loss; returns output (padded), h_n and all gradients."""
    x = x.detach().clone().requires_grad_()
    h0 = h0.detach().clone().requires_grad_()
    if case.packed:
        lengths = lengths_for(case)
        inp = pack_padded_sequence(x, lengths, batch_first=case.batch_first, enforce_sorted=False)
    else:
        inp = x
    out, h_n = module(inp, h0)
    if case.packed:
        out, _ = pad_packed_sequence(out, batch_first=case.batch_first, total_length=case.seq_len)
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g).to(out)
    w_h = torch.randn(h_n.shape, generator=g).to(h_n)
    ((out * w_out).sum() + (h_n * w_h).sum()).backward()
    grads = {"input": x.grad, "h0": h0.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), h_n.detach(), grads


def modules(case: Case, device, backend_names=("triton",)):
    torch.manual_seed(0)
    rnn = nn.RNN(
        case.input_size, case.hidden_size, num_layers=case.num_layers,
        nonlinearity=case.nonlinearity, bias=case.bias, batch_first=case.batch_first,
        bidirectional=case.bidirectional, device=device,
    )
    fused = []
    for name in backend_names:
        m = FastBiRNN(
            case.input_size, case.hidden_size, num_layers=case.num_layers,
            nonlinearity=case.nonlinearity, bias=case.bias, batch_first=case.batch_first,
            bidirectional=case.bidirectional, device=device, backend=name,
        )
        m.load_state_dict(rnn.state_dict())
        fused.append(m)
    return rnn, fused


def tolerances(device, tf32=False):
    if tf32:
        return dict(rtol=2e-2, atol=2e-2)
    if device.type == "cuda":  # longer sequences and larger sums than on CPU
        return dict(rtol=1e-3, atol=2e-4)
    return dict(rtol=1e-4, atol=2e-5)


def assert_same(result, expected, **tol):
    out, h_n, grads = result
    out_e, h_n_e, grads_e = expected
    torch.testing.assert_close(out, out_e, **tol)
    torch.testing.assert_close(h_n, h_n_e, **tol)
    assert grads.keys() == grads_e.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_e[name], msg=lambda m: f"{name}: {m}", **tol)


def check_module_parity(case: Case, device):
    case = sized(case, device)
    rnn, (fused_triton, fused_reference) = modules(case, device, ("triton", "reference"))
    assert fused_triton.selected_backend(make_input(case, device)[0]) == "triton"
    x, h0 = make_input(case, device)
    got = run(fused_triton, case, x, h0)
    assert_same(got, run(rnn, case, x, h0), **tolerances(device))
    if device.type == "cpu":  # the Python-loop reference is too slow for CUDA shapes
        assert_same(got, run(fused_reference, case, x, h0), **tolerances(device))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_module_parity(case, device, exact_fp32):
    check_module_parity(case, device)


@pytest.mark.parametrize("case", STREAMED_CASES, ids=str)
def test_module_parity_streamed(case, device, exact_fp32, streamed):
    check_module_parity(case, device)


# --- the seam itself, against the reference -------------------------------------------------


def seam_inputs(T, B, D, H, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(T, B, D, H, generator=g)
    W = torch.randn(D, H, H, generator=g) / H**0.5
    h0 = torch.randn(D, B, H, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    dHs = torch.randn(T, B, D, H, generator=g)
    return [t.to(device, dtype) for t in (Z, W, h0, dHs)], lengths.to(device)


def seam(Z, W, h0, dHs, lengths, nonlinearity, fn_forward, fn_backward):
    Hs = fn_forward(Z, W, h0, lengths, nonlinearity)
    dZ, dh0 = fn_backward(dHs, Hs, W, lengths, nonlinearity)
    return Hs, dZ, dh0


@pytest.mark.parametrize("path", ["onchip", "streamed"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("D", [2, 1])
def test_seam_matches_reference(path, nonlinearity, D, device, exact_fp32, request):
    from fastbirnn import triton as kernels

    if path == "streamed":
        request.getfixturevalue("streamed")
    T, B, H = (6, 5, 24) if device.type == "cpu" else (40, 50, 72)
    (Z, W, h0, dHs), lengths = seam_inputs(T, B, D, H, device, torch.float32)
    got = seam(Z, W, h0, dHs, lengths, nonlinearity,
               kernels.recurrence_forward, kernels.recurrence_backward)
    want = seam(Z, W, h0, dHs, lengths, nonlinearity,
                reference.recurrence_forward, reference.recurrence_backward)
    for name, a, b in zip(("Hs", "dZ", "dh0"), got, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}", **tolerances(device))
    # Past each row's length: zero outputs and zero gradients.
    t = torch.arange(T, device=device)[:, None]
    padded = t >= lengths[None, :]
    assert not got[0][padded].any() and not got[1][padded].any()


@pytest.mark.parametrize("path", ["onchip", "streamed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_seam(dtype, path, device, request):
    """fp16/bf16 in, fp32 accumulation inside: close to the fp32 reference."""
    from fastbirnn import triton as kernels

    if path == "streamed":
        request.getfixturevalue("streamed")
    # On CUDA H=200 pads to 256: the largest fp16/bf16 on-chip size.
    T, B, D, H = (5, 3, 2, 24) if device.type == "cpu" else (32, 40, 2, 200)
    (Z, W, h0, dHs), lengths = seam_inputs(T, B, D, H, device, torch.float32)
    low = [t.to(dtype) for t in (Z, W, h0, dHs)]
    # The reference gets the same rounded inputs, so only the kernel's own rounding differs.
    want = seam(*[t.float() for t in low], lengths, "tanh",
                reference.recurrence_forward, reference.recurrence_backward)
    got = seam(*low, lengths, "tanh", kernels.recurrence_forward, kernels.recurrence_backward)
    tol = dict(rtol=2e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=8e-2, atol=6e-2)
    for name, a, b in zip(("Hs", "dZ", "dh0"), got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_module_forward(dtype, device):
    case = sized(Case(num_layers=2, packed=True, batch=4), device)
    rnn, (fused,) = modules(case, device)
    x, h0 = make_input(case, device)
    with torch.no_grad():
        lengths = lengths_for(case)
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out_e, h_e = rnn(packed, h0)
        fused = fused.to(dtype)
        packed_low = pack_padded_sequence(x.to(dtype), lengths, enforce_sorted=False)
        out, h_n = fused(packed_low, h0.to(dtype))
    assert out.data.dtype == dtype and h_n.dtype == dtype
    tol = dict(rtol=3e-2, atol=2e-2) if dtype == torch.float16 else dict(rtol=1e-1, atol=8e-2)
    torch.testing.assert_close(out.data.float(), out_e.data, **tol)
    torch.testing.assert_close(h_n.float(), h_e, **tol)


def test_deterministic(device):
    case = sized(Case(batch=17, num_layers=2, packed=True), device)
    _, (fused,) = modules(case, device)
    x, h0 = make_input(case, device)
    first = run(fused, case, x, h0)
    fused.zero_grad()
    second = run(fused, case, x, h0)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists only on CUDA")
@pytest.mark.parametrize("hidden_size", [128, 512])  # on-chip and streamed with TF32
def test_cuda_tf32_matches_cudnn(hidden_size):
    """With torch's default flags cuDNN's RNN and the kernels both round fp32 to TF32."""
    device = torch.device("cuda")
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        from fastbirnn.triton.launcher import use_tf32

        assert use_tf32(device)
        case = Case(batch=32, seq_len=128, input_size=64, hidden_size=hidden_size, num_layers=2)
        rnn, (fused,) = modules(case, device)
        x, h0 = make_input(case, device)
        assert_same(run(fused, case, x, h0), run(rnn, case, x, h0), **tolerances(device, True))
    finally:
        torch.backends.cudnn.allow_tf32 = saved


# --- selection and errors -------------------------------------------------------------------


def test_tf32_rule_follows_cudnn_flag():
    from fastbirnn.triton.launcher import use_tf32

    saved = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        assert not use_tf32(torch.device("cuda"))
        torch.backends.cudnn.allow_tf32 = True
        assert use_tf32(torch.device("cuda"))
        assert not use_tf32(torch.device("cpu"))  # the interpreter is always exact fp32
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def test_auto_does_not_pick_triton_without_measurements(device):
    assert triton_backend.CUDA_CROSSOVER == {}
    module = FastBiRNN(4, 20, device=device)
    assert module.selected_backend(torch.randn(5, 3, 4, device=device)) != "triton"
    assert not triton_backend.crossover_prefers(torch.float32, 512, 1)


def test_crossover_lookup(monkeypatch):
    monkeypatch.setattr(triton_backend, "CUDA_CROSSOVER", {torch.float32: {256: 64, 1024: 8}})
    assert triton_backend.crossover_prefers(torch.float32, 200, 64)
    assert not triton_backend.crossover_prefers(torch.float32, 200, 65)
    assert triton_backend.crossover_prefers(torch.float32, 512, 8)
    assert not triton_backend.crossover_prefers(torch.float32, 2048, 1)
    assert not triton_backend.crossover_prefers(torch.bfloat16, 256, 1)
    # 'auto' passes the batch size through; on CPU the interpreter is never the fast path.
    module = FastBiRNN(4, 200, batch_first=True)
    expected = "triton" if torch.cuda.is_available() else module.selected_backend(torch.randn(3, 5, 4))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = module.to(device)
    assert module.selected_backend(torch.randn(64, 5, 4, device=device)) == expected
    assert module.selected_backend(torch.randn(65, 5, 4, device=device)) != "triton"


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # Without CUDA already at construction (the backend is unavailable on this machine);
    # with CUDA at the call with a CPU tensor.
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        module = FastBiRNN(4, 8, backend="triton")
        module(torch.randn(5, 3, 4))


def test_available_backends_tells_the_truth_about_this_machine(monkeypatch):
    """Issue 11: without CUDA and without the interpreter, 'triton' cannot run any tensor,
    so available_backends() must say so (not None), and asking for it by name fails early."""
    import fastbirnn

    assert fastbirnn.available_backends()["triton"] is None  # here: CUDA or interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = fastbirnn.available_backends()["triton"]
    assert reason is not None and "CUDA" in reason and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="'triton' is not available.*CUDA"):
        FastBiRNN(4, 8, backend="triton")
    # 'auto' is unaffected: it never considers triton for CPU tensors.
    assert FastBiRNN(4, 8).selected_backend(torch.randn(5, 3, 4)) != "triton"


def test_unsupported_dtype_is_a_clear_error(device):
    module = FastBiRNN(4, 8, backend="triton", device=device, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        module(torch.randn(5, 3, 4, device=device, dtype=torch.float64))


# --- non-finite values flow exactly as in nn.RNN (issue 11) ---------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
@pytest.mark.parametrize("path", ["onchip", "streamed"])
def test_non_finite_input_matches_nn_rnn(value, nonlinearity, path, device, exact_fp32, request):
    """One input element non-finite: output, h_n and every gradient as nn.RNN's, NaN where
    nn.RNN has NaN (relu must not drop NaN; its gradient is a select, not a product)."""
    if path == "streamed":
        request.getfixturevalue("streamed")
    case = sized(Case(batch=3, seq_len=4, hidden_size=20, nonlinearity=nonlinearity), device)
    rnn, (fused,) = modules(case, device)
    x, h0 = make_input(case, device)
    x[1, 1, 0] = value  # one row (t=1, b=1); the other rows stay finite
    got, want = run(fused, case, x, h0), run(rnn, case, x, h0)
    # The case does exercise non-finite values (tanh saturates inf, but not its gradients).
    assert not all(torch.isfinite(t).all() for t in (want[0], want[1], *want[2].values()))
    out, h_n, grads = got
    out_e, h_n_e, grads_e = want
    tol = dict(equal_nan=True, **tolerances(device))
    torch.testing.assert_close(out, out_e, **tol)
    torch.testing.assert_close(h_n, h_n_e, **tol)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_e[name], msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_non_finite_seam_matches_autograd(nonlinearity, device, exact_fp32):
    """The seam alone, against autograd through the same recurrence: NaN/inf in Z, in the
    output gradient, and an inf gradient meeting a relu at 0."""
    from fastbirnn import triton as kernels

    T, B, D, H = 4, 4, 2, 20
    (Z, W, h0, dHs), lengths = seam_inputs(T, B, D, H, device, torch.float32)
    lengths = torch.full_like(lengths, T)
    Z[1, 0, 0, 3] = float("nan")
    Z[2, 1, 1, 5] = float("inf")
    Z[0, 2, 0, 7] = float("-inf")
    dHs[3, 3, 1, 2] = float("inf")
    dHs[3, 3, 0, 4] = float("nan")

    def autograd_reference():
        z = Z.clone().requires_grad_()
        h0_ = h0.clone().requires_grad_()
        act = torch.tanh if nonlinearity == "tanh" else torch.relu
        outs = torch.zeros_like(Z)
        for d in range(D):
            h = h0_[d]
            steps = range(T) if d == 0 else range(T - 1, -1, -1)
            for t in steps:
                h = act(z[t, :, d] + h @ W[d].T)
                outs[t, :, d] = h
        outs.backward(dHs)
        return outs.detach(), z.grad, h0_.grad

    Hs = kernels.recurrence_forward(Z, W, h0, lengths, nonlinearity)
    dZ, dh0 = kernels.recurrence_backward(dHs, Hs, W, lengths, nonlinearity)
    for name, a, b in zip(("Hs", "dZ", "dh0"), (Hs, dZ, dh0), autograd_reference()):
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m: f"{name}: {m}",
                                   **tolerances(device))


# --- the multi-CTA kernels (issue 13), in step mode under the interpreter ---------------------


@pytest.fixture
def multicta(monkeypatch):
    """Force the multi-CTA path (step mode on CPU; on CUDA persistent where it fits)."""
    from fastbirnn.triton import launcher

    monkeypatch.setattr(launcher, "FORCE_PATH", "multicta")
    return launcher


# Each override exercises other tile boundaries: W block resident or re-read in ragged
# 16-wide k tiles, several batch tiles, hidden blocks wider than the unit count.
MULTICTA_CONFIGS = {
    "resident": {"W_RESIDENT": True},  # (exact fp32, as in the interpreter, re-reads by default)
    "streamedK16": {"W_RESIDENT": False, "BLOCK_K": 16},
    "batch16": {"BLOCK_B": 16, "BLOCK_N": 32},
}
MULTICTA_CASES = [
    Case(batch=18, hidden_size=40, packed=True),  # ragged lengths, unsorted, 3 hidden blocks
    Case(batch=3, hidden_size=33, nonlinearity="relu", num_layers=2, batch_first=True),
    Case(batch=5, hidden_size=20, bidirectional=False, packed=True),
]


# Every case with every configuration; under the interpreter the default run takes the diagonal
# (each case and each configuration once) and the rest are slow tests (CI runs them).
SLOW_ON_CPU = () if torch.cuda.is_available() else pytest.mark.slow


@pytest.mark.parametrize("case, config", [
    pytest.param(case, config, marks=() if i == j else SLOW_ON_CPU)
    for i, case in enumerate(MULTICTA_CASES) for j, config in enumerate(MULTICTA_CONFIGS)
], ids=str)
def test_module_parity_multicta(case, config, device, exact_fp32, multicta, monkeypatch):
    if device.type == "cuda" and config == "streamedK16":
        pytest.skip("tile boundaries are the interpreter's job; on CUDA: the launch modes")
    monkeypatch.setattr(multicta, "MULTICTA_OVERRIDES", MULTICTA_CONFIGS[config])
    check_module_parity(case, device)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("D", [2, 1])
def test_multicta_seam_matches_reference(nonlinearity, D, device, exact_fp32, multicta,
                                         monkeypatch):
    from fastbirnn import triton as kernels

    # On CPU also the W-resident variant, which exact fp32 does not pick by itself (on CUDA
    # it would be an FMA dot over all of H: huge and slow to compile).
    monkeypatch.setattr(multicta, "MULTICTA_OVERRIDES",
                        {"BLOCK_B": 16, "W_RESIDENT": device.type == "cpu"})
    T, B, H = (5, 21, 36) if device.type == "cpu" else (40, 50, 520)
    (Z, W, h0, dHs), lengths = seam_inputs(T, B, D, H, device, torch.float32)
    lengths[1] = 1  # a row that is active for one step only
    got = seam(Z, W, h0, dHs, lengths, nonlinearity,
               kernels.recurrence_forward, kernels.recurrence_backward)
    want = seam(Z, W, h0, dHs, lengths, nonlinearity,
                reference.recurrence_forward, reference.recurrence_backward)
    for name, a, b in zip(("Hs", "dZ", "dh0"), got, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}", **tolerances(device))
    t = torch.arange(T, device=device)[:, None]
    padded = t >= lengths[None, :]
    assert not got[0][padded].any() and not got[1][padded].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_multicta_low_precision_seam(dtype, device, multicta):
    from fastbirnn import triton as kernels

    T, B, D, H = (4, 3, 2, 24) if device.type == "cpu" else (32, 40, 2, 600)
    (Z, W, h0, dHs), lengths = seam_inputs(T, B, D, H, device, torch.float32)
    low = [t.to(dtype) for t in (Z, W, h0, dHs)]
    want = seam(*[t.float() for t in low], lengths, "tanh",
                reference.recurrence_forward, reference.recurrence_backward)
    got = seam(*low, lengths, "tanh", kernels.recurrence_forward, kernels.recurrence_backward)
    tol = dict(rtol=2e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=8e-2, atol=6e-2)
    for name, a, b in zip(("Hs", "dZ", "dh0"), got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=str)
def test_multicta_non_finite_matches_nn_rnn(value, device, exact_fp32, multicta):
    case = sized(Case(batch=3, seq_len=4, hidden_size=20, nonlinearity="relu"), device)
    rnn, (fused,) = modules(case, device)
    x, h0 = make_input(case, device)
    x[1, 1, 0] = value
    out, h_n, grads = run(fused, case, x, h0)
    out_e, h_n_e, grads_e = run(rnn, case, x, h0)
    tol = dict(equal_nan=True, **tolerances(device))
    torch.testing.assert_close(out, out_e, **tol)
    torch.testing.assert_close(h_n, h_n_e, **tol)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_e[name], msg=lambda m: f"{name}: {m}", **tol)


def test_path_choice():
    from fastbirnn.triton import launcher

    cpu = torch.device("cpu")
    assert launcher.choose_path(64, 8, torch.float32, "tf32", cpu) == "onchip"
    assert launcher.choose_path(200, 8, torch.float32, "tf32", cpu) == "streamed"
    assert launcher.choose_path(512, 8, torch.float32, "tf32", cpu) == "multicta"
    assert launcher.choose_path(1024, 64, torch.bfloat16, "ieee", cpu) == "multicta"
    assert launcher.choose_path(256, 8, torch.bfloat16, "ieee", cpu) == "onchip"
    assert launcher.choose_path(1024, 65, torch.float32, "tf32", cpu) == "streamed"
    # The grid (D, K, NB) fills the SMs, one CTA each, and never exceeds them while it can.
    for H, B in [(256, 1), (512, 16), (1024, 32), (1024, 64), (2048, 16), (4096, 64)]:
        for dtype, precision in [(torch.float32, "tf32"), (torch.float32, "ieee"),
                                 (torch.bfloat16, "ieee")]:
            cfg = launcher.multicta_config(H, B, 2, dtype, 132, precision)
            ctas = 2 * -(-H // cfg["BLOCK_N"]) * -(-B // cfg["BLOCK_B"])
            assert ctas <= 132 or cfg["BLOCK_N"] == launcher.MULTICTA_MAX_BLOCK_N, (H, B, cfg)
            assert min(cfg["BLOCK_N"], cfg["BLOCK_B"], cfg["BLOCK_K"]) >= 16
            assert not (cfg["W_RESIDENT"] and precision == "ieee" and dtype == torch.float32)
    assert launcher.multicta_config(1024, 16, 2, torch.float32, 132)["W_RESIDENT"]
    assert launcher.multicta_config(512, 16, 2, torch.bfloat16, 132, "ieee")["W_RESIDENT"]


def test_persistent_mode_refused_under_the_interpreter(multicta, monkeypatch):
    if not backends.triton_interpreter_enabled():
        pytest.skip("only the interpreter refuses the persistent kernel")
    from fastbirnn import triton as kernels

    monkeypatch.setattr(multicta, "FORCE_MULTICTA_MODE", "persistent")
    (Z, W, h0, _), lengths = seam_inputs(3, 2, 2, 20, "cpu", torch.float32)
    with pytest.raises(RuntimeError, match="needs a GPU"):
        kernels.recurrence_forward(Z, W, h0, lengths, "tanh")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the grid barrier runs only on a GPU")
@pytest.mark.parametrize("mode", ["persistent", "step"])
def test_cuda_multicta_modes_agree(mode, multicta, monkeypatch, exact_fp32):
    """On a GPU both launch modes give the same results (same tile code, same arithmetic)."""
    from fastbirnn import triton as kernels

    (Z, W, h0, dHs), lengths = seam_inputs(64, 24, 2, 768, torch.device("cuda"), torch.float32)
    monkeypatch.setattr(multicta, "FORCE_MULTICTA_MODE", "step")
    want = seam(Z, W, h0, dHs, lengths, "tanh",
                kernels.recurrence_forward, kernels.recurrence_backward)
    monkeypatch.setattr(multicta, "FORCE_MULTICTA_MODE", mode)
    got = seam(Z, W, h0, dHs, lengths, "tanh",
               kernels.recurrence_forward, kernels.recurrence_backward)
    assert multicta.LAST_MULTICTA["mode"] == mode  # the grid fits an H100/H200 at once
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the grid barrier runs only on a GPU")
def test_cuda_barrier_timeout_raises(multicta, monkeypatch):
    """A barrier that cannot complete (MAX_SPIN = 0 polls) raises instead of hanging: at the
    seam at once, in a module's forward once after its last layer, in a backward pass once
    autograd is done (the flag is read once per call)."""
    from fastbirnn import triton as kernels

    monkeypatch.setattr(multicta, "FORCE_MULTICTA_MODE", "persistent")
    monkeypatch.setattr(multicta, "BARRIER_MAX_SPIN", 0)
    (Z, W, h0, _), lengths = seam_inputs(8, 4, 2, 512, torch.device("cuda"), torch.float32)
    with pytest.raises(RuntimeError, match="barrier timed out"):
        kernels.recurrence_forward(Z, W, h0, lengths, "tanh")
    module = FastBiRNN(16, 512, num_layers=2, backend="triton", device="cuda")
    x = torch.randn(8, 4, 16, device="cuda", requires_grad=True)
    with pytest.raises(RuntimeError, match="barrier timed out"):
        module(x)
    monkeypatch.setattr(multicta, "BARRIER_MAX_SPIN", 1 << 22)
    out = module(x)[0]
    monkeypatch.setattr(multicta, "BARRIER_MAX_SPIN", 0)
    with pytest.raises(RuntimeError, match="barrier timed out.*backward_multicta_kernel"):
        out.sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_of_the_persistent_kernel_is_refused(multicta):
    module = FastBiRNN(16, 512, backend="triton", device="cuda")
    x = torch.randn(8, 4, 16, device="cuda")
    with torch.no_grad():
        module(x)  # compiled and run once outside the capture
        graph = torch.cuda.CUDAGraph()
        refusal = None
        with torch.cuda.graph(graph):
            try:
                module(x)
            except RuntimeError as error:  # caught inside, so that the capture ends cleanly
                refusal = error
    assert refusal is not None and "cannot be captured in a CUDA graph" in str(refusal)
