"""The POS tagger example learns real tagged text (a tiny slice of Porttinari-base).

The corpus comes from the ``dante-corpora`` wheel. Without it the tests skip, except in CI
(``CI`` set), where the package is a declared test dependency and a skip would hide a gap.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastbirnn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import pos_tagger  # noqa: E402


def _require_corpus():
    reasons = []
    try:
        import conllu  # noqa: F401
    except ImportError:
        reasons.append("the 'conllu' package is not installed")
    try:
        pos_tagger.corpus_path("porttinari")
    except pos_tagger.CorpusNotInstalled as error:
        reasons.append(str(error))
    if reasons:
        reason = "; ".join(reasons) + " (pip install conllu dante-corpora)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the POS corpus: {reason}")
        pytest.skip(reason)


FUSED = [n for n in ("cpp", "reference") if fastbirnn.available_backends().get(n, "") is None]
MAX_SENTENCES = 300
EPOCHS = 3
HIDDEN = 32


def _auto_resolves_to() -> str:
    return fastbirnn.FastBiRNN(4, 4).selected_backend(torch.zeros(1, 1, 4))


# Each fused backend, plus 'auto' where it picks something else (on CPU: 'cpp' or nn.RNN).
BACKENDS = [*FUSED, *(["auto"] if _auto_resolves_to() not in FUSED else [])]


@pytest.fixture
def one_thread():
    """Two intra-op threads on a busy 2-core machine spin and stall; one runs steadily."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pos_tagger_learns_and_tracks_nn_rnn(backend, one_thread):
    _require_corpus()
    results = pos_tagger.run(
        max_sentences=MAX_SENTENCES, epochs=EPOCHS, backend=backend, compare=True,
        hidden_size=HIDDEN,
        progress=False, log=None,
    )
    assert results.n_train + results.n_test == MAX_SENTENCES
    fast, torch_run = results.runs[f"FastBiRNN[{backend}]"], results.runs["nn.RNN"]

    baseline = results.majority_baseline
    assert 0.1 < baseline < 0.4, baseline  # NOUN is the most frequent tag, about 19%
    # Far above the majority-tag baseline on held-out sentences after a few epochs.
    assert fast.accuracy > baseline + 0.35, (fast.accuracy, baseline)
    assert fast.losses[-1] < 0.5 * fast.losses[0]
    # Same initial weights, same batches: the per-epoch losses follow nn.RNN's.
    torch.testing.assert_close(
        torch.tensor(fast.losses), torch.tensor(torch_run.losses), rtol=1e-3, atol=1e-4
    )
    assert abs(fast.accuracy - torch_run.accuracy) < 0.02
    assert len(fast.epoch_seconds) == len(torch_run.epoch_seconds) == EPOCHS
    # What FastBiRNN ran, counted per epoch on its real batches (32 sentences each).
    n_batches = -(-results.n_train // 32)
    assert [sum(counts.values()) for counts in fast.backends] == [n_batches] * EPOCHS
    if backend != "auto":
        assert fast.backends == [{backend: n_batches}] * EPOCHS


def test_pos_tagger_cli():
    _require_corpus()
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "pos_tagger.py"), "--max-sentences", "200",
         "--epochs", "1", "--backend", "auto"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr
    assert "held-out token accuracy" in result.stdout
    assert "nn.RNN" in result.stdout and "FastBiRNN[auto]" in result.stdout
    assert "s/epoch" in result.stdout


def test_packed_unsorted_batches_match_nn_rnn():
    """The example's packed, unsorted, variable-length path gives nn.RNN's logits."""
    torch.manual_seed(0)
    fast = pos_tagger.Tagger(50, 40, 7, backend=FUSED[0] if FUSED else "auto")
    ref = pos_tagger.Tagger(50, 40, 7, rnn_factory=pos_tagger.torch_rnn)
    ref.load_state_dict(fast.state_dict(), strict=True)
    lengths = [5, 9, 1, 7]
    examples = [
        (torch.stack([torch.randint(2, 50, (n,)), torch.randint(2, 40, (n,)),
                      torch.randint(2, 7, (n,))], dim=1), torch.randint(0, 7, (n,)))
        for n in lengths
    ]
    features, labels, lens = pos_tagger.collate(examples)
    torch.testing.assert_close(fast(features, lens), ref(features, lens))
