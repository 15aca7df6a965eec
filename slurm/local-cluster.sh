#!/usr/bin/env bash
# A real single-node Slurm (munged + slurmctld + slurmd) for tests and laptops, no systemd, no cgroups.
#
#   slurm/local-cluster.sh start DIR     # start it; everything (config, state, logs, PIDs) lives under DIR
#   slurm/local-cluster.sh status DIR    # daemons alive? node state
#   slurm/local-cluster.sh stop DIR      # cancel its jobs, stop the daemons this script started (and only those)
#
# Then point the Slurm commands at it:   export SLURM_CONF=DIR/etc/slurm.conf   (start prints this)
#
# Needs root (slurmd starts job steps as the submitting user). Installs Debian's slurmctld, slurmd,
# slurm-client and munge when they are missing. Environment knobs:
#   LOCAL_SLURM_CPUS  CPUs the node advertises (default: max(nproc, 8); more than the real cores is fine)
#   LOCAL_SLURM_PORT  slurmctld port (default 6817; slurmd uses PORT+1)
# Requeues are fast (a few seconds): cred_expire=5 and sched_interval=1 (Slurm's defaults take ~2 minutes).
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
cmd=$1
DIR=$(mkdir -p "$2" && cd "$2" && pwd)
CONF=$DIR/etc/slurm.conf
PIDS=$DIR/run/pids
export SLURM_CONF=$CONF
SBIN=/usr/sbin

alive() { kill -0 "$1" 2>/dev/null; }

install_packages() {
    command -v sbatch >/dev/null && [[ -x $SBIN/slurmctld && -x $SBIN/slurmd && -x $SBIN/munged ]] && return
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: Slurm is not installed; as root: apt-get install -y slurmctld slurmd slurm-client munge" >&2
        exit 1
    fi
    echo "installing slurmctld slurmd slurm-client munge ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    local host cpus mem port
    host=$(hostname -s)
    cpus=${LOCAL_SLURM_CPUS:-$(( $(nproc) > 8 ? $(nproc) : 8 ))}
    mem=$($SBIN/slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')  # must not exceed what slurmd sees
    port=${LOCAL_SLURM_PORT:-6817}
    mkdir -p "$DIR"/{etc,run,log,state,spool,munge}
    chmod 700 "$DIR/munge"
    cat >"$CONF" <<EOF
# written by slurm/local-cluster.sh: one node, no accounting, no cgroups
ClusterName=duoflow-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=15
MinJobAge=600
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    [[ -s $DIR/munge/munge.key ]] || $SBIN/mungekey --create --keyfile="$DIR/munge/munge.key"
    chmod 600 "$DIR/munge/munge.key"
}

spawn() {  # spawn NAME CMD...: run a daemon in the foreground as a background process, record its PID
    local name=$1; shift
    nohup "$@" >>"$DIR/log/$name.out" 2>&1 </dev/null &
    echo "$name $!" >>"$PIDS"
}

start() {
    if [[ -s $PIDS ]] && status_quiet; then
        echo "already running: export SLURM_CONF=$CONF"; return
    fi
    [[ $(id -u) -eq 0 ]] || { echo "error: the local cluster needs root (slurmd runs jobs as their user)" >&2; exit 1; }
    install_packages
    write_config
    : >"$PIDS"
    mkdir -p /run/munge
    spawn munged $SBIN/munged --foreground --force --key-file="$DIR/munge/munge.key" \
        --socket="$DIR/munge/munge.socket.2" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
    for _ in $(seq 50); do [[ -S $DIR/munge/munge.socket.2 ]] && break; sleep 0.1; done
    spawn slurmctld $SBIN/slurmctld -D -i -f "$CONF"   # -i: ignore old state (job ids restart at 1)
    spawn slurmd $SBIN/slurmd -D -f "$CONF"
    local state=""
    for _ in $(seq 300); do
        state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
        [[ $state == idle ]] && break
        sleep 0.1
    done
    if [[ $state != idle ]]; then
        echo "error: the node did not come up (state '${state}'); logs in $DIR/log" >&2
        tail -n 5 "$DIR"/log/*.log >&2 || true
        stop; exit 1
    fi
    echo "local Slurm up (node idle). Use it with:"
    echo "  export SLURM_CONF=$CONF"
}

stop() {
    [[ -f $PIDS ]] || { echo "nothing started in $DIR"; return; }
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then  # end the jobs through Slurm first: its job steps outlive the daemons
        echo "cancelling jobs:" $jobs
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 300); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.1; done
    fi
    local name pid
    tac "$PIDS" | while read -r name pid; do   # slurmd, slurmctld, then munged
        alive "$pid" && kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
        alive "$pid" && kill -9 "$pid" 2>/dev/null || true
        echo "stopped $name ($pid)"
    done
    rm -f "$PIDS"
}

status_quiet() {
    local name pid ok=0
    while read -r name pid; do alive "$pid" || ok=1; done <"$PIDS"
    return $ok
}

status() {
    [[ -f $PIDS ]] || { echo "not started in $DIR"; return 1; }
    local name pid
    while read -r name pid; do
        if alive "$pid"; then echo "$name $pid running"; else echo "$name $pid DEAD"; fi
    done <"$PIDS"
    sinfo -N -o "%N %T %c" 2>/dev/null || true
    squeue 2>/dev/null || true
    echo "export SLURM_CONF=$CONF"
    status_quiet
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
