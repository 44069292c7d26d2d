"""Each cell's fastbirnn module per backend vs its nn class (FastBiRNN vs nn.RNN, FastBiLSTM
vs nn.LSTM, FastBiGRU vs nn.GRU; same weights), inference and training step.

Run with ``pytest benchmarks/ --benchmark-only`` (options in ``benchmarks/conftest.py``).
Groups are per cell, shape, precision and mode, so each group compares the contenders
directly. Cases and contenders come from ``conftest.py``; a backend without the cell is
skipped there with the reason.
"""

import pytest

from fastbirnn import benchmarking as bm


@pytest.mark.parametrize("mode", ["fwd", "train"])
def test_rnn(benchmark, request, bench_device, case, contender, mode):
    device = bench_device
    benchmark.group = f"{case.cell} {case.shape} {case.dtype} {mode}"
    with bm.precision(case.dtype):
        models = bm.build_models(case, device, [contender])
        model = models[contender]
        x, grad_out = bm.make_inputs(case, device)
        if mode == "fwd":
            step = bm.forward_step(model, x)
        else:
            step = bm.train_step(model, x, grad_out)
        step = bm.synchronized(step, device)
        benchmark.extra_info.update(
            config=case.as_dict(),
            cell=case.cell,
            shape=case.shape,
            dtype=case.dtype,
            mode=mode,
            backend=contender,
            resolved_backend=bm.resolved_backend(model, x),
            device=str(device),
            tokens=case.tokens,
        )
        step()  # warm-up: Triton compilation, allocator, autograd graph caches
        step()
        benchmark(step)
        stats = getattr(benchmark, "stats", None)
        median = getattr(getattr(stats, "stats", None), "median", None)
        if median:
            benchmark.extra_info["tokens_per_s"] = case.tokens / median
        if mode == "train" and request.config.getoption("--bench-memory"):
            benchmark.extra_info["peak_train_bytes"] = bm.peak_train_memory(step, device)
