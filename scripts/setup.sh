#!/usr/bin/env bash
# Create .venv beside the checkout and install the project (editable) with its test tools.
# Idempotent: a second run only checks. PYTHON picks the interpreter (default python3, 3.10+).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
echo "installed: $(.venv/bin/lymphoma --help | head -1)"
