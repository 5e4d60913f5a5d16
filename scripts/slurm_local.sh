#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying `--submit` and for the tests.
#
#   bash scripts/slurm_local.sh install        # Debian's slurm-wlm and munge (root, apt)
#   bash scripts/slurm_local.sh start DIR      # munged, slurmctld, slurmd; config and logs in DIR
#   export SLURM_CONF=DIR/slurm.conf           # then sbatch/squeue/fairchem-equiformers --submit
#   bash scripts/slurm_local.sh stop DIR       # stops every daemon started by `start DIR`
#
# No GPUs and no cgroups (proctrack/linuxproc, task/none): the node is this machine's CPUs and
# memory as `slurmd -C` reports them, in one partition named `local`.
set -euo pipefail

command=${1:?usage: slurm_local.sh install|start DIR|stop DIR}

case "$command" in
install)
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    ;;
start)
    dir=$(realpath -m "${2:?start needs a directory}")
    mkdir -p "$dir/state" "$dir/spool"
    # munged runs as the munge user, which may not reach into DIR: its files live in /tmp
    munge_dir=$(mktemp -d /tmp/slurm-local-munge.XXXXXX)
    echo "$munge_dir" >"$dir/munge.dir"
    host=$(hostname -s)
    # CPUs, sockets, cores and memory exactly as slurmd sees them; keep 2 GB for the system
    node=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ UpTime=.*//')
    memory=$(echo "$node" | sed -E 's/.*RealMemory=([0-9]+).*/\1/')
    node=$(echo "$node" | sed -E "s/RealMemory=[0-9]+/RealMemory=$((memory > 4000 ? memory - 2000 : memory))/")
    cat >"$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$((6817 + RANDOM % 1000 * 2))
SlurmdPort=$((7818 + RANDOM % 1000 * 2))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
AuthType=auth/munge
AuthInfo=socket=$munge_dir/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SchedulerParameters=nohold_on_prolog_fail
MinJobAge=3600
NodeName=$host $node State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    chown munge:munge "$munge_dir"
    chmod 755 "$munge_dir"
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    runuser -u munge -- munged --socket="$munge_dir/munge.socket" \
        --pid-file="$munge_dir/munged.pid" --log-file="$munge_dir/munged.log" \
        --seed-file="$munge_dir/munged.seed"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF" -i
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 60); do
        if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            echo "SLURM is up: export SLURM_CONF=$SLURM_CONF"
            exit 0
        fi
        sleep 1
    done
    echo "SLURM did not come up; logs in $dir" >&2
    sinfo >&2 || true
    tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    exit 1
    ;;
stop)
    dir=$(realpath -m "${2:?stop needs a directory}")
    munge_dir=$(cat "$dir/munge.dir" 2>/dev/null || echo /nonexistent)
    # cancel what still runs, so no job step outlives its slurmd
    export SLURM_CONF=$dir/slurm.conf
    if [ -s "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        scancel --full --partition=local 2>/dev/null || true
        for _ in $(seq 30); do
            [ -z "$(squeue -h -t running,completing 2>/dev/null)" ] && break
            sleep 1
        done
    fi
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$munge_dir/munged.pid"; do
        if [ -s "$pidfile" ]; then
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$munge_dir"
    ;;
*)
    echo "unknown command $command; use install, start DIR or stop DIR" >&2
    exit 2
    ;;
esac
