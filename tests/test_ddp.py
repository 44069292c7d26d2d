"""DistributedDataParallel (gloo, 2 CPU processes) trains FastBiRNN like one process does.

Two processes each take half of a batch; after a few SGD steps their parameters must equal
those of single-process training on the whole batch, with no flatten_parameters warning and
with the RNN's flat weights still the parameters themselves (no copy made by DDP).
"""

import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import fastbirnn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_ddp  # noqa: E402

WORLD = 2
STEPS = 3
BATCH = 8  # combined; each rank takes BATCH // WORLD rows
LENGTH = 7
LR = 0.5

FUSED = [n for n in ("cpp", "reference") if fastbirnn.available_backends().get(n, "") is None]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_only():
    # Keep gloo's own connections on the loopback interface, whatever the hostname resolves to.
    if os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"


def _flat_weights_are_parameters(rnn) -> bool:
    return all(
        w is getattr(rnn, name) and w.data_ptr() == getattr(rnn, name).data_ptr()
        for w, name in zip(rnn._flat_weights, rnn._flat_weights_names)
    )


def _train(model, tokens, tags):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        optimizer.zero_grad()
        train_ddp.loss_fn(model, tokens, tags).backward()
        optimizer.step()


def _worker(rank, port, backends, out_dir):
    _loopback_only()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        for backend in backends:  # one spawn for all backends: process start-up is the cost
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
                model = train_ddp.Tagger(backend)
                ddp = DDP(model)
                tokens, tags = train_ddp.make_data(BATCH, LENGTH, seed=1)
                shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
                _train(ddp, tokens[shard], tags[shard])
            torch.save(
                {
                    "state": model.state_dict(),
                    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
                    "flat_weights_are_parameters": _flat_weights_are_parameters(model.rnn),
                    "selected": model.rnn.selected_backend(
                        torch.zeros(1, 1, model.rnn.input_size)),
                },
                os.path.join(out_dir, f"{backend}-rank{rank}.pt"),
            )
        # Both ranks finish before either tears gloo down: a rank that destroys the group
        # while its peer still holds the connection can abort ("terminate called without an
        # active exception", about one run in ten on 2 cores).
        dist.barrier()
    finally:
        dist.destroy_process_group()


BACKENDS = ["auto", *FUSED]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), BACKENDS, str(out_dir)), nprocs=WORLD, join=True)
    return out_dir


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_two_processes_equal_single_process_on_combined_batch(backend, ddp_results):
    torch.manual_seed(0)
    single = train_ddp.Tagger(backend)
    tokens, tags = train_ddp.make_data(BATCH, LENGTH, seed=1)
    initial = {k: v.clone() for k, v in single.state_dict().items()}
    _train(single, tokens, tags)

    for rank in range(WORLD):
        result = torch.load(ddp_results / f"{backend}-rank{rank}.pt")
        if backend != "auto":
            assert result["selected"] == backend
        assert not [w for w in result["warnings"] if "flatten_parameters" in w
                    or "contiguous chunk of memory" in w], result["warnings"]
        assert result["flat_weights_are_parameters"]
        assert result["state"].keys() == single.state_dict().keys()
        for name, value in single.state_dict().items():
            assert not torch.equal(value, initial[name]), f"{name} did not train"
            torch.testing.assert_close(result["state"][name], value,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not on PATH")
@pytest.mark.slow  # two trainings under torchrun (~5 s); the two-process test above stays quick
def test_train_ddp_example_with_torchrun():
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(EXAMPLES / "train_ddp.py"),
         "--steps", "100"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 processes (gloo)" in result.stdout
    assert "rank 0: FastBiRNN ran '" in result.stdout  # counted on its real batches
    accuracy = float(result.stdout.split("held-out tag accuracy: ")[1].split("%")[0])
    assert accuracy > 90, result.stdout
