"""CPU emulation of the CUDA C++ backend, so that machines without a GPU (CI) run the real kernels.

With ``MOCE_CUDA_EMULATION=1`` and no CUDA device, backend ``cuda`` accepts CPU tensors: the same
kernel sources (``csrc/*/kernels.cu``) and torch wrappers (``csrc/*/ops.cpp``) are compiled as C++
for the CPU against ``csrc/emulation`` (a fiber per GPU thread, barriers, warp collectives, wmma;
see ``csrc/emulation/include/emu/device.h``) and registered as ``torch.ops.moce_C`` with CPU
kernels. It proves the kernels' logic (indexing, barriers, reductions, the math), not their speed,
and not what only the hardware does (memory-model races between blocks, fast-math rounding).

Three rewrites are made to the sources, all mechanical: every launch
``kernel<<<grid, block, smem, stream>>>(args)`` becomes ``::emu::Launch(grid, block, smem, stream)(kernel, args)``;
``extern __shared__ T name[];`` becomes ``T* name = ::emu::dynamic_smem<T>();``; and every static
``__shared__ T a[n], b;`` becomes per-block storage, ``auto& a = ::emu::shared_var<T[n]>(key); ...``,
filled with NaN bytes at every block start like dynamic shared memory (so a read before any write
shows up instead of finding the previous block's or launch's values).
"""
from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
from typing import List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
BUILD_DIR = os.path.join(ROOT, "build", "cuda_emulation")
FAMILIES = ("window_attention", "grouped_conv", "expert_stage", "routing")

_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")
# kernel name (optionally with template arguments, which may hold one level of parentheses), the
# launch configuration, and whether the argument list is empty
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;{}()]*(?:\([^()]*\)[^<>;{}()]*)*>)?)\s*<<<(.*?)>>>\s*\(\s*(\))?", re.S)


_STATIC_SHARED = re.compile(r"(?<![\w])__shared__\s+([^;]+);")
_DECLARATOR = re.compile(r"^(.*?)\b([A-Za-z_]\w*)\s*((?:\[[^\[\]]*(?:\[[^\[\]]*\][^\[\]]*)*\]\s*)*)$", re.S)


def _split_top_level(text: str) -> List[str]:
    """Split on commas outside (), [], <>."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([<":
            depth += 1
        elif ch in ")]>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _static_shared(m: "re.Match[str]") -> str:
    """``__shared__ T a[n], b;`` -> per-block references ``auto& a = ::emu::shared_var<T[n]>(key); ...``."""
    decls = _split_top_level(m.group(1))
    first = _DECLARATOR.match(decls[0])
    if first is None:
        raise RuntimeError(f"cannot parse the shared declaration {m.group(0)!r}")
    base = first.group(1).strip()
    out = []
    for i, d in enumerate(decls):
        dm = first if i == 0 else _DECLARATOR.match(d)
        if dm is None or (i > 0 and dm.group(1).strip()):
            raise RuntimeError(f"cannot parse the shared declaration {m.group(0)!r}")
        dims = re.sub(r"\s+", "", dm.group(3)) if dm.group(3) else ""
        out.append(f"auto& {dm.group(2)} = ::emu::shared_var<{base}{dims}>([] {{ static char key; return &key; }}());")
    return " ".join(out)


def cuda_include_dir() -> Optional[str]:
    """The CUDA toolkit's include directory (for cuda_runtime_api.h, cuda_bf16.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "include", "cuda_runtime_api.h")):
            return os.path.join(c, "include")
    return None


def why_unavailable() -> Optional[str]:
    """None when the emulated backend can be built here, else the reason it cannot."""
    if cuda_include_dir() is None:
        return "the CUDA emulation needs the CUDA toolkit's headers (set CUDA_HOME)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "the CUDA emulation needs a C++ compiler"
    return None


def translate(source: str, path: str) -> str:
    """A kernel source rewritten for the emulation (launches and dynamic shared memory)."""
    out = _EXTERN_SHARED.sub(r"\1* \2 = ::emu::dynamic_smem<\1>();", source)
    out = _STATIC_SHARED.sub(_static_shared, out)

    def launch(m: "re.Match[str]") -> str:
        return f"::emu::Launch({m.group(2)})({m.group(1)}" + (")" if m.group(3) else ", ")

    out = _LAUNCH.sub(launch, out)
    if "<<<" in out or "__shared__" in out:
        raise RuntimeError(f"{path}: a kernel launch or shared declaration the emulation cannot rewrite")
    return f'#include "emu/device.h"\n#line 1 "{path}"\n{out}'


def _write_if_changed(path: str, text: str) -> None:
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


def _sources() -> List[str]:
    src_dir = os.path.join(BUILD_DIR, "src")
    os.makedirs(src_dir, exist_ok=True)
    out = []
    for family in FAMILIES:
        for cu in sorted(glob.glob(os.path.join(CSRC, family, "*.cu"))):
            with open(cu) as f:
                text = translate(f.read(), cu)
            dst = os.path.join(src_dir, f"{family}_{os.path.splitext(os.path.basename(cu))[0]}.cpp")
            _write_if_changed(dst, text)
            out.append(dst)
        # a one-line wrapper: object files are named after their source, and every family has an ops.cpp
        wrapper = os.path.join(src_dir, f"{family}_ops.cpp")
        _write_if_changed(wrapper, f'#include "{os.path.join(CSRC, family, "ops.cpp")}"\n')
        out.append(wrapper)
    return out + [os.path.join(CSRC, "emulation", "runtime.cpp"), os.path.join(CSRC, "torch_bindings.cpp")]


@functools.lru_cache(maxsize=None)
def load():
    """Build (incrementally, under build/cuda_emulation) and load the emulated extension."""
    why = why_unavailable()
    if why is not None:
        raise RuntimeError(why)
    from torch.utils import cpp_extension

    os.makedirs(BUILD_DIR, exist_ok=True)
    return cpp_extension.load(
        name="moce_C_emulated",
        sources=_sources(),
        extra_include_paths=[os.path.join(CSRC, "emulation", "include"), CSRC, cuda_include_dir()],
        extra_cflags=["-O2", "-DMOCE_CUDA_EMULATION", "-Wno-unknown-pragmas", "-Wno-attributes"],
        build_directory=BUILD_DIR,
        verbose=os.environ.get("MOCE_EMU_VERBOSE", "0") == "1",
    )


def compile_library(cu_path: str, out_dir: str) -> str:
    """Compile one torch-free CUDA source (and the emulated runtime) into a shared library for ctypes;
    returns its path. Used by the emulation's own tests (csrc/emulation/selftest.cu)."""
    why = why_unavailable()
    if why is not None:
        raise RuntimeError(why)
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.splitext(os.path.basename(cu_path))[0]
    src = os.path.join(out_dir, f"{name}.cpp")
    with open(cu_path) as f:
        _write_if_changed(src, translate(f.read(), cu_path))
    lib = os.path.join(out_dir, f"lib{name}.so")
    cmd = [os.environ.get("CXX", "c++"), "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas",
           "-Wno-attributes", "-I" + os.path.join(CSRC, "emulation", "include"), "-I" + CSRC,
           "-I" + cuda_include_dir(), src, os.path.join(CSRC, "emulation", "runtime.cpp"), "-o", lib]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {cu_path} for the emulation failed:\n{proc.stderr[-4000:]}")
    return lib
