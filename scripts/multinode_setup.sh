#!/usr/bin/env bash
# Real multi-node plumbing on ONE machine, for tests/test_launch.py (and for trying the launchers by hand):
# an sshd for DeepSpeed's pdsh launcher and a two-node Slurm cluster (slurmctld + two slurmd + munge).
# Everything it starts lives in a directory of its own (configs, keys, logs, pid files) and is stopped by `stop`;
# it never touches ~/.ssh, /etc/ssh, /etc/slurm, /etc/munge or the system's daemons.
#
#   scripts/multinode_setup.sh install                       apt-get the Debian packages (root; idempotent, quiet)
#   scripts/multinode_setup.sh check [ssh|slurm]             exit 0 if usable, else print why not (exit 1)
#   scripts/multinode_setup.sh sshd-start DIR PORT           sshd on 127.0.0.1:PORT, root login with a key made here
#   scripts/multinode_setup.sh slurm-start DIR CTLD_PORT PORT1 PORT2
#                                                            munged, slurmctld, slurmd for node1 and node2
#   scripts/multinode_setup.sh stop DIR                      stop everything started under DIR
#
# sshd-start leaves DIR/bin/ssh: /usr/bin/ssh with DIR/ssh_config (the key made here, no host key checking).
# Put DIR/bin first on PATH for the ssh clients (DeepSpeed's ssh check, pdsh -R ssh) that should use it.
#
# slurm-start leaves DIR/slurm.conf (export SLURM_CONF=DIR/slurm.conf for sbatch/srun/squeue). The two nodes are
# two slurmd daemons on this machine (`slurmd -N node1`, `slurmd -N node2`: Slurm's multiple-slurmd mode, one
# NodeName per daemon, NodeAddr=127.0.0.1 with a port each). Each slurmd runs in a mount namespace of its own in
# which /etc/hosts is a copy with "127.0.0.1 node1 node2" first, so jobs (and MASTER_ADDR=node1) resolve the
# node names; nothing outside those daemons and their jobs sees that file.
set -euo pipefail

PACKAGES=(pdsh openssh-server openssh-client slurmctld slurmd slurm-client munge)

die() { echo "multinode_setup.sh: $*" >&2; exit 1; }

cmd_install() {
    [[ $(id -u) == 0 ]] || die "install needs root (apt-get)"
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [[ ${#missing[@]} == 0 ]] && return 0
    export DEBIAN_FRONTEND=noninteractive
    # No daemon is started by the packages' scripts (policy-rc.d 101); this script starts its own.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; made_policy=1; fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
    [[ $made_policy == 1 ]] && rm -f "$policy"
    return 0
}

# Prints why the named part cannot run here (nothing when it can).
why_not() {
    local part=$1 b hint=", or: bash scripts/multinode_setup.sh install)"
    [[ $(id -u) == 0 ]] || { echo "needs root (sshd/slurmd run as root here)"; return; }
    case $part in
        ssh) for b in pdsh /usr/sbin/sshd ssh ssh-keygen; do
                 command -v "$b" > /dev/null && continue
                 echo "$b not found (apt-get install pdsh openssh-server openssh-client$hint"; return
             done ;;
        slurm) for b in slurmctld slurmd sbatch srun scontrol sinfo munged unshare; do
                   command -v "$b" > /dev/null && continue
                   echo "$b not found (apt-get install slurmctld slurmd slurm-client munge$hint"; return
               done ;;
        *) die "check: unknown part '$part' (ssh or slurm)" ;;
    esac
}

cmd_check() {
    local parts=("$@") part reason rc=0
    [[ ${#parts[@]} == 0 ]] && parts=(ssh slurm)
    for part in "${parts[@]}"; do
        reason=$(why_not "$part")
        if [[ -n $reason ]]; then echo "$part: $reason"; rc=1; fi
    done
    return $rc
}

cmd_sshd_start() {
    local dir=${1:?DIR} port=${2:?PORT}
    dir=$(mkdir -p "$dir" && cd "$dir" && pwd)
    rm -f "$dir"/ssh_host_ed25519_key* "$dir"/id_ed25519*
    ssh-keygen -q -t ed25519 -N '' -C multinode-host -f "$dir/ssh_host_ed25519_key"
    ssh-keygen -q -t ed25519 -N '' -C multinode-test -f "$dir/id_ed25519"
    cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
    chmod 600 "$dir/authorized_keys"
    cat > "$dir/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $dir/ssh_host_ed25519_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# the key files live under /tmp (world-writable): skip sshd's ownership checks of the path
StrictModes no
EOF
    cat > "$dir/ssh_config" <<EOF
Host *
    IdentityFile $dir/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    GlobalKnownHostsFile /dev/null
    BatchMode yes
    LogLevel ERROR
EOF
    mkdir -p "$dir/bin"
    printf '#!/bin/sh\nexec /usr/bin/ssh -F %s "$@"\n' "$dir/ssh_config" > "$dir/bin/ssh"
    chmod +x "$dir/bin/ssh"
    mkdir -p /run/sshd  # sshd's privilege-separation directory (Debian's sshd refuses to start without it)
    /usr/sbin/sshd -t -f "$dir/sshd_config"
    /usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log"
    local i
    for ((i = 0; i < 50; i++)); do
        if "$dir/bin/ssh" -p "$port" 127.0.0.1 true 2> /dev/null; then return 0; fi
        sleep 0.2
    done
    cat "$dir/sshd.log" >&2
    die "sshd on 127.0.0.1:$port does not accept the key made for it (log above: $dir/sshd.log)"
}

cmd_slurm_start() {
    local dir=${1:?DIR} ctld_port=${2:?CTLD_PORT} port1=${3:?PORT1} port2=${4:?PORT2}
    dir=$(mkdir -p "$dir" && cd "$dir" && pwd)
    mkdir -p "$dir/state" "$dir/spool/node1" "$dir/spool/node2" "$dir/log" "$dir/munge"
    chmod 755 "$dir/munge"
    (umask 077 && head -c 1024 /dev/urandom > "$dir/munge/munge.key")
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
    cat > "$dir/slurm.conf" <<EOF
# A two-node Slurm cluster on one machine (scripts/multinode_setup.sh): two slurmd daemons, one per node.
ClusterName=novograd-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port1 CPUs=1 State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port2 CPUs=1 State=UNKNOWN
PartitionName=test Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF
    { echo "127.0.0.1 node1 node2"; cat /etc/hosts; } > "$dir/hosts"
    slurmctld -f "$dir/slurm.conf"
    local node
    for node in node1 node2; do
        # a private mount namespace per slurmd: its /etc/hosts (and its jobs') knows node1 and node2
        # shellcheck disable=SC2016  # $1..$3 expand in that inner sh
        unshare --mount --propagation private sh -c 'mount --bind "$1" /etc/hosts && exec slurmd -f "$2" -N "$3"' \
            sh "$dir/hosts" "$dir/slurm.conf" "$node"
    done
    local i states
    for ((i = 0; i < 150; i++)); do
        states=$(SLURM_CONF=$dir/slurm.conf sinfo -h -N -o '%N=%t' 2> /dev/null | sort | tr '\n' ' ')
        [[ $states == "node1=idle node2=idle " ]] && return 0
        sleep 0.2
    done
    tail -n 20 "$dir"/log/*.log >&2
    die "the Slurm nodes did not come up idle within 30 s (sinfo: ${states:-nothing}); logs above, in $dir/log"
}

# True while PID runs (a zombie, or a pid reused by another program, counts as gone).
alive() { [[ -r /proc/$1/stat ]] && [[ $(awk '{print $3}' "/proc/$1/stat" 2> /dev/null) != Z ]]; }

stop_pidfile() {
    local f=$1 pid i
    [[ -s $f ]] || return 0
    pid=$(cat "$f")
    if alive "$pid"; then
        kill "$pid" 2> /dev/null || true
        for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
        alive "$pid" && kill -9 "$pid" 2> /dev/null
    fi
    rm -f "$f"
}

cmd_stop() {
    local dir=${1:?DIR}
    [[ -d $dir ]] || return 0
    dir=$(cd "$dir" && pwd)
    if [[ -s $dir/slurmctld.pid ]]; then
        SLURM_CONF=$dir/slurm.conf scancel --quiet --partition test 2> /dev/null || true
    fi
    local f
    for f in "$dir"/slurmd-node*.pid "$dir/slurmctld.pid" "$dir/munge/munged.pid" "$dir/sshd.pid"; do
        [[ -e $f ]] && stop_pidfile "$f"
    done
    return 0
}

case ${1:-} in
    install) cmd_install ;;
    check) shift; cmd_check "$@" ;;
    sshd-start) shift; cmd_sshd_start "$@" ;;
    slurm-start) shift; cmd_slurm_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    *) die "usage: $0 install | check [ssh|slurm] | sshd-start DIR PORT" \
           "| slurm-start DIR CTLD_PORT PORT1 PORT2 | stop DIR" ;;
esac
