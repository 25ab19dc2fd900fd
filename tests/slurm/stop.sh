#!/usr/bin/env bash
# Stop the daemons tests/slurm/start.sh started (by their pid files only; nothing else is touched).
# Logs stay in $MOEBENCH_SLURM_DIR/log for inspection; pass --purge to delete the whole state dir.
set -uo pipefail
STATE=${MOEBENCH_SLURM_DIR:-/tmp/moebench-slurm}
if [ -f "$STATE/slurm.conf" ]; then   # cancel leftover jobs first so slurmd has nothing to wait for
  SLURM_CONF="$STATE/slurm.conf" timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
fi
for d in slurmd slurmctld munged; do
  pidfile="$STATE/run/$d.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$pidfile"
done
# The /etc/slurm/slurm.conf link start.sh made, and only that.
[ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$STATE/slurm.conf" ] && rm -f /etc/slurm/slurm.conf
[ "${1:-}" = --purge ] && rm -rf "$STATE"
exit 0
