#!/usr/bin/env bash
# Times the README's quick start as a new user runs it: a fresh clone, a new venv, pip's cache
# as it is. Prints one line per step: wall time, CPU time and the load average at its end (the
# machine may be shared: note the load next to any time you quote). The commands are read
# from README.md itself.
#
#   benchmarks/time_first_contact.sh [both|alone] [REPO]
#     both:  command 1, then command 2 (which reuses the C++ build of command 1)
#     alone: on its own fresh clone, torch as CI installs it (command 1's first step), then
#            command 2: no build to reuse, so it must compile
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

step() {  # step LABEL COMMAND: run COMMAND in the clone; print wall time, CPU time, load
    local label=$1 times real user sys
    # (The redirections sit inside the timed subshell: outside it, bash loses the timing.)
    if ! times=$( { TIMEFORMAT='%R %U %S'; time ( {
        cd "$work/clone" && { [ ! -f .venv/bin/activate ] || . .venv/bin/activate; } &&
        # In a pseudo-terminal, as a user sees it (the build's progress goes to the terminal).
        if command -v script >/dev/null; then script -qec "$2" /dev/null; else eval "$2"; fi
    } >>"$log" 2>&1 </dev/null ); } 2>&1 ); then
        echo "$label: FAILED (see $log)"
        exit 1
    fi
    read -r real user sys <<<"$times"
    # CPU time (user + sys, children included) is what a busy machine does not inflate.
    printf '%-34s %6.1f s wall %6.1f s CPU   load average %s\n' "$label" "$real" \
        "$(echo "$user + $sys" | bc)" "$(cut -d' ' -f1-3 /proc/loadavg)"
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
else
    step "  ${command1%% && *}" "${command1%% && *}"
fi
step "command 2 until pytest starts" "$install2"
step "command 2: python -m pytest" "python -m pytest"
# (Python warnings too: the quick start promises a first screen without any.)
grep -a -E "passed|fastbirnn: (compiling.*done|reusing)|WARNING: [0-9]+ of|[A-Za-z]+Warning:" "$log" |
    sed -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/.*fastbirnn: /fastbirnn: /' | tr -d '\r' || true
