#!/usr/bin/env bash
# The one script a GPU session runs: install, CUDA parity, Triton paths vs cuDNN, profile -> $OUT.
#
#   GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_run.sh      # (on the GPU machine)
#   DRY_RUN=1 OUT=/tmp/dry bash benchmarks/gpu_run.sh                 # (anywhere: CPU, tiny)
#
# Written for the GPU machine as it is (python3 with torch, triton, pytest, matplotlib there;
# no package registry): nothing is downloaded. Stage by stage, each with its own time limit
# (clipped to what is left of TOTAL_S, default 450: under 8 minutes with the summary); a stage
# that fails or times out is recorded and the next one still runs, and every stage leaves its
# JSON behind as it goes, so a run cut off anywhere still brings back what it measured:
#
#   info       GPU, driver, versions, commit                        -> run.json (rewritten
#                                                                      after every stage)
#   install    pip install --no-build-isolation --no-deps --no-index -e . (the C++ extension)
#   backends   fastbirnn.available_backends()
#   tests      CUDA parity of every cell (RNN, LSTM, GRU) on 'triton' (every path, both
#              multi-CTA launch modes) and 'auto', against cuDNN      -> run.json (counts,
#                                                                      failures)
#   paths      Elman: multi-CTA persistent vs step mode vs single-CTA vs cuDNN nn.RNN
#              (profile_gpu.py --paths; rewritten after every shape) -> paths.json
#   profile    torch.profiler: launches and time per kernel          -> profile_summary.txt,
#                                                                      profile_traces.tar.gz
#   gated      LSTM/GRU: triton vs cuDNN nn.LSTM/nn.GRU              -> paths.json "gated"
#   bench      the batch x hidden grid vs cuDNN (fills 'auto''s CUDA crossover; gets the time
#              that is left, SIGINT writes what it has)               -> bench.json, bench.png
#   ncu        (only if named in STAGES) Nsight Compute of the Triton kernels -> ncu_triton.ncu-rep
#              (a 9th file: the device tool brings back 8, so leave out another stage's)
#
# Files in $OUT (8): summary.txt, gpu_run.log (every stage's output), run.json, paths.json,
# profile_summary.txt, profile_traces.tar.gz, bench.json, bench.png. Every JSON carries the
# device, the torch/triton/CUDA versions and the commit.
#
# DRY_RUN=1: the same stages on the CPU under the Triton interpreter (TRITON_INTERPRET=1) with
# tiny shapes and a few tests, so that everything but the GPU is exercised before a GPU run
# (tests/test_gpu_run.py runs it); 'install' is checked with pip's --dry-run.
#
# Knobs (environment): OUT, PYTHON (python3), GIT_COMMIT, STAGES, TESTS, TESTS_K (pytest -k),
# PYTEST_ARGS, PATHS_ARGS, GATED_ARGS, PROFILE_ARGS, BENCH_PRESET (gpu), BENCH_ARGS, TOTAL_S,
# T_INSTALL, T_TESTS, T_PATHS, T_PROFILE, T_GATED, T_BENCH, T_NCU (seconds), NCU (path of ncu).
set -u
set -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
OUT=${OUT:-/tmp/fastbirnn-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG=$OUT/gpu_run.log
SUMMARY=$OUT/summary.txt
RUN_JSON=$OUT/run.json
DRY_RUN=${DRY_RUN:-0}

if [[ "$DRY_RUN" == 1 ]]; then
    export TRITON_INTERPRET=1  # the kernels on CPU tensors
    DEVICE=cpu
    STAGES=${STAGES:-"info install tests paths profile gated bench"}
    TESTS=${TESTS:-"tests/test_triton.py tests/test_triton_gated.py tests/test_triton_launch.py"}
    # One test per cell and the cooperative launch, instead of every CUDA parity test.
    TESTS_K=${TESTS_K:-"test_seam_matches_reference and 1-tanh-onchip or test_parity_onchip and lstm-B3T5H20L1 or test_coresident_grid"}
    PATHS_ARGS=${PATHS_ARGS:-"--shape 1,2,8,16:fp32 --case-budget 0 --rounds 1 --warmup 0"}
    PROFILE_ARGS=${PROFILE_ARGS:-"--shape 2,2,8,16:fp32 --iters 1 --backends triton"}
    GATED_ARGS=${GATED_ARGS:-"--gated-shape 1,2,16 --gated-dtype fp32 --case-budget 0 --rounds 1 --warmup 0"}
    BENCH_ARGS=${BENCH_ARGS:-"--shape 2,2,8,16 --backends auto --min-rounds 1 --max-rounds 1 --budget 0 --no-memory -q"}
    BENCH_PRESET=${BENCH_PRESET:-tiny}
    TOTAL_S=${TOTAL_S:-120}
else
    DEVICE=auto
    STAGES=${STAGES:-"info install tests paths profile gated bench"}
    TESTS=${TESTS:-"tests/test_triton.py tests/test_triton_gated.py tests/test_triton_launch.py"}
    TESTS_K=${TESTS_K:-}
    PATHS_ARGS=${PATHS_ARGS:-}
    PROFILE_ARGS=${PROFILE_ARGS:-}
    GATED_ARGS=${GATED_ARGS:-}
    BENCH_ARGS=${BENCH_ARGS:-}
    BENCH_PRESET=${BENCH_PRESET:-gpu}
    TOTAL_S=${TOTAL_S:-450}
fi
T_INSTALL=${T_INSTALL:-120}
T_TESTS=${T_TESTS:-150}
T_PATHS=${T_PATHS:-90}
T_PROFILE=${T_PROFILE:-45}
T_GATED=${T_GATED:-60}
T_BENCH=${T_BENCH:-150}
T_NCU=${T_NCU:-90}

export PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
# Import the package from this tree even if the editable install fails.
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if [[ -z "${GIT_COMMIT:-}" ]]; then
    GIT_COMMIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
fi
export FASTBIRNN_GIT_COMMIT=$GIT_COMMIT

START=$(date +%s)
DEADLINE=$((START + TOTAL_S))
STAGE_RECORDS=$(mktemp)  # one JSON object a line: name, verdict, seconds[, tests]
: >"$LOG"
trap 'rm -f "$STAGE_RECORDS"' EXIT

log() { echo "$*" | tee -a "$LOG"; }
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

# write_run_json: run.json from the machine info and every stage recorded so far.
write_run_json() {
    "$PY" - "$RUN_JSON" "$STAGE_RECORDS" "$START" "$DRY_RUN" <<'EOF' >>"$LOG" 2>&1
import json, os, sys, time
path, records, start, dry = sys.argv[1:5]
report = json.load(open(path)) if os.path.exists(path) else {}
report["dry_run"] = dry == "1"
report["elapsed_s"] = round(time.time() - int(start))
report["stages"] = [json.loads(line) for line in open(records) if line.strip()]
with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=1)
os.replace(path + ".tmp", path)
EOF
}

# junit_counts FILE: the test counts and failures of a pytest --junitxml file, as JSON.
junit_counts() {
    "$PY" - "$1" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as error:
    print(json.dumps({"error": str(error)}))
    sys.exit()
suites = [root] if root.tag == "testsuite" else list(root)
counts = {k: sum(int(s.get(k, 0)) for s in suites)
          for k in ("tests", "failures", "errors", "skipped")}
counts["failed"] = [f"{case.get('classname')}::{case.get('name')}: "
                    f"{(case.find(tag).get('message') or '')[:300]}"
                    for s in suites for case in s.iter("testcase")
                    for tag in ("failure", "error") if case.find(tag) is not None]
print(json.dumps(counts))
EOF
}

# run_stage NAME LIMIT_S CMD...: run CMD with its output in the log, under min(LIMIT, time
# left). SIGINT first (pytest and the bench CLI then write what they have), SIGKILL 20 s later.
# A stage's JUNIT (set by the caller) adds its test counts to the record.
run_stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    if ((left < 20)); then
        log "=== [$name] skipped: no time left"
        echo "{\"name\": \"$name\", \"verdict\": \"SKIPPED (${left}s left of TOTAL_S=$TOTAL_S)\"}" \
            >>"$STAGE_RECORDS"
        write_run_json
        return 0
    fi
    ((limit > left)) && limit=$left
    log "=== [$name] $(date +%T), limit ${limit}s: $*"
    local t0 rc dt verdict tests=null
    t0=$(date +%s)
    timeout -s INT -k 20 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    dt=$(($(date +%s) - t0))
    if ((rc == 0)); then
        verdict="ok"
    elif ((rc == 124 || rc == 137)) || ((dt >= limit)); then
        verdict="TIMEOUT after ${limit}s (rc=$rc)"
    else
        verdict="FAILED (rc=$rc)"
    fi
    [[ -n "${JUNIT:-}" ]] && tests=$(junit_counts "$JUNIT")
    echo "{\"name\": \"$name\", \"verdict\": \"$verdict\", \"seconds\": $dt, \"tests\": $tests}" \
        >>"$STAGE_RECORDS"
    write_run_json
    log "=== [$name] $verdict in ${dt}s"
    return 0
}

# ---------------------------------------------------------------------------------- stages
if has_stage info; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv,noheader >>"$LOG" 2>&1
    # The machine, once: run.json's head.
    "$PY" - "$RUN_JSON" "$GIT_COMMIT" <<'EOF' >>"$LOG" 2>&1
import json, platform, subprocess, sys, time
import torch
info = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": sys.argv[2],
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "cpu_threads": torch.get_num_threads()}
try:
    import triton
    info["triton"] = triton.__version__
except Exception as error:  # noqa: BLE001
    info["triton"] = f"not importable: {error}"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30))
else:
    info["device"] = "cpu (torch sees no CUDA device)"
try:
    info["driver"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    info["driver"] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print("\n".join(f"{k}: {v}" for k, v in info.items()))
EOF
    write_run_json
fi

if has_stage install; then
    # Builds the C++ CPU extension against the torch already there; no downloads. The dry run
    # asks pip what it would do (its metadata step), without building.
    dry=()
    [[ "$DRY_RUN" == 1 ]] && dry=(--dry-run)
    run_stage install "$T_INSTALL" "$PY" -m pip install --no-build-isolation --no-deps \
        --no-index ${dry[@]+"${dry[@]}"} -e "$REPO"
fi
run_stage backends 60 "$PY" -c "import fastbirnn; print('backends:', fastbirnn.available_backends())"

if has_stage tests; then
    timeout_plugin=()
    "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_plugin=(--timeout=120)
    JUNIT=$(mktemp --suffix=.xml)
    # shellcheck disable=SC2086
    run_stage tests "$T_TESTS" "$PY" -m pytest $TESTS -q --maxfail=10 -rfEs --durations=10 \
        -p no:cacheprovider ${timeout_plugin[@]+"${timeout_plugin[@]}"} --junitxml="$JUNIT" \
        ${TESTS_K:+-k "$TESTS_K"} ${PYTEST_ARGS:-}
    rm -f "$JUNIT"
    JUNIT=
fi

if has_stage paths; then
    # New shapes stop 30 s before the limit; paths.json is rewritten after every shape.
    # shellcheck disable=SC2086
    run_stage paths "$T_PATHS" "$PY" "$REPO/benchmarks/profile_gpu.py" --paths --device "$DEVICE" \
        --paths-budget $((T_PATHS - 30)) --out "$OUT" $PATHS_ARGS
fi

if has_stage profile; then
    # shellcheck disable=SC2086
    run_stage profile "$T_PROFILE" "$PY" "$REPO/benchmarks/profile_gpu.py" --device "$DEVICE" \
        --out "$OUT" --bundle $PROFILE_ARGS
fi

if has_stage gated; then
    # shellcheck disable=SC2086
    run_stage gated "$T_GATED" "$PY" "$REPO/benchmarks/profile_gpu.py" --gated --device "$DEVICE" \
        --paths-budget $((T_GATED - 20)) --case-budget 0.4 --out "$OUT" $GATED_ARGS
fi

if has_stage bench; then
    # shellcheck disable=SC2086
    run_stage bench "$T_BENCH" "$PY" -m fastbirnn.bench --preset "$BENCH_PRESET" \
        --device "$DEVICE" --out "$OUT" $BENCH_ARGS
    if [[ -f "$OUT/bench.json" && ! -f "$OUT/bench.png" ]]; then
        # Interrupted before the end: table and plot of the cases that were measured.
        run_stage bench-replot 60 "$PY" -m fastbirnn.bench --replot "$OUT/bench.json" \
            --out "$OUT"
    fi
fi

if has_stage ncu; then
    NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)}
    if [[ -n "$NCU" ]]; then
        run_stage ncu "$T_NCU" "$NCU" --target-processes all \
            --kernel-name "regex:(forward|backward)_(onchip|streamed|multicta)_kernel" \
            --launch-skip 4 --launch-count 4 --set full --clock-control none \
            -f -o "$OUT/ncu_triton" \
            "$PY" "$REPO/benchmarks/profile_gpu.py" --shape 8,256,512,512:tf32 \
            --backends triton --iters 1
    else
        echo '{"name": "ncu", "verdict": "SKIPPED (no ncu on PATH or under /opt/nvidia/nsight-compute)"}' \
            >>"$STAGE_RECORDS"
        write_run_json
    fi
fi

# --------------------------------------------------------------------------------- summary
"$PY" - "$OUT" <<'EOF' >"$SUMMARY" 2>&1
import json, os, sys
out = sys.argv[1]


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


run = load("run.json") or {}
print(f"fastbirnn GPU run{' (DRY RUN: CPU, interpreter, tiny shapes)' if run.get('dry_run') else ''}"
      f" in {run.get('elapsed_s')} s")
for key in ("date", "commit", "device", "capability", "sms", "driver", "python", "torch",
            "cuda", "cudnn", "triton"):
    if key in run:
        print(f"  {key}: {run[key]}")
print("\nstages:")
for stage in run.get("stages", []):
    line = f"  {stage['name']}: {stage['verdict']}"
    if "seconds" in stage:
        line += f", {stage['seconds']} s"
    tests = stage.get("tests")
    if tests:
        line += (f"; tests: {tests.get('tests')} run, {tests.get('failures')} failed, "
                 f"{tests.get('errors')} errors, {tests.get('skipped')} skipped")
        for failed in tests.get("failed", [])[:20]:
            line += f"\n    FAILED {failed}"
    print(line)

paths = load("paths.json") or {}
if paths.get("cases"):
    print("\ntriton paths vs cuDNN nn.RNN (train step; speedup = cuDNN / path; paths.json):")
for c in paths.get("cases", []):
    if "paths" not in c:
        print(f"  {c.get('shape')} {c.get('dtype', '')}: {c.get('failed') or c.get('skipped')}")
        continue
    parts = [f"cuDNN {c['cudnn_ms']['train']:.2f} ms"]
    for name, p in c["paths"].items():
        parts.append(f"{name.replace('triton ', '')} {p['train_ms']:.2f} ms "
                     f"{p['train_speedup_vs_cudnn']:.2f}x ({p['ran'].get('mode') or '-'})")
    for name, why in c.get("skipped", {}).items():
        parts.append(f"{name.replace('triton ', '')}: not run ({why[:80]})")
    print(f"  {c['shape']} {c['dtype']}: " + "; ".join(parts))
gated = paths.get("gated", {}).get("cases", [])
if gated:
    print("\ntriton LSTM/GRU vs cuDNN (bidirectional; speedup = cuDNN / triton):")
for c in gated:
    head = f"  {c['cell']} B{c['batch']} T{c['seq']} H{c['hidden']} {c['dtype']}"
    if "failed" in c or "skipped" in c:
        print(f"{head}: {c.get('failed') or c.get('skipped')}")
        continue
    print(f"{head} ({c['path']}): train {c['triton_train_ms']:.2f} vs {c['cudnn_train_ms']:.2f}"
          f" ms ({c['train_speedup_vs_cudnn']:.2f}x), forward "
          f"{c['forward_speedup_vs_cudnn']:.2f}x, err {c['max_abs_err_vs_cudnn']:.1e}")

try:
    with open(os.path.join(out, "profile_summary.txt")) as f:
        lines = [x.rstrip() for x in f if x.startswith("==") or "vs nn.RNN" in x
                 or "kernels per call" in x or "(runs" in x]
    print("\nprofile (launches per call; full list in profile_summary.txt):")
    print("\n".join(lines))
except OSError:
    pass
EOF
if [[ -f "$OUT/bench.json" ]]; then
    {
        echo
        timeout 60 "$PY" -m fastbirnn.bench --replot "$OUT/bench.json" -q 2>&1
    } >>"$SUMMARY"
fi
cat "$SUMMARY"
exit 0
