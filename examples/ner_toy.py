"""The BiRNN tutorial's toy NER model, with ``FastBiRNN`` in place of ``nn.RNN``.

Vocabulary of 6 words, tags B-PER / O / B-LOC, Embedding(6, 16) -> bidirectional RNN with
32 hidden units per direction -> Linear(64, 3); Adam (lr 0.01), cross-entropy, 20 epochs of
one sentence per step, as in the tutorial.

    python examples/ner_toy.py                      # FastBiRNN, backend 'auto'
    python examples/ner_toy.py --backend reference  # force the fused path (pure-PyTorch loop)
    python examples/ner_toy.py --backend torch      # plain nn.RNN, for comparison

The functions below (``BiRNNNER``, ``make_dataset``, ``train``, ``predict``) are what
``tests/test_examples.py`` imports to train it with ``nn.RNN`` and ``FastBiRNN`` from the
same initial weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from fastbirnn import FastBiRNN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backend_report import BackendCounts, ran  # noqa: E402

VOCAB = {"John": 0, "lives": 1, "in": 2, "Paris": 3, "Mary": 4, "London": 5}
TAG2IDX = {"B-PER": 0, "O": 1, "B-LOC": 2}
IDX2TAG = {v: k for k, v in TAG2IDX.items()}

SENTENCES = [["John", "lives", "in", "Paris"], ["Mary", "lives", "in", "London"]]
LABELS = [["B-PER", "O", "O", "B-LOC"], ["B-PER", "O", "O", "B-LOC"]]

EMBEDDING_DIM = 16
HIDDEN_DIM = 32


class BiRNNNER(nn.Module):
    """Embedding -> bidirectional Elman RNN -> per-token linear classifier.

    ``rnn_factory(input_size, hidden_size)`` builds the RNN; by default ``FastBiRNN`` with
    ``backend``. Passing ``nn.RNN`` (bidirectional, batch_first) gives the tutorial's model
    with the same parameter names, so ``state_dict``s load both ways.
    """

    def __init__(
        self,
        vocab_size: int = len(VOCAB),
        embedding_dim: int = EMBEDDING_DIM,
        hidden_dim: int = HIDDEN_DIM,
        tagset_size: int = len(TAG2IDX),
        backend: str = "auto",
        rnn_factory: Optional[Callable[[int, int], nn.RNN]] = None,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        if rnn_factory is None:
            self.rnn = FastBiRNN(embedding_dim, hidden_dim, batch_first=True, backend=backend)
        else:
            self.rnn = rnn_factory(embedding_dim, hidden_dim)
        self.classifier = nn.Linear(hidden_dim * 2, tagset_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(input_ids)  # (batch, seq_len, embedding_dim)
        rnn_out, _ = self.rnn(embeds)  # (batch, seq_len, 2 * hidden_dim)
        return self.classifier(rnn_out)  # (batch, seq_len, tagset_size)


def torch_rnn(input_size: int, hidden_size: int) -> nn.RNN:
    """The tutorial's own layer: ``nn.RNN(..., bidirectional=True, batch_first=True)``."""
    return nn.RNN(input_size, hidden_size, bidirectional=True, batch_first=True)


def encode(sentence: list[str], labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.tensor([VOCAB[w] for w in sentence], dtype=torch.long)
    label_ids = torch.tensor([TAG2IDX[t] for t in labels], dtype=torch.long)
    return input_ids, label_ids


def make_dataset() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [encode(s, l) for s, l in zip(SENTENCES, LABELS)]


def train(
    model: nn.Module,
    dataset: list[tuple[torch.Tensor, torch.Tensor]],
    epochs: int = 20,
    lr: float = 0.01,
    log: Optional[Callable[[str], None]] = print,
) -> list[float]:
    """The tutorial's loop: one sentence per Adam step; returns the summed loss per epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    tagset_size = model.classifier.out_features
    losses = []
    for epoch in range(epochs):
        total_loss = 0.0
        model.train()
        for input_ids, label_ids in dataset:
            optimizer.zero_grad()
            logits = model(input_ids.unsqueeze(0))  # (1, seq_len, tagset_size)
            loss = criterion(logits.view(-1, tagset_size), label_ids.view(-1))
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
        losses.append(total_loss)
        if log is not None:
            log(f"Epoch {epoch + 1}: loss = {total_loss:.4f}")
    return losses


@torch.no_grad()
def predict(model: nn.Module, sentence: list[str]) -> list[str]:
    model.eval()
    input_ids = torch.tensor([[VOCAB[w] for w in sentence]], dtype=torch.long)
    return [IDX2TAG[i] for i in model(input_ids).argmax(-1)[0].tolist()]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", help="FastBiRNN backend (default: auto)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = BiRNNNER(backend=args.backend)
    print(model)
    print(f"backend: {args.backend!r}")
    print("Training...")
    counts = BackendCounts(model.rnn)  # what ran, asked of selected_backend on each real input
    train(model, make_dataset(), epochs=args.epochs)
    print(f"FastBiRNN {ran(counts.take(), 'training step')}")
    print("Predictions:")
    for sentence, labels in zip(SENTENCES, LABELS):
        tags = predict(model, sentence)
        mark = "ok" if tags == labels else f"expected {labels}"
        print(f"  {' '.join(sentence)}: {tags} ({mark})")


if __name__ == "__main__":
    main()
