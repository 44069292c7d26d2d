import os

import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present.
# It must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
