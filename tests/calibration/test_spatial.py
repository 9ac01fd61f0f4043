"""Spatial calibration on chessboards rendered here with known geometry."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from agent.cli import main as calibrate_main
from calibration.spatial import (
    CameraGeometry,
    SpatialCalibrationError,
    measure_from_target,
    parse_pattern,
)


def render_chessboard(cols: int, rows: int, square_px: int, margin_x: int, margin_y: int) -> tuple[np.ndarray, tuple[float, float]]:
    """A white sheet with (cols+1) x (rows+1) squares; returns image and the first inner corner (x, y)."""
    h = (rows + 1) * square_px + 2 * margin_y
    w = (cols + 1) * square_px + 2 * margin_x
    img = np.full((h, w), 255, np.uint8)
    for r in range(rows + 1):
        for c in range(cols + 1):
            if (r + c) % 2 == 0:
                y0, x0 = margin_y + r * square_px, margin_x + c * square_px
                img[y0 : y0 + square_px, x0 : x0 + square_px] = 0
    # inner corner between squares (0,0),(0,1),(1,0),(1,1): the boundary between pixel
    # columns margin_x + square_px - 1 and margin_x + square_px, i.e. x = margin_x + square_px
    first = (float(margin_x + square_px), float(margin_y + square_px))
    return img, first


def test_recovers_anisotropic_scale_and_offset_within_1_percent():
    img, (fx0, _) = render_chessboard(9, 6, square_px=40, margin_x=120, margin_y=50)
    sx, sy = 1.0, 0.75  # line camera: rows along the strip are sampled more coarsely
    scaled = cv2.resize(img, None, fx=sx, fy=sy, interpolation=cv2.INTER_AREA)
    scaled = cv2.GaussianBlur(scaled, (3, 3), 0)
    square_mm = 10.0
    m = measure_from_target(scaled, (9, 6), square_mm, target_offset_mm=500.0)
    want_x = square_mm / (40 * sx)
    want_y = square_mm / (40 * sy)
    assert m.geometry.mm_per_px_x == pytest.approx(want_x, rel=0.01)
    assert m.geometry.mm_per_px_y == pytest.approx(want_y, rel=0.01)
    # the first corner maps back to the measured across position, pixel 0 to offset
    across, along = m.geometry.px_to_strip_mm(m.first_corner_px[0], m.first_corner_px[1], frame_pos_mm=1000.0)
    assert across == pytest.approx(500.0, abs=1e-6)
    assert along == pytest.approx(1000.0 + m.first_corner_px[1] * m.geometry.mm_per_px_y)
    assert m.first_corner_px[0] == pytest.approx(fx0, abs=0.3)  # sx = 1: x unchanged
    assert m.geometry.offset_x_mm == pytest.approx(500.0 - fx0 * want_x, abs=0.1)
    assert m.n_corners == 54
    assert m.rotation_deg < 1.0
    assert m.residual_px < 0.5


def test_flip_x_measures_from_the_other_side():
    img, _ = render_chessboard(7, 5, square_px=30, margin_x=60, margin_y=40)
    w = img.shape[1]
    m = measure_from_target(img, (7, 5), 5.0, target_offset_mm=200.0, flip_x=True)
    g = m.geometry
    assert g.flip_x
    assert g.px_to_strip_mm(*m.first_corner_px, 0.0, frame_width_px=w)[0] == pytest.approx(200.0)
    # moving left in the image moves away from the reference edge
    assert g.px_to_strip_mm(m.first_corner_px[0] - 30, 0, 0, frame_width_px=w)[0] == pytest.approx(205.0, rel=0.01)
    # the first corner is the right-most inner corner of the top row: 7 inner corners at 30 px
    assert m.first_corner_px[0] == pytest.approx(60 + 7 * 30, abs=0.3)
    with pytest.raises(SpatialCalibrationError, match=r"flip_x needs frame_width_px"):
        g.px_to_strip_mm(0, 0, 0)


def test_pattern_not_found_is_refused():
    blank = np.full((300, 400), 128, np.uint8)
    with pytest.raises(SpatialCalibrationError, match=r"chessboard with 9x6 inner corners not found in the 400x300 image"):
        measure_from_target(blank, (9, 6), 10.0)


def test_wrong_pattern_size_is_refused():
    img, _ = render_chessboard(9, 6, square_px=30, margin_x=40, margin_y=40)
    with pytest.raises(SpatialCalibrationError, match=r"chessboard with 8x8 inner corners not found"):
        measure_from_target(img, (8, 8), 10.0)


def test_turned_target_is_refused():
    img, _ = render_chessboard(9, 6, square_px=30, margin_x=120, margin_y=120)
    h, w = img.shape
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), 15, 1.0)
    turned = cv2.warpAffine(img, rot, (w, h), borderValue=255)
    with pytest.raises(SpatialCalibrationError, match=r"turned 1[45]\.\d deg against the image x axis"):
        measure_from_target(turned, (9, 6), 10.0)


def test_bad_arguments_are_refused():
    img, _ = render_chessboard(9, 6, square_px=30, margin_x=40, margin_y=40)
    with pytest.raises(SpatialCalibrationError, match=r"square_mm must be a finite number > 0, got -1"):
        measure_from_target(img, (9, 6), -1)
    with pytest.raises(SpatialCalibrationError, match=r"target image must be 8-bit grey or BGR"):
        measure_from_target(img.astype(np.float32), (9, 6), 10.0)
    with pytest.raises(SpatialCalibrationError, match=r"pattern '9by6' must look like COLSxROWS"):
        parse_pattern("9by6")
    with pytest.raises(SpatialCalibrationError, match=r"need at least 2x2 inner corners"):
        parse_pattern("1x6")
    assert parse_pattern("9x6") == (9, 6)


def test_geometry_conversions_and_validation():
    g = CameraGeometry(mm_per_px_x=0.5, mm_per_px_y=2.0, offset_x_mm=100.0)
    assert g.px_to_strip_mm(10, 5, 1000.0) == (105.0, 1010.0)
    assert g.area_px_to_mm2(10) == 10.0
    assert g.length_px_to_mm(-4, 3) == (2.0, 6.0)
    with pytest.raises(SpatialCalibrationError, match=r"CameraGeometry.mm_per_px_y must be a finite number > 0, got 0"):
        CameraGeometry(0.5, 0, 0.0)
    with pytest.raises(SpatialCalibrationError, match=r"CameraGeometry.offset_x_mm must be a finite number, got nan"):
        CameraGeometry(0.5, 0.5, float("nan"))
    toml = g.to_toml("cam-1")
    assert toml.splitlines() == [
        "[[cameras]]",
        'id = "cam-1"',
        "mm_per_px_x = 0.5",
        "mm_per_px_y = 2",
        "offset_x_mm = 100",
    ]


def test_cli_prints_toml_snippet(tmp_path, capsys):
    img, _ = render_chessboard(9, 6, square_px=40, margin_x=80, margin_y=40)
    path = tmp_path / "target.png"
    cv2.imwrite(str(path), img)
    rc = calibrate_main(
        ["calibrate", "spatial", "--image", str(path), "--pattern", "9x6", "--square-mm", "10",
         "--target-offset-mm", "250", "--camera-id", "top-0"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert '[[cameras]]\nid = "top-0"\n' in out
    values = dict(line.split(" = ") for line in out.splitlines() if " = " in line and not line.startswith("#"))
    assert float(values["mm_per_px_x"]) == pytest.approx(0.25, rel=0.01)
    assert float(values["mm_per_px_y"]) == pytest.approx(0.25, rel=0.01)


def test_cli_missing_image_is_a_clear_error(tmp_path, capsys):
    rc = calibrate_main(
        ["calibrate", "spatial", "--image", str(tmp_path / "nope.png"), "--pattern", "9x6", "--square-mm", "10"]
    )
    assert rc == 2
    assert "cannot read image" in capsys.readouterr().err
