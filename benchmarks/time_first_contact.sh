#!/usr/bin/env bash
# Times the README's quick start as a new user runs it: a fresh clone, a new venv, pip's cache
# as it is. Prints one line per step with the load average at its end (the machine may be
# shared: note it next to any time you quote). The commands are read from README.md itself.
#
#   benchmarks/time_first_contact.sh [both|alone] [REPO]
#     both:  command 1, then command 2 (which reuses the C++ build of command 1)
#     alone: command 2 only, on its own fresh clone (it must do all of its own setup)
set -euo pipefail
mode=${1:-both}
repo=$(cd "${2:-$(dirname "$0")/..}" && pwd)
work=$(mktemp -d /tmp/first-contact.XXXXXX)
log=$work/log.txt

readme=$repo/README.md
setup=$(grep -m1 '^python3 -m venv' "$readme")
command1=$(grep -m1 '^pip install torch' "$readme")
command2=$(grep -m1 '^pip install --no-build-isolation -e ".\[test' "$readme")
install2=${command2% && python -m pytest}
[ "$install2" != "$command2" ] || { echo "command 2 does not end in && python -m pytest" >&2; exit 1; }

step() {  # step LABEL COMMAND: run COMMAND in the clone, print its wall time and load
    local label=$1 start end
    start=$(date +%s.%N)
    (cd "$work/clone" && { [ ! -f .venv/bin/activate ] || . .venv/bin/activate; } && eval "$2") \
        >>"$log" 2>&1
    end=$(date +%s.%N)
    printf '%-34s %6.1f s   load average %s\n' "$label" "$(echo "$end - $start" | bc)" \
        "$(cut -d' ' -f1-3 /proc/loadavg)"
}

echo "$(date -u +%FT%TZ)  $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
echo "commit $(git -C "$repo" rev-parse --short HEAD), mode $mode, log $log"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
git clone -q "$repo" "$work/clone"
step "setup (venv, pip upgrade)" "$setup"
if [ "$mode" = both ]; then
    start1=$(date +%s.%N)
    while IFS= read -r part; do  # each part of command 1 on its own, in order
        step "  ${part:0:32}" "$part"
    done <<<"${command1// && /$'\n'}"
    printf '%-34s %6.1f s\n' "command 1 in all" "$(echo "$(date +%s.%N) - $start1" | bc)"
fi
step "command 2 until pytest starts" "$install2"
step "command 2: python -m pytest" "python -m pytest"
grep -a -E "passed|fastbirnn: (compiling.*done|reusing)|WARNING: [0-9]+ of" "$log" | tr -d '\r' || true
