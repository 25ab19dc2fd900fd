#!/usr/bin/env bash
# Start a throwaway single-node Slurm (munged + slurmctld + slurmd) on this machine, for tests/test_slurm.py
# and for trying `snakemake --profile slurm-gpu` without a cluster. No systemd: the daemons run by hand with
# their config, state, logs and pid files under one directory, so tests/slurm/stop.sh can end exactly them.
#
#   eval "$(tests/slurm/start.sh)"      # prints `export SLURM_CONF=...`; client commands then find the cluster
#   tests/slurm/stop.sh                 # stops the daemons started here (by pid file), keeps the logs
#
# Environment: MOEBENCH_SLURM_DIR (state dir, default /tmp/moebench-slurm), MOEBENCH_SLURM_MINJOBAGE (300),
# MOEBENCH_SLURM_SLOTS (CPUs the node declares; default max(cores, 8)).
# Exit 77: Slurm cannot be had here (not root, or apt cannot install it) -> callers skip; other non-zero: broken.
#
# The cluster mimics the clusters that made the profile hang: Debian's Slurm 22.05, AccountingStorageType=none
# (so `sacct` exists but answers nothing), partitions `cpu` (default) and `cpu2`, no GPU gres (a `--gpus=1` request is
# rejected at submission; tests/slurm/profile maps the GPU rules onto plain CPU slots instead).
set -euo pipefail

STATE=${MOEBENCH_SLURM_DIR:-/tmp/moebench-slurm}
MINJOBAGE=${MOEBENCH_SLURM_MINJOBAGE:-300}
log() { echo "[slurm-start] $*" >&2; }

if [ "$(id -u)" != 0 ]; then log "not root: cannot start slurmd/munged"; exit 77; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  command -v apt-get >/dev/null || { log "no apt-get to install Slurm"; exit 77; }
  log "installing slurmctld slurmd munge slurm-client (apt)"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd munge slurm-client; } >&2
  then log "apt-get could not install Slurm"; exit 77; fi
fi

# Already up (e.g. a second test in the same session)? Reuse it.
if [ -f "$STATE/slurm.conf" ] && [ -L /etc/slurm/slurm.conf ] \
   && SLURM_CONF="$STATE/slurm.conf" timeout 10 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)$'
then log "reusing running cluster in $STATE"; echo "export SLURM_CONF=$STATE/slurm.conf"; exit 0; fi

mkdir -p "$STATE"/{ctld,spool,log,run}
rm -rf "$STATE"/ctld/* "$STATE"/spool/*        # a fresh cluster: job ids start at 1 again
for f in "$STATE"/log/slurm*.log; do [ -f "$f" ] && mv "$f" "$f.prev"; done
HOST=$(hostname -s)
# slurmd -C reports what slurmd will detect; declaring more than that makes the node INVAL unless slurmd is told
# to take the config's word for it (SlurmdParameters=config_overrides, set below for the CPU count only).
read -r CPUS MEM < <(slurmd -C | awk '{for(i=1;i<=NF;i++){split($i,a,"=");
  if(a[1]=="CPUs")c=a[2]; if(a[1]=="RealMemory")m=a[2]}} END{print c, m}')
MEM=$(( MEM * 9 / 10 ))   # leave headroom so the node never drains for "Low RealMemory"
# Job slots: at least 8, more than the cores (config_overrides below lets slurmd accept that). The test's jobs
# mostly wait (Snakemake's start, the plugin's polling), and on a 2-core machine two slots would queue the
# workflows and short probe jobs of tests/test_slurm.py one behind another.
SLOTS=${MOEBENCH_SLURM_SLOTS:-$(( CPUS > 8 ? CPUS : 8 ))}

# munged on a private socket (AuthInfo below), key from the package (/etc/munge/munge.key).
if [ ! -S "$STATE/run/munge.sock" ] || ! munge -n -S "$STATE/run/munge.sock" >/dev/null 2>&1; then
  [ -f /etc/munge/munge.key ] || { log "no /etc/munge/munge.key"; exit 1; }
  chown munge:munge "$STATE/run" "$STATE/log"
  runuser -u munge -- munged --socket="$STATE/run/munge.sock" --pid-file="$STATE/run/munged.pid" \
    --log-file="$STATE/log/munged.log" --seed-file="$STATE/run/munged.seed" >&2
fi

cat > "$STATE/slurm.conf" <<CONF
# Written by tests/slurm/start.sh: a single-node test cluster without accounting.
ClusterName=moebench-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$STATE/run/munge.sock
CredType=cred/munge
SlurmctldPort=${MOEBENCH_SLURMCTLD_PORT:-6817}
SlurmdPort=${MOEBENCH_SLURMD_PORT:-6818}
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers: track processes by parent pid, no task confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# The case under test: no slurmdbd, so sacct has nothing to say.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue this long; the plugin polls at most every 180 s.
MinJobAge=$MINJOBAGE
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$SLOTS RealMemory=$MEM State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
# A second partition on the same node, to check that per-tier partitions (config cluster.tiers) are honoured.
PartitionName=cpu2 Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$STATE/slurm.conf"
# Inside a job, snakemake-executor-plugin-slurm-jobstep starts the rule with `srun` after dropping every
# SLURM_* variable, SLURM_CONF included, so srun only finds the cluster through the standard path (as on real
# compute nodes). Link it there, unless someone else's config is already in place.
if [ -L /etc/slurm/slurm.conf ] && [ ! -e /etc/slurm/slurm.conf ]; then
  rm -f /etc/slurm/slurm.conf   # dangling link left by an earlier test cluster whose state dir is gone
fi
if [ -e /etc/slurm/slurm.conf ]; then
  if [ "$(readlink /etc/slurm/slurm.conf || true)" != "$SLURM_CONF" ]; then
    log "/etc/slurm/slurm.conf belongs to another Slurm setup; not touching it"; exit 77
  fi
else
  mkdir -p /etc/slurm && ln -s "$SLURM_CONF" /etc/slurm/slurm.conf
fi

slurmctld -f "$SLURM_CONF" -c >&2     # -c: start with no saved job state
slurmd -f "$SLURM_CONF" >&2

for _ in $(seq 60); do   # until the node is schedulable
  if timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed)$'; then
    log "up: $(sinfo -h -o '%P %D %T %c cpus %m MB')"
    echo "export SLURM_CONF=$SLURM_CONF"; exit 0
  fi
  sleep 1
done
log "node never became idle; last log lines:"
tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
exit 1
