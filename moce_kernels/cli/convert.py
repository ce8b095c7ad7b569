"""moce-convert-ckpt: a released Lightning .ckpt (or a plain state dict) to a .safetensors file that
stores the model's configuration, so that MoCEIR.from_checkpoint needs no other arguments.

    moce-convert-ckpt checkpoints/MoCE_IR_S_AIO3/last.ckpt MoCE_IR_S_AIO3.safetensors
    moce-convert-ckpt my_state_dict.pth mine.safetensors --set topk=2 --set 'stage_depth=[1,1,1]'

Arguments the file does not determine are assumed (a warning names each with its value): set them
with --preset or --set NAME=VALUE (VALUE as JSON, else a string).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

from ._common import UsageError, add_checkpoint_options, load_checkpoint, one_line, plain_warnings


def _parse_sets(items: Sequence[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--set takes NAME=VALUE, got {item!r}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moce-convert-ckpt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="released .ckpt, plain state dict or .safetensors")
    ap.add_argument("dst", help="the .safetensors file to write")
    add_checkpoint_options(ap)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with plain_warnings():
        try:
            if os.path.exists(args.dst) and os.path.exists(args.src) and os.path.samefile(args.src, args.dst):
                raise UsageError(f"refusing to overwrite the input {args.src}")
            if os.path.exists(args.dst) and not args.force:
                raise UsageError(f"{args.dst} exists; pass --force to replace it")
            model = load_checkpoint(args.src, preset=args.preset, **_parse_sets(args.sets))
            model.save_checkpoint(args.dst)
        except (UsageError, ValueError, RuntimeError, OSError) as e:
            print(f"moce-convert-ckpt: {one_line(e)}", file=sys.stderr)
            return 2
    print(f"wrote {args.dst}: {json.dumps(model.config)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
