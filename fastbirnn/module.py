"""``FastBiRNN``: ``nn.RNN`` with a fused recurrence, bidirectional by default."""

from __future__ import annotations

from torch import nn

from fastbirnn import backends
from fastbirnn.base import FusedRNNMixin


class FastBiRNN(FusedRNNMixin, nn.RNN):
    r"""Drop-in for :class:`torch.nn.RNN` whose recurrence runs both directions at once.

    Same arguments, parameters, ``state_dict``, inputs and outputs as ``nn.RNN``, except that
    ``bidirectional`` defaults to ``True`` and there is one more argument:

    backend: ``'auto'`` (the fastest correct backend for the input's device, falling back to
        ``nn.RNN``), ``'triton'`` (CUDA; CPU tensors only under ``TRITON_INTERPRET=1``),
        ``'cpp'`` (fused C++ CPU kernel), ``'reference'`` (pure-PyTorch loop, for testing) or
        ``'torch'`` (``nn.RNN`` itself). A named backend that cannot run raises an error
        saying why; ``'auto'`` never does.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = True,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        backends.check_name(backend, self.cell)  # before nn.RNN allocates anything
        super().__init__(
            input_size,
            hidden_size,
            num_layers=num_layers,
            nonlinearity=nonlinearity,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            device=device,
            dtype=dtype,
        )
        self.backend = backend

    def _cell_config(self) -> dict:
        # nn.RNN runs what its mode says (set at construction), not the attribute.
        return {"nonlinearity": "relu" if self.mode == "RNN_RELU" else "tanh"}
