"""torch.compile(fullgraph=True), torch.export and ONNX export of a model containing FastBiRNN.

Dynamo refuses every ``nn.RNN`` subclass (and ``nn.RNN`` itself) unless
``torch._dynamo.config.allow_rnn = True``; the tests set it with ``config.patch``.

ONNX, as documented here and tested below:

* ``backend='torch'`` (``nn.RNN``'s own kernel) exports with both exporters (the dynamo-based
  ``torch.onnx.export(..., dynamo=True)``, the default, and the legacy TorchScript one) and
  onnxruntime reproduces the eager outputs. This is the way to export: set
  ``model.rnn.backend = 'torch'`` (or build with it) before ``torch.onnx.export``; the
  parameters and ``state_dict`` are the same, so nothing else changes.
* The fused backends ('cpp', 'triton', and 'auto' wherever it picks one) do not
  export: their recurrence is a ``torch.library`` custom op (``fastbirnn::...``) that no ONNX
  translation is registered for, so the dynamo exporter fails converting it and the legacy
  exporter raises ``UnsupportedOperatorError`` naming the op. (A translation to ONNX's own
  ``RNN`` operator, which has ``direction="bidirectional"`` and ``sequence_lens``, could be
  registered through ``custom_translation_table``; it is not written yet.)
"""

import importlib.util
import warnings

import pytest
import torch
from torch import nn

import fastbirnn
from fastbirnn import FastBiRNN

# The backends whose stack is a custom op. ('reference' is plain PyTorch ops, a loop over
# time: it compiles, unrolled, but exports only with a static sequence length.)
FUSED = [n for n in ("cpp",) if fastbirnn.available_backends().get(n, "") is None]
BACKENDS = ["auto", *FUSED]

allow_rnn = torch._dynamo.config.patch(allow_rnn=True)


class Tagger(nn.Module):
    def __init__(self, backend: str) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.rnn = FastBiRNN(16, 24, num_layers=2, batch_first=True, backend=backend)
        self.out = nn.Linear(48, 5)

    def forward(self, x):
        output, h_n = self.rnn(torch.tanh(self.proj(x)))
        return self.out(output), h_n


def _model(backend):
    torch.manual_seed(0)
    return Tagger(backend)


def _fastbirnn_ops(graph) -> set:
    return {str(n.target) for n in graph.nodes if n.op == "call_function" and "fastbirnn" in str(n.target)}


# Inductor compiles the Linear and tanh kernels around the RNN too (10-20 s of CPU time each
# with a cold cache): the default run traces the whole model with AOTAutograd (one graph,
# the custom ops in it), and Inductor compiles the RNN alone (below); the slow tests compile
# the whole model with Inductor as well.
@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_compile_fullgraph_forward_backward_matches_eager(backend, compiler):
    model = _model(backend)
    x = torch.randn(3, 6, 8)
    y_eager, h_eager = model(x)
    (y_eager.square().sum() + h_eager.sum()).backward()
    grads_eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    torch._dynamo.reset()
    with allow_rnn:
        compiled = torch.compile(model, fullgraph=True, backend=compiler)
        y, h = compiled(x)
        (y.square().sum() + h.sum()).backward()

    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(h, h_eager)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_eager[name], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_inductor_compiles_the_rnn_with_its_custom_ops(backend):
    torch.manual_seed(0)
    rnn = FastBiRNN(8, 12, num_layers=2, batch_first=True, backend=backend)
    x = torch.randn(3, 6, 8)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = rnn(xe)
    (expected[0].square().sum() + expected[1].sum()).backward()
    grads_eager = [xe.grad, *(p.grad.clone() for p in rnn.parameters())]
    rnn.zero_grad()

    torch._dynamo.reset()
    with allow_rnn:
        compiled = torch.compile(rnn, fullgraph=True)  # Inductor, the default
        actual = compiled(xc)
        (actual[0].square().sum() + actual[1].sum()).backward()
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close([xc.grad, *(p.grad for p in rnn.parameters())], grads_eager)


# nn.RNN refreshes its _flat_weights cache in forward, and torch.export warns about that
# attribute assignment; a plain nn.RNN gets the same warning, and the export is still right.
@pytest.mark.filterwarnings("ignore:The tensor attributes self.rnn._flat_weights:UserWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_export_matches_eager_with_dynamic_batch_and_time(backend):
    model = _model(backend).eval()
    x = torch.randn(3, 6, 8)
    batch, time = torch.export.Dim("batch", min=2), torch.export.Dim("time", min=2)
    with allow_rnn:
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch, 1: time}})

    if backend != "auto":  # a fused backend is one opaque custom op per layer (or stack)
        assert _fastbirnn_ops(program.graph), program.graph
    exported = program.module()
    for shape in [(3, 6, 8), (5, 2, 8), (2, 11, 8)]:
        x = torch.randn(shape)
        for got, want in zip(exported(x), model(x)):
            torch.testing.assert_close(got, want)


def test_compile_without_allow_rnn_is_refused():
    """Documents the Dynamo rule the README states: without allow_rnn, fullgraph fails."""
    torch._dynamo.reset()
    compiled = torch.compile(_model("reference"), fullgraph=True)
    with torch._dynamo.config.patch(allow_rnn=False), pytest.raises(Exception, match="(?i)rnn"):
        compiled(torch.randn(2, 3, 8))
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------- ONNX

needs_onnxscript = pytest.mark.skipif(
    importlib.util.find_spec("onnxscript") is None or importlib.util.find_spec("onnx") is None,
    reason="the dynamo ONNX exporter needs the onnx and onnxscript packages",
)


def _check_with_onnxruntime(path, model, x):
    if importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    for got, want in zip(outputs, model(x)):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


@needs_onnxscript
def test_onnx_export_works_with_backend_torch(tmp_path):
    model = _model("torch").eval()
    x = torch.randn(3, 6, 8)
    with allow_rnn, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), tmp_path / "tagger.onnx", dynamo=True)
    _check_with_onnxruntime(tmp_path / "tagger.onnx", model, x)


def test_onnx_legacy_export_works_with_backend_torch(tmp_path):
    pytest.importorskip("onnx")
    model = _model("torch").eval()
    x = torch.randn(3, 6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), tmp_path / "tagger.onnx", dynamo=False)
    _check_with_onnxruntime(tmp_path / "tagger.onnx", model, x)


@needs_onnxscript
@pytest.mark.parametrize("backend", FUSED)
def test_onnx_export_of_fused_backends_is_not_supported(backend, tmp_path):
    """Fails the day the custom op gets an ONNX translation: then update the docs above."""
    model = _model(backend).eval()
    x = torch.randn(3, 6, 8)
    with allow_rnn, warnings.catch_warnings(), pytest.raises(Exception) as error:
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), tmp_path / "tagger.onnx", dynamo=True)
    assert "fastbirnn" in str(error.value) or "onnx" in type(error.value).__module__


@pytest.mark.parametrize("backend", FUSED)
def test_onnx_legacy_export_of_fused_backends_names_the_custom_op(backend, tmp_path):
    pytest.importorskip("onnx")
    model = _model(backend).eval()
    with warnings.catch_warnings(), pytest.raises(Exception, match="fastbirnn"):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(3, 6, 8),), tmp_path / "t.onnx", dynamo=False)
