"""Per-camera spatial calibration: image pixels -> millimetres on the strip.

A line camera looks down on the strip. Its image x axis runs across the strip, its y axis
along it (the direction the strip moves). ``CameraGeometry`` holds the numbers the agent
needs, with the same names as the ``[[cameras]]`` section of the config (agent/config.py
CameraSection), and maps pixels exactly as engines/postprocess.py does::

    across_mm = offset_x_mm + x * mm_per_px_x     x = x_px, or frame_width - x_px when flip_x
    along_mm  = frame_pos_mm + y_px * mm_per_px_y

Pixel coordinates are continuous with pixel i covering [i, i + 1) (a one-pixel box at column
i has its centre at i + 0.5, as the agent computes box centres); OpenCV's corner positions,
which put pixel centres on integers, are shifted by +0.5 to match. ``offset_x_mm`` is the
across-strip position (from the strip's reference edge) of the frame's left edge, or of its
right edge when ``flip_x`` (the camera sees the strip mirrored); ``frame_pos_mm`` is the
along-strip position of the frame's first row, which the agent knows from the frame header.

``CameraGeometry`` is the small runtime type in engines.geometry (the agent's post-processing
uses it); this module measures it. ``measure_from_target`` measures these numbers from one image of a printed chessboard laid
flat on the strip with its rows across the strip: OpenCV finds the inner corners
(findChessboardCorners + cornerSubPix), a least-squares fit of corner pixel positions against
their grid indices gives the scale along each axis, and the pattern's first corner (on the
pattern line across the strip that is topmost in the image, the inner corner nearest the
strip's reference edge), whose across-strip position the fitter measured with a tape, fixes
the offset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engines.geometry import CameraGeometry, GeometryError

# The chessboard measurement's errors are the geometry's (one type for "these numbers are unusable").
SpatialCalibrationError = GeometryError


@dataclass(frozen=True)
class TargetMeasurement:
    """What one chessboard image says about the camera."""

    geometry: CameraGeometry
    first_corner_px: tuple[float, float]  # (x, y) of the pattern's first corner, pixel i = [i, i+1)
    rotation_deg: float  # angle of the pattern's across axis against image x
    residual_px: float  # RMS distance of the corners from the fitted grid
    n_corners: int


def parse_pattern(text: str) -> tuple[int, int]:
    """'9x6' -> (9, 6): inner corners per row (cols) and per column (rows)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise SpatialCalibrationError(f"pattern {text!r} must look like COLSxROWS of inner corners, e.g. 9x6")
    cols, rows = (int(p) for p in parts)
    if cols < 2 or rows < 2:
        raise SpatialCalibrationError(f"pattern {text!r}: need at least 2x2 inner corners")
    return cols, rows


def measure_from_target(
    image: np.ndarray,
    pattern: tuple[int, int],
    square_mm: float,
    target_offset_mm: float = 0.0,
    *,
    flip_x: bool = False,
    max_rotation_deg: float = 5.0,
) -> TargetMeasurement:
    """Measure mm/px across and along the strip and the across offset from a chessboard image.

    ``pattern`` is (cols, rows) of *inner* corners, OpenCV's patternSize; ``square_mm`` the
    printed square size; ``target_offset_mm`` the measured across-strip position of the
    pattern's first corner (the inner corner of the top pattern line nearest pixel column 0,
    or nearest the last column when ``flip_x``). Refuses when the pattern is not found or is
    turned more than ``max_rotation_deg`` against the image axes (the geometry assumes the
    camera's x axis runs across the strip).
    """
    import cv2

    if not (isinstance(square_mm, (int, float)) and math.isfinite(square_mm) and square_mm > 0):
        raise SpatialCalibrationError(f"square_mm must be a finite number > 0, got {square_mm!r}")
    cols, rows = pattern
    if cols < 2 or rows < 2:
        raise SpatialCalibrationError(f"pattern {cols}x{rows}: need at least 2x2 inner corners")
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] in (3, 4):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY if img.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    if img.ndim != 2 or img.dtype != np.uint8:
        raise SpatialCalibrationError(
            f"target image must be 8-bit grey or BGR, got shape {img.shape} dtype {img.dtype}"
        )
    flags = cv2.CALIB_CB_ADAPTIVE_THRESH | cv2.CALIB_CB_NORMALIZE_IMAGE
    found, corners = cv2.findChessboardCorners(img, (cols, rows), flags=flags)
    if not found or corners is None or len(corners) != cols * rows:
        raise SpatialCalibrationError(
            f"chessboard with {cols}x{rows} inner corners not found in the {img.shape[1]}x{img.shape[0]} image; "
            "check --pattern (inner corners, not squares), focus and lighting"
        )
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 50, 0.001)
    corners = cv2.cornerSubPix(img, corners.astype(np.float32), (5, 5), (-1, -1), criteria)
    pts = corners.reshape(rows, cols, 2).astype(np.float64)  # OpenCV: row by row, cols per row

    # Least squares: pixel = origin + i * u + j * v, with (i, j) the corner's (col, row) index.
    jj, ii = np.mgrid[0:rows, 0:cols]
    design = np.column_stack([np.ones(ii.size), ii.ravel(), jj.ravel()])
    coef, *_ = np.linalg.lstsq(design, pts.reshape(-1, 2), rcond=None)
    u, v = coef[1], coef[2]  # px per square along the pattern's col index and row index
    fitted = design @ coef
    residual = float(np.sqrt(np.mean(np.sum((fitted - pts.reshape(-1, 2)) ** 2, axis=1))))
    # The axis whose step is mostly horizontal runs across the strip; the corners sharing an
    # index along the other axis form one line across the strip.
    if abs(u[0]) * abs(v[1]) >= abs(v[0]) * abs(u[1]):
        across_vec, along_vec = u, v
        lines = pts  # [rows, cols, 2]: each row of the pattern lies across the strip
    else:
        across_vec, along_vec = v, u
        lines = pts.transpose(1, 0, 2)
    rotation = math.degrees(math.atan2(abs(across_vec[1]), abs(across_vec[0])))
    if rotation > max_rotation_deg:
        raise SpatialCalibrationError(
            f"chessboard is turned {rotation:.1f} deg against the image x axis (limit {max_rotation_deg} deg); "
            "lay the target square to the strip edge"
        )
    mm_per_px_x = float(square_mm / np.linalg.norm(across_vec))
    mm_per_px_y = float(square_mm / np.linalg.norm(along_vec))

    # First corner: on the pattern line across the strip that is topmost in the image, the
    # corner nearest pixel column 0 (nearest the last column when flip_x).
    top_line = lines[int(np.argmin(lines[:, :, 1].mean(axis=1)))]
    first = top_line[np.argmax(top_line[:, 0])] if flip_x else top_line[np.argmin(top_line[:, 0])]
    x0, y0 = float(first[0]) + 0.5, float(first[1]) + 0.5  # OpenCV centres -> pixel i = [i, i+1)
    width = img.shape[1]
    x_from_edge = (width - x0) if flip_x else x0
    offset = target_offset_mm - x_from_edge * mm_per_px_x
    geometry = CameraGeometry(mm_per_px_x, mm_per_px_y, float(offset), flip_x=flip_x)
    return TargetMeasurement(
        geometry=geometry,
        first_corner_px=(x0, y0),
        rotation_deg=float(rotation),
        residual_px=residual,
        n_corners=cols * rows,
    )
