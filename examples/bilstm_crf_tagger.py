"""BiLSTM-CRF sequence tagger -- the model the tutorial names -- on a real treebank.

    embeddings (word, suffix, shape) -> FastBiLSTM -> linear emissions -> linear-chain CRF

The data is the POS example's: Porttinari-base from the ``dante-corpora`` wheel (UPOS tags),
read with the same helpers (``examples/pos_tagger.py``). The CRF is a short one in torch ops
below: the forward algorithm for the log-likelihood, Viterbi for decoding, both batched over
padded sentences with a mask.

    pip install conllu dante-corpora tqdm
    python examples/bilstm_crf_tagger.py                       # 3,000 sentences, 3 epochs
    python examples/bilstm_crf_tagger.py --max-sentences 0     # the whole corpus

Each epoch trains the FastBiLSTM model and, interleaved with it, the same model built with
``nn.LSTM`` from the same initial weights on the same batches (``--no-compare`` skips it);
it prints the loss and time per epoch of both, then the held-out token accuracy of both.
Each FastBiLSTM line says which backend ran, counted over that epoch's batches (with
``'auto'`` it depends on each batch's size and length; ``'torch'`` is nn.LSTM).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backend_report import BackendCounts, ran  # noqa: E402
from pos_tagger import (  # noqa: E402  (the POS example's corpus and vocabulary helpers)
    IGNORE,
    N_SHAPES,
    PAD,
    Vocab,
    batches,
    load_sentences,
    split,
    word_dropout,
)

from fastbirnn import FastBiLSTM  # noqa: E402


class CRF(nn.Module):
    """Linear-chain CRF over ``num_tags`` tags: transition, start and end scores."""

    def __init__(self, num_tags: int) -> None:
        super().__init__()
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))  # [from, to]
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))

    def neg_log_likelihood(self, emissions, tags, mask) -> torch.Tensor:
        """Mean over sentences of -log p(tags | emissions); emissions [B, T, K], tags and
        mask [B, T] (mask: True on real tokens, which come first in each row)."""
        return (self._log_partition(emissions, mask) - self._score(emissions, tags, mask)).mean()

    def _score(self, emissions, tags, mask):
        B, T, _ = emissions.shape
        rows = torch.arange(B)
        score = self.start[tags[:, 0]] + emissions[rows, 0, tags[:, 0]]
        for t in range(1, T):
            step = self.transitions[tags[:, t - 1], tags[:, t]] + emissions[rows, t, tags[:, t]]
            score = score + step * mask[:, t]
        last = tags[rows, mask.sum(1) - 1]
        return score + self.end[last]

    def _log_partition(self, emissions, mask):
        alpha = self.start + emissions[:, 0]  # [B, K]
        for t in range(1, emissions.size(1)):
            scores = alpha.unsqueeze(2) + self.transitions + emissions[:, t].unsqueeze(1)
            alpha = torch.where(mask[:, t, None], torch.logsumexp(scores, dim=1), alpha)
        return torch.logsumexp(alpha + self.end, dim=1)

    @torch.no_grad()
    def decode(self, emissions, mask) -> torch.Tensor:
        """The best tag sequence per sentence (Viterbi), [B, T]; padded positions are 0."""
        B, T, K = emissions.shape
        score = self.start + emissions[:, 0]
        backpointers = []
        for t in range(1, T):
            best, index = (score.unsqueeze(2) + self.transitions).max(dim=1)
            backpointers.append(index)
            score = torch.where(mask[:, t, None], best + emissions[:, t], score)
        score = score + self.end
        lengths = mask.sum(1)
        path = torch.zeros(B, T, dtype=torch.long)
        best_last = score.argmax(1)
        for b in range(B):
            tag = int(best_last[b])
            path[b, lengths[b] - 1] = tag
            for t in range(int(lengths[b]) - 1, 0, -1):
                tag = int(backpointers[t - 1][b, tag])
                path[b, t - 1] = tag
        return path


class BiLSTMCRF(nn.Module):
    """(word, suffix, shape) embeddings -> bidirectional LSTM -> emissions -> CRF."""

    def __init__(self, n_words, n_suffixes, n_tags, word_dim=64, suffix_dim=32, shape_dim=8,
                 hidden_size=64, backend="auto") -> None:
        super().__init__()
        self.word_embedding = nn.Embedding(n_words, word_dim, padding_idx=PAD)
        self.suffix_embedding = nn.Embedding(n_suffixes, suffix_dim, padding_idx=PAD)
        self.shape_embedding = nn.Embedding(N_SHAPES, shape_dim, padding_idx=PAD)
        input_size = word_dim + suffix_dim + shape_dim
        self.lstm = FastBiLSTM(input_size, hidden_size, batch_first=True, backend=backend)
        self.emissions = nn.Linear(2 * hidden_size, n_tags)
        self.crf = CRF(n_tags)

    def with_nn_lstm(self) -> "BiLSTMCRF":
        """The same model, same weights, with ``nn.LSTM`` in place of ``FastBiLSTM``."""
        twin = copy.deepcopy(self)
        lstm = self.lstm
        twin.lstm = nn.LSTM(lstm.input_size, lstm.hidden_size, batch_first=True,
                            bidirectional=True)
        twin.lstm.load_state_dict(lstm.state_dict(), strict=True)
        return twin

    def _emissions(self, features, lengths):
        x = torch.cat([self.word_embedding(features[..., 0]),
                       self.suffix_embedding(features[..., 1]),
                       self.shape_embedding(features[..., 2])], dim=-1)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=features.size(1))
        return self.emissions(out)

    def loss(self, features, labels, lengths):
        mask = labels != IGNORE
        # Unseen tags (IGNORE) only occur in held-out data; the CRF needs a valid index.
        tags = labels.clamp(min=0)
        return self.crf.neg_log_likelihood(self._emissions(features, lengths), tags, mask)

    def predict(self, features, lengths):
        mask = torch.arange(features.size(1)) < lengths.unsqueeze(1)
        return self.crf.decode(self._emissions(features, lengths), mask)


def train_epoch(model, optimizer, epoch_batches, *, unk_p, generator):
    """One pass; returns (mean sentence loss, seconds)."""
    model.train()
    total, count = 0.0, 0
    start = time.perf_counter()
    for features, labels, lengths in epoch_batches:
        features = word_dropout(features, unk_p, generator)
        optimizer.zero_grad()
        loss = model.loss(features, labels, lengths)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(lengths)
        count += len(lengths)
    return total / max(count, 1), time.perf_counter() - start


@torch.no_grad()
def accuracy(model: BiLSTMCRF, eval_batches) -> float:
    model.eval()
    correct = total = 0
    for features, labels, lengths in eval_batches:
        predicted = model.predict(features, lengths)
        mask = labels != IGNORE
        correct += int((predicted[mask] == labels[mask]).sum())
        total += int(mask.sum())
    return correct / max(total, 1)


def run(max_sentences: Optional[int] = 3000, epochs: int = 3, batch_size: int = 32,
        hidden_size: int = 64, backend: str = "auto", compare: bool = True, seed: int = 0,
        held_out: float = 0.1, unk_p: float = 0.05, log=print) -> dict:
    """Train (and compare); returns per-model losses, seconds per epoch and accuracy."""
    sentences = load_sentences("porttinari", max_sentences or None)
    train, test = split(sentences, held_out, seed)
    vocab = Vocab.build(train)
    train_data = [vocab.encode(s) for s in train]
    test_batches = batches([vocab.encode(s) for s in test], 256)
    torch.manual_seed(seed)
    fast = BiLSTMCRF(len(vocab.words) + 2, len(vocab.suffixes) + 2, len(vocab.tags),
                     hidden_size=hidden_size, backend=backend)
    models = {"FastBiLSTM": fast}
    if compare:
        models["nn.LSTM"] = fast.with_nn_lstm()
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=3e-3) for name, m in models.items()}
    results = {name: {"loss": [], "seconds": []} for name in models}
    # What FastBiLSTM ran, asked of selected_backend on each real batch (not on a probe).
    counts = BackendCounts(fast.lstm)
    results["FastBiLSTM"]["backends"] = []
    log(f"{len(train)} training / {len(test)} held-out sentences, {len(vocab.tags)} tags; "
        f"FastBiLSTM backend {backend!r}")
    for epoch in range(1, epochs + 1):
        epoch_batches = batches(train_data, batch_size, torch.Generator().manual_seed(epoch))
        for name, model in models.items():  # the same batches and word dropout for each
            loss, seconds = train_epoch(model, optimizers[name], epoch_batches, unk_p=unk_p,
                                        generator=torch.Generator().manual_seed(100 + epoch))
            results[name]["loss"].append(loss)
            results[name]["seconds"].append(seconds)
            line = f"epoch {epoch}  {name:10s}  loss {loss:8.4f}  {seconds:6.2f} s"
            if model is fast:
                results[name]["backends"].append(counts.take())
                line += f"  ({ran(results[name]['backends'][-1])})"
            log(line)
    for name, model in models.items():
        results[name]["accuracy"] = accuracy(model, test_batches)
        log(f"{name:10s}  held-out token accuracy {results[name]['accuracy']:.4f}  "
            f"median {statistics.median(results[name]['seconds']):.2f} s per epoch")
    results["FastBiLSTM"]["eval_backends"] = counts.take()
    log(f"held-out evaluation: FastBiLSTM {ran(results['FastBiLSTM']['eval_backends'])}")
    counts.remove()
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-sentences", type=int, default=3000, help="0: the whole corpus")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--backend", default="auto", help="FastBiLSTM backend")
    parser.add_argument("--no-compare", action="store_true", help="skip the nn.LSTM twin")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    random.seed(args.seed)
    return run(args.max_sentences, args.epochs, args.batch_size, args.hidden_size, args.backend,
               not args.no_compare, args.seed)


if __name__ == "__main__":
    main()
