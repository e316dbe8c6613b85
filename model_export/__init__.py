"""Model export and the model repository (DESIGN section 3).

Two halves with one dependency direction:

- serving side, no torch and no training code: :mod:`model_export.errors`,
  :mod:`model_export.manifest`, :mod:`model_export.repository` (open + verify a
  repository, create ONNX Runtime sessions), :mod:`model_export.triton`
  (``config.pbtxt``), :mod:`model_export.bench` (model-only latency);
- exporting side, PyTorch: :mod:`model_export.graphs` (the exported functions),
  :mod:`model_export.export` (``mmrank export``), :mod:`model_export.torch_reference`
  (the same weights run in PyTorch, the reference backend).

This module imports nothing, so importing the serving half never pulls in torch.
"""
