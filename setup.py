"""Build: a pure-Python package everywhere; the CUDA extension ``moce_kernels._C`` as well where a
CUDA toolchain and a CUDA build of PyTorch are present (build it with
``pip install --no-build-isolation -e .`` so that the build sees the installed PyTorch).

Environment: ``MOCE_NO_CUDA=1`` skips the extension; ``MOCE_CUDA_ARCHS="80;90"`` picks the targets.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension():
    if os.environ.get("MOCE_NO_CUDA", "0") == "1":
        return None, {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:  # isolated build without torch: pure-Python package
        return None, {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return None, {}
    archs = os.environ.get("MOCE_CUDA_ARCHS", "80;90").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    sources = sorted(glob.glob("csrc/*/*.cu") + glob.glob("csrc/*/ops.cpp") + ["csrc/torch_bindings.cpp"])
    sources = [s for s in sources if not s.startswith("csrc/harness")]
    ext = CUDAExtension(
        name="moce_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"] + gencode},
    )
    return ext, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext, cmdclass = _cuda_extension()

setup(
    name="moce_kernels",
    version="0.1.0",
    description="Fast, exact MoCE-IR (all-in-one image restoration) with fused Triton and CUDA C++ kernels",
    packages=find_packages(include=["moce_kernels", "moce_kernels.*"]),
    python_requires=">=3.9",
    # opencv: image files with 16-bit colour, alpha and EXIF orientation (moce-restore); tqdm: progress bars
    install_requires=["torch>=2.4", "numpy", "opencv-python-headless>=5.1", "safetensors>=0.4", "tqdm>=4.60"],
    # spandrel: moce_kernels.spandrel (chaiNNer, ComfyUI; needs torchvision); ray: moce-restore --ray;
    # onnx: export_onnx / moce-export and the CPU runtimes (ONNX Runtime, OpenVINO)
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark"],
                    "spandrel": ["spandrel>=0.4.1"], "ray": ["ray[data]>=2.20"],
                    "onnx": ["onnx>=1.18", "onnxscript>=0.5", "onnxruntime>=1.22", "openvino>=2025.2"]},
    entry_points={"console_scripts": ["moce-restore=moce_kernels.cli.restore:main",
                                      "moce-convert-ckpt=moce_kernels.cli.convert:main",
                                      "moce-export=moce_kernels.cli.export:main"]},
    ext_modules=[ext] if ext is not None else [],
    cmdclass=cmdclass,
    zip_safe=False,
)
