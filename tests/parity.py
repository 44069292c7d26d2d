"""Shared parity harness: run nn.RNN and FastBiRNN on the same weights and inputs,
then compare outputs, h_n and every gradient."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastbirnn import FastBiRNN


def with_threads(n: int, fn):
    """fn() with torch.set_num_threads(n), the previous count restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


@dataclass
class Case:
    """One nn.RNN configuration and input layout."""

    batch: int = 3
    seq_len: int = 5
    input_size: int = 4
    hidden_size: int = 6
    num_layers: int = 1
    nonlinearity: str = "tanh"
    bias: bool = True
    batch_first: bool = False
    bidirectional: bool = True
    # 'padded' (3-D), 'unbatched' (2-D), 'packed' (sorted) or 'packed_unsorted'
    layout: str = "padded"
    with_hx: bool = True
    lengths: list[int] | None = None
    extra: dict = field(default_factory=dict)

    def module_kwargs(self) -> dict:
        return dict(
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            nonlinearity=self.nonlinearity,
            bias=self.bias,
            batch_first=self.batch_first,
            bidirectional=self.bidirectional,
            **self.extra,
        )

    def __str__(self) -> str:
        return (
            f"{self.layout}-L{self.num_layers}-{self.nonlinearity}-bias{int(self.bias)}"
            f"-bf{int(self.batch_first)}-bi{int(self.bidirectional)}-hx{int(self.with_hx)}"
            f"-B{self.batch}T{self.seq_len}I{self.input_size}H{self.hidden_size}"
        )


def tolerances(dtype: torch.dtype) -> dict:
    if dtype == torch.float64:
        return dict(rtol=1e-7, atol=1e-9)
    # fp32: different summation order in GEMMs, amplified through layers and steps.
    return dict(rtol=1e-4, atol=2e-5)


def make_pair(case: Case, backend: str, dtype=torch.float64, device="cpu", seed=0):
    """nn.RNN and FastBiRNN with identical weights (loaded through state_dict)."""
    torch.manual_seed(seed)
    reference = nn.RNN(**case.module_kwargs(), dtype=dtype, device=device)
    fast = FastBiRNN(**case.module_kwargs(), dtype=dtype, device=device, backend=backend)
    fast.load_state_dict(reference.state_dict(), strict=True)
    return reference, fast


def make_inputs(case: Case, dtype=torch.float64, device="cpu", seed=1):
    """A padded time-major or batch-first input, the lengths, and h_0 (or None)."""
    g = torch.Generator().manual_seed(seed)
    D = 2 if case.bidirectional else 1
    if case.layout == "unbatched":
        x = torch.randn(case.seq_len, case.input_size, generator=g, dtype=dtype)
        hx = torch.randn(case.num_layers * D, case.hidden_size, generator=g, dtype=dtype)
    else:
        shape = (case.batch, case.seq_len) if case.batch_first else (case.seq_len, case.batch)
        x = torch.randn(*shape, case.input_size, generator=g, dtype=dtype)
        hx = torch.randn(case.num_layers * D, case.batch, case.hidden_size, generator=g, dtype=dtype)
    x = x.to(device).requires_grad_()
    hx = hx.to(device).requires_grad_() if case.with_hx else None
    lengths = case.lengths
    if lengths is None and case.layout.startswith("packed"):
        lengths = [case.seq_len - (i % case.seq_len) for i in range(case.batch)]
        if case.layout == "packed_unsorted":
            lengths = lengths[::-1]
    return x, lengths, hx


def run(module, case: Case, x, lengths, hx):
    """Forward through `module` in the case's layout; returns (padded output, h_n)."""
    if case.layout.startswith("packed"):
        packed = pack_padded_sequence(
            x, lengths, batch_first=case.batch_first, enforce_sorted=case.layout == "packed"
        )
        out, h_n = module(packed, hx)
        assert isinstance(out, PackedSequence)
        out, _ = pad_packed_sequence(out, batch_first=case.batch_first, total_length=case.seq_len)
        return out, h_n
    out, h_n = module(x, hx) if hx is not None else module(x)
    return out, h_n


def forward_backward(module, case: Case, x, lengths, hx, seed=2):
    """Output, h_n and the gradients of a random linear loss of both."""
    out, h_n = run(module, case, x, lengths, hx)
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    w_h = torch.randn(h_n.shape, generator=g, dtype=h_n.dtype).to(h_n.device)
    loss = (out * w_out).sum() + (h_n * w_h).sum()
    inputs = [x] + ([hx] if hx is not None else []) + list(module.parameters())
    grads = torch.autograd.grad(loss, inputs)
    names = ["input"] + (["hx"] if hx is not None else []) + [n for n, _ in module.named_parameters()]
    return out.detach(), h_n.detach(), dict(zip(names, grads))


def assert_parity(case: Case, backend: str, dtype=torch.float64, device="cpu", tol=None):
    """FastBiRNN(backend) matches nn.RNN: output, h_n and every gradient."""
    tol = tol or tolerances(dtype)
    reference, fast = make_pair(case, backend, dtype, device)
    x, lengths, hx = make_inputs(case, dtype, device)
    expected = forward_backward(reference, case, x, lengths, hx)
    actual = forward_backward(fast, case, x, lengths, hx)
    torch.testing.assert_close(actual[0], expected[0], **tol, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(actual[1], expected[1], **tol, msg=lambda m: f"h_n: {m}")
    assert actual[2].keys() == expected[2].keys()
    for name in expected[2]:
        torch.testing.assert_close(
            actual[2][name], expected[2][name], **tol, msg=lambda m, n=name: f"grad {n}: {m}"
        )
    return fast


def clone_module(module):
    return copy.deepcopy(module)


# Configurations covering every item of the contract; kernels reuse this list.
PARITY_CASES = [
    Case(),
    Case(with_hx=False),
    Case(batch_first=True),
    Case(layout="unbatched"),
    Case(layout="unbatched", with_hx=False, batch_first=True),
    Case(layout="packed"),
    Case(layout="packed_unsorted"),
    Case(layout="packed_unsorted", batch_first=True, with_hx=False),
    Case(num_layers=2),
    Case(num_layers=3, layout="packed_unsorted"),
    Case(nonlinearity="relu"),
    Case(nonlinearity="relu", num_layers=2, layout="packed"),
    Case(bias=False),
    Case(bias=False, num_layers=2, batch_first=True),
    Case(bidirectional=False),
    Case(bidirectional=False, num_layers=2, layout="packed_unsorted"),
    Case(batch=1, seq_len=1),
    Case(batch=2, seq_len=4, input_size=16, hidden_size=32, batch_first=True),
    Case(batch=4, seq_len=7, layout="packed_unsorted", lengths=[7, 1, 4, 7]),
]
