"""Calibration: thresholds tied to model hashes, and the camera geometry.

- ``gate``: the gate threshold for a recall target; ``classes``: per-class pixel thresholds and
  minimum areas; ``run``: feed a pack (engines.runner) over given samples and write
  calibration.json; ``reports``: the HTML/PNG calibration report (matplotlib); ``spatial``: mm per
  pixel from a chessboard image, written as the camera geometry the agent reads
  (engines.geometry).
- May import: ``engines`` and ``metrics``. Imported by: ``training`` (which reads the datasets and
  drives it) and the CLI. Never imports ``training`` or ``agent``.
"""


class CalibrationError(ValueError):
    """The data cannot support the requested calibration; the message says why."""
