#!/usr/bin/env bash
# Re-aggregate a committed run on any machine: aggregate -> recipe -> claims -> provenance (a new revision) ->
# stamp, the commands the rules run, without Snakemake (which would plan a model rebuild: weights are never
# committed).
# For GPU rows brought back from a lent machine, or after a change to the aggregate/verdict rules.
#   devtools/reaggregate.sh RUN [RUN ...]
set -euo pipefail
cd "$(dirname "$0")/.."
for run in "$@"; do
  R=results/$run
  [ -f "$R/config.yaml" ] || { echo "reaggregate: $R/config.yaml missing: is $run a run under results/?" >&2; exit 2; }
  mkdir -p "$R/logs" "$R/report"
  shopt -s nullglob
  draws=("$R"/arms/*/draw*/metrics.csv "$R"/validate/*/metrics.csv "$R"/offload/*/*/metrics.csv "$R"/sweep/*/*.csv
         "$R"/shapes/*.csv "$R"/routing_ab/*/metrics.csv "$R"/points/*.csv)
  gates=("$R"/validate/*/gates.json)
  shopt -u nullglob
  python -m moebench.aggregate --config "$R/config.yaml" --inputs "${draws[@]}" --gates "${gates[@]}" \
    --metrics "$R/metrics.csv" --comparison "$R/comparison.csv" --markdown "$R/comparison.md" \
    --verdict "$R/verdict.json" --model-sha "$R/model.sha256" > "$R/logs/aggregate.log"
  python -m moebench.recipe --config "$R/config.yaml" --tier "$R/tier.json" --metrics "$R/metrics.csv" \
    --out "$R/recipe.json" --markdown "$R/recipe.md" --out-html "$R/report/recipe.html" --log "$R/logs/recipe.log"
  python -m moebench.claims --ledger config/claims.yaml --run-dir "$R" --out-json "$R/claims.json" \
    --out-md "$R/claims.md" --out-html "$R/report/claims.html" --out-caption "$R/report/claims.caption.rst" \
    --log "$R/logs/claims.log"
  python -m moebench.provenance --run-dir "$R" --config "$R/config.yaml" --metrics "$R/metrics.csv" \
    --tier "$R/tier.json" --data-sha "$R/data/data.sha256" --model-sha "$R/model.sha256" \
    --comparison "$R/comparison.csv" --verdict "$R/verdict.json" --claims "$R/claims.json" \
    --history audits/.ots-history --out-json "$R/provenance.json" --out-md "$R/PROVENANCE.md" --log "$R/logs/provenance.log"
  python -m moebench.stamp stamp --provenance "$R/provenance.json" --config "$R/config.yaml" \
    --out "$R/provenance_stamp.json" --log "$R/logs/stamp.log" || true  # offline: recorded as unstamped
  echo "reaggregated $run: $(python -c "import json;v=json.load(open('$R/verdict.json'));print(v['verdict'])")"
done
