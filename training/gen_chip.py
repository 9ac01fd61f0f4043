"""Generated chip dies: 224x224, six channels that agree, with bump, dent and dot defects and exact masks.

The published die data (six registered views of each die: 3D height, 2D intensity, pattern,
variance, pads, drill hole; defect classes bump, dent, dot; positives often 20x20 px or less,
about 16 % of dies without any) is not reachable here, so this generator draws dies from those
definitions. Channel order (``CHANNELS``), uint8 HWC:

0 ``height``  3D height map: a slightly tilted plane with fine roughness; pads raised, drill holes deep.
1 ``intensity`` 2D image: grey die with its printed pattern, lit from the upper left, so a slope
  facing the light is brighter (a bump shades bright then dark, a dent dark then bright).
2 ``pattern`` the die's printed pattern (traces on a grid), the same on every die of a seed up to a
  shift of a few pixels: what the 2D image should show without defects.
3 ``variance`` local standard deviation of the 2D image (5x5 window), scaled.
4 ``pads``    pad mask (rectangular pads in rows along two edges), fixed structures, not defects.
5 ``drill``   drill-hole mask (one or two round holes), fixed structures, not defects.

Defects (never on a pad or a hole, never touching another defect):
- bump: a raised dome (Gaussian, 6-20 px across, +25..70 height levels), shaded in the 2D image.
- dent: a depression of the same sizes (-25..-70), shaded the other way.
- dot: a small spot of contamination (3-9 px across) in the 2D image only, darker or brighter
  than the die by 35..90 levels, and no height change.

A defect's mask is where it changes its channel by at least a third of its amplitude (bump,
dent: height; dot: 2D), so every mask pixel is visibly changed. ``sample(i)`` depends only on
(seed, i). numpy and OpenCV only.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CHIP_CLASSES: tuple[str, ...] = ("bump", "dent", "dot")
CHANNELS: tuple[str, ...] = ("height", "intensity", "pattern", "variance", "pads", "drill")
SIZE = 224
CLEAN_SHARE = 0.16
SEEDS = {"train": 1224, "val": 2224, "test": 3224}


@dataclass(frozen=True)
class ChipSample:
    image: np.ndarray  # uint8 [224, 224, 6] (HWC, CHANNELS order)
    masks: np.ndarray  # bool [3, 224, 224] (CHIP_CLASSES order)
    boxes: tuple[tuple[int, int, int, int, int], ...]  # (class_id, x0, y0, x1, y1), x1/y1 exclusive

    @property
    def labels(self) -> np.ndarray:
        return self.masks.reshape(len(CHIP_CLASSES), -1).any(axis=1)


class ChipGenerator:
    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        layout = np.random.default_rng([self.seed, 0x1A7])
        self._pattern = _pattern(layout)

    def sample(self, i: int, defective: bool | None = None) -> ChipSample:
        rng = np.random.default_rng([self.seed, int(i), 0xC4])
        n = SIZE
        if defective is None:
            defective = bool(rng.random() >= CLEAN_SHARE)
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        # fixed structures: pads in rows along two edges, one or two drill holes
        pads = np.zeros((n, n), np.uint8)
        pw, ph, pitch = int(rng.integers(10, 15)), int(rng.integers(14, 20)), int(rng.integers(22, 30))
        for x in range(8, n - pw - 8, pitch):
            pads[4:4 + ph, x:x + pw] = 1
            pads[n - 4 - ph:n - 4, x:x + pw] = 1
        drill = np.zeros((n, n), np.uint8)
        holes = [(int(rng.integers(50, n - 50)), int(rng.integers(50, n - 50)), int(rng.integers(7, 12)))]
        if rng.random() < 0.5:
            holes.append((int(rng.integers(40, n - 40)), int(rng.integers(40, n - 40)), int(rng.integers(6, 10))))
        for hx, hy, hr in holes:
            cv2.circle(drill, (hx, hy), hr, 1, -1, lineType=cv2.LINE_8)
        structure = cv2.dilate(((pads | drill) > 0).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        pads_f, drill_f = pads.astype(np.float32), drill.astype(np.float32)
        # height: tilted plane + roughness, pads raised, holes deep
        height = (110 + rng.uniform(-10, 10) + rng.uniform(-0.05, 0.05) * (xx - n / 2)
                  + rng.uniform(-0.05, 0.05) * (yy - n / 2) + rng.normal(0, 1.5, (n, n))).astype(np.float32)
        height += 45 * pads_f - 80 * drill_f
        dy, dx = int(rng.integers(-3, 4)), int(rng.integers(-3, 4))
        pattern = np.roll(self._pattern, (dy, dx), axis=(0, 1)).astype(np.float32)
        base2d = rng.uniform(95, 130)
        dot_change = np.zeros((n, n), np.float32)
        masks = np.zeros((len(CHIP_CLASSES), n, n), bool)
        boxes: list[tuple[int, int, int, int, int]] = []
        if defective:
            taken = structure.copy()
            for _ in range(int(rng.choice([1, 1, 1, 2, 2, 3]))):
                k = int(rng.integers(len(CHIP_CLASSES)))
                size = rng.uniform(3, 9) if CHIP_CLASSES[k] == "dot" else rng.uniform(6, 20)
                for _try in range(30):
                    cx, cy = rng.uniform(size + 2, n - size - 2, 2)
                    r = int(np.ceil(size)) + 3
                    x0, y0 = int(cx) - r, int(cy) - r
                    if not taken[max(0, y0):y0 + 2 * r, max(0, x0):x0 + 2 * r].any():
                        break
                else:
                    continue
                d2 = ((xx - cx) / (size / 2)) ** 2 + ((yy - cy) / (size / 2 * rng.uniform(0.7, 1.3))) ** 2
                if CHIP_CLASSES[k] == "dot":
                    blob = np.exp(-(d2 ** 2))  # flat top, sharp rim
                    amp = rng.uniform(35, 90) * rng.choice([-1.0, 1.0])
                    dot_change += amp * blob
                else:
                    blob = np.exp(-d2)  # Gaussian dome: d2 = 1 at half the size
                    amp = rng.uniform(25, 70) * (1 if CHIP_CLASSES[k] == "bump" else -1)
                    height += amp * blob
                m = blob >= 1.0 / 3.0
                masks[k] |= m
                ys, xs = np.nonzero(m)
                boxes.append((k, int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
                taken |= cv2.dilate(m.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        # 2D image: albedo (pattern, pads bright, holes dark) x lighting from the upper left on the height slope
        gy, gx = np.gradient(cv2.GaussianBlur(height, (0, 0), 1.0))
        shade = 1.0 - 0.035 * (gx + gy)
        albedo = base2d + 55 * pattern + 60 * pads_f - 70 * drill_f
        intensity = albedo * np.clip(shade, 0.3, 1.7) + dot_change + rng.normal(0, 2.0, (n, n))
        intensity = np.clip(intensity, 0, 255)
        mean = cv2.blur(intensity, (5, 5))
        var = np.sqrt(np.maximum(cv2.blur(intensity * intensity, (5, 5)) - mean * mean, 0))
        image = np.stack([np.clip(height, 0, 255), intensity, pattern * 255, np.clip(var * 6, 0, 255),
                          pads_f * 255.0, drill_f * 255.0], axis=-1)
        return ChipSample(np.rint(image).astype(np.uint8), masks, tuple(boxes))


def _pattern(rng: np.random.Generator) -> np.ndarray:
    """The seed's printed pattern: thin traces on a grid, 0/1 float."""
    p = np.zeros((SIZE, SIZE), np.uint8)
    step = int(rng.integers(14, 22))
    for y in range(30, SIZE - 30, step):
        x0, x1 = sorted(rng.integers(10, SIZE - 10, 2))
        cv2.line(p, (int(x0), y), (int(x1), y), 1, 1)
    for x in range(12, SIZE - 12, step * 2):
        y0, y1 = sorted(rng.integers(30, SIZE - 30, 2))
        cv2.line(p, (x, int(y0)), (x, int(y1)), 1, 1)
    return p.astype(np.float32)
