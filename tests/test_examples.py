"""The tutorial's NER toy model trains the same with FastBiRNN as with nn.RNN."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastbirnn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import ner_toy  # noqa: E402

# 'auto' (whatever is fastest here), the pure-PyTorch fused path, and the C++ kernel if built.
FUSED = [name for name in ("cpp", "reference") if fastbirnn.available_backends().get(name, "") is None]
BACKENDS = ["auto", *FUSED]


def _train(model):
    return ner_toy.train(model, ner_toy.make_dataset(), epochs=20, log=None)


@pytest.fixture(scope="module")
def torch_run():
    """The tutorial's model with nn.RNN: its initial weights, per-epoch losses, predictions."""
    torch.manual_seed(0)
    model = ner_toy.BiRNNNER(rnn_factory=ner_toy.torch_rnn)
    assert type(model.rnn) is torch.nn.RNN
    initial = copy.deepcopy(model.state_dict())
    losses = _train(model)
    return initial, losses, [ner_toy.predict(model, s) for s in ner_toy.SENTENCES]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ner_toy_matches_nn_rnn(torch_run, backend):
    initial, torch_losses, torch_predictions = torch_run
    model = ner_toy.BiRNNNER(backend=backend)
    model.load_state_dict(initial, strict=True)
    if backend != "auto":
        assert model.rnn.selected_backend(torch.zeros(1, 4, ner_toy.EMBEDDING_DIM)) == backend

    losses = _train(model)

    assert len(losses) == 20
    torch.testing.assert_close(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(torch_losses, dtype=torch.float64),
        rtol=2e-3,
        atol=1e-5,
    )
    assert losses[-1] < 0.05 * losses[0], "the model did not learn"
    predictions = [ner_toy.predict(model, s) for s in ner_toy.SENTENCES]
    assert predictions == ner_toy.LABELS
    assert torch_predictions == ner_toy.LABELS


def test_ner_toy_script_runs():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "ner_toy.py"), "--epochs", "20"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Epoch 20: loss = " in result.stdout
    assert result.stdout.count("(ok)") == 2, result.stdout
    # What ran on its 2 sentences x 20 epochs, counted on the real inputs (issue 26).
    ran = result.stdout.split("FastBiRNN ran ")[1].splitlines()[0]
    assert sum(int(n) for n in re.findall(r"on (\d+)", ran)) == 40, ran
