"""The BiLSTM-CRF example: its CRF against brute force, and training on real tagged text."""

import collections
import itertools
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import bilstm_crf_tagger  # noqa: E402
import pos_tagger  # noqa: E402
from bilstm_crf_tagger import CRF  # noqa: E402


def _crf_and_inputs(K=3, T=4, lengths=(4, 2)):
    torch.manual_seed(0)
    crf = CRF(K)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    emissions = torch.randn(len(lengths), T, K)
    mask = torch.arange(T) < torch.tensor(lengths).unsqueeze(1)
    return crf, emissions, mask


def _path_score(crf, emissions_row, path):
    score = crf.start[path[0]] + emissions_row[0, path[0]]
    for t in range(1, len(path)):
        score = score + crf.transitions[path[t - 1], path[t]] + emissions_row[t, path[t]]
    return score + crf.end[path[-1]]


def test_crf_likelihood_and_viterbi_match_brute_force():
    crf, emissions, mask = _crf_and_inputs()
    K = emissions.size(2)
    tags = torch.randint(0, K, mask.shape)
    nll = crf.neg_log_likelihood(emissions, tags, mask)
    decoded = crf.decode(emissions, mask)
    expected_nll = []
    for b, length in enumerate(mask.sum(1).tolist()):
        paths = list(itertools.product(range(K), repeat=length))
        scores = torch.stack([_path_score(crf, emissions[b], p) for p in paths])
        gold = _path_score(crf, emissions[b], tags[b, :length].tolist())
        expected_nll.append(torch.logsumexp(scores, 0) - gold)
        best = paths[int(scores.argmax())]
        assert decoded[b, :length].tolist() == list(best)
    torch.testing.assert_close(nll, torch.stack(expected_nll).mean())


def _require_corpus():
    try:
        import conllu  # noqa: F401

        pos_tagger.corpus_path("porttinari")
    except (ImportError, pos_tagger.CorpusNotInstalled) as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the POS corpus: {error}")
        pytest.skip(str(error))


def test_fast_and_nn_lstm_taggers_train_alike():
    _require_corpus()
    results = bilstm_crf_tagger.run(max_sentences=120, epochs=2, hidden_size=16,
                                    backend="reference", log=lambda *_: None)
    fast, plain = results["FastBiLSTM"], results["nn.LSTM"]
    # Same initial weights and batches: the same losses up to fp32 rounding.
    torch.testing.assert_close(fast["loss"], plain["loss"], rtol=1e-4, atol=1e-4)
    assert fast["loss"][1] < fast["loss"][0]
    assert abs(fast["accuracy"] - plain["accuracy"]) <= 0.02
    assert fast["accuracy"] > 0.3  # 16 tags: well above chance after two epochs


def test_printed_backend_is_what_selected_backend_gives_on_the_real_batches(monkeypatch):
    """Each epoch line names the backends FastBiLSTM ran on that epoch's batches, as its
    selected_backend answers for each real (packed) batch, not for a made-up probe (issue 26).
    55 sentences: 49 for training, in batches of 16, 16, 16 and 1 ('auto' may differ)."""
    _require_corpus()
    seen = []  # (grad enabled, backend) of every FastBiLSTM call, asked as it runs
    forward = bilstm_crf_tagger.FastBiLSTM.forward

    def recording_forward(self, input, hx=None):
        seen.append((torch.is_grad_enabled(), self.selected_backend(input)))
        return forward(self, input, hx)

    monkeypatch.setattr(bilstm_crf_tagger.FastBiLSTM, "forward", recording_forward)
    lines = []
    results = bilstm_crf_tagger.run(max_sentences=55, epochs=2, batch_size=16, hidden_size=64,
                                    compare=False, log=lines.append)
    training = [backend for grad, backend in seen if grad]
    evaluation = [backend for grad, backend in seen if not grad]
    assert len(training) == 2 * 4 and len(evaluation) == 1
    expected = []
    for epoch in range(2):
        counts = collections.Counter(training[4 * epoch: 4 * epoch + 4])
        assert results["FastBiLSTM"]["backends"][epoch] == dict(counts)
        expected.append(bilstm_crf_tagger.ran(dict(counts.most_common())))
    printed = [line for line in lines if line.startswith("epoch") and "FastBiLSTM" in line]
    assert [line.rsplit("(", 1)[1].rstrip(")") for line in printed] == expected
    assert lines[-1] == f"held-out evaluation: FastBiLSTM ran {evaluation[0]!r} on 1 batch"
    assert not any(" runs " in line for line in lines)  # no probe's answer printed
