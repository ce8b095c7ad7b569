"""Shared builders for model tests: the reference-data configurations."""
import os
from typing import Any, Dict

import torch

from moce_kernels import MoCEIR

FILES = ("official_tiny_top1.pt", "official_tiny_top2.pt")
_CACHE: Dict[str, Any] = {}


def load_data(reference_dir: str, name: str) -> Dict[str, Any]:
    if name not in _CACHE:
        _CACHE[name] = torch.load(os.path.join(reference_dir, name))
    return _CACHE[name]


def model_for(data: Dict[str, Any], **kwargs) -> MoCEIR:
    model = MoCEIR(**data["config"], **kwargs)
    model.load_state_dict(data["state_dict"])
    return model.eval()
