"""ComfyUI custom node: MoCE-IR for ComfyUI's model loaders.

Copy (or link) this folder into ComfyUI's ``custom_nodes/`` and install moce_kernels into ComfyUI's Python
environment (``pip install moce_kernels[spandrel]`` from a checkout). ComfyUI loads every upscale and
restoration model through spandrel; importing this package registers MoCE-IR with spandrel
(:func:`moce_kernels.spandrel.install`), after which "Load Upscale Model" loads MoCE-IR ``.safetensors``,
``.pth`` and released ``.ckpt`` files from ``models/upscale_models`` and "Upscale Image (using Model)" runs
them (its tiling included). It defines no nodes of its own.
"""
from moce_kernels.spandrel import install

install(ignore_duplicates=True)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
