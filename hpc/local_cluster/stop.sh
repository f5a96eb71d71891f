#!/usr/bin/env bash
# Stop the cluster that start.sh started, by its PID files (never by process name), and remove its
# /etc/hosts lines. Keeps STATE_DIR (logs, accounting database) unless PURGE=1.
set -uo pipefail
STATE_DIR=${STATE_DIR:-/tmp/lymphoma-slurm}
MARK="# lymphoma-local-cluster"

stop_pid_file() {
  local file=$1 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$file"
}

scancel --user=root >/dev/null 2>&1 || true
for f in "$STATE_DIR"/slurmd-*.pid; do [ -e "$f" ] && stop_pid_file "$f"; done
stop_pid_file "$STATE_DIR/slurmctld.pid"
stop_pid_file "$STATE_DIR/slurmdbd.pid"
stop_pid_file "$STATE_DIR/mariadb.pid"
stop_pid_file "$STATE_DIR/munged.pid"
sed -i "/$MARK/d" /etc/hosts
for conf in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do
  grep -q "$MARK" "$conf" 2>/dev/null && rm -f "$conf"
done
[ "${PURGE:-0}" = 1 ] && rm -rf "$STATE_DIR"
echo "SLURM cluster stopped"
