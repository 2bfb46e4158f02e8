#!/usr/bin/env bash
# make test-slurm: install Slurm and munge, start a one-node cluster, run tests/test_slurm.py
# against it, and stop the daemons by their PIDs whatever happens (the cluster's folder, with
# the daemons' logs, is kept when something failed).
#   scripts/slurm/test.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${1:-.venv/bin/python}
scripts/slurm/install.sh
run_dir=$(mktemp -d /tmp/vggt4d-slurm.XXXXXX)
passed=0
finish() {
    scripts/slurm/stop.sh "$run_dir"
    if [ "$passed" = 1 ]; then
        rm -rf "$run_dir"
    else
        echo "Slurm test cluster logs: $run_dir/log" >&2
    fi
}
trap finish EXIT
scripts/slurm/start.sh "$run_dir"
SLURM_CONF=$run_dir/slurm.conf VGGT4D_SLURM_TESTS=1 "$python" -m pytest -q tests/test_slurm.py
passed=1
