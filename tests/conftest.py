import importlib.util
import os
import sys

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present.
# It must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def grid():
    """benchmarks/cpu_grid.py (a script, not part of the package) as a module."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cpu_grid.py")
    spec = importlib.util.spec_from_file_location("cpu_grid", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cpu_grid", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
