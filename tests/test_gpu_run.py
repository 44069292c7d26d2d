"""benchmarks/gpu_run.sh end to end in its dry mode: CPU, Triton interpreter, tiny shapes.

The GPU run is prepared here and happens elsewhere, once, within minutes of a lent machine: a
typo in a stage, a renamed flag or a JSON key the summary expects must fail here, so that its
first real run fails only for GPU reasons. The dry mode runs every default stage with the same
commands and arguments as the real run (less the shapes, the number of tests and the build).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastbirnn.backends import triton_backend

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_run.sh"

pytestmark = [
    pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                       reason="needs bash and coreutils' timeout"),
    pytest.mark.skipif(triton_backend._import_failure() is not None,
                       reason="triton not importable: the dry run runs its interpreter"),
]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run")
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), PYTHON=sys.executable,
               GIT_COMMIT="0123456789abcdef")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=300)
    log = (out / "gpu_run.log").read_text() if (out / "gpu_run.log").exists() else ""
    return proc, out, log


def test_every_stage_runs_and_passes(dry_run):
    proc, out, log = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["dry_run"] is True
    stages = {s["name"]: s for s in run["stages"]}
    expected = ["install", "backends", "tests", "paths", "profile", "gated", "bench"]
    assert list(stages) == expected, run["stages"]
    failed = {name: s["verdict"] for name, s in stages.items() if s["verdict"] != "ok"}
    assert not failed, f"{failed}\n{log[-6000:]}"
    tests = stages["tests"]["tests"]
    assert tests["tests"] >= 3 and tests["failures"] == tests["errors"] == 0, tests


def test_its_json_describes_the_machine_and_the_code(dry_run):
    _, out, _ = dry_run
    run = json.loads((out / "run.json").read_text())
    for key in ("device", "torch", "triton", "cuda", "commit", "python"):
        assert key in run, key
    assert run["commit"] == "0123456789abcdef"
    paths = json.loads((out / "paths.json").read_text())
    machine = paths["machine"]
    assert machine["torch"] and machine["triton"]
    assert machine["git"]["commit"]


def test_paths_json_holds_times_and_ratios_against_nn_rnn(dry_run):
    _, out, _ = dry_run
    paths = json.loads((out / "paths.json").read_text())
    (case,) = paths["cases"]
    assert case["cudnn_ms"]["train"] > 0
    ran = {name: info["ran"].get("mode") for name, info in case["paths"].items()}
    assert ran["triton multicta step"] == "step"
    for info in case["paths"].values():
        assert info["train_ms"] > 0 and info["train_speedup_vs_cudnn"] > 0
        assert info["max_abs_err_vs_cudnn"] < 1e-4
    # The persistent kernel needs a GPU: recorded as not run, with the reason.
    assert "needs a GPU" in case["skipped"]["triton multicta persistent"]
    gated = paths["gated"]["cases"]
    assert {c["cell"] for c in gated} == {"lstm", "gru"}
    assert all(c["max_abs_err_vs_cudnn"] < 1e-4 for c in gated)


def test_the_files_the_device_tool_brings_back(dry_run):
    _, out, _ = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["summary.txt", "gpu_run.log", "run.json", "paths.json",
                            "profile_summary.txt", "profile_traces.tar.gz", "bench.json",
                            "bench.png"]), files  # 8: the device tool returns at most 8
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary and "triton paths vs cuDNN" in summary
    assert "tests: ok" in summary
