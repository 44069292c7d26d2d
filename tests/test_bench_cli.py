"""Smoke tests of the benchmark CLI (python -m fastbirnn.bench) on its tiny preset, for each
cell, and of the pytest-benchmark suite's parametrisation.

Timings are never asserted (machines are noisy): only that the table, the JSON and the plot
are produced and that every ratio is a finite positive number.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import fastbirnn
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


def test_modes_are_timed_one_after_the_other_contenders_interleaved():
    """measure_by_mode: every inference call of every contender before any training step
    (a model alternating modes is not what users run, and it slows nn.LSTM alone); within a
    mode the contenders alternate; the budget is split between the modes."""
    calls = []
    fns = {(name, mode): (lambda key=(name, mode): calls.append(key))
           for mode in ("fwd", "train") for name in ("nn.RNN", "cpp")}
    timings = bm.measure_by_mode(fns, "cpu", warmup=1, min_rounds=3, max_rounds=3,
                                 budget_s=0.0, target_sample_s=0.0)
    assert set(timings) == set(fns) and all(len(t.samples) == 3 for t in timings.values())
    modes = [mode for _, mode in calls]
    assert modes == sorted(modes, key=("fwd", "train").index)  # fwd calls first, all of them
    timed_fwd = [name for name, mode in calls if mode == "fwd"][-6:]  # the three rounds
    assert timed_fwd.count("nn.RNN") == timed_fwd.count("cpp") == 3
    assert any(a != b for a, b in zip(timed_fwd, timed_fwd[1:]))  # interleaved


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


# ------------------------------------------------------------------ the three cells, CLI

GATED = {"lstm": "nn.LSTM", "gru": "nn.GRU"}


@pytest.mark.parametrize("cell", sorted(GATED))
def test_bench_cli_gated_cell(cell, tmp_path, capsys):
    out = tmp_path / "bench"
    status = bench.main(["--cell", cell, "--shape", "2,4,16,32", "--out", str(out),
                         "--max-rounds", "3", "--budget", "0.05", "--no-memory", "-q"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    lines = printed.splitlines()
    header = [l for l in lines if l.startswith("cell ")]
    assert header and header[0].split()[:4] == ["cell", "shape", "dtype", "backend"]
    rows = [l.split() for l in lines if l.startswith(cell + " ")]
    assert rows and {r[5] for r in rows} == {"fp32"}  # cell, B2, T4, I16, H32, dtype, backend
    labels = {r[6] for r in rows}
    assert GATED[cell] in labels and any(l.startswith("auto->") for l in labels), printed
    assert bm.BASELINE not in printed  # nn.RNN has nothing to do with this run
    assert f"speedup over {GATED[cell]}" in printed

    doc = json.loads((out / bench.JSON_NAME).read_text())
    assert doc["config"]["cell"] == cell
    assert {r["cell"] for r in doc["results"]} == {cell}
    assert {r["case"]["cell"] for r in doc["results"]} == {cell}
    measured = {r["backend"]: r for r in doc["results"] if "skipped" not in r}
    assert measured[GATED[cell]]["speedup_train"] == pytest.approx(1.0)
    assert measured["auto"]["resolved_backend"] in fastbirnn.available_backends()
    # Every registered kernel backend without this cell is a skipped row saying so.
    from fastbirnn import backends as registry

    lacking = [n for n in registry.names()
               if n not in ("auto", "torch") and not registry.get(n).supports(cell)]
    skipped = {r["backend"]: r["skipped"] for r in doc["results"] if "skipped" in r}
    for name in lacking:
        assert f"no {cell.upper()} cell" in skipped[name]
        assert name not in measured
    if lacking:
        assert f"no {cell.upper()} cell" in printed  # the 'not run:' note under the table


def _fake_backend_without_cells(monkeypatch, name="nocell"):
    from fastbirnn import backends as registry
    from fastbirnn import reference

    fake = registry.RecurrenceBackend(
        name=name, cell_stacks={"rnn": reference.elman_stack},
        unavailable_reason=lambda: None, unsupported_reason=lambda x: None)
    monkeypatch.setitem(registry._REGISTRY, name, fake)
    return name


@pytest.mark.parametrize("cell", sorted(GATED))
def test_bench_cli_names_a_backend_without_the_cell(cell, monkeypatch):
    name = _fake_backend_without_cells(monkeypatch)

    def no_timing(*args, **kwargs):
        raise AssertionError("timed something before refusing")

    monkeypatch.setattr(bm, "run_case", no_timing)
    with pytest.raises(SystemExit) as error:
        bench.main(["--cell", cell, "--backends", f"auto,{name}", "--preset", "tiny", "-q"])
    message = str(error.value.code)
    assert f"backend {name!r} has no {cell.upper()} cell" in message
    assert "auto" in message and GATED[cell] in message
    # By default such a backend is a skipped contender with the same reason, not an error.
    case = bm.Case(2, 4, 16, 32, cell=cell)
    reasons = dict(bm.contenders(case, "cpu", ["auto", name]))
    assert reasons["auto"] is None and f"no {cell.upper()} cell" in reasons[name]
    assert dict(bm.contenders(case.with_cell("rnn"), "cpu", [name]))[name] is None


def test_nonlinearity_belongs_to_the_elman_cell():
    with pytest.raises(SystemExit) as error:
        bench.main(["--cell", "gru", "--nonlinearity", "relu", "--preset", "tiny", "-q"])
    assert "Elman" in str(error.value.code)
    with pytest.raises(ValueError):
        bm.Case(2, 4, 16, 32, nonlinearity="relu", cell="lstm")
    assert bm.Case(2, 4, 16, 32, nonlinearity="relu").id.endswith("relu-fp32")
    assert bm.Case(2, 4, 16, 32, cell="gru").id.startswith("gru-")


def test_models_of_every_cell_hold_the_same_weights():
    for cell, spec in bm.CELLS.items():
        case = bm.Case(3, 5, 4, 6, layers=2, cell=cell)
        models = bm.build_models(case, "cpu", [spec.baseline, "auto"])
        base, fast = models[spec.baseline], models["auto"]
        assert type(base) is spec.nn_class and isinstance(fast, spec.fast_class)
        x, _ = bm.make_inputs(case, "cpu")
        torch.testing.assert_close(fast(x)[0], base(x)[0])
        assert bm.resolved_backend(base, x) == "torch"


def test_table_names_the_cell_and_its_baseline():
    rows = [dict(_row("B1 T1 I1 H1", "nn.GRU", []), cell="gru"),
            dict(_row("B1 T1 I1 H1", "auto", []), cell="gru", resolved_backend="torch")]
    text = bench.table(rows)
    assert text.splitlines()[0].startswith("cell")
    assert text.splitlines()[2].startswith("gru ")
    assert "auto->torch" in text and "speedup over nn.GRU" in text and "nn.RNN" not in text
    # Rows of runs before cells were recorded are Elman rows.
    assert bench.table([_row("B1 T1 I1 H1", bm.BASELINE, [])]).splitlines()[2].startswith("rnn")


@pytest.mark.slow  # a second pytest in a subprocess: ~8 s
def test_benchmark_suite_runs_every_cell_and_skips_backends_without_it():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "-v", "-rs", "--benchmark-disable",
         "--bench-device", "cpu", "--bench-preset", "tiny", "--bench-backends", "auto,cpp",
         "-p", "no:cacheprovider", "-k", "b2"],
        capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr
    for cell in ("lstm", "gru"):
        assert f"[{cell}-b2-t4-i16-h32-fp32-{GATED[cell]}-fwd] PASSED" in run.stdout
        assert f"[{cell}-b2-t4-i16-h32-fp32-auto-train] PASSED" in run.stdout
    assert "[b2-t4-i16-h32-fp32-nn.RNN-fwd] PASSED" in run.stdout
    from fastbirnn import backends as registry

    for cell in ("lstm", "gru"):
        if not registry.get("cpp").supports(cell):
            assert f"[{cell}-b2-t4-i16-h32-fp32-cpp-train] SKIPPED" in run.stdout
            assert f"cpp: backend 'cpp' has no {cell.upper()} cell" in run.stdout


# --------------------------------------------------------------- the CPU grid, per cell




# One gated cell in the default run; the other with the slow tests (the code is shared).
@pytest.mark.parametrize("cell", ["gru", pytest.param("lstm", marks=pytest.mark.slow)])
def test_grid_cell_micro_writes_its_files_and_resumes(grid, cell, tmp_path, monkeypatch,
                                                      capsys):
    out = tmp_path / "grid"
    argv = ["--cell", cell, "--preset", "micro", "--threads", "1", "--budget", "0.01",
            "--out", str(out)]
    assert grid.main(argv) == 0
    printed = capsys.readouterr().out
    assert "estimated" in printed.splitlines()[0]  # the estimate comes before any timing
    doc = json.loads((out / "grid.json").read_text())
    assert doc["complete"] is True and doc["cell"] == cell
    assert len(doc["rows"]) == len(grid.MICRO)
    for row in doc["rows"]:
        assert row["cell"] == cell and row["point"]["cell"] == cell
        assert row["baseline"] == GATED[cell] and row["label"].startswith(cell + " ")
        for mode in ("infer", "train"):
            assert math.isfinite(row[f"auto_{mode}_x"]) and row[f"auto_{mode}_x"] > 0
            assert (row[f"cpp_{mode}_x"] is None) == (grid.cpp_reason(cell) is not None)
    summary = (out / "summary.md").read_text()
    assert summary.startswith(f"Cell: {cell}.") and GATED[cell] in summary
    assert summary.count(f"| {cell} B2 T4") == len(grid.MICRO)
    import csv

    with open(out / "grid.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["cell"], r["dtype"]) for r in table] == [(cell, "fp32"), (cell, "fp64")]
    assert all(float(r["auto_train_x"]) > 0 and r["rule_train"] in ("cpp", "torch")
               for r in table)
    pytest.importorskip("matplotlib")
    assert (out / "grid.png").read_bytes().startswith(b"\x89PNG")

    # A disturbed run: only the first point made it. Without --resume the partial grid is
    # not overwritten; with it, only the missing point is measured.
    doc["rows"], doc["complete"] = doc["rows"][:1], False
    (out / "grid.json").write_text(json.dumps(doc))
    with pytest.raises(SystemExit) as error:
        grid.main(argv)
    assert "--resume" in str(error.value.code)
    measured = []
    real_measure = grid.measure
    monkeypatch.setattr(grid, "measure", lambda p, b: measured.append(p) or real_measure(p, b))
    assert grid.main(argv + ["--resume"]) == 0
    assert [p.label for p in measured] == [grid.Point(**doc["rows"][0]["point"]).label
                                           .replace("B2 T4 I16 H32 L1 bi fp32",
                                                    "B2 T4 I16 H32 L1 uni fp64")]
    resumed = json.loads((out / "grid.json").read_text())
    assert resumed["complete"] is True and len(resumed["rows"]) == len(grid.MICRO)
    assert len(resumed["resumed"]) == 1
    measured.clear()
    assert grid.main(argv + ["--resume"]) == 0 and measured == []  # nothing left to do


def _synthetic_row(grid, cell, infer_x, train_x):
    p = grid.Point(8, 128, 64, 64, 1, True, "fp32", 2, cell)
    return {"point": dataclasses.asdict(p), "label": p.label, "cell": cell,
            "cpp_infer_x": infer_x, "cpp_train_x": train_x, "auto_infer_x": 1.0,
            "auto_train_x": 1.0, "auto_backend": {"infer": "torch", "train": "torch"}}


@pytest.mark.parametrize("cell", sorted(GATED))
def test_grid_check_finds_a_planted_disagreement_for_the_cell(grid, cell, tmp_path,
                                                             monkeypatch, capsys):
    from fastbirnn.backends import cpu_rule

    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"rows": [_synthetic_row(grid, cell, 0.5, 1.5)]}))
    seen = []

    def rule(call, picks):
        seen.append(call)
        return picks(call)

    # As if the cpp backend had the cell and the rule said: the kernel, always.
    monkeypatch.setattr(grid, "cpp_has_cell", lambda c: True)
    monkeypatch.setattr(cpu_rule, "prefer_cpp", lambda c: rule(c, lambda c: True))
    assert grid.main(["--check", str(path)]) == 1
    printed = capsys.readouterr().out
    assert f"{cell} B8 T128 I64 H64 L1 bi fp32 2t infer: rule picks cpp at 0.50x" in printed
    assert "train" not in printed.split("worst")[0]  # 1.5x in training: the right pick
    if any(f.name == "cell" for f in dataclasses.fields(cpu_rule.CallShape)):
        assert {c.cell for c in seen} == {cell}  # the rule is asked about this cell
    # Kernel for training only: both picks right. nn class for both: training gives up 1.5x.
    monkeypatch.setattr(cpu_rule, "prefer_cpp", lambda c: c.training)
    assert grid.main(["--check", str(path)]) == 0
    monkeypatch.setattr(cpu_rule, "prefer_cpp", lambda c: False)
    assert grid.main(["--check", str(path)]) == 1
    assert f"train: rule picks {GATED[cell]}, cpp would be 1.50x" in capsys.readouterr().out
    # A grid measured before cpp had the cell has no cpp timings: a rule that picks the
    # kernel there is flagged, one that keeps the nn class is not.
    path.write_text(json.dumps({"rows": [_synthetic_row(grid, cell, None, None)]}))
    assert grid.main(["--check", str(path)]) == 0
    monkeypatch.setattr(cpu_rule, "prefer_cpp", lambda c: True)
    assert grid.main(["--check", str(path)]) == 1
    assert "no cpp timing" in capsys.readouterr().out
    # Without the cell in the cpp backend, 'auto' cannot pick it, whatever the rule says.
    monkeypatch.setattr(grid, "cpp_has_cell", lambda c: False)
    assert grid.main(["--check", str(path)]) == 0
    with pytest.raises(SystemExit):
        grid.main(["--check", str(path), "--cell", "rnn"])  # a grid of another cell


def test_gated_grid_covers_its_preset_within_the_time_it_claims(grid):
    for cell in GATED:
        points = grid.preset_points("full", cell, 2, [2], 1e11)
        assert {p.cell for p in points} == {cell} and {p.threads for p in points} == {2}
        assert {p.batch for p in points} >= set(grid.GATED_BATCH)
        assert {p.seq for p in points} >= set(grid.GATED_SEQ)
        assert {p.hidden for p in points} >= set(grid.GATED_HIDDEN)
        assert {p.bidirectional for p in points} == {True, False}
        assert {p.dtype for p in points} == {"fp32", "fp64"} and {p.layers for p in points} == {1, 2}
        assert len(points) == len(set(points))
        # The printed estimate (a model, not a measurement) of the default run on 2 cores.
        assert sum(grid.estimate_point_s(p, 1.0, 3) for p in points) < 15 * 60
        # --max-macs shortens T only, never below the preset's shortest.
        short = grid.preset_points("full", cell, 2, [2], 1e8)
        assert all(p.macs <= 1e8 or p.seq == min(grid.GATED_SEQ) for p in short)
        assert min(p.seq for p in short if p.macs > 1e8) == min(grid.GATED_SEQ)
        assert sum(p.seq for p in short) < sum(p.seq for p in points)
    # The Elman grid is unchanged by the cell field: old grid.json rows load as rnn points.
    old = {"batch": 2, "seq": 4, "input": 16, "hidden": 32, "layers": 1,
           "bidirectional": True, "dtype": "fp32", "threads": 1}
    assert grid.Point(**old).cell == "rnn" and grid.Point(**old).label.startswith("B2")


def test_roofline_script_pieces_run(monkeypatch):
    """benchmarks/roofline.py (committed output in benchmarks/results/targets/): its step
    functions run the kernel, its multiply-add counts are the textbook ones, and the tiny
    breakdown gives positive times. No timing is asserted."""
    pytest.importorskip("fastbirnn._C")
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import roofline

    B, T, I, H = 3, 5, 4, 6
    assert roofline.stack_multiply_adds(B, T, I, H, 1, True, gates=1) == {
        "forward": 2 * T * B * (I * H + H * H),
        "train": 2 * T * B * (I * H + H * H) * 3,
    }
    # An LSTM stack: four gates, the second layer's input both directions' outputs.
    forward = 2 * T * B * 4 * (I * H + H * H) + 2 * T * B * 4 * (2 * H * H + H * H)
    assert roofline.stack_multiply_adds(B, T, I, H, 2, True, gates=4) == {
        "forward": forward, "train": 3 * forward}
    steps = roofline.kernel_steps(B, T, I, H)
    steps["forward"]()
    steps["train"]()
    tiny = roofline.tiny_breakdown(repeats=4)
    assert all(v > 0 for k, v in tiny.items() if k.endswith("_us"))


def test_one_per_process_script_runs_each_contender_in_its_own_process(tmp_path):
    """benchmarks/one_per_process.py at a tiny shape, one round: a process per contender,
    whose steps and fault counts reach the JSON with the machine. No timing is asserted."""
    pytest.importorskip("fastbirnn._C")
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "one_per_process.py")
    out = tmp_path / "opp.json"
    subprocess.run([sys.executable, script, "--rounds", "1", "--warmup", "1", "--steps", "2",
                    "--shape", "lstm,4,6,8,16,2,bi", "--shape", "gru,3,5,8,16,1,uni",
                    "--json", str(out)], check=True, capture_output=True, text=True,
                   timeout=300)
    record = json.loads(out.read_text())
    assert record["machine"]["cpu"] and record["settings"]["contenders"] == ["nn", "cpp", "auto"]
    assert [row["shape"] for row in record["rows"]] == ["lstm,4,6,8,16,2,bi", "gru,3,5,8,16,1,uni"]
    for row in record["rows"]:
        for contender in ("nn", "cpp", "auto"):
            (run,) = row["runs"][contender]
            assert len(run["train_s"]) == len(run["infer_s"]) == 2
            assert run["train_faults_per_step"] >= 0
        assert set(row["ratio_vs_nn"]) == {"cpp", "auto"}


def test_auto_label_names_what_ran_in_each_timed_step(monkeypatch):
    """The forward is timed under no_grad, where 'auto' may pick another backend than for
    the training step: the row says what ran in each (issue 26). A rule that prefers cpp
    only for training makes the two differ at a tiny shape, whatever the real rule says."""
    from fastbirnn import backends as registry

    cpp = registry.get("cpp")
    if cpp.unavailable_reason() is not None:
        pytest.skip(cpp.unavailable_reason())
    training_only = dataclasses.replace(cpp, preferred_for=lambda x, call: call.training)
    monkeypatch.setitem(registry._REGISTRY, "cpp", training_only)
    case = bm.Case(2, 4, 16, 32, cell="lstm")
    model = bm.build_models(case, "cpu", ["auto"])["auto"]
    x, _ = bm.make_inputs(case, "cpu")
    with torch.no_grad():
        fwd = bm.resolved_backend(model, x)
    train = bm.resolved_backend(model, x)
    assert (fwd, train) == ("torch", "cpp")
    row = dict(_row("B2 T4 I16 H32", "auto", []), cell="lstm", resolved_backend=train,
               resolved_backend_fwd=fwd)
    assert "auto->torch/cpp" in bench.table([row])
    rows = bm.run_case(case, "cpu", ["auto"], min_rounds=1, max_rounds=1, budget_s=0.0,
                       memory=False)
    measured = {r["backend"]: r for r in rows}["auto"]
    assert (measured["resolved_backend_fwd"], measured["resolved_backend"]) == (fwd, train)


def _plot_rows(disturbed_batch=None):
    rows = []
    for batch in (1, 8, 32):
        case = bm.Case(batch, 16, 32, 32).as_dict()
        for backend, x in ((bm.BASELINE, 1.0), ("cpp", 2.0 + batch / 32)):
            reasons = ["others 1.30 cores"] if batch == disturbed_batch else []
            rows.append(dict(_row(f"B{batch} T16 I32 H32", backend, reasons), case=case,
                             speedup_fwd=x, speedup_train=x))
    return rows


def test_plot_draws_disturbed_points_hollow_with_a_legend_entry():
    """The points of rows the table flags as disturbed are hollow markers, and the legend
    says what hollow means (issue 26); a clean run has neither."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    def hollow_and_legend(rows):
        fig = bench.figure(rows)
        try:
            found = []
            for ax in fig.axes[::2]:  # the speedup-vs-batch panels (train, then forward)
                filled = [l for l in ax.get_lines() if l.get_label().startswith("cpp")]
                assert len(filled) == 1
                line = filled[0]
                shown = line.get_markevery()
                hollow = [l for l in ax.get_lines() if l.get_gid() == "disturbed"]
                found.append((
                    [line.get_xdata()[i] for i in shown],
                    [(list(l.get_xdata()), l.get_markerfacecolor()) for l in hollow],
                    [t.get_text() for t in ax.get_legend().get_texts()],
                ))
            return found
        finally:
            plt.close(fig)

    for filled, hollow, legend in hollow_and_legend(_plot_rows(disturbed_batch=8)):
        assert filled == [1, 32] and hollow == [([8], "none")]
        assert any("hollow: disturbed" in text for text in legend)
    for filled, hollow, legend in hollow_and_legend(_plot_rows()):
        assert filled == [1, 8, 32] and hollow == []
        assert not any("disturbed" in text for text in legend)
