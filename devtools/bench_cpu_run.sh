#!/usr/bin/env bash
# Times what issue 3 promises, as a new user would see it: the README's main command on a fresh clone (CPU tier),
# then the no-op rerun. Reuses a venv when given one (VENV=path) so the figure is the workflow, not pip.
#   devtools/bench_cpu_run.sh [clone-dir]
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-/tmp/moebench-bench}
rm -rf "$dir" && git clone -q "$src" "$dir" && cd "$dir"
[ -n "${VENV:-}" ] && ln -s "$VENV" .venv && touch .venv/.installed
t0=$(date +%s.%N); make run CORES=2 >run.log 2>&1; t1=$(date +%s.%N)
make run CORES=2 >rerun.log 2>&1; t2=$(date +%s.%N)
grep -q "Nothing to be done" rerun.log && noop=yes || noop=NO
printf 'first run: %.1f s\nno-op rerun: %.1f s (nothing to be done: %s)\ncores: %s\n' \
  "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t1" | bc)" "$noop" "$(nproc)"
