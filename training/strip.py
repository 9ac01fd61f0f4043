"""Realistic synthetic strip: textured background, non-defect stains, defects with instance boxes.

The plain generator (training.synth.StripGenerator) paints defects on a smooth background that no
line camera sees; a model or a gate tuned on it passes every textured frame (issue 17). This one
draws what a camera over real hot-rolled strip shows, so that training, calibration, the demo and
the bench meet hard negatives:

- texture at several scales, stretched along the rolling direction (down the columns, y): coarse
  mottling, medium grain and fine speckle, each an anisotropic noise field;
- roll lines: thin streaks constant down a column (rolling marks), plus faint bands across the
  strip that repeat with the work-roll circumference along the coil;
- illumination drift across the width (uneven lighting) and along the coil (a slow function of the
  coil position `index * height + y`, so consecutive frames join), and vignetting (the lens's
  cos^4-like fall-off towards the frame edges);
- sensor noise: per-column fixed-pattern gain, shot noise growing with brightness, read noise;
- soft stains (oil: smooth dark blotches) and water marks (rings with a soft edge) that are NOT
  defects and carry no label;
- defects of the six NEU-DET classes (training.synth's drawers), some scaled to low contrast, and
  small defects (3-40 px: pits, short scratches, small inclusions), each one instance with its class
  and box: the tight box of the pixels it changed by at least `training.synth.MIN_CONTRAST` grey
  levels before its contrast scale (so a faint defect keeps the box of its shape).

numpy and OpenCV only (the camera simulator and the bench may import it; torch never).
`frame(index, defective)` depends only on (seed, index, defective).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from training.datasets.core import Box
from training.synth import _DRAWERS, MIN_CONTRAST, STEEL_CLASSES

SMALL_MAX_PX = 40  # a small defect's box is at most this long on its longer side
LOW_CONTRAST = (0.35, 0.7)  # contrast scale of a low-contrast defect
ROLL_CIRCUMFERENCE_LINES = 2900  # lines per work-roll turn: the period of the roll bands


@dataclass(frozen=True)
class StripFrame:
    """One generated frame: image uint8 [H, W]; masks bool [K, H, W] (the changed pixels of each
    class); boxes, one per defect instance (x1/y1 exclusive, like training.datasets.Box); and the
    boxes of the stains drawn (no class: they are not defects; for tests and the bench)."""

    image: np.ndarray
    masks: np.ndarray
    boxes: list[Box]
    stains: list[tuple[int, int, int, int]]

    def instances(self) -> list[tuple[int, int, int, int, int]]:
        """The boxes as (class_id, x0, y0, x1, y1) int tuples, as training.synth's
        ``frame_with_instances`` gives them (camera-sim's and the bench's ground truth)."""
        return [(int(b.cls), int(b.x0), int(b.y0), int(b.x1), int(b.y1)) for b in self.boxes]


def _aniso_noise(rng: np.random.Generator, h: int, w: int, cell_x: float, stretch: float) -> np.ndarray:
    """Smooth noise in about [-1, 1] with correlation length cell_x across and cell_x*stretch along."""
    gw = max(2, int(w / cell_x) + 2)
    gh = max(2, int(h / (cell_x * stretch)) + 2)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    out = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return out / max(1e-6, float(out.std()))


def _small_defect(rng: np.random.Generator, h: int, w: int, classes: Sequence[str]) -> tuple[str, np.ndarray]:
    """A defect whose box is 3..SMALL_MAX_PX px: a pit, a short scratch or a small inclusion."""
    d = np.zeros((h, w), np.float32)
    kinds = [c for c in ("pitted_surface", "scratches", "inclusion") if c in classes] or list(classes)
    kind = kinds[int(rng.integers(len(kinds)))]
    cx, cy = int(rng.integers(24, w - 24)), int(rng.integers(24, h - 24))
    value = -float(rng.uniform(25, 60))
    if kind == "scratches":
        length = rng.uniform(8, SMALL_MAX_PX - 4)
        ang = np.deg2rad(90 + rng.normal(0, 20))
        dx, dy = 0.5 * length * np.cos(ang), 0.5 * length * np.sin(ang)
        value = -value if rng.random() < 0.6 else value
        cv2.line(d, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), value, int(rng.integers(1, 3)), cv2.LINE_8)
    elif kind == "inclusion":
        cv2.ellipse(d, (cx, cy), (int(rng.integers(1, 4)), int(rng.integers(3, 15))), float(rng.normal(0, 10)),
                    0, 360, value, -1, cv2.LINE_8)
    elif kind == "pitted_surface":
        for _ in range(int(rng.integers(1, 6))):
            cv2.circle(d, (cx + int(rng.integers(-10, 11)), cy + int(rng.integers(-10, 11))),
                       int(rng.integers(1, 4)), value, -1, cv2.LINE_8)
    else:  # a class without a small form: a small blob of it
        cv2.circle(d, (cx, cy), int(rng.integers(2, 8)), value, -1, cv2.LINE_8)
    return kind, d


class RealisticStripGenerator:
    """Textured strip frames with stains (no label) and defects (one box each); deterministic."""

    def __init__(self, width: int = 1600, height: int = 256, classes: Sequence[str] = STEEL_CLASSES,
                 seed: int = 0, small_rate: float = 0.35, low_contrast_rate: float = 0.3,
                 stains_per_frame: float = 1.2) -> None:
        if width < 96 or height < 96:
            raise ValueError(f"RealisticStripGenerator: frame must be at least 96x96, got {width}x{height}")
        if not classes:
            raise ValueError("RealisticStripGenerator: classes must not be empty")
        unknown = [c for c in classes if c not in _DRAWERS]
        if unknown:
            raise ValueError(f"RealisticStripGenerator: unknown defect class(es) {unknown}; known: {list(STEEL_CLASSES)}")
        for name, v in (("small_rate", small_rate), ("low_contrast_rate", low_contrast_rate)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"RealisticStripGenerator: {name} must be in [0, 1], got {v}")
        if stains_per_frame < 0:
            raise ValueError(f"RealisticStripGenerator: stains_per_frame must be >= 0, got {stains_per_frame}")
        self.width, self.height = int(width), int(height)
        self.classes = tuple(classes)
        self.seed = int(seed)
        self.small_rate = float(small_rate)
        self.low_contrast_rate = float(low_contrast_rate)
        self.stains_per_frame = float(stains_per_frame)
        # properties of the coil (not of a frame): lighting profile, roll-band phase, column gains
        coil = np.random.default_rng([self.seed, 0x5EED])
        x = np.linspace(-1.0, 1.0, self.width, dtype=np.float32)
        self._across = (coil.uniform(-10, 10) * x + coil.uniform(-8, 0) * x ** 2
                        + 3.0 * _aniso_noise(coil, 1, self.width, 300.0, 1.0)[0])
        self._vignette = (1.0 - coil.uniform(0.08, 0.2) * x ** 4).astype(np.float32)
        self._column_gain = (1.0 + coil.normal(0, 0.006, self.width)).astype(np.float32)
        self._level = coil.uniform(100.0, 145.0)
        self._drift = coil.uniform(-1, 1, 4)  # along-coil drift: a few slow sines
        self._band_phase = coil.uniform(0, 2 * np.pi)

    # -- public --------------------------------------------------------------------------------
    def frame(self, index: int, defective: bool) -> StripFrame:
        # one stream per layer, so that a setting of one layer (stains, defects) leaves the others' pixels
        seq = np.random.SeedSequence([self.seed, int(index), int(bool(defective))])
        rng_tex, rng_stain, rng, rng_sensor = (np.random.default_rng(s) for s in seq.spawn(4))
        h, w, k = self.height, self.width, len(self.classes)
        base = self._background(rng_tex, int(index))
        stains = self._stains(rng_stain, base)
        masks = np.zeros((k, h, w), bool)
        boxes: list[Box] = []
        image = base
        if defective:
            delta = np.zeros((h, w), np.float32)
            owner = np.full((h, w), -1, np.int32)
            painted: list[tuple[int, np.ndarray]] = []
            for _ in range(int(rng.choice([1, 1, 1, 2, 2, 3]))):
                if rng.random() < self.small_rate:
                    name, d = _small_defect(rng, h, w, self.classes)
                else:
                    name = self.classes[int(rng.integers(k))]
                    d = _DRAWERS[name](rng, h, w)
                support = np.abs(d) >= MIN_CONTRAST
                if not support.any():
                    continue
                faint, low = rng.uniform(*LOW_CONTRAST), rng.random() < self.low_contrast_rate  # both always drawn
                scale = faint if low else 1.0
                delta[support] = d[support] * scale
                owner[support] = len(painted)  # a later defect overwrites an earlier one's pixels
                painted.append((self.classes.index(name), support))
            for i, (ci, _) in enumerate(painted):
                mine = owner == i
                if not mine.any():
                    continue  # wholly covered by a later defect
                ys, xs = np.nonzero(mine)
                boxes.append(Box(ci, float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
                masks[ci] |= mine
            image = base + delta
        image = self._sensor(rng_sensor, image)
        return StripFrame(np.clip(np.rint(image), 0, 255).astype(np.uint8), masks, boxes, stains)

    # -- background ----------------------------------------------------------------------------
    def _background(self, rng: np.random.Generator, index: int) -> np.ndarray:
        h, w = self.height, self.width
        stretch = rng.uniform(3.0, 8.0)
        tex = (rng.uniform(3.0, 7.0) * _aniso_noise(rng, h, w, rng.uniform(60, 160), stretch)
               + rng.uniform(1.5, 4.0) * _aniso_noise(rng, h, w, rng.uniform(8, 20), stretch)
               + rng.uniform(1.0, 2.5) * _aniso_noise(rng, h, w, rng.uniform(1.5, 3.0), stretch * 1.5))
        # rolling marks: thin streaks constant down a column
        streak = rng.normal(0.0, 1.0, w).astype(np.float32)
        streak = cv2.GaussianBlur(streak.reshape(1, -1), (0, 0), sigmaX=rng.uniform(0.6, 2.0)).ravel()
        streak *= rng.uniform(2.0, 5.0) / max(1e-6, float(streak.std()))
        for _ in range(int(rng.integers(0, 4))):  # a few stronger roll lines
            c = int(rng.integers(0, w))
            streak[max(0, c - 1):c + 2] += rng.choice([-1.0, 1.0]) * rng.uniform(4.0, 9.0)
        # position along the coil, in lines: drift and roll bands continue from frame to frame
        y = (index * h + np.arange(h, dtype=np.float64))
        drift = sum(a * 6.0 * np.sin(y / (20000.0 * (i + 1)) + i) for i, a in enumerate(self._drift))
        band = 2.0 * np.exp(-0.5 * ((np.mod(y, ROLL_CIRCUMFERENCE_LINES) - 800.0) / 6.0) ** 2)
        along = (drift + band * np.cos(self._band_phase)).astype(np.float32)
        level = self._level + tex + streak[None, :] + self._across[None, :] + along[:, None]
        return level * self._vignette[None, :]

    def _stains(self, rng: np.random.Generator, base: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Oil stains and water marks, added into `base` in place; their boxes (x0, y0, x1, y1)."""
        h, w = base.shape
        boxes = []
        for _ in range(int(rng.poisson(self.stains_per_frame))):
            rx, ry = rng.uniform(20, 160), rng.uniform(15, 110)
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            x0, x1 = int(max(0, cx - 2.5 * rx)), int(min(w, cx + 2.5 * rx + 1))
            y0, y1 = int(max(0, cy - 2.5 * ry)), int(min(h, cy + 2.5 * ry + 1))
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            r = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
            r = r * (1.0 + 0.25 * _aniso_noise(rng, y1 - y0, x1 - x0, 30.0, 1.0))  # irregular outline
            if rng.random() < 0.6:  # oil: a smooth darkening, soft edge
                amp = -rng.uniform(5.0, 16.0)
                field = amp / (1.0 + np.exp((r - 1.0) / 0.25))
            else:  # water mark: a soft ring where the drop dried
                amp = rng.choice([-1.0, 1.0]) * rng.uniform(4.0, 10.0)
                field = amp * np.exp(-0.5 * ((r - 1.0) / 0.12) ** 2) + 0.25 * amp / (1.0 + np.exp((r - 1.0) / 0.2))
            base[y0:y1, x0:x1] += field.astype(np.float32)
            boxes.append((x0, y0, x1, y1))
        return boxes

    def _sensor(self, rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
        signal = np.clip(image, 0, None) * self._column_gain[None, :]
        shot = rng.standard_normal(image.shape).astype(np.float32) * np.sqrt(signal * rng.uniform(0.02, 0.06))
        read = rng.normal(0.0, rng.uniform(0.8, 2.0), image.shape).astype(np.float32)
        return signal + shot + read
