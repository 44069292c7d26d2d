"""Which backend a fastbirnn module ran, counted on the real inputs (shared by the examples).

``'auto'`` decides per call, from the batch size, sequence length, dtype, grad mode and thread
count: a probe with a made-up input (one row, one step) can name another backend than the
real batches get. ``BackendCounts`` asks the module's own ``selected_backend`` for every input
it is called with, just before it runs, and counts the answers (``'torch'`` is the nn class).

    counts = BackendCounts(model.rnn)
    ...train...
    print("FastBiRNN", ran(counts.take()))   # FastBiRNN ran 'cpp' on 212 batches
"""

from __future__ import annotations

from collections import Counter


class BackendCounts:
    """Counts per backend of the calls ``module`` (a fastbirnn module) ran since ``take``."""

    def __init__(self, module) -> None:
        self.counts: Counter = Counter()
        self._handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        # Under the same grad mode and with the same input as the forward about to run.
        self.counts[module.selected_backend(args[0] if args else kwargs["input"])] += 1

    def take(self) -> dict[str, int]:
        """The counts so far, most frequent first; starts counting afresh."""
        counts, self.counts = dict(self.counts.most_common()), Counter()
        return counts

    def remove(self) -> None:
        self._handle.remove()


def ran(counts: dict[str, int], unit: str = "batch") -> str:
    """``ran 'torch' on 85 batches, 'cpp' on 1`` (``'torch'`` is the nn class)."""
    plural = unit + ("es" if unit.endswith(("ch", "s")) else "s")
    if not counts:
        return f"ran on no {plural}"
    parts = [f"{backend!r} on {n}" for backend, n in counts.items()]
    first = next(iter(counts.values()))
    return f"ran {parts[0]} {unit if first == 1 else plural}" + "".join(
        f", {p}" for p in parts[1:]
    )
