#!/usr/bin/env bash
# The environment of the spandrel tests (tests/test_spandrel.py): spandrel imports torchvision, which does
# not load beside the CPU torch of the main environment, so they run in a virtual environment of their own
# with torch 2.14.1 and torchvision 0.29.1 (a CUDA build; it runs on a CPU too). The environment lives
# outside the checkout, so fresh clones on one machine share it ($MOCE_SPANDREL_VENV, default
# /opt/moce_kernels/venv-spandrel); it is reused while its stamp matches the requirements below and its
# imports work, and rebuilt otherwise. The package itself is not installed there: the tests import the
# checkout (python -m pytest from the repository root puts it first on sys.path).
# Prints the environment's python on its last line; exits non-zero if it cannot be built.
set -euo pipefail
VENV=${MOCE_SPANDREL_VENV:-/opt/moce_kernels/venv-spandrel}
PY311=${PYTHON311:-python3.11}
REQS=(torch==2.14.1 torchvision==0.29.1 spandrel==0.4.2 numpy pytest pytest-xdist "opencv-python-headless>=5.1"
      "safetensors>=0.4" "tqdm>=4.60")
STAMP="${REQS[*]}"

usable() {
    [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.moce-stamp" 2>/dev/null)" = "$STAMP" ] &&
        "$VENV/bin/python" -c "import torch, torchvision, spandrel, cv2, safetensors, pytest" 2>/dev/null
}

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # one check or build at a time (checkouts of one machine share the environment)
if ! usable; then
    echo "spandrel_env: building $VENV (${REQS[*]})" >&2
    rm -rf "$VENV"
    "$PY311" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${REQS[@]}" >&2
    echo "$STAMP" > "$VENV/.moce-stamp"
    usable || { echo "spandrel_env: $VENV was built but its imports fail" >&2; exit 1; }
fi
echo "$VENV/bin/python"
