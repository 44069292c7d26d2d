"""Part-of-speech tagger on a real treebank: embeddings -> 2-layer FastBiRNN -> linear.

The corpus is read from the ``dante-corpora`` wheel (nothing is downloaded at run time):
by default Porttinari-base, the manually revised news portion of the Porttinari treebank of
Brazilian Portuguese (Folha de S.Paulo texts, Universal Dependencies UPOS tags, CC BY 4.0;
8,420 sentences, 168,400 words). CoNLL-U is read with the ``conllu`` package.

    pip install conllu dante-corpora tqdm
    python examples/pos_tagger.py                              # all sentences, 3 epochs
    python examples/pos_tagger.py --max-sentences 2000 --epochs 5 --backend reference

Each epoch trains the FastBiRNN model and, interleaved with it, the same model with
``nn.RNN`` from the same initial weights on the same batches (``--no-compare`` skips it), then
prints the loss and time per epoch of both and the token accuracy on a held-out split.
Each epoch line says which backend FastBiRNN ran, counted over that epoch's batches (with
``'auto'`` it depends on each batch's size and length; ``'torch'`` is nn.RNN).

Batches are padded, then packed with ``pack_padded_sequence(..., enforce_sorted=False)``:
variable lengths, no sorting by the caller.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from fastbirnn import FastBiRNN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backend_report import BackendCounts, ran  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # a progress bar is nice to have, not a requirement

    def tqdm(iterable, desc="", total=None, disable=False, **kwargs):
        total = len(iterable) if total is None else total
        for i, item in enumerate(iterable, 1):
            if not disable:
                filled = 30 * i // max(total, 1)
                print(f"\r{desc} [{'#' * filled}{'.' * (30 - filled)}] {i}/{total}", end="",
                      file=sys.stderr, flush=True)
            yield item
        if not disable:
            print(file=sys.stderr)


# CoNLL-U files inside the dante-corpora wheel ("portinari" there is a copy of "porttinari").
CORPORA = {
    "porttinari": "dante/data/porttinari/annotated.conllu",  # news, CC BY 4.0
    "dantestocks": "dante/data/dantestocks/POS.conllu",  # stock-market tweets, CC BY 4.0
    "petrogold": "dante/data/petrogold/annotated.conllu",  # oil & gas academic texts
}
CORPUS_PACKAGE = "dante-corpora"

PAD, UNK = 0, 1
IGNORE = -100  # label of padded positions: CrossEntropyLoss(ignore_index=IGNORE)


class CorpusNotInstalled(RuntimeError):
    pass


def corpus_path(name: str = "porttinari") -> Path:
    """Where the wheel put the corpus. Never imports the ``dante`` package itself (its code
    needs pandas and the old ``pkg_resources``); only the files it ships are read."""
    from importlib import metadata

    try:
        dist = metadata.distribution(CORPUS_PACKAGE)
    except metadata.PackageNotFoundError:
        raise CorpusNotInstalled(
            f"the {CORPUS_PACKAGE!r} package is not installed: pip install {CORPUS_PACKAGE}"
        ) from None
    path = Path(dist.locate_file(CORPORA[name]))
    if not path.is_file():
        raise CorpusNotInstalled(f"{CORPUS_PACKAGE} is installed but {path} is missing")
    return path


Sentence = tuple[list[str], list[str]]  # (words, UPOS tags)


def load_sentences(name: str = "porttinari", max_sentences: Optional[int] = None) -> list[Sentence]:
    """The first ``max_sentences`` sentences as (words, tags), syntactic words only: the
    parts of a contraction ("do" = "de" + "o") are kept, the surface form and empty nodes not."""
    import conllu

    sentences = []
    with open(corpus_path(name), encoding="utf-8") as f:
        for tokenlist in itertools.islice(conllu.parse_incr(f), max_sentences):
            words = [t for t in tokenlist if isinstance(t["id"], int)]
            if words:
                sentences.append(([t["form"] for t in words], [t["upos"] for t in words]))
    return sentences


def split(sentences: list[Sentence], held_out: float, seed: int) -> tuple[list, list]:
    shuffled = sentences[:]
    random.Random(seed).shuffle(shuffled)
    n_test = max(1, round(len(shuffled) * held_out))
    return shuffled[n_test:], shuffled[:n_test]


def shape_of(word: str) -> int:
    """A tiny orthographic feature: 2 lower, 3 Capitalised, 4 UPPER, 5 has a digit, 6 other."""
    if any(c.isdigit() for c in word):
        return 5
    if word.isalpha():
        if word.islower():
            return 2
        if word.isupper() and len(word) > 1:
            return 4
        if word[0].isupper():
            return 3
    return 6


N_SHAPES = 7


@dataclass
class Vocab:
    words: dict[str, int] = field(default_factory=dict)
    suffixes: dict[str, int] = field(default_factory=dict)
    tags: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, sentences: Iterable[Sentence]) -> "Vocab":
        vocab = cls()
        words, suffixes, tags = Counter(), Counter(), Counter()
        for ws, ts in sentences:
            words.update(w.lower() for w in ws)
            suffixes.update(w.lower()[-3:] for w in ws)
            tags.update(ts)
        vocab.words = {w: i for i, w in enumerate(sorted(words), start=2)}
        vocab.suffixes = {s: i for i, s in enumerate(sorted(suffixes), start=2)}
        vocab.tags = {t: i for i, (t, _) in enumerate(tags.most_common())}
        return vocab

    def encode(self, sentence: Sentence) -> tuple[torch.Tensor, torch.Tensor]:
        """[L, 3] features (word, suffix, shape ids) and [L] tag ids (IGNORE for unseen tags)."""
        ws, ts = sentence
        features = [
            (self.words.get(w.lower(), UNK), self.suffixes.get(w.lower()[-3:], UNK), shape_of(w))
            for w in ws
        ]
        return torch.tensor(features), torch.tensor([self.tags.get(t, IGNORE) for t in ts])


class Tagger(nn.Module):
    """(word, suffix, shape) embeddings -> bidirectional 2-layer Elman RNN -> linear.

    ``rnn_factory(input_size, hidden_size, num_layers)`` builds the RNN, by default a
    ``FastBiRNN`` with ``backend``; ``torch_rnn`` gives the same model with ``nn.RNN``.
    """

    def __init__(
        self,
        n_words: int,
        n_suffixes: int,
        n_tags: int,
        word_dim: int = 64,
        suffix_dim: int = 32,
        shape_dim: int = 8,
        hidden_size: int = 64,
        num_layers: int = 2,
        backend: str = "auto",
        rnn_factory: Optional[Callable[[int, int, int], nn.RNN]] = None,
    ) -> None:
        super().__init__()
        self.word_embedding = nn.Embedding(n_words, word_dim, padding_idx=PAD)
        self.suffix_embedding = nn.Embedding(n_suffixes, suffix_dim, padding_idx=PAD)
        self.shape_embedding = nn.Embedding(N_SHAPES, shape_dim, padding_idx=PAD)
        input_size = word_dim + suffix_dim + shape_dim
        if rnn_factory is None:
            self.rnn = FastBiRNN(input_size, hidden_size, num_layers, batch_first=True,
                                 backend=backend)
        else:
            self.rnn = rnn_factory(input_size, hidden_size, num_layers)
        self.classifier = nn.Linear(2 * hidden_size, n_tags)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """features [B, T, 3] (padded), lengths [B] -> logits [B, T, n_tags]."""
        x = torch.cat(
            [
                self.word_embedding(features[..., 0]),
                self.suffix_embedding(features[..., 1]),
                self.shape_embedding(features[..., 2]),
            ],
            dim=-1,
        )
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=features.size(1))
        return self.classifier(out)


def torch_rnn(input_size: int, hidden_size: int, num_layers: int) -> nn.RNN:
    return nn.RNN(input_size, hidden_size, num_layers, batch_first=True, bidirectional=True)


def collate(examples: list[tuple[torch.Tensor, torch.Tensor]]):
    features = pad_sequence([f for f, _ in examples], batch_first=True, padding_value=PAD)
    labels = pad_sequence([l for _, l in examples], batch_first=True, padding_value=IGNORE)
    lengths = torch.tensor([len(l) for _, l in examples])
    return features, labels, lengths


def batches(data: list, batch_size: int, generator: Optional[torch.Generator] = None):
    order = torch.randperm(len(data), generator=generator) if generator is not None else range(len(data))
    order = list(order)
    return [collate([data[int(i)] for i in order[s : s + batch_size]])
            for s in range(0, len(order), batch_size)]


def word_dropout(features: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace words by UNK with probability p, so the model learns to tag unseen words."""
    if p <= 0:
        return features
    drop = (torch.rand(features.shape[:2], generator=generator) < p) & (features[..., 0] != PAD)
    features = features.clone()
    features[..., 0][drop] = UNK
    return features


def train_epoch(model, optimizer, epoch_batches, *, unk_p, generator, desc="", progress=True):
    """One pass over ``epoch_batches``; returns (mean token loss, seconds)."""
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE)
    model.train()
    total, tokens = 0.0, 0
    start = time.perf_counter()
    for features, labels, lengths in tqdm(epoch_batches, desc=desc, disable=not progress,
                                          leave=False, file=sys.stderr):
        features = word_dropout(features, unk_p, generator)
        optimizer.zero_grad()
        logits = model(features, lengths)
        loss = criterion(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        n = int((labels != IGNORE).sum())
        total += loss.item() * n
        tokens += n
    return total / max(tokens, 1), time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, eval_batches) -> float:
    model.eval()
    correct = total = 0
    for features, labels, lengths in eval_batches:
        predicted = model(features, lengths).argmax(-1)
        mask = labels != IGNORE
        correct += int((predicted[mask] == labels[mask]).sum())
        total += int(mask.sum())
    return correct / max(total, 1)


@dataclass
class RunResult:
    name: str
    losses: list[float]
    epoch_seconds: list[float]
    accuracy: float
    # FastBiRNN only: per epoch, how many batches each backend ran ('torch': nn.RNN).
    backends: list[dict[str, int]] = field(default_factory=list)


@dataclass
class Results:
    runs: dict[str, RunResult]
    majority_baseline: float
    n_train: int
    n_test: int
    n_train_tokens: int
    n_test_tokens: int


def run(
    *,
    corpus: str = "porttinari",
    max_sentences: Optional[int] = None,
    epochs: int = 3,
    backend: str = "auto",
    compare: bool = True,
    batch_size: int = 32,
    hidden_size: int = 64,
    lr: float = 3e-3,
    unk_p: float = 0.05,
    held_out: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = print,
) -> Results:
    log = log or (lambda s: None)
    sentences = load_sentences(corpus, max_sentences)
    train_sents, test_sents = split(sentences, held_out, seed)
    vocab = Vocab.build(train_sents)
    train_data = [vocab.encode(s) for s in train_sents]
    test_batches = batches([vocab.encode(s) for s in test_sents], 256)
    tag_counts = Counter(t for _, ts in train_sents for t in ts)
    majority_tag = tag_counts.most_common(1)[0][0]
    test_tags = [t for _, ts in test_sents for t in ts]
    baseline = sum(t == majority_tag for t in test_tags) / len(test_tags)
    n_train_tokens = sum(tag_counts.values())
    log(f"corpus {corpus}: {len(train_sents)} train sentences ({n_train_tokens} words), "
        f"{len(test_sents)} held out ({len(test_tags)} words); {len(vocab.words)} word types, "
        f"{len(vocab.tags)} tags; majority tag {majority_tag!r} = {baseline:.1%} of held-out words")

    def make(rnn_factory=None):
        return Tagger(len(vocab.words) + 2, len(vocab.suffixes) + 2, len(vocab.tags),
                      hidden_size=hidden_size, backend=backend, rnn_factory=rnn_factory)

    torch.manual_seed(seed)
    fast = make()
    models = {f"FastBiRNN[{backend}]": fast}
    if compare:
        reference = make(torch_rnn)
        reference.load_state_dict(fast.state_dict(), strict=True)  # same initial weights
        models["nn.RNN"] = reference
    # What FastBiRNN ran, asked of selected_backend on each real batch (not on a probe).
    counts = BackendCounts(fast.rnn)
    log(f"FastBiRNN backend {backend!r}; {sum(p.numel() for p in fast.parameters())} parameters")

    optimizers = {name: torch.optim.Adam(m.parameters(), lr=lr) for name, m in models.items()}
    # Each model gets its own generators, seeded alike: same batches, same word dropout.
    generators = {name: torch.Generator().manual_seed(seed) for name in models}
    results = {name: RunResult(name, [], [], 0.0) for name in models}
    for epoch in range(1, epochs + 1):
        names = list(models) if epoch % 2 else list(reversed(models))  # interleaved timing
        for name in names:
            epoch_batches = batches(train_data, batch_size, generators[name])
            loss, seconds = train_epoch(
                models[name], optimizers[name], epoch_batches, unk_p=unk_p,
                generator=generators[name], desc=f"epoch {epoch} {name}", progress=progress,
            )
            results[name].losses.append(loss)
            results[name].epoch_seconds.append(seconds)
            if models[name] is fast:
                results[name].backends.append(counts.take())
        log(f"epoch {epoch}: " + "; ".join(
            f"{name} loss {r.losses[-1]:.4f} in {r.epoch_seconds[-1]:.2f} s"
            + (f" ({ran(r.backends[-1])})" if r.backends else "")
            for name, r in results.items()))
    counts.remove()
    for name, model in models.items():
        results[name].accuracy = accuracy(model, test_batches)
    return Results(results, baseline, len(train_sents), len(test_sents), n_train_tokens,
                   len(test_tags))


def median(values: list[float]) -> float:
    s = sorted(values)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def report(results: Results, log: Callable[[str], None] = print) -> None:
    log(f"\nheld-out token accuracy ({results.n_test_tokens} words); majority-tag baseline "
        f"{results.majority_baseline:.1%}")
    log(f"{'model':<24}{'accuracy':>10}{'s/epoch (median)':>20}")
    for r in results.runs.values():
        log(f"{r.name:<24}{r.accuracy:>10.1%}{median(r.epoch_seconds):>20.2f}")
    if len(results.runs) == 2:
        fast, torch_run = results.runs.values()
        ratio = median(torch_run.epoch_seconds) / median(fast.epoch_seconds)
        log(f"FastBiRNN is {ratio:.2f}x as fast as nn.RNN per epoch (nn.RNN's median epoch time "
            "over FastBiRNN's; >1: FastBiRNN is faster)")


def main(argv: Optional[list[str]] = None) -> Results:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="porttinari", choices=sorted(CORPORA))
    parser.add_argument("--max-sentences", type=int, default=None,
                        help="read only the first N sentences (default: all)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--backend", default="auto",
                        help="FastBiRNN backend: auto, cpp, triton, reference, torch")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the same model with nn.RNN (default: yes)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        results = run(
            corpus=args.corpus, max_sentences=args.max_sentences, epochs=args.epochs,
            backend=args.backend, compare=args.compare, batch_size=args.batch_size,
            hidden_size=args.hidden_size, lr=args.lr, seed=args.seed,
            progress=not args.no_progress,
        )
    except CorpusNotInstalled as error:
        parser.exit(2, f"error: {error}\n")
    report(results)
    return results


if __name__ == "__main__":
    main()
