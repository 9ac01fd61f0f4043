"""Camera geometry: image pixels -> millimetres on the strip (the agent's runtime type).

A line camera looks down on the strip. Its image x axis runs across the strip, its y axis along
it (the direction the strip moves). ``CameraGeometry`` holds the numbers the agent needs, with
the same names as the ``[[cameras]]`` section of the config (agent/config.py CameraSection)::

    across_mm = offset_x_mm + x * mm_per_px_x     x = x_px, or frame_width - x_px when flip_x
    along_mm  = frame_pos_mm + y_px * mm_per_px_y

Pixel coordinates are continuous with pixel i covering [i, i + 1). ``offset_x_mm`` is the
across-strip position (from the strip's reference edge) of the frame's left edge, or of its
right edge when ``flip_x``; ``frame_pos_mm`` is the along-strip position of the frame's first
row, which the agent knows from the frame header. calibration/spatial.py measures these numbers
from a chessboard image (`coilsight calibrate spatial`) and prints them as config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


class GeometryError(ValueError):
    """The numbers cannot make a trustworthy geometry; the message says why."""


@dataclass(frozen=True)
class CameraGeometry:
    """Pixel -> strip millimetres for one camera (field names = config keys)."""

    mm_per_px_x: float
    mm_per_px_y: float
    offset_x_mm: float
    flip_x: bool = False

    def __post_init__(self) -> None:
        for name in ("mm_per_px_x", "mm_per_px_y"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise GeometryError(f"CameraGeometry.{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.offset_x_mm, (int, float)) and math.isfinite(self.offset_x_mm)):
            raise GeometryError(f"CameraGeometry.offset_x_mm must be a finite number, got {self.offset_x_mm!r}")

    def px_to_strip_mm(
        self, x_px: float, y_px: float, frame_pos_mm: float, *, frame_width_px: int | None = None
    ) -> tuple[float, float]:
        """(across_mm, along_mm) of the point (x_px, y_px) of a frame whose first row is at
        frame_pos_mm. A mirrored camera (flip_x) needs the frame width to mirror x."""
        if self.flip_x:
            if frame_width_px is None:
                raise GeometryError("CameraGeometry with flip_x needs frame_width_px to map x")
            x_px = frame_width_px - x_px
        across = self.offset_x_mm + x_px * self.mm_per_px_x
        along = frame_pos_mm + y_px * self.mm_per_px_y
        return float(across), float(along)

    def area_px_to_mm2(self, area_px: float) -> float:
        """Area of a region of area_px pixels, in mm^2."""
        return float(area_px) * self.mm_per_px_x * self.mm_per_px_y

    def length_px_to_mm(self, dx_px: float, dy_px: float) -> tuple[float, float]:
        """Width across and length along the strip of a dx_px x dy_px extent."""
        return float(abs(dx_px) * self.mm_per_px_x), float(abs(dy_px) * self.mm_per_px_y)

    def to_toml(self, camera_id: str) -> str:
        """The [[cameras]] snippet for the agent's config."""
        lines = [
            "[[cameras]]",
            f"id = {_toml_string(camera_id)}",
            f"mm_per_px_x = {self.mm_per_px_x:.6g}",
            f"mm_per_px_y = {self.mm_per_px_y:.6g}",
            f"offset_x_mm = {self.offset_x_mm:.6g}",
        ]
        if self.flip_x:
            lines.append("flip_x = true")
        return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
