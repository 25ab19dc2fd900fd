#!/usr/bin/env bash
# Run several workflow invocations back to back on a lent GPU host, as a user would on a GPU node, across
# per-command time limits. The first call starts the queue in its own session (it outlives this command) and
# waits; later calls with the same arguments keep waiting. Each call tars every run's results (no model
# weights, no adapters) into $OUT, so what finished comes back even if the machine goes away.
#   devtools/lent_gpu_queue.sh WAIT_SECONDS "RUN [snakemake args...]" ["RUN ..." ...]
# A step whose RUN starts with "rm:" deletes results/<run>/model instead (the disk holds one full model); one
# that starts with "il:" runs that run through moebench.interleave (the verdict pair's draws A B A B, then the rest);
# its words before a "--" are interleave's own options ("il:RUN --force --draws 3 --").
# The GPU-only tests run beside the queue's first step (nothing is timed then), every sitting: GPU_TESTS="pytest
# args" changes which, GPU_TESTS=none skips them. Their log comes back as gpu-tests.log and inside each run's
# logs/ (gpu-tests-<UTC date>.log), so it is committed beside that sitting's results.
# The queue runs in its own copy of the tree (/tmp/mb): the tool re-copies tracked files into the repo at each
# call, which would overwrite results the queue is still rewriting.
set -uo pipefail
wait_s=$1; shift
out=${OUT:-/tmp/out}; mkdir -p "$out"
if [ ! -d /tmp/site ]; then
  mkdir -p /tmp/site && tar xzf .gpu-bundle/site.tgz -C /tmp/site
fi
# moebench: the queue's copy of this checkout (the bundle has no editable install of it)
export PYTHONPATH=/tmp/mb/scripts:/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export TRITON_CACHE_AUTOTUNING=1  # later processes reuse Triton autotune results (first steps only; timed steps unaffected)
command -v python >/dev/null || ln -sf "$(command -v python3)" /tmp/site/bin/python  # rules call `python`
log=/tmp/moebench-queue.log
if [ ! -e /tmp/moebench-queue.started ]; then
  touch /tmp/moebench-queue.started
  mkdir -p /tmp/mb && cp -a . /tmp/mb/
  nvidia-smi --query-gpu=name,memory.total,driver_version,power.draw,temperature.gpu --format=csv | tee -a "$log"
  (cd /tmp/mb && setsid nohup bash -c '
    for step in "$@"; do
      set -- $step; run=$1; shift
      if [[ $run == rm:* ]]; then rm -rf "results/${run#rm:}/model"; echo "== removed ${run#rm:}/model"; continue; fi
      echo "== $(date -u +%T) start $run $*"
      common=(--cores 8 --resources gpu=1 --rerun-triggers params input code software-env)
      if [[ $run == il:* ]]; then
        run=${run#il:}; il=()
        if [[ " $* " == *" -- "* ]]; then while [ "$1" != "--" ]; do il+=("$1"); shift; done; shift; fi
        python -m moebench.interleave --configfile "config/runs/$run.yaml" --rest run "${il[@]}" -- "$@" "${common[@]}" --keep-going \
          2>&1 | tee /tmp/moebench-step.log
      else
        snakemake "$@" "${common[@]}" --configfile "config/runs/$run.yaml" 2>&1 | tee /tmp/moebench-step.log
      fi
      rc=${PIPESTATUS[0]}
      # a committed result is "up to date" on a fresh copy (no Snakemake metadata): re-measuring needs --forcerun
      grep -q "Nothing to be done" /tmp/moebench-step.log && echo "== WARNING: $run ran nothing (to re-measure committed results add --forcerun RULE to the step)"
      echo "== $(date -u +%T) end $run rc=$rc"
    done
    echo "== QUEUE DONE"' queue "$@" >>"$log" 2>&1 < /dev/null &)
  GPU_TESTS=${GPU_TESTS:-"tests/test_energy.py tests/test_offload.py tests/test_snippets.py -k 'cuda or nvml or gpu'"}
  if [ "$GPU_TESTS" != none ]; then
    # shellcheck disable=SC2086
    (cd /tmp/mb && setsid nohup bash -c "nvidia-smi -L; python -m pytest -p no:cacheprovider -rs $GPU_TESTS" \
      >/tmp/moebench-gpu-tests.log 2>&1 < /dev/null &)
  fi
  echo "started the queue on machine $(cat /proc/sys/kernel/random/boot_id)"
else
  echo "continuing the queue on machine $(cat /proc/sys/kernel/random/boot_id)"
fi
# A lent machine goes back after 30 s idle or 30 min held; the next call then lands on a fresh one and this
# script starts the whole queue again there (model build included): a changed machine id says so.
end=$((SECONDS + wait_s))
while [ $SECONDS -lt $end ] && ! grep -q "== QUEUE DONE" "$log"; do sleep 5; done
grep -q "== QUEUE DONE" "$log" && echo "QUEUE DONE" || echo "STILL RUNNING"
cd /tmp/mb
runs=$(for s in "$@"; do r=${s%% *}; r=${r#il:}; [[ $r == rm:* ]] || echo "results/$r"; done | sort -u)
if [ -e /tmp/moebench-gpu-tests.log ]; then
  for r in $runs; do mkdir -p "$r/logs" && cp /tmp/moebench-gpu-tests.log "$r/logs/gpu-tests-$(date -u -r /tmp/moebench-queue.started +%F).log"; done
fi
# shellcheck disable=SC2086
tar czf "$out/results.tgz" --exclude='*/model' --exclude='*/model.partial' --exclude='*/adapter' \
  --exclude='*-unsloth-bnb4' --exclude='*.routers.safetensors' $(for r in $runs; do [ -d "$r" ] && echo "$r"; done) .snakemake/log 2>/dev/null
cp "$log" "$out/queue.log"
[ -e /tmp/moebench-gpu-tests.log ] && cp /tmp/moebench-gpu-tests.log "$out/gpu-tests.log" && tail -3 /tmp/moebench-gpu-tests.log
grep -E "^== |^\[interleave|steps \(|Error|rror:|quantcheck:|Finished job" "$log" | tail -40
df -h . | tail -1; nvidia-smi --query-gpu=memory.used,power.draw --format=csv,noheader
