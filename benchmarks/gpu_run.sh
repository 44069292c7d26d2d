#!/usr/bin/env bash
# One prepared GPU run, for the device tool: install, CUDA tests, benchmarks, profile -> $OUT.
#
#   GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_run.sh      # (on the GPU machine)
#
# Written for the GPU machine as it is (python3 with torch, triton, pytest, matplotlib there;
# no package registry): nothing is downloaded. Every stage has its own time limit, a stage
# that fails or times out is recorded and the next one still runs, and the whole run stays
# under TOTAL_S seconds (default 540, under the tool's 10-minute limit; each stage limit is
# clipped to the time left, so the stages need not sum to it).
#
# Files in $OUT (at most 8: the device tool brings back 8):
#   summary.txt            GPU, driver, versions, commit, each stage's verdict, the bench table
#   gpu_run.log            every stage's full output
#   junit.xml              the CUDA test run (pytest --junitxml)
#   bench.json, bench.png  python -m fastbirnn.bench --preset gpu (times, ratios, machine info)
#   profile_summary.txt    kernel launches per call and time per kernel, FastBiRNN vs nn.RNN
#   profile_traces.tar.gz  the Chrome traces of one training step of each contender
#   paths.json             the Triton paths vs cuDNN (profile_gpu.py --paths): multi-CTA
#                          persistent and step mode, single-CTA streamed/on-chip; bidirectional
#                          T=256, H 512/1024, B 1/32, tf32 and bf16: ms, per-step us, ratios;
#                          and under "gated" the LSTM/GRU cells vs cuDNN nn.LSTM/nn.GRU
#                          (profile_gpu.py --gated; stage 'gated', after its CUDA parity tests,
#                          whose results the summary lists)
#
# Knobs (environment): OUT, PYTHON (python3), GIT_COMMIT, STAGES ("info install tests paths
# gated bench profile"; add "ncu" for an Nsight Compute report of the Triton kernels, a 9th
# file), BENCH_PRESET (gpu), BENCH_ARGS, TESTS (tests), PYTEST_ARGS, PATHS_ARGS, GATED_ARGS,
# TOTAL_S, T_INSTALL, T_TESTS, T_PATHS, T_GATED_TESTS, T_GATED, T_BENCH, T_PROFILE, T_NCU
# (seconds), NCU (path of ncu).
set -u
set -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
OUT=${OUT:-/tmp/fastbirnn-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG=$OUT/gpu_run.log
SUMMARY=$OUT/summary.txt
STAGES=${STAGES:-"info install tests paths gated bench profile"}
BENCH_PRESET=${BENCH_PRESET:-gpu}
BENCH_ARGS=${BENCH_ARGS:-}
TESTS=${TESTS:-tests}
PYTEST_ARGS=${PYTEST_ARGS:-}
PATHS_ARGS=${PATHS_ARGS:-}
GATED_ARGS=${GATED_ARGS:-}
TOTAL_S=${TOTAL_S:-540}
T_INSTALL=${T_INSTALL:-150}
T_TESTS=${T_TESTS:-180}
T_PATHS=${T_PATHS:-130}
# Small on purpose (the whole run has ~10 minutes): the parity tests compile ~30 kernel
# variants; the timings stop starting new shapes 20 s before their limit.
T_GATED_TESTS=${T_GATED_TESTS:-90}
T_GATED=${T_GATED:-75}
T_BENCH=${T_BENCH:-200}
T_PROFILE=${T_PROFILE:-60}
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
VERDICTS=()
: >"$LOG"

log() { echo "$*" | tee -a "$LOG"; }
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

# run_stage NAME LIMIT_S CMD...: run CMD with its output in the log, under min(LIMIT, time
# left). SIGINT first (pytest and the bench CLI then write what they have), SIGKILL 20 s later.
run_stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    if ((left < 20)); then
        VERDICTS+=("$name: SKIPPED (${left}s left of TOTAL_S=${TOTAL_S})")
        log "=== [$name] skipped: no time left"
        return 0
    fi
    ((limit > left)) && limit=$left
    log "=== [$name] $(date +%T), limit ${limit}s: $*"
    local t0 rc dt verdict
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
    VERDICTS+=("$name: $verdict, ${dt}s")
    log "=== [$name] $verdict in ${dt}s"
    return 0
}

stage_info() {
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $GIT_COMMIT"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
    "$PY" - <<'EOF'
import platform, torch
print("python:", platform.python_version(), "| torch:", torch.__version__,
      "| CUDA:", torch.version.cuda, "| cuDNN:", torch.backends.cudnn.version())
try:
    import triton
    print("triton:", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("device: torch sees NO CUDA device")
print("cpu threads:", torch.get_num_threads())
EOF
}

# ---------------------------------------------------------------------------------- stages
INFO=$(mktemp)
if has_stage info; then
    stage_info >"$INFO" 2>&1
    cat "$INFO" >>"$LOG"
fi

if has_stage install; then
    # Builds the C++ CPU extension against the torch already there; no downloads.
    run_stage install "$T_INSTALL" "$PY" -m pip install --no-build-isolation --no-deps \
        --no-index -e "$REPO"
fi
run_stage backends 60 "$PY" -c "import fastbirnn; print('backends:', fastbirnn.available_backends())"

if has_stage tests; then
    timeout_plugin=()
    "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_plugin=(--timeout=120)
    # shellcheck disable=SC2086
    # The ahead-of-time compile check (tests/test_triton_aot.py) is a CPU-side check that CI
    # runs; it is left out here to keep the stage's time for the CUDA tests.
    # The LSTM/GRU triton tests run in stage 'gated' (their AOT check is CPU-side too).
    run_stage tests "$T_TESTS" "$PY" -m pytest $TESTS -q --maxfail=10 -rfEs --durations=15 \
        --ignore=tests/test_triton_aot.py --ignore=tests/test_triton_gated_aot.py \
        --ignore=tests/test_triton_gated.py \
        -p no:cacheprovider ${timeout_plugin[@]+"${timeout_plugin[@]}"} --junitxml="$OUT/junit.xml" $PYTEST_ARGS
fi

if has_stage paths; then
    # Multi-CTA (persistent, step) vs single-CTA vs cuDNN; new shapes stop 30 s before the
    # limit and paths.json is rewritten after every shape, so a timeout keeps what was measured.
    # shellcheck disable=SC2086
    run_stage paths "$T_PATHS" "$PY" "$REPO/benchmarks/profile_gpu.py" --paths \
        --paths-budget $((T_PATHS - 30)) --out "$OUT" $PATHS_ARGS
fi

GATED_JUNIT=$(mktemp --suffix=.xml)
if has_stage gated; then
    # CUDA parity of the triton LSTM/GRU (exact fp32, TF32, bf16/fp16) against cuDNN, then
    # their speed vs cuDNN nn.LSTM/nn.GRU (bidirectional, T=256, B 1/8/32, H 128/256/512,
    # tf32 then bf16), added to paths.json as "gated" (no 9th file).
    run_stage gated-tests "$T_GATED_TESTS" "$PY" -m pytest tests/test_triton_gated.py -q \
        -rfEs -p no:cacheprovider --junitxml="$GATED_JUNIT"
    # shellcheck disable=SC2086
    run_stage gated "$T_GATED" "$PY" "$REPO/benchmarks/profile_gpu.py" --gated \
        --paths-budget $((T_GATED - 20)) --case-budget 0.4 --out "$OUT" $GATED_ARGS
fi

if has_stage bench; then
    # shellcheck disable=SC2086
    run_stage bench "$T_BENCH" "$PY" -m fastbirnn.bench --preset "$BENCH_PRESET" \
        --out "$OUT" $BENCH_ARGS
    if [[ -f "$OUT/bench.json" && ! -f "$OUT/bench.png" ]]; then
        # Interrupted before the end: table and plot of the cases that were measured.
        run_stage bench-replot 60 "$PY" -m fastbirnn.bench --replot "$OUT/bench.json" \
            --out "$OUT"
    fi
fi

if has_stage profile; then
    run_stage profile "$T_PROFILE" "$PY" "$REPO/benchmarks/profile_gpu.py" --out "$OUT" --bundle
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
        VERDICTS+=("ncu: SKIPPED (no ncu on PATH or under /opt/nvidia/nsight-compute)")
    fi
fi

# --------------------------------------------------------------------------------- summary
{
    echo "fastbirnn GPU run ($(($(date +%s) - START))s of TOTAL_S=${TOTAL_S})"
    cat "$INFO"
    echo
    echo "stages:"
    for v in ${VERDICTS[@]+"${VERDICTS[@]}"}; do echo "  $v"; done
    for junit in "$OUT/junit.xml" "$GATED_JUNIT"; do
        [[ -s "$junit" ]] || continue
        echo
        [[ "$junit" == "$GATED_JUNIT" ]] && echo "gated (LSTM/GRU) CUDA parity, tests/test_triton_gated.py:"
        "$PY" - "$junit" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print("tests: {tests} run, {failures} failed, {errors} errors, {skipped} skipped".format(**n))
for s in suites:
    for case in s.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                print(f"  {tag.upper()}: {case.get('classname')}::{case.get('name')}: "
                      f"{(el.get('message') or '')[:200]}")
EOF
    done
    if [[ -f "$OUT/bench.json" ]]; then
        echo
        timeout 60 "$PY" -m fastbirnn.bench --replot "$OUT/bench.json" -q 2>&1
    fi
    if [[ -f "$OUT/paths.json" ]]; then
        echo
        echo "triton paths vs cuDNN (train step; full data in paths.json):"
        "$PY" - "$OUT/paths.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
for c in report.get("cases", []):
    if "paths" not in c:
        print(f"  {c.get('shape')} {c.get('dtype', '')}: {c.get('failed') or c.get('skipped')}")
        continue
    parts = [f"cuDNN {c['cudnn_ms']['train']:.2f} ms"]
    for name, p in c["paths"].items():
        parts.append(f"{name.replace('triton ', '')} {p['train_ms']:.2f} ms "
                     f"{p['train_speedup_vs_cudnn']:.2f}x ({p['ran'].get('mode') or '-'})")
    print(f"  {c['shape']} {c['dtype']}: " + "; ".join(parts))
gated = report.get("gated", {}).get("cases", [])
if gated:
    print("triton LSTM/GRU vs cuDNN (bidirectional; ms, speedup = cuDNN / triton):")
for c in gated:
    head = f"  {c['cell']} B{c['batch']} T{c['seq']} H{c['hidden']} {c['dtype']}"
    if "failed" in c or "skipped" in c:
        print(f"{head}: {c.get('failed') or c.get('skipped')}")
        continue
    print(f"{head} ({c['path']}): train {c['triton_train_ms']:.2f} vs {c['cudnn_train_ms']:.2f} "
          f"({c['train_speedup_vs_cudnn']:.2f}x), forward {c['triton_forward_ms']:.2f} vs "
          f"{c['cudnn_forward_ms']:.2f} ({c['forward_speedup_vs_cudnn']:.2f}x), "
          f"err {c['max_abs_err_vs_cudnn']:.1e}")
EOF
    fi
    if [[ -f "$OUT/profile_summary.txt" ]]; then
        echo
        echo "profile (launches per call; full list in profile_summary.txt):"
        grep -E "^==|vs nn.RNN|kernels per call|\(runs" "$OUT/profile_summary.txt"
    fi
} >"$SUMMARY" 2>&1
rm -f "$INFO" "$GATED_JUNIT"
cat "$SUMMARY"
exit 0
