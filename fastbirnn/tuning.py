"""Opt-in calibration of ``'auto'`` on CPU, like ``torch.backends.cudnn.benchmark``.

Off by default: ``'auto'`` then follows the committed grids (``backends/cpu_rule.py``), and
the choice depends only on the call's shape, dtype, grad mode and thread count. With
``fastbirnn.autotune(True)`` (or ``FASTBIRNN_AUTOTUNE=1`` in the environment at import), the
first call of each signature on CPU times the fused kernel and the nn class on that very
input, a few interleaved rounds each, and every later call of the signature in this process
runs the faster one. The choice then depends on timing: on a busy machine it may differ
between runs. Timing has no effect on results, gradients or the random number generator:
it computes gradients with ``torch.autograd.grad`` (``.grad`` untouched) under a forked RNG.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch
from torch.nn.utils.rnn import PackedSequence

_enabled = os.environ.get("FASTBIRNN_AUTOTUNE", "") == "1"
# Signature -> (winner, {backend: median seconds}), for the life of the process.
_winners: dict[tuple, tuple[str, dict[str, float]]] = {}
ROUNDS = 3  # timed rounds per candidate, after one warm-up round each
_clock = time.perf_counter


def autotune(enabled: bool = True) -> None:
    """Turn the calibration of ``'auto'`` on or off for this process (see the module doc)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


def results() -> dict[tuple, tuple[str, dict[str, float]]]:
    """What the calibration measured so far: signature -> (winner, median seconds each)."""
    return dict(_winners)


def clear() -> None:
    """Forget every measured choice (the next call of each signature measures again)."""
    _winners.clear()


def choose(signature: tuple, candidates: list[str], run: Callable[[str], None]) -> str:
    """The fastest of ``candidates`` (the rule's choice first) for ``signature``, measured once
    with ``run(backend)`` (one forward, or one training step) and remembered. A candidate
    that raises on this input is left out; if every one does, the first is returned unmeasured
    (the call itself then raises its own error)."""
    known = _winners.get(signature)
    if known is not None:
        return known[0]
    runnable = []
    with torch.random.fork_rng(devices=[]):
        for name in candidates:  # warm-up: first-call allocations, caches
            try:
                run(name)
            except RuntimeError:
                continue
            runnable.append(name)
        if not runnable:
            return candidates[0]
        samples: dict[str, list[float]] = {name: [] for name in runnable}
        for _ in range(ROUNDS):
            for name in runnable:  # interleaved, so drift hits every candidate alike
                start = _clock()
                run(name)
                samples[name].append(_clock() - start)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    winner = min(runnable, key=lambda name: medians[name])  # a tie keeps the rule's choice
    _winners[signature] = (winner, medians)
    return winner


def step_runner(module, input, training: bool) -> Callable[[str], None]:
    """``run(backend)`` for ``choose``: ``module``'s forward on ``input`` with that backend,
    and in training the gradients of every input that needs one, none accumulated."""

    def run(backend: str) -> None:
        with torch.set_grad_enabled(training):
            output, final = module._forward_on(backend, input)
            if not training:
                return
            outputs = [output.data if isinstance(output, PackedSequence) else output]
            outputs += list(final) if isinstance(final, tuple) else [final]
            data = input.data if isinstance(input, PackedSequence) else input
            wrt = [w for w in module._flat_weights if w.requires_grad]
            wrt += [data] if data.requires_grad else []
            torch.autograd.grad(outputs, wrt, [torch.ones_like(o) for o in outputs],
                                allow_unused=True)

    return run
