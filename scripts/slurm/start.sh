#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine, reachable on the loopback address only:
# munged (unless one already answers), slurmctld and slurmd in the foreground of background
# processes whose PIDs go to RUN_DIR/pids (scripts/slurm/stop.sh RUN_DIR stops them).
#   scripts/slurm/start.sh RUN_DIR && export SLURM_CONF=RUN_DIR/slurm.conf
# The node is described by `slurmd -C`; select/cons_tres, proctrack/linuxproc, task/none, no
# accounting. Ports: VGGT4D_SLURM_PORT (slurmctld, default 6817) and the next one (slurmd).
set -euo pipefail
run_dir=$(realpath -m "${1:?usage: $0 RUN_DIR}")
port=${VGGT4D_SLURM_PORT:-6817}
if [ "$(id -u)" != 0 ]; then
    echo "error: starting slurmctld and slurmd needs root" >&2
    exit 2
fi
if [ -s "$run_dir/pids" ]; then
    echo "error: $run_dir/pids exists: a cluster from that folder may still run; stop it with scripts/slurm/stop.sh $run_dir" >&2
    exit 2
fi
mkdir -p "$run_dir/state" "$run_dir/spool" "$run_dir/log"
: > "$run_dir/pids"
host=$(hostname -s)
# slurmctld binds to its host name's address with NoCtldInAddrAny: loopback only when the
# name resolves to a loopback address (else it listens on every address, still on port $port).
bind=NoInAddrAny
case "$(getent hosts "$host" | awk '{print $1; exit}')" in
    127.*|::1) bind=NoCtldInAddrAny,NoInAddrAny ;;
esac

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge/munge.key
    setpriv --reuid=munge --regid=munge --clear-groups \
        /usr/sbin/munged --foreground >"$run_dir/log/munged.out" 2>&1 &
    echo "munged $!" >> "$run_dir/pids"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
fi

node=$(slurmd -C | head -n 1 | sed 's/ UpTime=.*//')
cat > "$run_dir/slurm.conf" <<CONF
# One-node test cluster written by scripts/slurm/start.sh
ClusterName=vggt4d-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
CommunicationParameters=$bind
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$run_dir/state
SlurmdSpoolDir=$run_dir/spool
SlurmctldPidFile=$run_dir/slurmctld.pid
SlurmdPidFile=$run_dir/slurmd.pid
SlurmctldLogFile=$run_dir/log/slurmctld.log
SlurmdLogFile=$run_dir/log/slurmd.log
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$run_dir/slurm.conf

slurmctld -D -c >"$run_dir/log/slurmctld.out" 2>&1 &
echo "slurmctld $!" >> "$run_dir/pids"
slurmd -D -N "$host" >"$run_dir/log/slurmd.out" 2>&1 &
echo "slurmd $!" >> "$run_dir/pids"

for _ in $(seq 150); do
    if [ "$(sinfo --noheader --Node --format=%T 2>/dev/null)" = idle ]; then
        sinfo
        exit 0
    fi
    sleep 0.2
done
echo "error: the Slurm node did not become idle within 30 s; logs in $run_dir/log" >&2
tail -n 5 "$run_dir"/log/*.out >&2
exit 1
