"""Loading the authors' released checkpoints (Lightning ``.ckpt``) and plain state dicts, safely;
reading and writing ``.safetensors`` files that keep the model's configuration.

Files are recognised by their content, whatever their name. PyTorch files are read with
``torch.load(weights_only=True)``: no arbitrary pickled code runs. Lightning hyper-parameters that
hold an ``argparse.Namespace`` are allowed explicitly. A ``.safetensors`` file holds no code at all;
the constructor arguments are a JSON string in its metadata under :data:`SAFETENSORS_CONFIG_KEY`, and
the CRC-32 of every tensor and of that string under :data:`SAFETENSORS_CRC_KEY`.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import pickle
import re
import struct
import warnings
import zipfile
import zlib
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .._files import write_atomic
from .presets import PRESETS, preset_config

_PREFIXES = ("net.", "model.", "module.", "_orig_mod.")


SAFETENSORS_CONFIG_KEY = "moce_kernels.config"
SAFETENSORS_CRC_KEY = "moce_kernels.crc32"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or does not fit the model."""


_ADVICE = ("Weights only load failed", "weights_only", "trusted source", "Check the documentation",
           "Please file an issue", "(2) ")


def _unpickler_reason(msg: str) -> str:
    """The specific cause inside ``torch.load``'s weights-only error, without its advice to retry with
    ``weights_only=False`` (which would run code from the file): e.g. ``Unsupported global: GLOBAL
    argparse.ArgumentParser``, ``Trying to load unsupported GLOBAL posix.system ...`` or ``Unsupported
    operand 250``."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and not any(a in ln for a in _ADVICE)]
    reason = " ".join(ln.replace("WeightsUnpickler error:", "").strip() for ln in lines).strip()
    return reason.split(" was not an allowed global")[0] or "unreadable pickle data"


def _verify_zip(path: str) -> None:
    """Zip-format checkpoints (``torch.save``'s default): every record's CRC-32 must match its data.
    ``torch.load`` does not check them, so a damaged tensor record would otherwise load silently."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is a damaged zip archive ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: the data of its record {bad!r} does not match the record's "
                              "CRC-32 (a damaged or partly written file); re-download or re-save it")


class AssumedConfigWarning(UserWarning):
    """A checkpoint did not determine some constructor arguments; the loader assumed values for them."""


def read_checkpoint(path: "str | os.PathLike", map_location="cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` after an integrity check (zip CRCs), with a
    :class:`CheckpointError` naming the problem for empty, corrupt, truncated or foreign files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
    if zipfile.is_zipfile(path):
        _verify_zip(path)
    unreadable = f"{path} is not a readable PyTorch checkpoint (another kind of file, or corrupt or truncated)"
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            with open(path, "rb") as f:  # a file object: torch.load would read a *.safetensors path as one
                return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(str(e))
        if "GLOBAL" not in reason:
            raise CheckpointError(f"{unreadable}: {reason}") from None
        raise CheckpointError(
            f"{path} holds objects that cannot be loaded safely ({reason}): loading them would run code from "
            "the file, so they are refused. Re-save the weights as a plain state dict: "
            "torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError, TypeError,
            AttributeError, OverflowError, MemoryError, struct.error) as e:
        # random bytes reach the legacy unpickler, whose stack machine fails in many ways
        raise CheckpointError(f"{unreadable}: {type(e).__name__} {str(e).splitlines()[0] if str(e) else ''}"
                              ) from None


def extract_state_dict(obj: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict without ``net.``-style prefixes, hyper-parameters dict) from a loaded file."""
    hparams: Dict[str, Any] = {}
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        hp = obj.get("hyper_parameters") or obj.get("hparams") or {}
        hparams = vars(hp) if isinstance(hp, argparse.Namespace) else dict(hp) if isinstance(hp, Mapping) else {}
        for v in list(hparams.values()):
            if isinstance(v, argparse.Namespace):
                hparams.update(vars(v))
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError("checkpoint holds no state dict (expected a mapping of parameter names to tensors)")
    odd_keys = [k for k in obj if not isinstance(k, str)]
    if odd_keys:
        raise CheckpointError(f"state dict keys must be parameter names (strings); got {len(odd_keys)} other keys: "
                              f"{[f'{k!r} ({type(k).__name__})' for k in odd_keys[:5]]}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"state dict entries that are not tensors: {bad[:5]}")
    sd = dict(obj)
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd, hparams


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def _shape(sd: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Size:
    """The shape of ``sd[key]``, a CheckpointError unless it is there with ``ndim`` non-zero dimensions."""
    if key not in sd:
        raise CheckpointError(f"not a complete MoCE-IR state dict: missing {key!r}")
    shape = sd[key].shape
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(f"{key} has shape {tuple(shape)}; a MoCE-IR state dict holds a {ndim}-d tensor there "
                              "with no empty dimension")
    return shape


def _expert_ranks(sd: Mapping[str, torch.Tensor], num_experts: int) -> List[int]:
    """The ranks of the first MoCE layer's experts (an error naming the first expert's tensor if none)."""
    return [_shape(sd, f"dec.0.2.layers.0.adapter.experts.{e}.0.proj.0.weight", 4)[0]
            for e in range(max(num_experts, 1))]


def infer_config(sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Constructor arguments implied by the tensor shapes (topk cannot be inferred: it is left out).

    A foreign or partial state dict raises a :class:`CheckpointError` naming the first tensor that is
    missing or has the wrong number of dimensions."""
    for key in ("patch_embed.proj.weight", "output.weight"):
        if key not in sd:
            raise CheckpointError(f"not a MoCE-IR state dict: missing {key!r}")
    dim, inp = _shape(sd, "patch_embed.proj.weight", 4)[:2]
    out_ch = _shape(sd, "output.weight", 4)[0]
    levels = _count(sd, r"enc\.(\d+)\.") + 1
    heads = [_shape(sd, f"enc.{i}.0.layers.0.mixer.temperature", 3)[0] for i in range(levels - 1)]
    heads.append(_shape(sd, "latent.layers.0.mixer.temperature", 3)[0])
    num_blocks = [_count(sd, rf"enc\.{i}\.0\.layers\.(\d+)\.") for i in range(levels - 1)]
    num_blocks.append(_count(sd, r"latent\.layers\.(\d+)\."))
    num_dec = [_count(sd, rf"dec\.{i}\.2\.layers\.(\d+)\.") for i in range(levels - 1)][::-1]
    hidden = _shape(sd, "enc.0.0.layers.0.ffn.project_out.weight", 4)[1]
    c0 = _shape(sd, "dec.0.2.layers.0.adapter.proj_out.weight", 4)[0]
    num_experts = _count(sd, r"dec\.0\.2\.layers\.0\.adapter\.experts\.(\d+)\.")
    ranks = _expert_ranks(sd, num_experts)
    cfg: Dict[str, Any] = dict(
        inp_channels=int(inp), out_channels=int(out_ch), dim=int(dim), levels=levels, heads=heads,
        num_blocks=num_blocks, num_dec_blocks=num_dec, num_refinement_blocks=_count(sd, r"refinement\.layers\.(\d+)\."),
        num_experts=num_experts, ffn_expansion_factor=hidden / dim,
        LayerNorm_type="WithBias" if "enc.0.0.layers.0.norms.0.body.bias" in sd else "BiasFree",
        bias="output.bias" in sd,
    )
    if ranks == [c0 // 2 ** (num_experts - 1 - i) for i in range(num_experts)]:
        cfg["rank_type"] = "spread"
    elif len(set(ranks)) == 1:
        cfg.update(rank_type="constant", rank=ranks[0])
    if cfg["ffn_expansion_factor"] == int(cfg["ffn_expansion_factor"]):
        cfg["ffn_expansion_factor"] = int(cfg["ffn_expansion_factor"])
    return cfg


def _infer(path, sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """:func:`infer_config` with the file's name in its errors."""
    try:
        return infer_config(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{os.fspath(path)}: {e}") from None


_SHAPE_ARGUMENTS = ("inp_channels", "out_channels", "dim", "levels", "heads", "num_blocks", "num_dec_blocks",
                    "num_refinement_blocks", "num_experts", "LayerNorm_type", "bias")


def _same_value(got: Any, want: Any) -> bool:
    """``got == want`` with the same types (no ``True == 1``, no ``"2"`` for 2, lists for lists)."""
    if isinstance(want, list):
        return (isinstance(got, (list, tuple)) and len(got) == len(want)
                and all(_same_value(g, w) for g, w in zip(got, want)))
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    return type(got) is type(want) and got == want


def _same_expansion(got: Any, inferred: Mapping[str, Any]) -> bool:
    """Whether ``ffn_expansion_factor = got`` gives the feed-forward width the tensors have."""
    if not isinstance(got, (int, float)) or isinstance(got, bool) or not math.isfinite(got):
        return False
    dim = inferred["dim"]
    return int(dim * got) == round(inferred["ffn_expansion_factor"] * dim)


def _same_ranks(rank_type: Any, rank: Any, inferred: Mapping[str, Any], want: List[int]) -> bool:
    """Whether ``rank_type`` and ``rank`` give the first MoCE layer's experts the ranks ``want``."""
    from .moe import expert_ranks
    if not isinstance(rank, int) or isinstance(rank, bool) or not isinstance(rank_type, str):
        return False
    if rank_type != "spread" and not 1 <= rank <= max(want):  # every other rank type starts at >= rank
        return False
    try:
        width = inferred["dim"] * 2 ** (inferred["levels"] - 2)  # the first decoder stage's
        return expert_ranks(rank_type, rank, width, inferred["num_experts"]) == want
    except ValueError:
        return False


def check_stored_config(path, stored: Mapping[str, Any], sd: Mapping[str, torch.Tensor],
                        inferred: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Refuse a stored configuration whose shape-determining arguments (``defaults`` for those it
    leaves out) differ from what the tensors ``sd`` have (``inferred``: :func:`infer_config`'s): nothing
    of a wrong type or an absurd size is built."""
    wrong = []
    for name in _SHAPE_ARGUMENTS:
        got = stored.get(name, defaults.get(name))
        if not _same_value(got, inferred[name]):
            wrong.append(f"{name} = {got!r} where the tensors have {inferred[name]!r}")
    got = stored.get("ffn_expansion_factor", defaults.get("ffn_expansion_factor"))
    if not _same_expansion(got, inferred):
        wrong.append(f"ffn_expansion_factor = {got!r} where the tensors have {inferred['ffn_expansion_factor']!r}")
    if not wrong:
        rank_type, rank = (stored.get(n, defaults.get(n)) for n in ("rank_type", "rank"))
        want = _expert_ranks(sd, inferred["num_experts"])
        if not _same_ranks(rank_type, rank, inferred, want):
            wrong.append(f"rank_type = {rank_type!r} with rank = {rank!r} where the experts' ranks are {want}")
    if wrong:
        raise CheckpointError(f"{os.fspath(path)}: the stored model configuration does not fit its tensors: "
                              + "; ".join(wrong))


def matching_preset(cfg: Mapping[str, Any]) -> Optional[str]:
    """The preset whose shape-determining arguments equal ``cfg``'s, if any."""
    keys = ("dim", "levels", "heads", "num_blocks", "num_dec_blocks", "num_refinement_blocks", "num_experts")
    for name in PRESETS:
        p = preset_config(name)
        if all(list(p[k]) == list(cfg[k]) if isinstance(p[k], list) else p[k] == cfg[k] for k in keys):
            return name
    return None


def _from_hparams(hparams: Mapping[str, Any]) -> Dict[str, Any]:
    """Constructor arguments found among Lightning hyper-parameters (``topk`` and friends)."""
    names = ("topk", "with_complexity", "complexity_scale", "depth_type", "stage_depth", "rank")
    return {n: hparams[n] for n in names if n in hparams}


def describe_mismatch(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> List[str]:
    """Human-readable differences between the model's state dict and ``sd``."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    out = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            out.append(f"{len(items)} {label}: {', '.join(items[:8])}{more}")
    return out


# ---------------------------------------------------------------- safetensors
class UnverifiedCheckpointWarning(UserWarning):
    """A ``.safetensors`` file stores no checksums (written by other tools): damage cannot be detected."""


def is_safetensors(path: "str | os.PathLike") -> bool:
    """Whether the file at ``path`` starts like a safetensors file (8-byte header length, then JSON)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = struct.unpack("<Q", head[:8])[0]
    return head[8:9] == b"{" and 8 + n <= size


def _is_torch_file(path: str) -> bool:
    """Whether the file starts like ``torch.save``'s output: a zip archive, or a pickle (protocol >= 2)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _crc32(data: "torch.Tensor | str") -> str:
    """CRC-32 (8 hex digits) of a tensor's bytes or of a string's UTF-8."""
    if isinstance(data, str):
        return f"{zlib.crc32(data.encode()):08x}"
    raw = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return f"{zlib.crc32(raw.numpy().data):08x}"


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: "str | os.PathLike",
                     config: Mapping[str, Any]) -> None:
    """Write ``state_dict`` and the constructor arguments ``config`` (JSON in the metadata) to ``path``,
    with the CRC-32 of every tensor and of the configuration (metadata :data:`SAFETENSORS_CRC_KEY`),
    which :func:`read_safetensors` verifies.

    Written to a temporary file beside ``path`` and renamed, so a failed write leaves no partial file.
    """
    from safetensors.torch import save
    try:
        meta = json.dumps(dict(config))
    except TypeError as e:
        raise ValueError(f"model configuration cannot be stored as JSON: {e}") from None
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    crcs = json.dumps({"config": _crc32(meta), "tensors": {k: _crc32(v) for k, v in tensors.items()}})
    write_atomic(path, save(tensors, metadata={"format": "pt", SAFETENSORS_CONFIG_KEY: meta,
                                               SAFETENSORS_CRC_KEY: crcs}))


def _open_safetensors(path: str) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, a CheckpointError naming the file if it is unreadable."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError besides OSError/ValueError
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): "
                              f"{type(e).__name__}: {e}") from None
    return meta, sd


def _verify_crcs(path: str, meta: Mapping[str, str], sd: Mapping[str, torch.Tensor]) -> None:
    """Compare every tensor and the stored configuration with their stored CRC-32 (a warning if none)."""
    if SAFETENSORS_CRC_KEY not in meta:
        warnings.warn(f"{path} stores no checksums (it was not written by save_checkpoint or moce-convert-ckpt), "
                      "so damage to its tensors cannot be detected", UnverifiedCheckpointWarning, stacklevel=6)
        return
    damaged = f"{path} is damaged: "
    try:
        crcs = json.loads(meta[SAFETENSORS_CRC_KEY])
        config_crc, tensor_crcs = crcs["config"], dict(crcs["tensors"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(damaged + "its stored checksums are unreadable") from None
    if set(tensor_crcs) != set(sd):
        extra, gone = sorted(set(sd) - set(tensor_crcs)), sorted(set(tensor_crcs) - set(sd))
        raise CheckpointError(damaged + f"its tensors are not the ones it stored checksums for (unlisted: "
                              f"{extra[:5]}, absent: {gone[:5]})")
    bad = [k for k, v in sd.items() if _crc32(v) != tensor_crcs[k]]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"{path}: tensor {bad[0]!r}{more} does not match its stored CRC-32 (a damaged "
                              "file); re-download or re-save it")
    if config_crc != (_crc32(meta[SAFETENSORS_CONFIG_KEY]) if SAFETENSORS_CONFIG_KEY in meta else None):
        raise CheckpointError(f"{path}: the stored model configuration does not match its stored CRC-32 "
                              "(a damaged or edited file)")


def stored_config(path: str, meta: Mapping[str, str]) -> Optional[Dict[str, Any]]:
    """The constructor arguments in a ``.safetensors`` file's metadata ``meta``, or None if it stores
    none; :class:`CheckpointError` (naming ``path``) for a stored configuration that is not a JSON mapping."""
    if SAFETENSORS_CONFIG_KEY not in meta:
        return None
    try:
        config = json.loads(meta[SAFETENSORS_CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the stored model configuration is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the stored model configuration is not a mapping: {config!r}")
    return config


def read_safetensors(path: "str | os.PathLike", map_location="cpu") -> Tuple[Dict[str, torch.Tensor],
                                                                             Optional[Dict[str, Any]]]:
    """(state dict, stored constructor arguments or None) from a safetensors file, with clear errors;
    the stored CRC-32s are verified (an :class:`UnverifiedCheckpointWarning` for a file without them)."""
    path = os.fspath(path)
    meta, sd = _open_safetensors(path)
    _verify_crcs(path, meta, sd)
    config = stored_config(path, meta)
    if map_location not in (None, "cpu"):
        sd = {k: v.to(map_location) for k, v in sd.items()}
    return sd, config


# ---------------------------------------------------------------- assumed configuration
def assumed_arguments(cfg: Mapping[str, Any], determined: "set[str]") -> Dict[str, Any]:
    """The constructor arguments in ``cfg`` that nothing in ``determined`` fixed (``rank`` only
    where the rank type uses it)."""
    out = {k: v for k, v in cfg.items() if k not in determined}
    if cfg.get("rank_type") == "spread":
        out.pop("rank", None)
    return out


def warn_assumed(path: "str | os.PathLike", assumed: Mapping[str, Any], source: str) -> None:
    """Warn (:class:`AssumedConfigWarning`) naming each assumed argument and its value."""
    if not assumed:
        return
    values = ", ".join(f"{k}={v!r}" for k, v in assumed.items())
    warnings.warn(
        f"{os.fspath(path)} does not store these constructor arguments and its tensor shapes cannot tell them; "
        f"assumed {values} ({source}). Pass the right values as keyword arguments to from_checkpoint if they "
        "differ; a .safetensors file written by save_checkpoint or moce-convert-ckpt stores them.",
        AssumedConfigWarning, stacklevel=4)


def _read_any(path, map_location) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Optional[Dict[str, Any]]]:
    """(state dict, Lightning hyper-parameters, stored configuration or None) from any supported file:
    a safetensors file by its header, a ``torch.save`` file by its first bytes (zip or pickle), and a
    file named ``.safetensors`` that is neither reads as a (damaged) safetensors file."""
    path = os.fspath(path)
    if os.path.isfile(path) and (is_safetensors(path) or (path.endswith(".safetensors")
                                                          and not _is_torch_file(path))):
        sd, stored = read_safetensors(path, map_location)
        return extract_state_dict(sd)[0], {}, stored
    sd, hparams = extract_state_dict(read_checkpoint(path, map_location))
    return sd, hparams, None


def _build(cls, path, cfg: Mapping[str, Any], inferred: Mapping[str, Any]):
    try:
        return cls(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build a model for this checkpoint ({e}); shapes suggest {inferred}")


def load_model(cls, path, preset: Optional[str] = None, map_location="cpu", strict: bool = True, **kwargs):
    """Build a model for the checkpoint at ``path`` and load its weights.

    A ``.safetensors`` file with a stored configuration is rebuilt from it (updated by ``kwargs``;
    ``preset`` replaces it). Otherwise the configuration comes from ``preset`` if given, else from the
    tensor shapes (the matching preset, or the released routing settings with the inferred shapes),
    then any Lightning hyper-parameters (``topk``, ``depth_type``, ...), then ``kwargs``; what none of
    these fixed (``topk``, depths, ... without a named preset) is assumed, with an
    :class:`AssumedConfigWarning` naming each value.
    """
    sd, hparams, stored = _read_any(path, map_location)
    inferred = _infer(path, sd)
    if stored is not None and preset is None:
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
        check_stored_config(path, {k: v for k, v in stored.items() if k not in kwargs}, sd, inferred, defaults)
        model = _build(cls, path, dict(stored, **kwargs), inferred)
        _load_weights(model, sd, strict, f"{path}: the tensors do not fit the configuration stored in the file")
        return model
    looks_like = matching_preset(inferred)
    if preset is not None:
        cfg = preset_config(preset)
    elif looks_like is not None:
        cfg = preset_config(looks_like)
    else:  # shapes of no preset: the released routing settings, with the inferred shapes
        cfg = preset_config("MoCE_IR")
        cfg.pop("rank_type")
        cfg.update(inferred)
    cfg.update(_from_hparams(hparams))
    cfg.update(kwargs)
    if preset is None:
        source = (f"the values of preset {looks_like!r}, whose shapes it has" if looks_like
                  else "the released presets' values")
        warn_assumed(path, assumed_arguments(cfg, set(inferred) | set(_from_hparams(hparams)) | set(kwargs)), source)
    model = _build(cls, path, cfg, inferred)
    hint = f"it looks like preset {looks_like!r}" if looks_like else f"its shapes suggest {inferred}"
    asked = f"preset {preset!r}" if preset else "the inferred configuration"
    _load_weights(model, sd, strict, f"{path} does not fit {asked}; {hint}")
    return model


def _load_weights(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], strict: bool, intro: str) -> None:
    problems = describe_mismatch(model, sd)
    if problems and strict:
        raise CheckpointError(f"{intro}.\n  " + "\n  ".join(problems))
    model.load_state_dict(sd, strict=strict)
