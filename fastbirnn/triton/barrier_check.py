"""When the host reads the persistent kernels' barrier-timeout flag: once per call.

A persistent multi-CTA launch whose grid barrier gave up (a CTA never arrived within
``BARRIER_MAX_SPIN`` polls, see ``multicta._grid_barrier``) sets an int32 flag on the device:
its results are invalid. Reading the flag is a host synchronisation, so it is read once per
call, after the call's last kernel, instead of after every layer and pass:

- a module's forward on 'triton' runs its layer stack through ``one_check_per_call`` (the
  backend's stack function): one read when the stack is done;
- a backward pass: one read when autograd has run all of it (a final callback of the pass);
- a seam call outside both (direct use, tests): one read right after its launch.

Each read comes before the call returns, so invalid results never reach the caller unreported.
A CUDA graph replay would skip the read: the launcher refuses to capture a persistent launch.
"""

from __future__ import annotations

import contextlib
import threading

import torch


class PendingCheck:
    """The flags of persistent launches that the host has not read yet, one per device."""

    def __init__(self):
        self.flags: dict = {}  # device -> (int32 [1] flag, the stream the launches ran on)
        self.launches: list[str] = []

    def flag(self, device: torch.device) -> torch.Tensor:
        """The flag a launch on ``device`` sets (one for all of the call's launches there)."""
        if device not in self.flags:
            stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
            self.flags[device] = (torch.zeros(1, dtype=torch.int32, device=device), stream)
        return self.flags[device][0]

    def read(self) -> None:
        """One host read per device: RuntimeError if any of the launches timed out."""
        flags, self.flags = self.flags, {}
        launches, self.launches = self.launches, []
        timed_out = False
        for flag, stream in flags.values():
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                timed_out |= flag.item() != 0
        if timed_out:
            raise RuntimeError(
                "fastbirnn triton: the multi-CTA grid barrier timed out (a CTA never arrived) "
                f"in one of {', '.join(dict.fromkeys(launches))}; results are invalid. The grid "
                "was launched cooperatively (co-resident), so this should not happen: please "
                "report it.")


_thread = threading.local()  # .call: the PendingCheck of the call open on this thread
_backward_checks: dict[int, PendingCheck] = {}  # autograd graph task id -> its check
_backward_lock = threading.Lock()


def one_check_per_call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, reading the flags of all its persistent launches once, at its
    end. A call inside another joins the outer one."""
    if getattr(_thread, "call", None) is not None:
        return fn(*args, **kwargs)
    _thread.call = check = PendingCheck()
    try:
        result = fn(*args, **kwargs)
    finally:
        _thread.call = None
    check.read()
    return result


@contextlib.contextmanager
def flag_for(device: torch.device, launch: str):
    """Yields the flag that one persistent launch (described by ``launch``) on ``device`` sets;
    once the launch is enqueued, the flag is read at once or left to its call's one read."""
    check, deferred = _current_check()
    yield check.flag(device)
    check.launches.append(launch)
    if not deferred:
        check.read()


def _current_check() -> tuple[PendingCheck, bool]:
    """The check a launch reports to now, and whether someone else reads it later."""
    call = getattr(_thread, "call", None)
    if call is not None:
        return call, True
    task = _graph_task_id()
    if task < 0:
        return PendingCheck(), False
    with _backward_lock:
        check = _backward_checks.get(task)
        if check is None:
            check = _backward_checks[task] = PendingCheck()
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: _read_backward(task))
    return check, True


def _read_backward(task: int) -> None:
    with _backward_lock:
        check = _backward_checks.pop(task)
    check.read()


def _graph_task_id() -> int:
    """The running backward pass (autograd graph task), or -1 outside one."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if current is None else current()
