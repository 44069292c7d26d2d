"""pytest-benchmark suite options: which device and which preset of shapes.

    pytest benchmarks/ --benchmark-only                      # CPU: the design's three shapes
    pytest benchmarks/ --benchmark-only --bench-preset cpu   # plus batch / hidden sweeps
    pytest benchmarks/ --benchmark-only --bench-device cuda  # CUDA: the 'gpu' grid
    pytest benchmarks/ --benchmark-only --bench-cell lstm    # one cell (default: rnn,lstm,gru)

Every case runs for each cell: FastBiRNN / FastBiLSTM / FastBiGRU per backend against
nn.RNN / nn.LSTM / nn.GRU. A backend without the cell is skipped with that reason.

The suite is kept out of the default test run (pyproject's testpaths = ["tests"]).
Shapes, contenders and skip reasons come from fastbirnn.benchmarking, shared with the CLI.
"""

import pytest
import torch

from fastbirnn import benchmarking as bm

# Default preset per device type when --bench-preset is not given.
DEFAULT_PRESET = {"cpu": "quick", "cuda": "gpu"}


def pytest_addoption(parser):
    group = parser.getgroup("fastbirnn benchmarks")
    group.addoption("--bench-device", default="auto",
                    help="cpu, cuda or auto (cuda when available); default auto")
    group.addoption("--bench-preset", default=None,
                    help=f"shape preset from fastbirnn.benchmarking.PRESETS ({', '.join(bm.PRESETS)}); "
                         "default: quick on CPU, gpu on CUDA")
    group.addoption("--bench-cell", default=",".join(bm.CELLS),
                    help=f"comma-separated cells ({', '.join(bm.CELLS)}); default all three")
    group.addoption("--bench-dtype", default=None,
                    help="comma-separated precisions to keep (fp32, tf32, bf16, fp16)")
    group.addoption("--bench-backends", default=None,
                    help="comma-separated FastBiRNN backends (default: auto + every registered one)")
    group.addoption("--bench-memory", action="store_true",
                    help="also record the training step's peak memory in extra_info")


def _device(config) -> torch.device:
    choice = config.getoption("--bench-device")
    if choice == "auto":
        return bm.default_device()
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda, but torch sees no CUDA device")
    return device


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = _device(config)
    preset = config.getoption("--bench-preset") or DEFAULT_PRESET.get(device.type, "quick")
    cells = config.getoption("--bench-cell").split(",")
    unknown = [c for c in cells if c not in bm.CELLS]
    if unknown:
        raise pytest.UsageError(f"--bench-cell: unknown {', '.join(unknown)}; "
                                f"one of {', '.join(bm.CELLS)}")
    try:
        cases = [case for cell in cells for case in bm.preset_cases(preset, device, cell)]
    except ValueError as error:
        raise pytest.UsageError(str(error))
    dtypes = config.getoption("--bench-dtype")
    if dtypes:
        cases = [c for c in cases if c.dtype in dtypes.split(",")]
    backends = config.getoption("--bench-backends")
    backends = backends.split(",") if backends else None

    params = []
    for case in cases:
        for name, reason in bm.contenders(case, device, backends):
            marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
            params.append(pytest.param(case, name, id=f"{case.id}-{name}", marks=marks))
    metafunc.parametrize(("case", "contender"), params)


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    return _device(request.config)


def pytest_benchmark_update_machine_info(config, machine_info):
    device = _device(config)
    info = bm.machine_info(device)
    machine_info["fastbirnn"] = {k: info[k] for k in (
        "device", "cpu", "cpu_count", "torch_threads", "torch", "cuda", "cudnn", "triton",
        "backends", "git") if k in info}
    if device.type == "cuda":
        machine_info["fastbirnn"].update(gpu=info["gpu"], gpu_capability=info["gpu_capability"])
