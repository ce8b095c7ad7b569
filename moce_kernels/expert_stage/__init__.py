"""The MoCE expert stage below the ops layer: its contracts and its backend-agnostic driver.

  weights.py          ExpertWeights: the 13 named tensors of one expert (model, ops, reference, driver, tests)
  layouts.py          the meta tables' column layouts (IntEnums; Triton constexprs and a generated C++ header)
  interface.py        ExpertStageKernels: the typed launchers a backend implements
  plan.py             a layer's plan: weight layout, packed weights (re-packed on a version change), shape layouts
  tables.py           device meta tables, built once per content, pinned while a CUDA graph captures
  driver.py           buffers, meta rows, launch order (expert stage and plain pw->dw)
  implementations.py  the op implementations the Triton and CUDA backends register, built from their launchers

Imports go down only: backends (``moce_kernels/triton``, ``moce_kernels/cuda``) import this package;
it imports nothing of the ops, the backends or the model.
"""
