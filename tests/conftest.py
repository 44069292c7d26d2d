import importlib.util
import os
import sys

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present.
# It must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests marked ``slow`` run only with FASTBIRNN_SLOW_TESTS=1: the full hypothesis profiles
# (the default run keeps a smaller one that still covers every kernel threshold), compiling
# every Triton configuration ahead of time, Inductor on the pure-PyTorch reference. CI runs
# them after the README's test command (.ci/run), so the default run stays short.
SLOW_TESTS = os.environ.get("FASTBIRNN_SLOW_TESTS") == "1"
# Files whose every test is slow: the ahead-of-time ones compile all Triton kernel
# configurations for sm_80 and sm_90 (about 80 s of CPU time with a cold Triton cache); the GPU
# script's dry run runs every stage of benchmarks/gpu_run.sh in the interpreter (about 20 s).
SLOW_FILES = {"test_triton_aot.py", "test_triton_gated_aot.py", "test_gpu_run.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
    if SLOW_TESTS:
        return
    skip = pytest.mark.skip(reason="slow: runs with FASTBIRNN_SLOW_TESTS=1 (CI runs it)")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def grid():
    """benchmarks/cpu_grid.py (a script, not part of the package) as a module."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cpu_grid.py")
    spec = importlib.util.spec_from_file_location("cpu_grid", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cpu_grid", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
