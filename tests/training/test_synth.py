"""Synthetic strip frames: determinism, shapes and exact ground truth."""
from __future__ import annotations

import numpy as np
import pytest

from training.synth import MIN_CONTRAST, STEEL_CLASSES, StripGenerator, compose_from_crops


def test_frame_shapes_and_dtypes():
    g = StripGenerator(width=320, height=128, seed=1)
    img, masks = g.frame(0, True)
    assert img.shape == (128, 320) and img.dtype == np.uint8
    assert masks.shape == (len(STEEL_CLASSES), 128, 320) and masks.dtype == bool


def test_frame_is_deterministic_per_seed_and_index():
    a = StripGenerator(width=320, height=128, seed=3)
    b = StripGenerator(width=320, height=128, seed=3)
    for i in range(3):
        ia, ma = a.frame(i, True)
        ib, mb = b.frame(i, True)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
    other_index, _ = a.frame(1, True)
    other_seed, _ = StripGenerator(width=320, height=128, seed=4).frame(0, True)
    first, _ = a.frame(0, True)
    assert not np.array_equal(first, other_index)
    assert not np.array_equal(first, other_seed)


def test_clean_frames_have_empty_masks_and_texture():
    g = StripGenerator(width=320, height=128, seed=0)
    img, masks = g.frame(5, False)
    assert not masks.any()
    assert 60 < img.mean() < 200
    assert img.std() > 2.0  # textured, not flat


def test_every_class_is_drawn_with_a_nonempty_mask():
    seen = set()
    for cls in STEEL_CLASSES:
        g = StripGenerator(width=400, height=160, classes=(cls,), seed=0)
        for i in range(4):
            _, masks = g.frame(i, True)
            if masks[0].any():
                seen.add(cls)
                break
    assert seen == set(STEEL_CLASSES)


def test_masks_are_exact_defect_pixels_differ_from_clean_texture():
    """The same (seed, index) texture is what a defect is drawn on: mask pixels changed, others did not."""
    g = StripGenerator(width=400, height=160, seed=7)
    for i in range(6):
        rng = np.random.default_rng([g.seed, i, 1])
        clean = np.clip(np.rint(g._texture(rng)), 0, 255)
        img, masks = g.frame(i, True)
        support = masks.any(0)
        assert support.any()
        diff = np.abs(img.astype(np.float32) - clean)
        assert diff[support].min() >= MIN_CONTRAST - 1  # rounding can cost one grey level
        assert diff[~support].max() == 0
        # defect pixels stand out from the background statistics
        bg = img[~support].astype(np.float32)
        assert abs(img[support].mean() - bg.mean()) > 0.5 * bg.std()


def test_unknown_class_is_refused():
    with pytest.raises(ValueError, match=r"unknown defect class\(es\) \['dent'\]"):
        StripGenerator(classes=("dent",))


def test_too_small_frame_is_refused():
    with pytest.raises(ValueError, match="at least 64x64, got 32x256"):
        StripGenerator(width=32)


def _crop(value: int, defect: bool, k: int = 6, size: int = 200, cls: int = 2):
    img = np.full((size, size), value, np.uint8)
    masks = np.zeros((k, size, size), bool)
    if defect:
        masks[cls, 50:80, 60:120] = True
        img[masks[cls]] = value - 40
    return img, masks


def test_compose_from_crops_tiles_with_exact_ground_truth():
    crops = [_crop(130, True), _crop(130, False), _crop(130, False)]
    frame, masks = compose_from_crops(crops, width=1600, height=256, rng=np.random.default_rng(0))
    assert frame.shape == (256, 1600) and frame.dtype == np.uint8
    assert masks.shape == (6, 256, 1600)
    assert masks[2].any() and not np.delete(masks, 2, axis=0).any()
    # every mask pixel is a dark defect pixel, every other pixel is clean background
    # (the level matching shifts each crop by the same amount, keeping the 40-level step)
    defect, clean = frame[masks[2]], frame[~masks[2]]
    assert len(np.unique(defect)) == 1 and len(np.unique(clean)) <= 3
    assert int(clean.min()) - int(defect.max()) >= 38


def test_compose_from_crops_pulls_crop_levels_together_keeping_masks():
    crops = [_crop(100, True), _crop(180, False)]
    frame, masks = compose_from_crops(crops, width=400, height=200, rng=np.random.default_rng(1))
    assert masks[2].sum() == 30 * 60
    left, right = frame[:, :200], frame[:, 200:]
    assert abs(float(np.median(left)) - float(np.median(right))) < 80 * 0.5


def test_compose_from_crops_errors():
    with pytest.raises(ValueError, match="crops must not be empty"):
        compose_from_crops([], 100, 100)
    img, m = _crop(100, False)
    with pytest.raises(ValueError, match=r"crop 0 image must be uint8 \[h, w\]"):
        compose_from_crops([(img.astype(np.float32), m)], 100, 100)
    with pytest.raises(ValueError, match=r"crop 1 has 3 classes, crop 0 has 6"):
        compose_from_crops([(img, m), (img, m[:3])], 100, 100)
    with pytest.raises(ValueError, match=r"crop 0 masks must be bool"):
        compose_from_crops([(img, m.astype(np.uint8))], 100, 100)
