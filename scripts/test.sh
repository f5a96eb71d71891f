#!/usr/bin/env bash
# Run the whole test suite: installs the project (scripts/setup.sh), starts the local SLURM cluster when
# running as root (hpc/local_cluster/start.sh; stopped again at the end) so that the SLURM tests run
# too, Debian's chromium for the browser test of report.html and bindfs (FUSE) for the stalled-filesystem tests,
# then pytest. Extra arguments go to pytest.
# LYMPHOMA_NO_SLURM=1 skips the cluster (and its tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null; then  # the run report is tested in a real browser
  echo "installing Debian's chromium (headless, for the report.html test)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if [ "$(id -u)" = 0 ] && ! command -v bindfs >/dev/null; then  # a real FUSE filesystem that stops answering
  echo "installing Debian's bindfs (FUSE, for the tests of slides whose reading hangs)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bindfs >/dev/null
fi
if command -v chromium >/dev/null; then export LYMPHOMA_REQUIRE_BROWSER=1; fi
if [ "${LYMPHOMA_NO_SLURM:-0}" != 1 ] && [ "$(id -u)" = 0 ]; then
  if scontrol ping 2>/dev/null | grep -q UP; then
    echo "using the SLURM cluster that is already up"
  else
    bash hpc/local_cluster/start.sh
    trap 'bash hpc/local_cluster/stop.sh' EXIT
  fi
  export LYMPHOMA_REQUIRE_SLURM=1
fi
.venv/bin/python -m pytest "$@"
