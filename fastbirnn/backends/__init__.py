"""Backend registry: who runs the layer stack, and on which tensors.

Every backend implements, for each cell it has ('rnn', 'lstm', 'gru'), the layer stack of
``fastbirnn.functional.run_stack``'s contract. ``'torch'`` is special: it is the nn class's
own forward and never goes through the registry. A backend module registers itself here on
import. ``resolve_auto`` picks what ``'auto'`` runs for a given input; ``require`` checks that a
backend asked for by name can run it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

TORCH = "torch"
AUTO = "auto"


@dataclass(frozen=True)
class RecurrenceBackend:
    name: str
    # The layer stack of each cell it runs ('rnn', 'lstm', 'gru'), with the arguments and
    # results of ``fastbirnn.functional.run_stack``'s ``stack``.
    cell_stacks: Mapping[str, Callable]
    # Why this backend cannot run at all here (missing package, build failure), or None.
    unavailable_reason: Callable[[], Optional[str]]
    # Why it cannot run this input (device, dtype), or None.
    unsupported_reason: Callable[[torch.Tensor], Optional[str]]
    # Whether 'auto' should pick it for input x and everything 'auto' knows about the call
    # (a ``cpu_rule.CallShape``): only where measured faster than the nn class.
    preferred_for: Callable[[torch.Tensor, object], bool] = lambda x, call: False
    # Device types on which 'auto' considers it at all (None: every device). Keeps the
    # per-call choice cheap: on CPU, 'auto' never asks a CUDA-only backend.
    auto_devices: Optional[tuple[str, ...]] = None
    # The cells 'auto' may pick it for (None: every cell it has), for a backend whose
    # measurements cover only some of its cells.
    auto_cells: Optional[tuple[str, ...]] = None
    # The recurrence seam, for a backend whose Elman stack is built on it
    # (``fastbirnn.functional.seam_stack``): forward(Z, W_hh, h0, lengths, nonlinearity) -> Hs
    # and backward(dHs, Hs, W_hh, lengths, nonlinearity) -> (dZ, dh0).
    forward: Optional[Callable] = None
    backward: Optional[Callable] = None

    def supports(self, cell: str) -> bool:
        return cell in self.cell_stacks


_REGISTRY: dict[str, RecurrenceBackend] = {}
# The order 'auto' tries backends in; the first preferred one wins, else nn.RNN.
_AUTO_ORDER: list[str] = []


def register(backend: RecurrenceBackend, auto_priority: Optional[int] = None) -> None:
    _REGISTRY[backend.name] = backend
    if auto_priority is not None and backend.name not in _AUTO_ORDER:
        _AUTO_ORDER.insert(min(auto_priority, len(_AUTO_ORDER)), backend.name)


def names() -> tuple[str, ...]:
    return (AUTO, TORCH, *_REGISTRY)


def get(name: str) -> RecurrenceBackend:
    return _REGISTRY[name]


def check_name(name: str, cell: str = "rnn") -> None:
    """Raise for an unknown backend, one without this cell, or one that cannot run here."""
    if not isinstance(name, str) or name not in names():
        raise ValueError(f"Unknown backend {name!r}. Select from {', '.join(map(repr, names()))}.")
    if name in _REGISTRY and not _REGISTRY[name].supports(cell):
        with_cell = [n for n in names() if n not in _REGISTRY or _REGISTRY[n].supports(cell)]
        raise ValueError(
            f"fastbirnn backend {name!r} has no {cell.upper()} cell yet. Select from "
            f"{', '.join(map(repr, with_cell))}."
        )
    if name in _REGISTRY:
        reason = _REGISTRY[name].unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"fastbirnn backend {name!r} is not available: {reason}")


def available() -> dict[str, Optional[str]]:
    """Every backend name mapped to None (usable) or the reason it is not."""
    status: dict[str, Optional[str]] = {AUTO: None, TORCH: None}
    for name, backend in _REGISTRY.items():
        status[name] = backend.unavailable_reason()
    return status


def resolve_auto(x: torch.Tensor, call, cell: str = "rnn") -> str:
    """What ``'auto'`` runs for input ``x``: the first preferred kernel, else ``'torch'``.

    ``call`` (a ``cpu_rule.CallShape``) describes the whole call; only backends that have
    the ``cell`` are considered.
    """
    device_type = x.device.type
    for name in _AUTO_ORDER:
        backend = _REGISTRY[name]
        if backend.auto_devices is not None and device_type not in backend.auto_devices:
            continue
        if not backend.supports(cell):
            continue
        if backend.auto_cells is not None and cell not in backend.auto_cells:
            continue
        unavailable = backend.unavailable_reason()
        if unavailable is not None:
            _warn_fallback_once(name, unavailable)
        elif backend.unsupported_reason(x) is None and backend.preferred_for(x, call):
            return name
    return TORCH


_warned_fallbacks: set[str] = set()


def _warn_fallback_once(name: str, reason: str) -> None:
    """A kernel that should be there is not (e.g. a failed build): say so once, then carry on."""
    if name not in _warned_fallbacks:
        _warned_fallbacks.add(name)
        warnings.warn(
            f"fastbirnn: backend {name!r} is not available, 'auto' falls back to the next "
            f"backend: {reason}",
            RuntimeWarning,
            stacklevel=4,
        )


def cannot_run(name: str, x: torch.Tensor) -> Optional[str]:
    """Why the named kernel backend cannot run input ``x`` here, or None."""
    backend = _REGISTRY[name]
    return backend.unavailable_reason() or backend.unsupported_reason(x)


def require(name: str, x: torch.Tensor) -> None:
    """Raise a clear error when the named kernel backend cannot run input ``x``."""
    reason = cannot_run(name, x)
    if reason is not None:
        raise RuntimeError(f"fastbirnn backend {name!r} cannot run this input: {reason}")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _register_builtin() -> None:
    from fastbirnn import reference

    def reference_unsupported(x: torch.Tensor) -> Optional[str]:
        if not x.is_floating_point():
            return f"floating point input required, got {x.dtype}"
        return None

    # The reference is always available and never preferred by 'auto' (it is a Python loop).
    register(
        RecurrenceBackend(
            name="reference",
            cell_stacks=reference.STACKS,
            unavailable_reason=lambda: None,
            unsupported_reason=reference_unsupported,
            # The seam's spec, so the seam ops (fastbirnn.ops) run without a kernel backend.
            forward=reference.recurrence_forward,
            backward=reference.recurrence_backward,
        )
    )


_register_builtin()

# Kernel backends register themselves on import; each reports its own unavailability
# (missing triton, extension not built) instead of failing here.
import importlib  # noqa: E402

for _module in ("cpp_backend", "triton_backend"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as _error:
        if _error.name != f"{__name__}.{_module}":
            raise
