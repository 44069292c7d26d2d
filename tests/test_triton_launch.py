"""How the multi-CTA kernels are launched on a GPU (issue 25), tested without one.

A persistent grid must be co-resident: it is launched cooperatively, and where it cannot be
co-resident the launcher says so (a clear error when persistent mode is forced, else one
warning and the single-CTA streamed kernel) instead of silently running one launch per step.

Without a GPU the tests stand a CPU tensor in for a CUDA one (``launcher._on_gpu``) and give
the compiled kernel a simulated co-residency limit (``launcher._coresidency``); the kernels
that then run are the interpreter's. On a GPU the same tests run on CUDA tensors with only the
limit simulated.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import test_triton as tt
from test_triton import exact_fp32  # noqa: F401 - a fixture
from fastbirnn import backends, reference
from fastbirnn.backends import triton_backend
from fastbirnn.backends.cpu_rule import CallShape

pytestmark = pytest.mark.skipif(
    triton_backend._unavailable_reason() is not None, reason="triton not importable"
)

# An H100's SM as torch.cuda.get_device_properties describes it.
H100 = types.SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                             shared_memory_per_multiprocessor=228 * 1024,
                             max_threads_per_multi_processor=2048)
# The seam's shapes here: H = 36 in 16-unit blocks, B = 5 in one tile, both directions.
T, B, D, H = 4, 5, 2, 36
GRID_CTAS = 2 * 3 * 1


@pytest.fixture
def launcher(device, monkeypatch):
    """The launcher on a (real or stand-in) GPU, multi-CTA path forced, 16-unit blocks, with
    its co-residency memo and warnings reset."""
    from fastbirnn.triton import launcher

    monkeypatch.setattr(launcher, "FORCE_PATH", "multicta")
    monkeypatch.setattr(launcher, "MULTICTA_OVERRIDES", {"BLOCK_N": 16, "BLOCK_B": 16})
    monkeypatch.setattr(launcher, "_NOT_CORESIDENT", {})
    monkeypatch.setattr(launcher, "_warned", set())
    if device.type == "cpu":
        monkeypatch.setattr(launcher, "_on_gpu", lambda device: True)
        for name in ("forward_multicta_kernel", "backward_multicta_kernel"):
            monkeypatch.setattr(launcher, name, StepModeOnly(getattr(launcher, name)))
    return launcher


class StepModeOnly:
    """A multi-CTA kernel under the interpreter, where a persistent launch would deadlock (its
    programs run one after another): such a launch fails the test instead of hanging it."""

    def __init__(self, kernel):
        self.kernel, self.fn = kernel, kernel.fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            assert not kwargs["PERSISTENT"], "persistent launch under the interpreter"
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture(params=tt.DEVICES)
def device(request):
    return torch.device(request.param)


def simulate_limit(launcher, monkeypatch, max_ctas: int, limited_by="shared memory"):
    """The compiled kernel holds ``max_ctas`` CTAs on the device at once."""
    from fastbirnn.triton import residency

    fit = residency.Residency(per_sm=1, num_sms=max_ctas, limited_by=limited_by,
                              registers=168, shared_bytes=132096)
    monkeypatch.setattr(launcher, "_coresidency", lambda launch, device: fit)


class FakeKernel:
    """Stands in for a multi-CTA kernel: records every launch's keyword arguments and computes
    nothing; fails as the driver does when it refuses a cooperative launch (``refuse``), or
    sets the barrier-timeout flag as a timed-out barrier does (``time_out``)."""

    def __init__(self, name: str, refuse: bool = False, time_out: bool = False):
        self.fn = types.SimpleNamespace(__name__=name)
        self.refuse, self.time_out = refuse, time_out
        self.launches: list[dict] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            if self.refuse and kwargs.get("launch_cooperative_grid"):
                raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")
            if self.time_out:
                err = args[6 if self.fn.__name__.startswith("forward") else 8]  # ERR
                err.fill_(1)
        return launch


def fake_kernels(launcher, monkeypatch, **behaviour) -> dict:
    """Both multi-CTA kernels replaced by FakeKernels with the same behaviour."""
    fakes = {}
    for name in ("forward_multicta_kernel", "backward_multicta_kernel"):
        fakes[name] = FakeKernel(name, **behaviour)
        monkeypatch.setattr(launcher, name, fakes[name])
    return fakes


def seam_forward(device):
    from fastbirnn import triton as kernels

    (Z, W, h0, _), lengths = tt.seam_inputs(T, B, D, H, device, torch.float32)
    got = kernels.recurrence_forward(Z, W, h0, lengths, "tanh")
    return got, reference.recurrence_forward(Z, W, h0, lengths, "tanh")


# --- co-residency: the arithmetic and the driver's refusal ----------------------------------


def test_residency_counts_like_the_occupancy_calculator():
    from fastbirnn.triton.residency import residency

    # H = 1024, B = 16, fp32, W resident: 129 KiB of shared memory, one CTA per SM.
    fit = residency(registers=168, num_warps=8, shared_bytes=132096, props=H100)
    assert (fit.per_sm, fit.max_ctas) == (1, 132)
    assert fit.limited_by == "registers and shared memory"
    assert residency(128, 8, 132096, H100).limited_by == "shared memory"
    # 255 registers round up to 8192 per warp: one 8-warp CTA per SM.
    assert (residency(255, 8, 0, H100).per_sm, residency(255, 8, 0, H100).limited_by) == (
        1, "registers")
    fit = residency(64, 4, 0, H100)  # 2048 registers a warp: 8 CTAs of 4 warps
    assert (fit.per_sm, fit.limited_by) == (8, "registers")
    assert residency(100, 4, 0, H100).per_sm == 4  # 3200 registers a warp take 3328
    assert residency(16, 1, 0, H100).limited_by == "blocks per SM"
    assert "at most 132 CTAs (1 per SM x 132 SMs, limited by shared memory: 128 registers" \
        in residency(128, 8, 132096, H100).describe()


def test_cooperative_refusal_is_recognised():
    from fastbirnn.triton.residency import is_cooperative_refusal

    assert is_cooperative_refusal(
        RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch"))
    assert not is_cooperative_refusal(RuntimeError("Triton Error [CUDA]: out of memory"))
    assert not is_cooperative_refusal(ValueError("cooperative launch"))


def test_this_triton_launches_cooperatively():
    """Triton 3.6 (the GPU machine's) and 3.9 (CI's) have the launch option."""
    import triton

    from fastbirnn.triton import residency

    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    if (major, minor) >= (3, 6):
        assert residency.COOPERATIVE_LAUNCH


# --- what runs where the grid is or is not co-resident --------------------------------------


def test_not_coresident_and_forced_persistent_is_a_clear_error(launcher, device, monkeypatch):
    simulate_limit(launcher, monkeypatch, max_ctas=GRID_CTAS - 1)
    monkeypatch.setattr(launcher, "FORCE_MULTICTA_MODE", "persistent")
    with pytest.raises(RuntimeError, match=r"cannot be co-resident .*at most 5 CTAs \(1 per SM "
                       r"x 5 SMs, limited by shared memory"):
        seam_forward(device)


def test_not_coresident_runs_streamed_with_one_warning_never_step_mode(launcher, device,
                                                                       monkeypatch,
                                                                       exact_fp32):
    """'triton' on a GPU where the persistent grid does not fit: a warning naming the limit,
    the single-CTA streamed kernel (nn.RNN's results), and no multi-CTA launch at all."""
    simulate_limit(launcher, monkeypatch, max_ctas=GRID_CTAS - 1)
    launched = []
    original_call = launcher.MultiCTALaunch.call
    monkeypatch.setattr(launcher.MultiCTALaunch, "call", lambda self, persistent, *a, **k: (
        launched.append(persistent), original_call(self, persistent, *a, **k))[1])
    case = tt.Case(batch=B, hidden_size=H, num_layers=2)
    with pytest.warns(RuntimeWarning, match=r"cannot be co-resident.*at most 5 CTAs.*"
                      r"single-CTA streamed kernel"):
        tt.check_module_parity(case, device)
    assert launcher.LAST_MULTICTA["mode"] == "streamed"
    assert launched == []  # neither persistent nor step mode ran
    with warnings.catch_warnings():  # once per configuration, not per call
        warnings.simplefilter("error")
        tt.check_module_parity(case, device)


def test_coresident_grid_is_launched_cooperatively_once(launcher, device, monkeypatch):
    """Where the grid fits: one persistent launch with launch_cooperative_grid=True."""
    simulate_limit(launcher, monkeypatch, max_ctas=GRID_CTAS)
    fake = fake_kernels(launcher, monkeypatch)["forward_multicta_kernel"]
    seam_forward(device)
    assert launcher.LAST_MULTICTA["mode"] == "persistent"
    assert len(fake.launches) == 1
    assert fake.launches[0]["PERSISTENT"] and fake.launches[0]["launch_cooperative_grid"]


@pytest.mark.parametrize("forced", [None, "persistent"])
def test_driver_refusing_the_cooperative_launch(launcher, device, monkeypatch, forced):
    """The driver knows better than the calculator: its refusal is the same verdict."""
    simulate_limit(launcher, monkeypatch, max_ctas=GRID_CTAS)
    monkeypatch.setattr(launcher, "FORCE_MULTICTA_MODE", forced)
    fake_kernels(launcher, monkeypatch, refuse=True)
    if forced:
        with pytest.raises(RuntimeError, match="driver refused the cooperative launch"):
            seam_forward(device)
        return
    with pytest.warns(RuntimeWarning, match="driver refused the cooperative launch"):
        got, want = seam_forward(device)  # the streamed kernel ran instead
    torch.testing.assert_close(got, want, **tt.tolerances(device))


def test_without_cooperative_launch_persistent_mode_is_refused(launcher, device, monkeypatch):
    from fastbirnn.triton import residency

    monkeypatch.setattr(residency, "COOPERATIVE_LAUNCH", False)
    monkeypatch.setattr(launcher, "FORCE_MULTICTA_MODE", "persistent")
    with pytest.raises(RuntimeError, match="no cooperative launch"):
        seam_forward(device)


def test_step_mode_only_when_forced(launcher, device, monkeypatch):
    monkeypatch.setattr(launcher, "FORCE_MULTICTA_MODE", "step")
    simulate_limit(launcher, monkeypatch, max_ctas=GRID_CTAS)
    got, want = seam_forward(device)
    assert launcher.LAST_MULTICTA["mode"] == "step"
    torch.testing.assert_close(got, want, **tt.tolerances(device))


# --- 'auto' keeps cuDNN where the persistent grid cannot run --------------------------------


def test_persistent_unavailable_reason(launcher, device, monkeypatch, exact_fp32):
    monkeypatch.setattr(launcher, "MULTICTA_OVERRIDES", {})
    simulate_limit(launcher, monkeypatch, max_ctas=100, limited_by="registers")
    # H = 1024, B = 64, exact fp32 (16-row batch tiles): 2 directions x 16 blocks of 64 units
    # x 4 batch tiles.
    why = launcher.persistent_unavailable_reason(1024, 64, torch.float32, device)
    assert why is not None and "(128 CTAs)" in why and "limited by registers" in why
    monkeypatch.setattr(launcher, "FORCE_PATH", None)
    assert launcher.persistent_unavailable_reason(1024, 64, torch.float32, device) is not None
    # Shapes that take another path never need the grid.
    assert launcher.persistent_unavailable_reason(64, 8, torch.float32, device) is None
    assert launcher.persistent_unavailable_reason(1024, 65, torch.float32, device) is None
    simulate_limit(launcher, monkeypatch, max_ctas=132)
    monkeypatch.setattr(launcher, "_NOT_CORESIDENT", {})
    assert launcher.persistent_unavailable_reason(1024, 64, torch.float32, device) is None


def test_auto_prefers_triton_only_where_the_grid_can_run(monkeypatch):
    from fastbirnn.triton import launcher

    monkeypatch.setattr(triton_backend, "CUDA_CROSSOVER", {torch.float32: {1024: 64}})
    x = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    monkeypatch.setattr(launcher, "persistent_unavailable_reason", lambda *a: None)
    assert triton_backend._preferred_for(x, _call(1024, 64))
    monkeypatch.setattr(launcher, "persistent_unavailable_reason", lambda *a: "too many CTAs")
    assert not triton_backend._preferred_for(x, _call(1024, 64))
    assert not triton_backend._preferred_for(x, _call(1024, 65))  # beyond the measured table


def _call(hidden, batch):
    return CallShape(batch=batch, seq=256, hidden=hidden, layers=1, bidirectional=True,
                     dtype=torch.float32, training=True, threads=1)


def test_auto_never_picks_triton_on_cpu():
    assert not triton_backend._preferred_for(torch.empty(1), _call(1024, 1))
    assert backends.resolve_auto(torch.empty(3, 2, 4), _call(1024, 2)) != "triton"


# --- the barrier-timeout flag: read once per call, before the call returns ------------------


@pytest.fixture
def reads(monkeypatch):
    """Counts the host reads of the barrier-timeout flags."""
    from fastbirnn.triton import barrier_check

    count = []
    original = barrier_check.PendingCheck.read
    monkeypatch.setattr(barrier_check.PendingCheck, "read",
                        lambda self: (count.append(len(self.launches)), original(self))[1])
    return count


def module_and_input(device, num_layers=3):
    torch.manual_seed(0)
    module = tt.FastBiRNN(4, H, num_layers=num_layers, backend="triton", device=device)
    return module, torch.randn(T, B, 4, device=device, requires_grad=True)


def test_a_seam_call_reads_the_flag_right_after_its_launch(launcher, device, monkeypatch,
                                                           reads):
    simulate_limit(launcher, monkeypatch, max_ctas=GRID_CTAS)
    fake_kernels(launcher, monkeypatch, time_out=True)
    with pytest.raises(RuntimeError, match="barrier timed out.*forward_multicta_kernel"):
        seam_forward(device)
    assert reads == [1]


def test_a_forward_reads_the_flag_once_after_its_last_layer(launcher, device, monkeypatch,
                                                            reads):
    simulate_limit(launcher, monkeypatch, max_ctas=GRID_CTAS)
    fakes = fake_kernels(launcher, monkeypatch)
    module, x = module_and_input(device)
    module(x)
    module(x)  # the repeated call's shortcut too
    assert reads == [3, 3]  # one read per call, of three layers' launches
    fakes["forward_multicta_kernel"].time_out = True
    with pytest.raises(RuntimeError, match="barrier timed out"):
        module(x)
    assert reads == [3, 3, 3] and len(fakes["forward_multicta_kernel"].launches) == 9


def test_a_backward_pass_reads_the_flag_once_when_autograd_is_done(launcher, device,
                                                                   monkeypatch, reads):
    simulate_limit(launcher, monkeypatch, max_ctas=GRID_CTAS)
    fakes = fake_kernels(launcher, monkeypatch)
    module, x = module_and_input(device)
    module(x)[0].sum().backward()
    assert reads == [3, 3]  # the forward's, then the backward pass's
    fakes["backward_multicta_kernel"].time_out = True
    with pytest.raises(RuntimeError, match="barrier timed out.*backward_multicta_kernel"):
        module(x)[0].sum().backward()
    assert reads == [3, 3, 3, 3]
    from fastbirnn.triton import barrier_check

    assert barrier_check._backward_checks == {}


def test_a_cuda_graph_capture_of_a_persistent_launch_is_refused(launcher, device,
                                                                monkeypatch):
    simulate_limit(launcher, monkeypatch, max_ctas=GRID_CTAS)
    fakes = fake_kernels(launcher, monkeypatch)
    monkeypatch.setattr(launcher, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        seam_forward(device)
    assert fakes["forward_multicta_kernel"].launches == []
    monkeypatch.setattr(launcher, "FORCE_MULTICTA_MODE", "step")  # no barrier: capturable
    seam_forward(device)
    assert fakes["forward_multicta_kernel"].launches[0]["PERSISTENT"] is False
