"""Restore image files with MoCE-IR: the ``moce-restore`` command (see ``moce-restore --help``),
runnable from a checkout without installing.

    python python/restore.py photos/ --ckpt MoCE_IR_S.safetensors --out restored/
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from moce_kernels.cli.restore import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
