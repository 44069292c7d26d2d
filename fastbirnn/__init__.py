"""fastbirnn: a fused bidirectional Elman RNN, a drop-in for ``torch.nn.RNN``."""

from fastbirnn import backends
from fastbirnn.module import FastBiRNN

__all__ = ["FastBiRNN", "available_backends"]
__version__ = "0.1.0"


def available_backends() -> dict:
    """Each backend name mapped to None if it can run here, else the reason it cannot."""
    return backends.available()
