#!/usr/bin/env bash
# Run a command inside the project's pinned environment (.venv), creating or updating it first.
#   bash scripts/venv.sh python train.py
#   bash scripts/venv.sh python -m pytest -q
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# reinstall only when the pins or setup.py change
stamp=".venv/.ftkernels-installed"
want="$(cat requirements-dev.txt setup.py | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
    echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH" VIRTUAL_ENV="$root/.venv"
# Triton 3.9 warns unless the FP-fusion default is chosen explicitly; keep its current default.
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
exec "$@"
