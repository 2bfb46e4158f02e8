#!/usr/bin/env bash
# Install Debian's Slurm (slurm-wlm: slurmctld, slurmd, the client commands) and munge, unless
# they are already there. Needs root and apt-get.
set -euo pipefail
missing=0
for command in slurmctld slurmd sinfo sbatch munged; do
    command -v "$command" >/dev/null || missing=1
done
if [ "$missing" = 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "error: installing slurm-wlm and munge needs root (run as root or install them first)" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurm-wlm munge >/dev/null
