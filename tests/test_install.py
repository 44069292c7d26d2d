"""What a plain install pulls in, and what a missing optional dependency says."""

import sys
from pathlib import Path

import pytest
import torch

import fastbirnn
from fastbirnn import FastBiRNN

ROOT = Path(__file__).resolve().parent.parent


def _starts_with(requirements, name):
    return [r for r in requirements if r.replace(" ", "").lower().startswith(name)]


def test_a_cpu_install_pulls_no_triton():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # ~1 GB that a CPU-only machine cannot run; CUDA builds of torch bring their own.
    assert not _starts_with(project["dependencies"], "triton")
    assert not _starts_with(extras["bench"], "triton")
    # The test command installs it: CI runs the kernels through the Triton interpreter.
    assert _starts_with(extras["test"], "triton")


def _clear_triton_backend_caches():
    # The backend checks its import once (functools caches); forget that answer.
    from fastbirnn.backends import triton_backend

    for value in vars(triton_backend).values():
        getattr(value, "cache_clear", lambda: None)()


def test_backend_triton_without_the_package_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails
    for name in [m for m in sys.modules if m.startswith("fastbirnn.triton")]:
        monkeypatch.delitem(sys.modules, name)
    _clear_triton_backend_caches()
    try:
        assert "pip install triton" in fastbirnn.available_backends()["triton"]
        with pytest.raises(RuntimeError, match="pip install triton"):
            FastBiRNN(4, 8, backend="triton")(torch.randn(3, 2, 4))
    finally:
        monkeypatch.undo()
        _clear_triton_backend_caches()  # later tests see the real triton again


def test_a_plain_install_pulls_numpy():
    """Without numpy, `import torch` warns "Failed to initialize NumPy" before anything else
    (torch's wheels do not depend on it): the README's command 1 must install it (issue 26)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _starts_with(project["dependencies"], "numpy")
