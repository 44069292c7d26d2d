"""Smoke test of the benchmark CLI (python -m fastbirnn.bench) on its tiny preset.

Timings are never asserted (machines are noisy): only that the table, the JSON and the plot
are produced and that every ratio is a finite positive number.
"""

import json
import math
import subprocess
import sys
import time

import pytest

from fastbirnn import bench
from fastbirnn import benchmarking as bm


def test_bench_cli_tiny(tmp_path, capsys):
    out = tmp_path / "bench"
    status = bench.main(
        ["--preset", "tiny", "--out", str(out), "--max-rounds", "3", "--budget", "0.2", "-q"]
    )
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "shape" in printed and "train x" in printed and "peak MB" in printed
    assert "B2 T4 I16 H32" in printed and bm.BASELINE in printed

    doc = json.loads((out / bench.JSON_NAME).read_text())
    assert doc["complete"] is True
    machine = doc["machine"]
    for key in ("device", "torch", "triton", "backends", "git", "cpu"):
        assert key in machine
    measured = [r for r in doc["results"] if "skipped" not in r]
    backends = {r["backend"] for r in measured}
    assert {bm.BASELINE, "auto"} <= backends
    assert {r["shape"] for r in measured} == {c.shape for c in bm.PRESETS["tiny"]["cpu"]}
    for r in measured:
        for key in ("fwd_ms", "train_ms", "speedup_fwd", "speedup_train",
                    "tokens_per_s_fwd", "tokens_per_s_train"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        if r["backend"] == bm.BASELINE:
            assert r["speedup_train"] == pytest.approx(1.0)
        assert isinstance(r["disturbed_by"], list)
        assert r["other_cpu_cores"] is None or r["other_cpu_cores"] >= 0
        peak = r["peak_train_bytes"]
        # The training step at least materialises the output [T, B, 2H] (fp32) and its grads.
        assert peak is None or peak >= r["case"]["seq"] * r["case"]["batch"] * 2 * r["case"]["hidden"] * 4
    for r in doc["results"]:
        if "skipped" in r:
            assert isinstance(r["skipped"], str) and r["skipped"]

    pytest.importorskip("matplotlib")
    png = (out / bench.PNG_NAME).read_bytes()
    assert png.startswith(b"\x89PNG")

    # Redraw from the JSON alone (how committed results are re-rendered).
    again = tmp_path / "replot"
    assert bench.main(["--replot", str(out / bench.JSON_NAME), "--out", str(again), "-q"]) == 0
    assert "B4 T8 I16 H32" in capsys.readouterr().out
    assert (again / bench.PNG_NAME).read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------ disturbed measurements

STEADY = [1.00, 1.02, 0.99, 1.01, 1.00]
SPIKY = [1.0, 1.1, 9.0, 8.5, 1.05]  # a few repeats hit by other work


def test_disturbance_quiet_case_flags_nothing():
    steady = {"fwd": STEADY, "train": STEADY}
    assert bm.disturbance(steady, steady, other_cores=0.03) == []
    assert bm.disturbance(steady, None, other_cores=None) == []  # unknown is not disturbed


def test_disturbance_other_processes_flag_every_row_of_the_case():
    steady = {"fwd": STEADY, "train": STEADY}
    reasons = bm.disturbance(steady, steady, other_cores=1.3)
    assert reasons == ["others 1.30 cores"]
    # Cores that this process leaves idle may be used by others without harm.
    assert bm.disturbance(steady, steady, other_cores=1.3, spare_cores=2) == []


def test_disturbance_spread_flags_the_row_and_the_ratios_using_the_baseline():
    steady, spiky = {"fwd": STEADY, "train": STEADY}, {"fwd": STEADY, "train": SPIKY}
    assert bm.disturbance(spiky, steady, other_cores=0.0) == ["spread train 677%"]
    # A contender's ratio divides nn.RNN's time: a spread-out baseline spoils it too.
    assert bm.disturbance(steady, spiky, other_cores=0.0) == [f"{bm.BASELINE} spread train 677%"]
    assert bm.relative_spread(STEADY) < bm.SPREAD_LIMIT < bm.relative_spread(SPIKY)


def _row(shape, backend, reasons):
    return {"shape": shape, "dtype": "fp32", "backend": backend, "resolved_backend": None,
            "fwd_ms": 1.0, "train_ms": 2.0, "tokens_per_s_train": 1e3, "speedup_fwd": 1.0,
            "speedup_train": 1.0, "peak_train_bytes": None, "disturbed_by": reasons}


def test_table_marks_disturbed_rows_and_warns():
    clean = [_row("B1 T1 I1 H1", bm.BASELINE, []), _row("B1 T1 I1 H1", "cpp", [])]
    assert "disturbed" not in bench.table(clean) and "WARNING" not in bench.table(clean)
    assert "disturbed" not in bench.markdown_table(clean)

    rows = clean + [_row("B2 T2 I2 H2", bm.BASELINE, ["others 1.30 cores"])]
    text = bench.table(rows)
    assert bench.DISTURBED_HEADER in text.splitlines()[0]
    assert [l for l in text.splitlines() if "B2 T2" in l][0].endswith("others 1.30 cores")
    assert "WARNING: 1 of 3 rows were disturbed" in text
    assert "others 1.30 cores |" in bench.markdown_table(rows)


def test_other_cpu_meter_sees_another_process():
    if bm.OtherCpuMeter().cores() is None:
        pytest.skip("no /proc/stat here")
    meter = bm.OtherCpuMeter()
    start = time.perf_counter()
    # Another process burns 0.5 s of CPU; the meter must count it, and not this one's waiting.
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                    "while time.process_time() - t < 0.5: pass"], check=True)
    other_cpu_s = meter.cores() * (time.perf_counter() - start)
    assert other_cpu_s >= 0.4
