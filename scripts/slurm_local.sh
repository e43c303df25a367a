#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for launching tests and for trying `neo launch`
# (root only; Debian/Ubuntu). Installs slurm-wlm and munge if missing, writes a minimal
# slurm.conf (this host, all its CPUs, one partition `debug`), starts munged, slurmctld and
# slurmd, and waits until the node is idle. Safe to run again: it restarts the daemons.
#   sudo bash scripts/slurm_local.sh        # then: sinfo; neo launch train launcher=slurm ...
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "scripts/slurm_local.sh: run as root (it installs and starts daemons)" >&2; exit 1; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
fi
host=$(hostname -s)
cpus=$(nproc)
conf=/etc/slurm/slurm.conf
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge
cat > "$conf" <<CONF
ClusterName=neolocal
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# A requeued job may start again once its credential expired (default 120 s): 10 s here.
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
pkill -x slurmd 2>/dev/null || true; pkill -x slurmctld 2>/dev/null || true; pkill -x munged 2>/dev/null || true
sleep 0.5
if id munge >/dev/null 2>&1; then su -s /bin/sh munge -c munged; else munged --force; fi
slurmctld -i  # -i: ignore state a previous run left behind
slurmd
for _ in $(seq 50); do
    if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
        echo "SLURM is up: node $host ($cpus CPUs), partition debug"
        exit 0
    fi
    sleep 0.2
done
echo "scripts/slurm_local.sh: the node did not become idle; sinfo says:" >&2
sinfo >&2 || true
exit 1
