"""The ops layer: every mission computation of the model goes through these functions.

Each is an op of namespace ``moce`` declared once (:mod:`._declare`): schema, fake implementation,
input check, op family, autograd formula, optional lowering, and its implementations per backend (see
:mod:`moce_kernels.backends`), the choice memoized per call key. :func:`declarations` lists them,
:func:`declaration` finds one by name, :func:`explain` says which implementation runs given inputs and why.
"""
from .._submodules import import_all
from ..expert_stage.weights import ExpertWeights
from ._declare import declaration, declarations, explain

__all__ = ["ExpertWeights", "declaration", "declarations", "explain"]
for _module in import_all(__name__, __path__):  # one module per op family: its __all__ are its public ops
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
del _module, _name
