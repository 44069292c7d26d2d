"""Smoke test of the benchmark CLI (python -m fastbirnn.bench) on its tiny preset.

Timings are never asserted (machines are noisy): only that the table, the JSON and the plot
are produced and that every ratio is a finite positive number.
"""

import json
import math

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
