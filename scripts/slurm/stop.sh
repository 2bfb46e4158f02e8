#!/usr/bin/env bash
# Stop the daemons scripts/slurm/start.sh RUN_DIR started, by the PIDs it recorded (TERM, then
# KILL after 10 s), in reverse order of starting.
set -uo pipefail
run_dir=${1:?usage: $0 RUN_DIR}
[ -f "$run_dir/pids" ] || exit 0
tac "$run_dir/pids" | while read -r name pid; do
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "$name ($pid) ignored TERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null
    fi
done
rm -f "$run_dir/pids"
