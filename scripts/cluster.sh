#!/usr/bin/env bash
# A private two-node Slurm test cluster on this one machine, for DoPQ's Slurm
# backend (issue #16): munged, slurmctld, two slurmd ("dopq-n1", "dopq-n2",
# gres gpu:2 each, backed by fake device files, no real GPU needed) and
# Debian's docker-registry on 127.0.0.1. Everything it writes lives under one
# folder (DOPQ_CLUSTER_DIR, default /var/lib/dopq-cluster); nothing in /etc.
# All daemons listen on loopback only.
#
#   bash scripts/cluster.sh up      install what is missing, start, smoke-test;
#                                   the last line of stdout is the DoPQ config
#   bash scripts/cluster.sh down    stop what "up" started (by its PID files)
#   bash scripts/cluster.sh status  what runs
#   bash scripts/cluster.sh env     export lines for a shell (SLURM_CONF, DOPQ_CONFIG)
#   bash scripts/cluster.sh node-stop dopq-n2 / node-start dopq-n2
#                                   stop / start one node's slurmd (node failure)
#
# Ports (loopback): DOPQ_CLUSTER_CTLD_PORT (16817), the nodes take the next
# two, DOPQ_CLUSTER_REGISTRY_PORT (15000).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${DOPQ_CLUSTER_DIR:-/var/lib/dopq-cluster}
CTLD_PORT=${DOPQ_CLUSTER_CTLD_PORT:-16817}
REG_PORT=${DOPQ_CLUSTER_REGISTRY_PORT:-15000}
NODES=(dopq-n1 dopq-n2)
GPUS_PER_NODE=2
# Declared, not detected (SlurmdParameters=config_overrides) and not enforced
# by Slurm (no cgroups; the container's own limits apply): sized so that two
# jobs with DoPQ's default limits (2 CPUs, 20g) fit on a node, one per GPU.
NODE_CPUS=4
NODE_MEM_MB=65536
PKGS=(slurmctld slurmd slurm-client munge docker-registry)

CONF=$DIR/etc/slurm.conf
RUN=$DIR/run
LOG=$DIR/log
TOML=$DIR/dopq.toml
MUNGE_SOCKET=$RUN/munge/munge.socket.2
BIN_DIR=/usr/bin

say() { echo "cluster: $*" >&2; }
# node_port NODE: the nodes listen on the ports after slurmctld's.
node_port() {
    local i
    for i in "${!NODES[@]}"; do
        [ "${NODES[$i]}" = "$1" ] && { echo $((CTLD_PORT + 1 + i)); return 0; }
    done
    return 1
}
die() { echo "cluster: $*" >&2; exit 1; }

# -- processes we started: PID files under $RUN, checked against the binary --
# alive NAME BINARY: the PID in $RUN/NAME.pid runs BINARY, a path (Debian's
# are links through /etc/alternatives); guards against a reused PID.
alive() {
    local pidfile=$RUN/$1.pid pid exe
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    [ "${exe% (deleted)}" = "$(readlink -f "$2")" ]
}

# launch NAME COMMAND...: run in the background, in its own session, with its
# output in $LOG/NAME.out (this run's), and remember its PID. Returns once
# the PID runs COMMAND (not still setsid), so alive and stop can trust it.
launch() {
    local name=$1 pid
    shift
    setsid "$@" </dev/null >"$LOG/$name.out" 2>&1 &
    pid=$!
    echo "$pid" >"$RUN/$name.pid"
    for _ in $(seq 1 100); do
        alive "$name" "$1" && return 0
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.05
    done
}

# stop NAME:BINARY...: SIGTERM each recorded PID at once, SIGKILL what still
# runs after 15 s. Only PIDs from our own PID files, checked by alive.
stop() {
    local spec name pids=() names=() pid i
    for spec in "$@"; do
        name=${spec%%:*}
        if alive "$name" "${spec#*:}"; then
            pid=$(cat "$RUN/$name.pid")
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("$name")
        fi
        rm -f "$RUN/$name.pid"
    done
    for i in "${!pids[@]}"; do
        for _ in $(seq 1 150); do
            kill -0 "${pids[$i]}" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "${pids[$i]}" 2>/dev/null; then
            say "${names[$i]} (${pids[$i]}) ignored SIGTERM, killing"
            kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
        say "stopped ${names[$i]} (${pids[$i]})"
    done
}

# -- installation -------------------------------------------------------------
install_missing() {
    local missing=() p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]}"
    # Debian's packages would start their own daemons with /etc's config:
    # a policy-rc.d that refuses keeps them stopped (only when none exists).
    local policy=/usr/sbin/policy-rc.d ours=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        ours=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local rc=0
    { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; } || rc=$?
    [ "$ours" = 1 ] && rm -f "$policy"
    [ "$rc" = 0 ] || die "apt-get install ${missing[*]} failed"
}

# -- configuration ------------------------------------------------------------
# replace FILE: FILE.tmp becomes FILE unless they are the same (a second "up"
# leaves the files of running daemons untouched).
replace() {
    if cmp -s "$1.tmp" "$1"; then
        rm -f "$1.tmp"
    else
        mv "$1.tmp" "$1"
        CHANGED+=("$1")
    fi
}

write_config() {
    mkdir -p "$DIR"/{etc,dev,shared,registry,dopq-state,spool/ctld} "$LOG" "$RUN/munge"
    chmod 755 "$DIR/etc"
    chmod 700 "$RUN/munge"
    chmod 755 "$DIR" "$DIR/shared"
    if [ ! -s "$DIR/etc/munge.key" ]; then
        (umask 077 && dd if=/dev/urandom of="$DIR/etc/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 400 "$DIR/etc/munge.key"

    local host n i port gres_lines="" node_lines=""
    host=$(hostname -s)
    for i in "${!NODES[@]}"; do
        n=${NODES[$i]}
        port=$(node_port "$n")
        mkdir -p "$DIR/spool/$n"
        # Stand-ins for /dev/nvidia*: Slurm wants character devices, so each
        # fake GPU is a copy of /dev/null (1,3); nothing ever opens them.
        for g in $(seq 0 $((GPUS_PER_NODE - 1))); do
            [ -c "$DIR/dev/$n-gpu$g" ] || { rm -f "$DIR/dev/$n-gpu$g"; mknod -m 600 "$DIR/dev/$n-gpu$g" c 1 3; }
        done
        node_lines+="NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB Gres=gpu:$GPUS_PER_NODE State=UNKNOWN"$'\n'
        gres_lines+="NodeName=$n Name=gpu File=$DIR/dev/$n-gpu[0-$((GPUS_PER_NODE - 1))]"$'\n'
    done
    local nodelist
    nodelist=$(IFS=,; echo "${NODES[*]}")

    cat >"$CONF.tmp" <<EOF
# Written by scripts/cluster.sh: DoPQ's private test cluster. Loopback only.
ClusterName=dopq
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd-%n.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# Nothing that needs cgroups, so it runs in a VM or container.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MessageTimeout=5
SlurmdTimeout=10
SlurmctldTimeout=15
InactiveLimit=0
KillWait=30
MinJobAge=300
ReturnToService=2
TreeWidth=4
$node_lines
PartitionName=dopq Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP
EOF
    replace "$CONF"
    printf '# Written by scripts/cluster.sh: the fake GPUs of the test nodes.\n%s' "$gres_lines" \
        >"$DIR/etc/gres.conf.tmp"
    replace "$DIR/etc/gres.conf"

    cat >"$DIR/etc/registry.yml.tmp" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $DIR/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$REG_PORT
EOF
    replace "$DIR/etc/registry.yml"

    cat >"$TOML.tmp" <<EOF
# DoPQ on the test cluster of scripts/cluster.sh (issue #16).
state_dir = "$DIR/dopq-state"

[runtime]
backend = "slurm"

[slurm]
conf = "$CONF"
bin_dir = "$BIN_DIR"
partition = "dopq"
extra_args = []
shared_dir = "$DIR/shared"
poll_interval = 1.0
node_docker = "docker"
requeue_on_node_failure = false

[registry]
url = "127.0.0.1:$REG_PORT"

[gpus]
backend = "virtual"
virtual_count = $(( ${#NODES[@]} * GPUS_PER_NODE ))

[server]
host = "127.0.0.1"
port = 0

[nameserver]
host = "127.0.0.1"
port = 9090
embedded = "auto"
EOF
    replace "$TOML"
}

# -- readiness probes ---------------------------------------------------------
slurm() { SLURM_CONF=$CONF "$BIN_DIR/$1" "${@:2}"; }
munge_ok() { [ -S "$MUNGE_SOCKET" ] && munge -S "$MUNGE_SOCKET" -n </dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }
ctld_ok() { slurm scontrol ping 2>/dev/null | grep -q 'is UP'; }
registry_ok() { python3 - "$REG_PORT" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/", timeout=2).read()
EOF
}
# port_free PORT: nothing listens on 127.0.0.1:PORT (else a probe could be
# answered by someone else's daemon).
port_free() { python3 -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null; }
need_port() { port_free "$1" || die "127.0.0.1:$1 is in use (for $2); choose other ports (see the top of $0)"; }
node_state() { slurm sinfo -h -n "$1" -o '%T' 2>/dev/null | head -1; }
nodes_idle() {
    local n
    for n in "${NODES[@]}"; do
        node_ok "$n" || return 1
    done
}
# wait_for SECONDS WHAT PROBE...: poll PROBE every 0.2 s.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@"; do
        [ $SECONDS -lt $end ] || die "$what did not come up within ${secs}s (logs: $LOG)"
        sleep 0.2
    done
}
# wait_up NAME SECONDS PROBE...: as wait_for, but gives up at once
# when the daemon NAME has exited, showing the end of its output.
wait_up() {
    local name=$1 secs=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@"; do
        if ! kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
            tail -n 5 "$LOG/$name.out" >&2 || true
            die "$name exited (logs: $LOG)"
        fi
        [ $SECONDS -lt $end ] || die "$name did not come up within ${secs}s (logs: $LOG)"
        sleep 0.2
    done
}

# -- daemons --------------------------------------------------------------------
start_munge() {
    alive munged /usr/sbin/munged && munge_ok && return 0
    stop munged:/usr/sbin/munged
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    say "starting munged"
    launch munged /usr/sbin/munged --foreground --force \
        --socket="$MUNGE_SOCKET" --key-file="$DIR/etc/munge.key" \
        --pid-file="$RUN/munged.daemon.pid" --log-file="$LOG/munged.log" \
        --seed-file="$RUN/munge/munged.seed"
    wait_up munged 20 munge_ok
    STARTED=1
}

start_ctld() {
    alive slurmctld /usr/sbin/slurmctld && ctld_ok && return 0
    stop slurmctld:/usr/sbin/slurmctld
    need_port "$CTLD_PORT" slurmctld
    say "starting slurmctld"
    # -i: ignore state it cannot recover (a changed config); state survives "down".
    SLURM_CONF=$CONF launch slurmctld /usr/sbin/slurmctld -D -i -f "$CONF"
    wait_up slurmctld 30 ctld_ok
    STARTED=1
}

node_ok() {
    case "$(node_state "$1")" in idle|mixed|allocated|completing) return 0 ;; esac
    return 1
}

start_node() {
    alive "slurmd-$1" /usr/sbin/slurmd && return 0
    stop "slurmd-$1:/usr/sbin/slurmd"
    need_port "$(node_port "$1")" "slurmd $1"
    say "starting slurmd $1"
    SLURM_CONF=$CONF launch "slurmd-$1" /usr/sbin/slurmd -D -N "$1" -f "$CONF"
    STARTED=1
}

start_nodes() {
    local n
    for n in "${NODES[@]}"; do
        start_node "$n"
    done
    wait_for 60 "nodes ${NODES[*]}" nodes_idle
}

start_registry() {
    alive registry /usr/bin/docker-registry && registry_ok && return 0
    stop registry:/usr/bin/docker-registry
    need_port "$REG_PORT" docker-registry
    say "starting docker-registry on 127.0.0.1:$REG_PORT"
    launch registry /usr/bin/docker-registry serve "$DIR/etc/registry.yml"
    wait_up registry 20 registry_ok
    STARTED=1
}

# -- smoke test ---------------------------------------------------------------
smoke() {
    local n jid state out img=127.0.0.1:$REG_PORT/dopq-smoke:latest
    bash "$HERE/engine.sh" >&2
    bash "$HERE/base-image.sh" >&2
    docker tag dopq/busybox:latest "$img"
    docker push -q "$img" >/dev/null || die "smoke: docker push $img failed"
    docker rmi "$img" >/dev/null
    mkdir -p "$DIR/shared/smoke"
    for n in "${NODES[@]}"; do
        out=$DIR/shared/smoke/$n.out
        rm -f "$out"
        jid=$(slurm sbatch --parsable --nodelist="$n" --gres=gpu:1 --time=2 \
            --job-name=dopq-smoke --output="$out" --chdir="$DIR/shared/smoke" \
            --wrap "echo node=\$SLURMD_NODENAME gpus=\${SLURM_JOB_GPUS:-} cuda=\${CUDA_VISIBLE_DEVICES:-}; docker pull -q $img >/dev/null && docker run --rm --network none $img true && docker rmi $img >/dev/null && echo docker=ok")
        jid=${jid%%;*}
        for _ in $(seq 1 300); do
            state=$(slurm scontrol show job "$jid" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
            case "$state" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break ;; esac
            sleep 0.2
        done
        [ "$state" = COMPLETED ] || die "smoke: job $jid on $n ended $state: $(cat "$out" 2>/dev/null)"
        grep -q 'docker=ok' "$out" || die "smoke: job $jid on $n: no docker: $(cat "$out")"
        grep -Eq 'gpus=[0-9]|cuda=[0-9]' "$out" || die "smoke: job $jid on $n saw no GPU: $(cat "$out")"
        say "smoke $n: $(head -1 "$out")"
    done
}

# -- commands -----------------------------------------------------------------
cmd_up() {
    [ "$(id -u)" = 0 ] || die "up needs root"
    install_missing
    STARTED=0
    CHANGED=()
    write_config
    start_munge
    if alive slurmctld /usr/sbin/slurmctld && [[ " ${CHANGED[*]} " == *" $CONF "* ]]; then
        # Node changes need a new slurmctld; running jobs survive that.
        say "slurm.conf changed: scontrol reconfigure"
        if ! slurm scontrol reconfigure; then
            say "restarting slurmctld for the new slurm.conf"
            stop slurmctld:/usr/sbin/slurmctld
        fi
        STARTED=1
    fi
    start_ctld
    start_nodes
    start_registry
    if [ "$STARTED" = 1 ] || [ ! -e "$RUN/smoke.ok" ]; then
        rm -f "$RUN/smoke.ok"
        smoke
        : >"$RUN/smoke.ok"
    fi
    echo "$TOML"
}

cmd_down() {
    local n ids
    if alive slurmctld /usr/sbin/slurmctld && ctld_ok; then
        # Jobs of this private cluster: cancel them so no slurmstepd outlives it.
        ids=$(slurm squeue -h -o '%A' 2>/dev/null || true)
        if [ -n "$ids" ]; then
            say "cancelling jobs $(echo $ids)"
            # shellcheck disable=SC2086
            slurm scancel $ids 2>/dev/null || true
            for _ in $(seq 1 200); do
                [ -z "$(slurm squeue -h -o '%A' 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    local specs=()
    for n in "${NODES[@]}"; do
        specs+=("slurmd-$n:/usr/sbin/slurmd")
    done
    stop "${specs[@]}"
    stop slurmctld:/usr/sbin/slurmctld registry:/usr/bin/docker-registry
    stop munged:/usr/sbin/munged
    rm -f "$RUN/smoke.ok"
}

cmd_status() {
    local name bin rc=0 n specs=(munged:/usr/sbin/munged slurmctld:/usr/sbin/slurmctld)
    for n in "${NODES[@]}"; do
        specs+=("slurmd-$n:/usr/sbin/slurmd")
    done
    for spec in "${specs[@]}" registry:/usr/bin/docker-registry; do
        name=${spec%%:*}
        bin=${spec#*:}
        if alive "$name" "$bin"; then
            echo "$name: running (pid $(cat "$RUN/$name.pid"))"
        else
            echo "$name: stopped"
            rc=1
        fi
    done
    if ctld_ok; then
        slurm sinfo -N -o '%N %T %c %m %G'
    fi
    echo "config: $TOML"
    return $rc
}

# node-stop NAME: stop that node's slurmd only, as if the node died: slurmctld
# marks it down after SlurmdTimeout; its job steps keep running on this machine.
cmd_node_stop() {
    known_node "$1"
    stop "slurmd-$1:/usr/sbin/slurmd"
}

cmd_node_start() {
    known_node "$1"
    STARTED=0
    start_node "$1"
    wait_for 60 "node $1" node_ok "$1"
}

known_node() {
    local n
    for n in "${NODES[@]}"; do
        [ "$n" = "$1" ] && return 0
    done
    die "no node '$1' (nodes: ${NODES[*]})"
}

cmd_env() {
    echo "export SLURM_CONF=$CONF"
    echo "export DOPQ_CONFIG=$TOML"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    node-stop) cmd_node_stop "${2:-}" ;;
    node-start) cmd_node_start "${2:-}" ;;
    *) echo "usage: $0 up|down|status|env|node-stop NODE|node-start NODE" >&2; exit 2 ;;
esac
