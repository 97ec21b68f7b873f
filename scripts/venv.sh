#!/usr/bin/env bash
# Run a command inside the project's pinned environment (REPO/.venv), creating or updating it first.
# The command runs in the caller's folder, so relative paths mean what they say:
#   bash scripts/venv.sh python -m pytest -q                      (from the repo root)
#   bash ~/ftkernels/scripts/venv.sh frame-transformer-separate song.wav -c run/checkpoint.pt
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    echo "venv.sh: creating $venv and installing the pinned environment (first run: ~2.4 GB, several minutes)" >&2
    python3 -m venv "$venv"
fi
# reinstall only when the pins or setup.py change
stamp="$venv/.ftkernels-installed"
want="$(cat "$root/requirements-dev.txt" "$root/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/requirements-dev.txt"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$root"
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
# Triton 3.9 warns unless the FP-fusion default is chosen explicitly; keep its current default.
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
exec "$@"
