"""Coilsight engines: the runtime that turns frames into model outputs and outputs into defects.

- ``modelpack``: a pack on disk (model.json, the models' sha256, calibration.json);
  ``packs``: where packs live and the table of profiles; ``runner``: the one offline runner (open
  a pack, shape frames, run, check outputs) that evaluation, calibration, the card, the bench and
  parity share.
- ``backends/``: one module per inference backend behind one small interface (ONNX Runtime,
  TensorRT), chosen by a registry of lazy import strings; ``backends/select``: the fallback chain.
- ``postprocess``: probability maps -> defect events; ``geometry``: pixels -> strip millimetres.
- ``fp16``, ``parity``, ``build``, ``manifest``, ``commands``: TensorRT FP16 engine builds, their
  parity gate and manifests, and `coilsight engines ...`.
- ``atomic``: the one home for atomic file writes. ``models/<profile>/``: the shipped packs.

May import: ``metrics`` only (never ``training``, ``calibration`` or ``agent``). Importing it is
cheap: onnx and tensorrt are imported only by the modules that need them.
"""
