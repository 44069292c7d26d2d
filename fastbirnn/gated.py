"""``FastBiLSTM`` and ``FastBiGRU``: ``nn.LSTM`` and ``nn.GRU`` on fastbirnn's backends.

Each class adds only what its cell owns -- the nn class's constructor arguments and its
stack's own arguments -- to the shared ``forward`` of ``fastbirnn.base``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fastbirnn import backends
from fastbirnn.base import FusedRNNMixin

_BACKEND_DOC = """
    backend: ``'auto'`` (the fastest correct backend for the input's device; today that is
        the nn class itself, until the fused {cell} cell's grid is measured), ``'cpp'`` (the
        fused C++ CPU engine; float32/float64, no ``proj_size``), ``'reference'`` (the
        pure-PyTorch spec of the cell, for testing) or ``'torch'`` (the nn class).
        A backend without this cell is refused at construction with the list of those
        that have it.
"""


@functools.lru_cache(maxsize=None)
def _nn_autocast_result_dtype(cell: str, device_type: str, autocast_dtype: torch.dtype):
    """What the nn class returns under the active autocast, asked of its own kernel once.

    It differs by cell and device: on CPU, nn.LSTM (oneDNN) returns the autocast dtype while
    nn.GRU returns float32 (only its GEMMs are cast). A one-step probe with zero weights
    draws no random numbers.
    """
    x = torch.zeros(1, 1, 1, device=device_type)
    gates = 4 if cell == "lstm" else 3
    weights = [torch.zeros(gates, 1, device=device_type)] * 2
    weights += [torch.zeros(gates, device=device_type)] * 2
    h = torch.zeros(1, 1, 1, device=device_type)
    if cell == "lstm":
        output = torch._VF.lstm(x, (h, h), weights, True, 1, 0.0, False, False, False)[0]
    else:
        output = torch._VF.gru(x, h, weights, True, 1, 0.0, False, False, False)[0]
    return output.dtype


class _GatedMixin(FusedRNNMixin):
    def _autocast_result_dtype(self, device_type: str, autocast_dtype: torch.dtype):
        return _nn_autocast_result_dtype(self.cell, device_type, autocast_dtype)


class FastBiLSTM(_GatedMixin, nn.LSTM):
    __doc__ = (
        "Drop-in for :class:`torch.nn.LSTM`: same arguments, parameters, ``state_dict``, "
        "inputs (``(h_0, c_0)`` included) and outputs, except that ``bidirectional`` defaults "
        "to ``True`` and there is one more argument:\n" + _BACKEND_DOC.format(cell="LSTM")
    )
    cell = "lstm"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = True,
        proj_size: int = 0,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        backends.check_name(backend, self.cell)  # before nn.LSTM allocates anything
        super().__init__(
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            proj_size=proj_size,
            device=device,
            dtype=dtype,
        )
        self.backend = backend

    def _cell_config(self) -> dict:
        return {"proj_size": self.proj_size}


class FastBiGRU(_GatedMixin, nn.GRU):
    __doc__ = (
        "Drop-in for :class:`torch.nn.GRU`: same arguments, parameters, ``state_dict``, "
        "inputs and outputs, except that ``bidirectional`` defaults to ``True`` and there is "
        "one more argument:\n" + _BACKEND_DOC.format(cell="GRU")
    )
    cell = "gru"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = True,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        backends.check_name(backend, self.cell)  # before nn.GRU allocates anything
        super().__init__(
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            device=device,
            dtype=dtype,
        )
        self.backend = backend


__all__ = ["FastBiLSTM", "FastBiGRU"]
