"""Data-parallel training of a FastBiRNN tagger with PyTorch's DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py            # 2 CPU processes, gloo
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --backend reference
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 examples/train_ddp.py

On CUDA machines each process takes the GPU ``LOCAL_RANK`` and the process group is nccl;
on CPU it is gloo. Nothing here is special to FastBiRNN: it is an ``nn.RNN`` subclass whose
parameters are ordinary leaf tensors, so DDP broadcasts them, buckets their gradients and
all-reduces them like any other module's (no ``flatten_parameters`` step, no copies).

The task is synthetic so that it needs both directions: the tag of token t is
``(x[t-1] + x[t+1]) % N_TAGS`` (0 beyond the ends), so a forward-only RNN cannot learn it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fastbirnn import FastBiRNN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backend_report import BackendCounts, ran  # noqa: E402

VOCAB = 12
N_TAGS = 3


class Tagger(nn.Module):
    def __init__(self, backend: str = "auto", hidden_size: int = 32, num_layers: int = 2,
                 embedding_dim: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, embedding_dim)
        self.rnn = FastBiRNN(embedding_dim, hidden_size, num_layers, batch_first=True,
                             backend=backend)
        self.classifier = nn.Linear(2 * hidden_size, N_TAGS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embedding(tokens))
        return self.classifier(out)


def make_data(n: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences of ``length`` tokens and their tags (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, length), generator=generator)
    padded = nn.functional.pad(tokens, (1, 1))
    tags = (padded[:, :-2] + padded[:, 2:]) % N_TAGS
    return tokens, tags


def loss_fn(model: nn.Module, tokens: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    # A mean over tokens: with equal shards, DDP's gradient average is the full-batch gradient.
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.reshape(-1, N_TAGS), tags.reshape(-1))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", help="FastBiRNN backend (default: auto)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)

    if "RANK" not in os.environ:
        parser.exit(2, "error: run me with torchrun, e.g. "
                       "torchrun --standalone --nproc_per_node=2 examples/train_ddp.py\n")
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = DDP(Tagger(args.backend).to(device), device_ids=[local_rank] if use_cuda else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    if rank == 0:
        print(f"{world} processes ({dist.get_backend()}), FastBiRNN backend {args.backend!r}",
              flush=True)
    counts = BackendCounts(model.module.rnn)  # what ran, asked of selected_backend per step

    # Each rank draws its own shard of fresh data each step (seeded by step and rank).
    for step in range(1, args.steps + 1):
        tokens, tags = make_data(args.batch_size, args.length, seed=step * world + rank)
        optimizer.zero_grad()
        loss = loss_fn(model, tokens.to(device), tags.to(device))
        loss.backward()  # gradients are all-reduced across ranks here
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)  # a sum (gloo has no average)
            if rank == 0:
                print(f"step {step}: loss {mean_loss.item() / world:.4f}", flush=True)
    if rank == 0:
        print(f"rank 0: FastBiRNN {ran(counts.take(), 'training step')}", flush=True)

    model.eval()
    tokens, tags = make_data(256, args.length, seed=2**31 - 1)
    with torch.no_grad():
        predicted = model.module(tokens.to(device)).argmax(-1).cpu()
    if rank == 0:
        print(f"held-out tag accuracy: {(predicted == tags).float().mean().item():.1%} "
              f"(chance {1 / N_TAGS:.1%})", flush=True)
    # Every rank arrives before gloo is torn down: a rank that tore it down while another
    # still evaluated aborted the other now and then ('terminate called without an active
    # exception'; tests/test_ddp.py's workers met the same way, 5535875).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
