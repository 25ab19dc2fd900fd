#!/usr/bin/env bash
# Build .gpu-bundle/site.tgz: the Python packages the lent GPU host lacks (unsloth, trl, bitsandbytes, snakemake,
# ots, zeus, torchao for the unsloth_fp8 arm), from the package registry, for the host's Python 3.12 and torch.
# It travels with each `run` call (carry [".gpu-bundle"]); the tree and the bundle together must stay under the
# tool's 64 MiB, so this checks that too. Keep it out of git: .git/info/exclude.
#   devtools/gpu_bundle.sh            # ~2-5 min; then devtools/lent_gpu_queue.sh unpacks it on the GPU host
set -euo pipefail
cd "$(dirname "$0")/.."
wh=../shared/gpu-wheelhouse
[ -f "$wh/build.py" ] || { echo "gpu_bundle: $wh/build.py not found (the shared wheelhouse sits beside the checkout)" >&2; exit 2; }
grep -q 'gpu-bundle' .git/info/exclude 2>/dev/null || echo '.gpu-bundle/' >> .git/info/exclude
# shellcheck disable=SC2046
python3 "$wh/build.py" $(grep -v '^#' "$wh/requirements.txt" | sed 's/#.*//') zeus==0.16.0 torchao==0.17.0
bundle=$(stat -c %s .gpu-bundle/site.tgz)
tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
limit=$((64 * 1024 * 1024))
echo "gpu_bundle: bundle $((bundle / 1048576)) MiB + tracked tree $((tree / 1048576)) MiB of $((limit / 1048576)) MiB"
[ $((bundle + tree)) -lt $limit ] || { echo "gpu_bundle: over the carry limit: drop a package or trim the tree" >&2; exit 1; }
