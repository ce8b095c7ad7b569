"""Run MoCE-IR forwards with NVTX ranges on, for Nsight Systems / Nsight Compute.

    nsys profile -t cuda,nvtx -o moce python python/profile_model.py --preset MoCE_IR --size 512 --batch 1
    ncu --nvtx --nvtx-include "MoCE/" --clock-control none python python/profile_model.py --iters 1

Every block (EncoderBlock, DecoderBlock, MDTA, GDFN, CrossAttention, MoCE) and every op
(``<op>[<backend>]``) gets its own range. Without a GPU it runs on the CPU (ranges are no-ops).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import moce_kernels  # noqa: E402
from moce_kernels import MoCEIR  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="MoCE_IR", choices=["MoCE_IR", "MoCE_IR_S"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if device == "cpu":
        dtype = torch.float32
    moce_kernels.set_backend(args.backend)
    moce_kernels.nvtx.enable(True)
    model = MoCEIR.from_preset(args.preset).eval().to(device, dtype)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
    with torch.no_grad():
        model(x)  # warm-up (compilation, autotuning)
        for i in range(args.iters):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with moce_kernels.nvtx.nvtx_range(f"iteration {i}"):
                model(x)
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"iteration {i}: {(time.perf_counter() - t0) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
