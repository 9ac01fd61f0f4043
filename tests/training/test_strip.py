"""training/strip.py: realistic textured strip with unlabelled stains and boxed defects."""
from __future__ import annotations

import numpy as np
import pytest

from training.strip import SMALL_MAX_PX, RealisticStripGenerator, StripFrame
from training.synth import STEEL_CLASSES


def test_shapes_dtypes_and_determinism():
    gen = RealisticStripGenerator(seed=3)
    f = gen.frame(5, defective=True)
    assert isinstance(f, StripFrame)
    assert f.image.shape == (256, 1600) and f.image.dtype == np.uint8
    assert f.masks.shape == (len(STEEL_CLASSES), 256, 1600) and f.masks.dtype == bool
    again = RealisticStripGenerator(seed=3).frame(5, defective=True)
    assert np.array_equal(f.image, again.image) and np.array_equal(f.masks, again.masks)
    assert [(b.cls, b.x0, b.y0, b.x1, b.y1) for b in f.boxes] == [(b.cls, b.x0, b.y0, b.x1, b.y1) for b in again.boxes]
    assert not np.array_equal(f.image, RealisticStripGenerator(seed=4).frame(5, True).image)
    assert not np.array_equal(f.image, gen.frame(6, True).image)


def test_texture_is_not_flat_and_drifts():
    f = RealisticStripGenerator(seed=1, stains_per_frame=0).frame(0, defective=False)
    img = f.image.astype(np.float64)
    assert img.std() > 5, "a textured strip, not a flat grey"
    # stretched along the rolling direction: neighbours down a column agree more than across a row
    down = np.abs(np.diff(img, axis=0)).mean()
    across = np.abs(np.diff(img, axis=1)).mean()
    assert down < across
    # vignetting: the frame's edges are darker than its middle
    assert img[:, :50].mean() < img[:, 700:900].mean()


def test_stains_carry_no_label_but_change_pixels():
    stained = RealisticStripGenerator(seed=2, stains_per_frame=3.0)
    plain = RealisticStripGenerator(seed=2, stains_per_frame=0.0)
    seen = 0
    for i in range(6):
        f = stained.frame(i, defective=False)
        assert f.boxes == [] and not f.masks.any(), "a stain must never be labelled a defect"
        d = np.abs(f.image.astype(float) - plain.frame(i, False).image)
        inside = np.zeros(d.shape, bool)
        for x0, y0, x1, y1 in f.stains:
            seen += 1
            inside[y0:y1, x0:x1] = True
            assert d[y0:y1, x0:x1].max() >= 4, "a stain must be visible"
        assert d[~inside].max() <= 2, "a stain changes its own box only (shot noise aside)"
    assert seen >= 3
    f = stained.frame(0, defective=True)
    labelled = f.masks.any(axis=0)
    for b in f.boxes:  # stains on a defective frame: still only the defects are labelled
        assert labelled[int(b.y0):int(b.y1), int(b.x0):int(b.x1)].any()


def test_defect_boxes_frame_the_painted_defect():
    gen = RealisticStripGenerator(seed=5)
    boxes_seen = 0
    for i in range(8):
        f = gen.frame(i, defective=True)
        covered = np.zeros_like(f.masks)
        for b in f.boxes:
            boxes_seen += 1
            x0, y0, x1, y1 = int(b.x0), int(b.y0), int(b.x1), int(b.y1)
            inside = f.masks[b.cls, y0:y1, x0:x1]
            # tight: every side of the box touches a pixel of the defect
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[b.cls, y0:y1, x0:x1] = True
        assert not (f.masks & ~covered).any(), "every defect pixel lies in a box of its class"
    assert boxes_seen >= 8


def test_small_and_low_contrast_defects():
    small = RealisticStripGenerator(seed=7, small_rate=1.0)
    for i in range(6):
        for b in small.frame(i, defective=True).boxes:
            assert max(b.x1 - b.x0, b.y1 - b.y0) <= SMALL_MAX_PX
    faint = RealisticStripGenerator(seed=7, small_rate=0.0, low_contrast_rate=1.0, stains_per_frame=0)
    strong = RealisticStripGenerator(seed=7, small_rate=0.0, low_contrast_rate=0.0, stains_per_frame=0)
    a, b = faint.frame(1, True), strong.frame(1, True)
    assert np.array_equal(a.masks, b.masks), "contrast scales the defect, not its shape or box"
    m = b.masks.any(axis=0)
    assert m.any() and np.array_equal(a.image[~m], b.image[~m]), "the background is the same"
    # the faint defect changes its pixels by 0.35-0.7 of the strong one's change
    background = np.asarray(a.image[~m], float).mean()
    assert np.abs(a.image[m] - background).mean() < np.abs(b.image[m].astype(float) - background).mean()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least 96x96"):
        RealisticStripGenerator(width=64)
    with pytest.raises(ValueError, match="unknown defect class"):
        RealisticStripGenerator(classes=("rust",))
    with pytest.raises(ValueError, match="small_rate must be in"):
        RealisticStripGenerator(small_rate=2.0)
    with pytest.raises(ValueError, match="stains_per_frame must be >= 0"):
        RealisticStripGenerator(stains_per_frame=-1)
