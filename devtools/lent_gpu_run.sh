#!/usr/bin/env bash
# Run the workflow on a lent GPU host exactly as a user would on a GPU node, within a per-command time limit.
# The first call starts `snakemake` in its own session (so it outlives this command) and waits; later calls
# keep waiting, or start it again (Snakemake resumes) if it is not running. Results come back as a tarball.
#   devtools/lent_gpu_run.sh RUN_NAME WAIT_SECONDS [extra snakemake arguments...]
set -uo pipefail
run=$1; wait_s=$2; shift 2
out=${OUT:-/tmp/out}; mkdir -p "$out"
if [ ! -d /tmp/site ]; then
  mkdir -p /tmp/site && tar xzf .gpu-bundle/site.tgz -C /tmp/site
fi
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
command -v python >/dev/null || ln -sf "$(command -v python3)" /tmp/site/bin/python  # rules call `python`
log=/tmp/snakemake-$run.log
if ! pgrep -f "snakemake.*runs/$run.yaml" >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,power.draw,temperature.gpu --format=csv | tee -a "$log"
  setsid nohup snakemake "$@" --cores 8 --resources gpu=1 --configfile "config/runs/$run.yaml" --rerun-triggers params input code software-env >>"$log" 2>&1 < /dev/null &
  echo "started snakemake for $run (pid $!)"
fi
end=$((SECONDS + wait_s))
while [ $SECONDS -lt $end ] && pgrep -f "snakemake.*runs/$run.yaml" >/dev/null; do sleep 5; done
pgrep -f "snakemake.*runs/$run.yaml" >/dev/null && echo "STILL RUNNING" || echo "SNAKEMAKE FINISHED"
tar czf "$out/results-$run.tgz" --exclude="results/$run/model" --exclude="results/$run/model.partial" \
  "results/$run" .snakemake/log 2>/dev/null
cp "$log" "$out/" 2>/dev/null
grep -E "steps \(|Error|error|Finished job|done" "$log" | tail -30
cat "results/$run/comparison.md" 2>/dev/null
