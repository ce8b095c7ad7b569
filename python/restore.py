"""Restore images with MoCE-IR.

    python python/restore.py --ckpt MoCE_IR.ckpt --out restored/ input1.png input2.jpg ...

Images are read and written with Pillow (install it separately); any size works. ``--backend``
picks the moce_kernels backend, ``--dtype`` the precision (bf16/fp16 need a GPU).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import moce_kernels  # noqa: E402
from moce_kernels import MoCEIR  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _load_image(path: str) -> torch.Tensor:
    from PIL import Image
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def _save_image(t: torch.Tensor, path: str) -> None:
    from PIL import Image
    arr = (t[0].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    Image.fromarray(arr).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+")
    ap.add_argument("--ckpt", required=True, help="released .ckpt or a state dict")
    ap.add_argument("--preset", default=None, choices=[None, "MoCE_IR", "MoCE_IR_S"])
    ap.add_argument("--out", default="restored")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    moce_kernels.set_backend(args.backend)
    model = MoCEIR.from_checkpoint(args.ckpt, preset=args.preset).eval().to(args.device, DTYPES[args.dtype])
    os.makedirs(args.out, exist_ok=True)
    with torch.no_grad():
        for path in args.images:
            x = _load_image(path).to(args.device, DTYPES[args.dtype])
            out = model(x)
            dst = os.path.join(args.out, os.path.basename(path))
            _save_image(out, dst)
            print(f"{path} -> {dst}")


if __name__ == "__main__":
    main()
