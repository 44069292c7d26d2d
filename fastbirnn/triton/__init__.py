"""Triton kernels of the recurrence: both directions in one launch, time loop inside.

``recurrence_forward`` / ``recurrence_backward`` implement the seam of
``fastbirnn.reference``; ``fastbirnn.backends.triton_backend`` registers them as 'triton'.
"""

from fastbirnn.triton.launcher import recurrence_backward, recurrence_forward

__all__ = ["recurrence_forward", "recurrence_backward"]
