"""fastbirnn: fused bidirectional RNNs, drop-ins for ``torch.nn.RNN``, ``nn.LSTM`` and ``nn.GRU``."""

from fastbirnn import backends
from fastbirnn.gated import FastBiGRU, FastBiLSTM
from fastbirnn.module import FastBiRNN
from fastbirnn.tuning import autotune

__all__ = ["FastBiRNN", "FastBiLSTM", "FastBiGRU", "autotune", "available_backends"]
__version__ = "0.1.0"


def available_backends() -> dict:
    """Each backend name mapped to None if it can run here, else the reason it cannot."""
    return backends.available()
