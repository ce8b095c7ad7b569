"""moce-export: a MoCE-IR checkpoint to an ONNX graph (standard operators, dynamic batch, height, width).

    moce-export MoCE_IR_S_AIO3.safetensors MoCE_IR_S_AIO3.onnx
    moce-export checkpoints/MoCE_IR_S_AIO3/last.ckpt moce_s_fp16.onnx --fp16
    moce-export my_state_dict.pth mine.onnx --preset MoCE_IR --set topk=2

The checkpoint is read as MoCEIR.from_checkpoint reads it: a .safetensors file written by
save_checkpoint needs no other argument; for a released .ckpt or a plain state dict, arguments the
file does not determine are assumed (a warning names each): set them with --preset or --set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from ._common import UsageError, add_checkpoint_options, one_line, plain_warnings
from .convert import _parse_sets


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moce-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help=".safetensors (from save_checkpoint or moce-convert-ckpt), released .ckpt "
                                "or plain state dict")
    ap.add_argument("dst", help="the .onnx file to write")
    ap.add_argument("--fp16", action="store_true", help="float16 weights, input and output (default float32)")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    add_checkpoint_options(ap)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from moce_kernels import MoCEIR
    from moce_kernels.onnx.export import DEFAULT_OPSET, export_onnx
    start = time.perf_counter()
    with plain_warnings():
        try:
            if os.path.exists(args.dst) and not args.force:
                raise UsageError(f"{args.dst} exists; pass --force to replace it")
            if os.path.exists(args.dst) and os.path.exists(args.src) and os.path.samefile(args.src, args.dst):
                raise UsageError(f"refusing to overwrite the input {args.src}")
            model = MoCEIR.from_checkpoint(args.src, preset=args.preset, **_parse_sets(args.sets)).eval()
            export_onnx(model, args.dst, dtype=torch.float16 if args.fp16 else torch.float32,
                        opset=DEFAULT_OPSET if args.opset is None else args.opset)
        except (UsageError, ValueError, RuntimeError, OSError, ImportError) as e:
            print(f"moce-export: {one_line(e)}", file=sys.stderr)
            return 2
    print(f"wrote {args.dst} ({'float16' if args.fp16 else 'float32'}, {time.perf_counter() - start:.0f} s): "
          f"{json.dumps(model.config)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
