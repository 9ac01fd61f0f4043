"""The wafer, chip and parts generators: shapes, dtypes, label statistics, channel agreement, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from training.gen_chip import CHANNELS, CHIP_CLASSES, ChipGenerator
from training.gen_parts import FULL_H, FULL_W, SCALE, PartsGenerator
from training.gen_wafer import FAIL, GOOD, LABEL_SETS, OUTSIDE, WAFER_PATTERNS, WaferGenerator


# -- wafer ---------------------------------------------------------------------------------------

def test_wafer_label_sets_are_mixedwm38s_38():
    assert len(LABEL_SETS) == 38 and len(set(LABEL_SETS)) == 38
    sizes = [len(s) for s in LABEL_SETS]
    assert [sizes.count(n) for n in range(5)] == [1, 8, 13, 12, 4]  # normal, single, 2-, 3-, 4-pattern mixtures
    for s in LABEL_SETS:
        assert not {"Center", "Donut"} <= set(s) and not {"Edge-Loc", "Edge-Ring"} <= set(s)
        if len(s) > 1:
            assert "Near-full" not in s and "Random" not in s


def test_wafer_maps_shapes_codes_and_masks():
    gen = WaferGenerator(5)
    for i in range(40):
        s = gen.sample(i)
        assert s.wafer.shape == (52, 52) and s.wafer.dtype == np.uint8
        assert set(np.unique(s.wafer)) <= {OUTSIDE, GOOD, FAIL}
        assert s.wafer[0, 0] == OUTSIDE and s.wafer[26, 26] != OUTSIDE  # a disc of dies in a square
        assert s.labels.dtype == bool and s.labels.shape == (8,)
        assert s.patterns == LABEL_SETS[s.label_set]
        assert (s.wafer[s.masks.any(axis=0)] == FAIL).all(), "every die a pattern made fail is failing"
        for k in np.flatnonzero(s.labels):
            assert s.masks[k].any(), f"{WAFER_PATTERNS[k]} drew no failing die"
        assert not s.masks[~s.labels].any()
        assert 0.0 <= s.yield_() <= 1.0


def test_wafer_label_statistics_match_the_equal_shares_of_38_sets():
    n = 1900
    gen = WaferGenerator(11)
    labels = np.stack([gen.sample(i).labels for i in range(n)])
    expected = np.array([sum(p in s for s in LABEL_SETS) / 38 for p in WAFER_PATTERNS])
    share = labels.mean(axis=0)
    # binomial: 4 standard deviations
    assert np.all(np.abs(share - expected) <= 4 * np.sqrt(expected * (1 - expected) / n)), (share, expected)
    normal = (~labels.any(axis=1)).mean()
    assert abs(normal - 1 / 38) <= 4 * np.sqrt((1 / 38) * (37 / 38) / n)


def test_wafer_pattern_geometry_follows_the_definitions():
    gen = WaferGenerator(3)
    yy, xx = np.mgrid[0:52, 0:52]
    r = np.hypot(yy - 25.5, xx - 25.5)
    for name, check in (("Center", lambda m: r[m].mean() < 9), ("Edge-Ring", lambda m: r[m].min() > 17),
                        ("Edge-Loc", lambda m: r[m].min() > 14), ("Near-full", lambda m: m.sum() > 1000),
                        ("Donut", lambda m: r[m].min() > 4 and r[m].mean() < 20)):
        k = LABEL_SETS.index((name,))
        for i in range(10):
            s = gen.sample(i, label_set=k)
            assert check(s.masks[WAFER_PATTERNS.index(name)]), (name, i)


def test_wafer_generator_is_deterministic_by_seed():
    a, b, c = WaferGenerator(7).sample(12), WaferGenerator(7).sample(12), WaferGenerator(8).sample(12)
    assert np.array_equal(a.wafer, b.wafer) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.wafer, c.wafer)
    x, y = WaferGenerator(7).batch(10, 5)
    assert x.shape == (5, 52, 52) and y.shape == (5, 8) and np.array_equal(x[2], a.wafer)
    with pytest.raises(ValueError, match="label_set 38 outside 0..37"):
        WaferGenerator(0).sample(0, label_set=38)


# -- chip ----------------------------------------------------------------------------------------

def test_chip_dies_shapes_classes_and_clean_share():
    gen = ChipGenerator(2)
    samples = [gen.sample(i) for i in range(100)]
    for s in samples[:20]:
        assert s.image.shape == (224, 224, len(CHANNELS)) and s.image.dtype == np.uint8
        assert s.masks.shape == (len(CHIP_CLASSES), 224, 224) and s.masks.dtype == bool
        for k, x0, y0, x1, y1 in s.boxes:
            assert s.masks[k, y0:y1, x0:x1].any()
    clean = np.mean([not s.boxes for s in samples])
    assert abs(clean - 0.16) <= 4 * np.sqrt(0.16 * 0.84 / 100), clean
    sizes = [max(x1 - x0, y1 - y0) for s in samples for _, x0, y0, x1, y1 in s.boxes]
    assert max(sizes) <= 28 and np.mean(np.array(sizes) <= 20) > 0.8  # positives mostly 20x20 px or less
    present = {k for s in samples for k, *_ in s.boxes}
    assert present == {0, 1, 2}


def test_chip_channels_agree_with_the_defects():
    gen = ChipGenerator(4)
    height, intensity = CHANNELS.index("height"), CHANNELS.index("intensity")
    pads, drill = CHANNELS.index("pads"), CHANNELS.index("drill")
    seen = set()
    for i in range(60):
        s = gen.sample(i)
        img = s.image.astype(float)
        assert set(np.unique(s.image[..., pads])) <= {0, 255} and set(np.unique(s.image[..., drill])) <= {0, 255}
        assert s.image[..., drill].any() and s.image[..., pads].any()
        structures = (s.image[..., pads] > 0) | (s.image[..., drill] > 0)
        assert not (s.masks.any(axis=0) & structures).any(), "pads and drill holes are never defects"
        for k, x0, y0, x1, y1 in s.boxes:
            m = np.zeros_like(s.masks[k])
            m[y0:y1, x0:x1] = s.masks[k, y0:y1, x0:x1]  # this defect (defects never touch)
            ring = np.zeros_like(m)
            ring[max(0, y0 - 6):y1 + 6, max(0, x0 - 6):x1 + 6] = True
            ring &= ~m & ~structures & ~s.masks.any(axis=0)
            dh = img[..., height][m].mean() - img[..., height][ring].mean()
            name = CHIP_CLASSES[k]
            seen.add(name)
            if name == "bump":
                assert dh > 10, (i, dh)
            elif name == "dent":
                assert dh < -10, (i, dh)
            else:  # a dot marks the 2D image, not the height
                assert abs(dh) < 6, (i, dh)
                assert abs(img[..., intensity][m].mean() - img[..., intensity][ring].mean()) > 15
            if name in ("bump", "dent"):  # the 2D image is shaded where the height slopes
                assert img[..., intensity][m].std() > 3
    assert seen == set(CHIP_CLASSES)


def test_chip_generator_is_deterministic_by_seed():
    a, b = ChipGenerator(9).sample(3), ChipGenerator(9).sample(3)
    assert np.array_equal(a.image, b.image) and a.boxes == b.boxes
    assert not np.array_equal(a.image, ChipGenerator(10).sample(3).image)
    assert not ChipGenerator(9).sample(3, defective=False).boxes


# -- parts ---------------------------------------------------------------------------------------

def test_parts_windows_scratches_boxes_and_colours():
    gen = PartsGenerator(6)
    samples = [gen.sample(i, window=256) for i in range(40)]
    assert {s.colour for s in samples} == {"red", "white"}
    clean = np.mean([not s.boxes for s in samples])
    assert 0.1 <= clean <= 0.55
    for s in samples:
        assert s.image.shape == (256, 256, 3) and s.image.dtype == np.uint8 and s.mask.shape == (256, 256)
        if s.boxes:
            ys, xs = np.nonzero(s.mask)
            # boxes are in full-resolution pixels: SCALE x the drawn mask's extent
            assert min(b[0] for b in s.boxes) == xs.min() * SCALE and max(b[3] for b in s.boxes) == (ys.max() + 1) * SCALE
            for x0, y0, x1, y1 in s.boxes:
                assert 0 < x1 - x0 <= 200 * SCALE and 0 < y1 - y0 <= 200 * SCALE
        else:
            assert not s.mask.any()


def test_parts_scratches_change_the_paint():
    gen = PartsGenerator(8)
    for i in range(30):
        s = gen.sample(i, window=256, defective=True)
        if not s.mask.any():
            continue
        img = s.image.astype(float).mean(axis=2)
        import cv2

        near = cv2.dilate(s.mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~s.mask
        assert abs(img[s.mask].mean() - img[near].mean()) > 8, i


def test_parts_full_frame_and_determinism():
    a = PartsGenerator(1).sample(0, window=128)
    b = PartsGenerator(1).sample(0, window=128)
    assert np.array_equal(a.image, b.image) and a.boxes == b.boxes
    f = a.frame()
    assert f.shape == (128 * SCALE, 128 * SCALE, 3) and f.dtype == np.uint8
    assert (FULL_W, FULL_H) == (4608, 3072)
