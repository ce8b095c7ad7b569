#!/usr/bin/env bash
# Set up this checkout on a fresh machine: PyTorch (the pinned CPU build where none is installed,
# never an unpinned CUDA download), Triton, the test tools, the image and checkpoint libraries of
# moce-restore (OpenCV headless, safetensors, tqdm), Ray Data (the optional `ray` extra, for
# moce-restore --ray and its tests), and the package itself (editable, with its console scripts; the
# CUDA extension is built too where nvcc and a CUDA build of PyTorch exist). The spandrel tests' own
# environment is python/spandrel_env.sh's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
"$PY" -c "import triton" 2>/dev/null || pip_install triton
pip_install numpy pybind11 ninja pytest pytest-benchmark pytest-xdist "setuptools>=64" wheel
pip_install "opencv-python-headless>=5.1" "safetensors>=0.4" "tqdm>=4.60"
pip_install "ray[data]==2.58.0"
# the onnx extra (export and the CPU runtimes; tests/test_onnx.py): versions checked with torch 2.13.0, Python 3.11
pip_install "onnx>=1.18" "onnxscript>=0.5" "onnxruntime>=1.22" "openvino>=2025.2"
pip_install --no-build-isolation -e .
"$PY" -c "import moce_kernels, torch; print('moce_kernels ready: torch', torch.__version__, '| backends:', moce_kernels.available_backends())"
