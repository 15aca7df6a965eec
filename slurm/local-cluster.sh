#!/usr/bin/env bash
# A real Slurm (munged + slurmctld + slurmd) on one machine for tests and laptops, no systemd, no cgroups.
# One node by default; LOCAL_SLURM_NODES=2 gives two nodes, each slurmd in a network namespace of its own
# (own address on a bridge, own hostname, names resolved by a hosts file of its own), so a multi-node job
# talks over a network between distinct hosts as on a real cluster.
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
#   LOCAL_SLURM_NODES number of nodes (default 1). Above 1: needs `ip` and `unshare`; node<i> has address
#                     10.A.B.<i> on a bridge whose host side is 10.A.B.254 (A.B from the port). Each
#                     slurmd runs in namespace df<port>-<i>; `stop` deletes the namespaces and the bridge.
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
NODES=${LOCAL_SLURM_NODES:-1}
PORT=${LOCAL_SLURM_PORT:-6817}
TAG=df$PORT                                   # prefix of the namespaces and links of a multi-node cluster
NET=10.$(( PORT / 256 % 256 )).$(( PORT % 256 ))   # its /24

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
    local host cpus mem port addr nodes slurmd_files
    host=$(hostname -s)
    cpus=${LOCAL_SLURM_CPUS:-$(( $(nproc) > 8 ? $(nproc) : 8 ))}
    mem=$($SBIN/slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')  # must not exceed what slurmd sees
    port=$PORT
    addr=127.0.0.1
    nodes="NodeName=$host NodeAddr=127.0.0.1"
    slurmd_files="SlurmdSpoolDir=$DIR/spool
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log"
    if (( NODES > 1 )); then   # node1..N at $NET.1..N; slurmctld on the bridge's host side
        addr=$NET.254
        nodes="NodeName=node[1-$NODES] NodeAddr=$NET.[1-$NODES]"
        slurmd_files="SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log"
    fi
    mkdir -p "$DIR"/{etc,run,log,state,spool,munge}
    chmod 700 "$DIR/munge"
    cat >"$CONF" <<EOF
# written by slurm/local-cluster.sh: $NODES node(s), no accounting, no cgroups
ClusterName=duoflow-local
SlurmctldHost=$host($addr)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
$slurmd_files
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
$nodes CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
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

net_up() {  # a bridge on the host side, and per node a namespace joined to it by a veth pair
    local i
    net_down
    echo "$TAG $NODES" >"$DIR/run/net"
    ip link add "${TAG}br" type bridge
    ip addr add "$NET.254/24" dev "${TAG}br"
    ip link set "${TAG}br" up
    { echo "127.0.0.1 localhost"; echo "$NET.254 $(hostname -s)"
      for i in $(seq "$NODES"); do echo "$NET.$i node$i"; done; } >"$DIR/etc/hosts"
    for i in $(seq "$NODES"); do
        ip netns add "$TAG-$i"
        ip link add "${TAG}h$i" type veth peer name "${TAG}n$i"
        ip link set "${TAG}h$i" master "${TAG}br" up
        ip link set "${TAG}n$i" netns "$TAG-$i"
        ip -n "$TAG-$i" addr add "$NET.$i/24" dev "${TAG}n$i"
        ip -n "$TAG-$i" link set "${TAG}n$i" up
        ip -n "$TAG-$i" link set lo up
    done
}

net_down() {  # what net_up made (recorded in run/net), also after a crash
    [[ -f $DIR/run/net ]] || return 0
    local tag nodes i
    read -r tag nodes <"$DIR/run/net"
    for i in $(seq "$nodes"); do ip netns del "$tag-$i" 2>/dev/null || true; done  # deletes the veth pairs too
    ip link del "${tag}br" 2>/dev/null || true
    rm -f "$DIR/run/net"
}

spawn_nodes() {
    if (( NODES == 1 )); then
        spawn slurmd $SBIN/slurmd -D -f "$CONF"
        return
    fi
    command -v ip >/dev/null && command -v nsenter >/dev/null && command -v unshare >/dev/null \
        || { echo "error: LOCAL_SLURM_NODES>1 needs ip (iproute2), nsenter and unshare (util-linux)" >&2; exit 1; }
    net_up
    local i
    for i in $(seq "$NODES"); do  # own network, hostname and /etc/hosts; jobs started by this slurmd inherit them
        spawn "slurmd-node$i" nsenter --net="/run/netns/$TAG-$i" unshare --mount --uts sh -c \
            "mount --bind '$DIR/etc/hosts' /etc/hosts && hostname node$i && exec $SBIN/slurmd -D -N node$i -f '$CONF'"
    done
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
    spawn_nodes
    local state=""
    for _ in $(seq 300); do
        state=$(sinfo -h -N -o %T 2>/dev/null | sort | uniq -c | xargs || true)
        [[ $state == "$NODES idle" ]] && break
        sleep 0.1
    done
    if [[ $state != "$NODES idle" ]]; then
        echo "error: the nodes did not come up (states '${state}'); logs in $DIR/log" >&2
        tail -n 5 "$DIR"/log/*.log >&2 || true
        stop; exit 1
    fi
    echo "local Slurm up ($NODES node(s) idle). Use it with:"
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
    net_down
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
