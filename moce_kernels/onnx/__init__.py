"""ONNX export of MoCE-IR and restoration through ONNX Runtime or OpenVINO.

:func:`export_onnx` writes a model to ``.onnx`` (standard operators, dynamic batch, height and width,
routing inside the graph); :mod:`.lowerings` holds every op's exportable form; :mod:`.runtime` runs
an exported graph (:class:`OnnxTileRunner`).
"""
from .export import ExportError, export_onnx, lowered_ops, reflect_pad_to_multiple

__all__ = ["ExportError", "export_onnx", "lowered_ops", "reflect_pad_to_multiple"]
