"""MoCE-IR in spandrel, and so in chaiNNer and ComfyUI: :func:`install` adds the architecture to
``spandrel.MAIN_REGISTRY``, after which ``spandrel.ModelLoader().load_from_file(path)`` loads MoCE-IR
files of the three kinds moce_kernels reads:

- the authors' released Lightning ``.ckpt`` (spandrel unwraps its ``state_dict``; the ``net.`` prefix
  of its keys, which spandrel keeps, is removed here);
- plain ``.pth`` state dicts (with or without a ``net.``, ``model.``, ``module.`` or ``_orig_mod.`` prefix);
- ``.safetensors`` files written by ``MoCEIR.save_checkpoint`` / ``moce-convert-ckpt``.

Configuration. spandrel hands an architecture the tensors only: ``safetensors.torch.load_file``
drops a file's metadata, and spandrel keeps only the ``state_dict`` of a Lightning checkpoint, not its
hyper-parameters. So that the configuration resolves as in ``MoCEIR.from_checkpoint`` (a
``.safetensors`` file's stored configuration wins over inference; a ``.ckpt``'s hyper-parameters such as
``topk`` over assumptions), :func:`install` wraps ``ModelLoader._load_safetensors`` and
``ModelLoader._load_pth``: a MoCE-IR state dict comes back as a :class:`CarriedStateDict`, a dict that
also carries them. Hosts that read the tensors themselves and pass a plain dict (ComfyUI's upscale-model
loader does) give neither: the architecture is then inferred from the tensor shapes (widths, depths,
heads, experts, ranks), and what shapes cannot tell (``topk``, the routing settings) is taken from the
preset whose shapes the file has, else from the released presets, with an
:class:`~moce_kernels.model.checkpoint.AssumedConfigWarning` naming each assumed value.

Released checkpoints keep their hyper-parameters in an ``argparse.Namespace``, which spandrel's
restricted unpickler and ``torch.load(weights_only=True)`` refuse; :func:`install` allows that one
class in both (a plain attribute container: rebuilding it runs no code from the file).

The descriptor: purpose ``"Restoration"``, scale 1, any input size (the model reflect-pads to its
multiple of 8 and crops back, so no size requirement is declared), tiling supported. Its call is
``MoCEIR`` on the (1, C, H, W) image in [0, 1], clamped to [0, 1] by spandrel.
"""
from __future__ import annotations

import argparse
import os
import warnings
from typing import Any, Dict, Mapping, Optional

import torch

from .model.checkpoint import (AssumedConfigWarning, CheckpointError, _from_hparams, assumed_arguments,
                               describe_mismatch, extract_state_dict, infer_config, matching_preset)
from .model.checkpoint import stored_config as config_in_metadata
from .model.moce_ir import MoCEIR
from .model.presets import preset_config

ARCH_ID = "MoCE-IR"
# Keys every MoCE-IR state dict has (after its prefix is removed): embedding, first encoder block,
# latent, the first decoder level's fuse, MoCE layer (experts, router) and cross-attention, frequency
# embedding, output. Restormer-family models share only the first and the last.
DETECT_KEYS = (
    "patch_embed.proj.weight",
    "enc.0.0.layers.0.mixer.temperature",
    "latent.layers.0.mixer.temperature",
    "dec.0.1.weight",
    "dec.0.2.layers.0.adapter.experts.0.0.proj.0.weight",
    "dec.0.2.layers.0.adapter.routing.gate.2.weight",
    "dec.0.2.layers.0.mixer.kv_dwconv.weight",
    "freq_embed.mlp.0.weight",
    "output.weight",
)
# Which reduced precisions the descriptor declares: bf16 runs (CPU and GPU) and fp16 (GPU) within the
# error rule (tests/test_spandrel.py on CPU; tests/test_model_backends.py's low-precision test on a GPU).
SUPPORTS_HALF = True
SUPPORTS_BFLOAT16 = True


class CarriedStateDict(dict):
    """A state dict (a plain ``dict`` of tensors) that also carries what its file said about the model:
    :attr:`config`, the constructor arguments stored in a ``.safetensors`` file (or None), and
    :attr:`hparams`, a Lightning checkpoint's hyper-parameters (or empty)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], config: Optional[Dict[str, Any]] = None,
                 hparams: Optional[Dict[str, Any]] = None):
        super().__init__(tensors)
        self.config = config
        self.hparams = dict(hparams or {})


def stored_config(path: "str | os.PathLike") -> Optional[Dict[str, Any]]:
    """The constructor arguments stored in a ``.safetensors`` file's metadata, or None if it stores none.
    Raises :class:`CheckpointError` for a stored configuration that is not a JSON mapping."""
    from safetensors import safe_open
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    return config_in_metadata(os.fspath(path), meta)


def _tensors(state_dict: Mapping[str, Any]) -> Optional[Dict[str, torch.Tensor]]:
    """The state dict without its common prefix, or None if it is not a state dict of tensors."""
    try:
        return extract_state_dict(state_dict)[0]
    except CheckpointError:
        return None


def detect(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` (as spandrel passes it: keys possibly behind a ``net.``-style prefix) is a
    MoCE-IR state dict. Never raises."""
    sd = _tensors(state_dict)
    return sd is not None and all(k in sd for k in DETECT_KEYS)


def config_for(sd: Mapping[str, torch.Tensor], stored: Optional[Mapping[str, Any]] = None,
               hparams: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Constructor arguments for the (prefix-free) state dict ``sd``, as ``MoCEIR.from_checkpoint``
    resolves them: ``stored`` if given; else the preset with its shapes, or the released presets'
    routing settings with the inferred shapes, updated by the Lightning ``hparams``, with an
    :class:`AssumedConfigWarning` naming what neither determined."""
    if stored is not None:
        return dict(stored)
    inferred = infer_config(sd)
    looks_like = matching_preset(inferred)
    if looks_like is not None:
        cfg = preset_config(looks_like)
    else:
        cfg = preset_config("MoCE_IR")
        cfg.pop("rank_type")
        cfg.update(inferred)
    from_hparams = _from_hparams(hparams or {})
    cfg.update(from_hparams)
    assumed = assumed_arguments(cfg, set(inferred) | set(from_hparams))
    if assumed:
        source = (f"the values of preset {looks_like!r}, whose shapes it has" if looks_like
                  else "the released presets' values")
        values = ", ".join(f"{k}={v!r}" for k, v in assumed.items())
        warnings.warn(f"MoCE-IR state dict without a stored configuration: assumed {values} ({source}); a "
                      ".safetensors file written by moce-convert-ckpt stores them", AssumedConfigWarning, stacklevel=3)
    return cfg


def _tags(cfg: Mapping[str, Any]) -> list:
    name = matching_preset(dict(preset_config("MoCE_IR"), **cfg))
    return [name or f"{cfg.get('dim', 32)}dim", f"top{cfg.get('topk', 1)}"]


def _architecture_class():
    """The spandrel ``Architecture`` subclass (defined on first use: spandrel is an optional dependency)."""
    from spandrel import Architecture, ImageModelDescriptor, ModelTiling, SizeRequirements

    class MoCEIRArch(Architecture[MoCEIR]):
        """MoCE-IR for spandrel: detection by :data:`DETECT_KEYS`, configuration by :func:`config_for`."""

        def __init__(self) -> None:
            super().__init__(id=ARCH_ID, name="MoCE-IR", detect=detect)

        def load(self, state_dict: Mapping[str, Any]) -> "ImageModelDescriptor[MoCEIR]":
            sd = _tensors(state_dict)
            if sd is None:
                raise CheckpointError("not a MoCE-IR state dict (expected a mapping of parameter names to tensors)")
            cfg = config_for(sd, getattr(state_dict, "config", None), getattr(state_dict, "hparams", None))
            try:
                model = MoCEIR(**cfg)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"cannot build a MoCE-IR model from the configuration {cfg}: {e}") from None
            problems = describe_mismatch(model, sd)
            if problems:
                raise CheckpointError("the MoCE-IR state dict does not fit the configuration "
                                      f"{cfg}:\n  " + "\n  ".join(problems))
            return ImageModelDescriptor(
                model.eval(), sd, architecture=self, purpose="Restoration", tags=_tags(cfg),
                supports_half=SUPPORTS_HALF, supports_bfloat16=SUPPORTS_BFLOAT16, scale=1,
                input_channels=model.patch_embed.proj.weight.shape[1],
                output_channels=model.output.weight.shape[0],
                size_requirements=SizeRequirements(), tiling=ModelTiling.SUPPORTED)

    return MoCEIRArch


def _with_safetensors_config(tensors: Dict[str, Any], path) -> Dict[str, Any]:
    """A MoCE-IR ``.safetensors`` state dict as a :class:`CarriedStateDict` with its stored configuration."""
    return CarriedStateDict(tensors, config=stored_config(path)) if detect(tensors) else tensors


def _with_lightning_hparams(obj: Any, path) -> Any:
    """A Lightning checkpoint of MoCE-IR with its ``state_dict`` as a :class:`CarriedStateDict` that
    carries the hyper-parameters (spandrel unwraps ``state_dict`` and drops the rest)."""
    if not (isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and detect(obj["state_dict"])):
        return obj
    hparams = extract_state_dict(obj)[1]
    return dict(obj, state_dict=CarriedStateDict(obj["state_dict"], hparams=hparams))


def _wrap_loader(name: str, carry) -> None:
    """Make ``ModelLoader.<name>`` pass its result through ``carry(result, path)`` (once)."""
    from spandrel import ModelLoader
    original = getattr(ModelLoader, name)
    if getattr(original, "moce_kernels_wrapped", False):
        return

    def load(self, path):
        return carry(original(self, path), path)

    load.moce_kernels_wrapped = True
    setattr(ModelLoader, name, load)


def _allow_lightning_hyperparameters() -> None:
    """Let spandrel's restricted unpickler and ``torch.load(weights_only=True)`` rebuild ``argparse.Namespace``."""
    import importlib
    unpickler = importlib.import_module("spandrel.__helpers.unpickler")
    unpickler.safe_list.add(("argparse", "Namespace"))
    torch.serialization.add_safe_globals([argparse.Namespace])


def install(*, ignore_duplicates: bool = False) -> list:
    """Register MoCE-IR with ``spandrel.MAIN_REGISTRY`` (and let spandrel read the stored configuration of
    ``.safetensors`` files and the hyper-parameters of released ``.ckpt`` files; module docstring).

    Returns the list of ``ArchSupport`` entries added (empty if it was installed before and
    ``ignore_duplicates``); raises spandrel's ``DuplicateArchitectureError`` on a second install otherwise.
    """
    from spandrel import MAIN_REGISTRY, ArchSupport
    if ARCH_ID in MAIN_REGISTRY and ignore_duplicates:
        return []
    added = MAIN_REGISTRY.add(ArchSupport.from_architecture(_architecture_class()()),
                              ignore_duplicates=ignore_duplicates)
    _wrap_loader("_load_safetensors", _with_safetensors_config)
    _wrap_loader("_load_pth", _with_lightning_hparams)
    _allow_lightning_hyperparameters()
    return added
