"""Training side: datasets, synthetic generators, torch nets, training, export, evaluation, the
model card, calibration from data, and their commands (`coilsight train|export|evaluate|card|calibrate`).

- ``datasets/``: one reader module per label format; ``synth``: synthetic strips (numpy);
  ``nets``: the torch modules; ``train``, ``export`` (ONNX + model.json), ``evaluate``, ``card``;
  ``calibrate``: reads the data and drives calibration.run; ``commands``: the CLI.
- torch, pycocotools and matplotlib are imported only here (and in calibration.reports), inside
  the modules that need them, so the runtime install can import ``training.synth`` and
  ``training.datasets`` without them.
- May import: ``engines``, ``calibration``, ``metrics``. Imported by: the agent's tools and CLI.
"""
