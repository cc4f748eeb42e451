#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine, for the Slurm tests (run as root).
# Needs Debian's slurmctld, slurmd, munge and slurm-client. Idempotent: an already running
# cluster is left as it is. Usage: slurm/local-cluster.sh [CPUS] [MEMORY_MB]
set -euo pipefail
cpus=${1:-$(nproc)}
memory=${2:-20000}
host=$(hostname -s)

if scontrol ping 2>/dev/null | grep -q UP && sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"; then
  exit 0
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
DefMemPerCPU=$((memory / cpus))
ReturnToService=2
SchedulerType=sched/backfill
# A requeued job that becomes eligible again (cred_expire below) starts at the next scheduling
# pass, not on an event: every 2 s here rather than Slurm's 60 s (30 s for backfill), so a requeue
# test waits seconds, not up to a minute.
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
# A requeued job may start only once the credential of its previous run has expired (default 120
# s, which is also how long Slurm holds it). Short here, so a requeue test needs no StartTime=now,
# which on a fresh cluster started it too soon ("Job credential revoked").
AuthInfo=cred_expire=10
MpiDefault=none
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${memory} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF

if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
chmod 711 /run/munge
pgrep -x munged >/dev/null || munged --force
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; then
    exit 0
  fi
  scontrol update nodename="${host}" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "the local Slurm cluster did not come up; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
