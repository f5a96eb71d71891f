#!/usr/bin/env bash
# Start a real SLURM 22.05 cluster on loopback, on one Debian 12 machine, as root, without systemd:
# munge, a private MariaDB, slurmdbd (accounting: submitit learns failed and cancelled jobs through sacct),
# slurmctld and one slurmd per emulated node. Waits until every node is idle. Stop it with stop.sh.
#
#   bash hpc/local_cluster/start.sh            # 2 nodes of 8 CPUs and 32 GB, as declared: the real cores and
#                                              # memory are oversubscribed, so the generic profile
#                                              # configs/cluster/slurm.yaml fits as written; what a job asks
#                                              # for is enforced, as on a cluster: a step over its job's memory
#                                              # (--mem; 2 GB a CPU where none is asked) is killed (polled 1/s)
#   NODES=1 CPUS=4 bash hpc/local_cluster/start.sh
#
# Settings (environment): STATE_DIR (default /tmp/lymphoma-slurm), NODES (2), CPUS (8), MEM_MB (32768),
# DB_PORT (3307). Every daemon's state, logs and PID file live under STATE_DIR.
# Partitions: debug (the default, no time limit) and short (1 minute: jobs asking for more stay pending there).
# Arrays: at most 10 tasks in one array job (MaxArraySize; 1001 by default on real clusters), so that the tests
# meet the splitting of a larger array into several that share the parallelism (hpc/array_limit.py).
set -euo pipefail

STATE_DIR=${STATE_DIR:-/tmp/lymphoma-slurm}
NODES=${NODES:-2}
CPUS=${CPUS:-8}
MEM_MB=${MEM_MB:-32768}  # declared, not real (config_overrides): the generic profile (16 GB a task) fits
DB_PORT=${DB_PORT:-3307}
CLUSTER=lymphoma
HOST=$(hostname -s)
CONF_DIR=/etc/slurm
MARK="# lymphoma-local-cluster"

die() { echo "start.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (the daemons and /etc/slurm need it)"
[ -e "$STATE_DIR/slurmctld.pid" ] && kill -0 "$(cat "$STATE_DIR/slurmctld.pid")" 2>/dev/null \
  && die "a cluster is already running from $STATE_DIR; stop it first: bash $(dirname "$0")/stop.sh"

packages=()
for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client slurmdbd:slurmdbd mariadbd:mariadb-server; do
  command -v "${pair%%:*}" >/dev/null || [ -x "/usr/sbin/${pair%%:*}" ] || packages+=("${pair#*:}")
done
if [ ${#packages[@]} -gt 0 ]; then
  echo "installing ${packages[*]} from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi

mkdir -p "$STATE_DIR"/{state,log,mysql}
for n in $(seq 1 "$NODES"); do mkdir -p "$STATE_DIR/spool/n$n"; done

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq 1 $((limit * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "$what did not come up within ${limit}s; see the logs in $STATE_DIR/log"
}

# Node names must resolve: submitit takes the first node's name as the DDP master address.
sed -i "/$MARK/d" /etc/hosts
for n in $(seq 1 "$NODES"); do echo "127.0.0.1 n$n $MARK" >> /etc/hosts; done

# munge: reuse a running one, else start our own as user munge.
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null;
                                    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  wait_for 10 munge sh -c 'munge -n | unmunge'
  cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
fi

# A private MariaDB for accounting: own data folder, TCP on 127.0.0.1:$DB_PORT.
if [ ! -d "$STATE_DIR/mysql/mysql" ]; then
  mariadb-install-db --user=root --datadir="$STATE_DIR/mysql" --auth-root-authentication-method=socket \
    >"$STATE_DIR/log/mariadb-install.log" 2>&1
fi
setsid /usr/sbin/mariadbd --user=root --datadir="$STATE_DIR/mysql" --socket="$STATE_DIR/mysql.sock" \
  --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$STATE_DIR/mariadb.pid" \
  --log-error="$STATE_DIR/log/mariadb.log" --skip-name-resolve --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
wait_for 30 MariaDB mariadb --socket="$STATE_DIR/mysql.sock" -e "select 1"
mariadb --socket="$STATE_DIR/mysql.sock" -e "
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

mkdir -p "$CONF_DIR"
cat > "$CONF_DIR/slurmdbd.conf" <<CONF
$MARK
DbdHost=localhost
DbdPort=6819
SlurmUser=root
AuthType=auth/munge
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$STATE_DIR/slurmdbd.pid
LogFile=$STATE_DIR/log/slurmdbd.log
CONF
chmod 600 "$CONF_DIR/slurmdbd.conf"

cat > "$CONF_DIR/slurm.conf" <<CONF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=2048
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
MaxArraySize=10
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
SlurmctldPort=6817
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageEnforce=associations,limits,qos
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
JobCompType=jobcomp/none
NodeName=n[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[6821-$((6820 + NODES))] CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=ALL MaxTime=1 State=UP
CONF

/usr/sbin/slurmdbd
wait_for 30 slurmdbd sacctmgr -n show cluster
sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
# Limits are enforced, as on clusters: every user needs an association (an account), and a QOS may cap what is
# queued. root (the tests) and the user who started this, in account lab; the QOS "small" lets 12 jobs or array
# tasks be queued at once (the tests' submit limit), "normal" (the default) none.
sacctmgr -i add account lab Cluster="$CLUSTER" >/dev/null 2>&1 || true
sacctmgr -i add qos small >/dev/null 2>&1 || true
sacctmgr -i modify qos small set MaxSubmitJobsPerUser=12 >/dev/null 2>&1 || true  # a kept database's too
for user in root ${SUDO_USER:-}; do
  sacctmgr -i add user "$user" Account=lab Cluster="$CLUSTER" >/dev/null 2>&1 || true
  sacctmgr -i modify user "$user" set QOS=normal,small DefaultQOS=normal >/dev/null 2>&1 || true
done
/usr/sbin/slurmctld -c  # -c: a fresh start forgets jobs and drained nodes left by an earlier run (a full disk drains a node)
wait_for 30 slurmctld scontrol ping
for n in $(seq 1 "$NODES"); do /usr/sbin/slurmd -N "n$n"; done

all_idle() { [ "$(sinfo -h -N -p debug -o %T | grep -cx idle)" = "$NODES" ]; }
wait_for 60 "the nodes (idle)" all_idle
echo "SLURM cluster '$CLUSTER' is up: $NODES node(s) x $CPUS CPUs, state and logs in $STATE_DIR"
sinfo -N
