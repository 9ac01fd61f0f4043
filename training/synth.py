"""Synthetic steel strip frames with exact per-class ground truth.

A line camera looks across the strip: a frame is ``width`` pixels across the strip and
``height`` lines along the rolling direction (default 1600 x 256, uint8, grey). The texture
has what real hot-rolled strip shows a camera: rolling marks (streaks along the rolling
direction, constant down a column), a brightness drift across the frame, low-frequency
mottling and sensor noise. Defects of the six NEU-DET classes are drawn on top, each as an
intensity change whose support is the class mask, so a mask pixel is exactly a pixel the
defect changed (by at least ``MIN_CONTRAST`` grey levels) and no other pixel is.

numpy and OpenCV only: the camera simulator imports this module at run time, torch never.
"""
from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np

STEEL_CLASSES: tuple[str, ...] = (
    "crazing",
    "inclusion",
    "patches",
    "pitted_surface",
    "rolled-in_scale",
    "scratches",
)

MIN_CONTRAST = 6.0  # grey levels: a defect pixel differs from the clean texture by at least this


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1] made by upsampling a coarse random grid."""
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    coarse = rng.uniform(-1.0, 1.0, size=(gh, gw)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


class StripGenerator:
    """Deterministic synthetic strip frames: ``frame(i, defective)`` depends only on (seed, i, defective)."""

    def __init__(
        self,
        width: int = 1600,
        height: int = 256,
        classes: Sequence[str] = STEEL_CLASSES,
        seed: int = 0,
    ) -> None:
        if width < 64 or height < 64:
            raise ValueError(f"StripGenerator: frame must be at least 64x64, got {width}x{height}")
        unknown = [c for c in classes if c not in _DRAWERS]
        if unknown:
            raise ValueError(f"StripGenerator: unknown defect class(es) {unknown}; known: {list(STEEL_CLASSES)}")
        if not classes:
            raise ValueError("StripGenerator: classes must not be empty")
        self.width = int(width)
        self.height = int(height)
        self.classes = tuple(classes)
        self.seed = int(seed)

    # -- public ------------------------------------------------------------------
    def frame(self, index: int, defective: bool) -> tuple[np.ndarray, np.ndarray]:
        """Return (image uint8 [H, W], masks bool [K, H, W]); masks are all False when not defective."""
        out, masks, _ = self.frame_with_instances(index, defective)
        return out, masks

    def frame_with_instances(self, index: int, defective: bool
                             ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int, int]]]:
        """(image, masks, instances): one instance per painted defect, ``(class_id, x0, y0, x1, y1)``, the
        box (px, x1/y1 exclusive) of the pixels it still owns after later defects painted over it (a
        defect wholly painted over is none). The same image and masks as ``frame``."""
        rng = np.random.default_rng([self.seed, int(index), int(bool(defective))])
        base = self._texture(rng)
        k, h, w = len(self.classes), self.height, self.width
        masks = np.zeros((k, h, w), dtype=bool)
        painted: list[tuple[int, np.ndarray]] = []
        if defective:
            delta = np.zeros((h, w), dtype=np.float32)
            n_defects = int(rng.choice([1, 1, 1, 2, 2, 3]))
            for _ in range(n_defects):
                ci = int(rng.integers(k))
                d = _DRAWERS[self.classes[ci]](rng, h, w)
                support = np.abs(d) >= MIN_CONTRAST
                if not support.any():
                    continue
                # later defects overwrite earlier ones where they overlap
                delta[support] = d[support]
                masks[:, support] = False
                masks[ci] |= support
                painted = [(c, own & ~support) for c, own in painted] + [(ci, support)]
            image = base + delta
        else:
            image = base
        instances = []
        for ci, own in painted:
            ys, xs = np.nonzero(own)
            if xs.size:
                instances.append((ci, int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        # keep every defect pixel at least MIN_CONTRAST away from the clean texture after clipping
        out = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        return out, masks, instances

    # -- texture -------------------------------------------------------------------
    def _texture(self, rng: np.random.Generator) -> np.ndarray:
        h, w = self.height, self.width
        level = rng.uniform(105.0, 150.0)
        # rolling marks: streaks along the rolling direction (constant down each column)
        streak = rng.normal(0.0, 1.0, size=w).astype(np.float32)
        streak = cv2.GaussianBlur(streak.reshape(1, -1), (0, 0), sigmaX=rng.uniform(0.8, 2.5)).ravel()
        streak *= rng.uniform(3.0, 7.0) / max(1e-6, float(streak.std()))
        # brightness drift across the strip (illumination falls off towards the edges) and along it
        x = np.linspace(-1.0, 1.0, w, dtype=np.float32)
        y = np.linspace(-1.0, 1.0, h, dtype=np.float32)
        across = rng.uniform(-12.0, 0.0) * x**2 + rng.uniform(-6.0, 6.0) * x
        along = rng.uniform(-4.0, 4.0) * y
        mottle = _smooth_noise(rng, h, w, cell=int(rng.integers(24, 64))) * rng.uniform(2.0, 6.0)
        grain = rng.normal(0.0, rng.uniform(2.0, 4.5), size=(h, w)).astype(np.float32)
        return level + streak[None, :] + across[None, :] + along[:, None] + mottle + grain


# -- defect drawers: each returns a float32 [H, W] intensity change, zero off the defect --------

def _box(rng: np.random.Generator, h: int, w: int, bw: tuple[int, int], bh: tuple[int, int]) -> tuple[int, int, int, int]:
    """A random box (x0, y0, x1, y1) of size in the given ranges, inside the frame."""
    ww = int(rng.integers(bw[0], min(bw[1], w - 4) + 1))
    hh = int(rng.integers(bh[0], min(bh[1], h - 4) + 1))
    x0 = int(rng.integers(2, w - ww - 1))
    y0 = int(rng.integers(2, h - hh - 1))
    return x0, y0, x0 + ww, y0 + hh


def _crazing(rng, h, w):
    """A network of fine, short, dark cracks in a patch (like dried mud)."""
    d = np.zeros((h, w), np.float32)
    x0, y0, x1, y1 = _box(rng, h, w, (60, 220), (50, 160))
    strength = -rng.uniform(14.0, 30.0)
    for _ in range(int(rng.integers(25, 60))):
        px, py = rng.uniform(x0, x1), rng.uniform(y0, y1)
        ang = rng.uniform(0, np.pi)
        pts = [(px, py)]
        for _ in range(int(rng.integers(2, 5))):
            ang += rng.normal(0, 0.5)
            step = rng.uniform(4, 12)
            px, py = px + step * np.cos(ang), py + step * np.sin(ang)
            pts.append((np.clip(px, x0, x1), np.clip(py, y0, y1)))
        cv2.polylines(d, [np.round(np.array(pts)).astype(np.int32)], False, float(strength), 1, cv2.LINE_8)
    return d


def _inclusion(rng, h, w):
    """Dark elongated inclusions stretched along the rolling direction (vertical)."""
    d = np.zeros((h, w), np.float32)
    n = int(rng.integers(1, 4))
    cx0, cy0 = rng.uniform(30, w - 30), rng.uniform(30, h - 30)
    for _ in range(n):
        cx = float(np.clip(cx0 + rng.normal(0, 15), 6, w - 6))
        cy = float(np.clip(cy0 + rng.normal(0, 20), 6, h - 6))
        ax = (int(rng.integers(2, 6)), int(rng.integers(10, 45)))
        ang = float(rng.normal(0, 10))
        cv2.ellipse(d, (int(cx), int(cy)), ax, ang, 0, 360, -float(rng.uniform(25, 55)), -1, cv2.LINE_8)
    return d


def _patches(rng, h, w):
    """Large irregular dark (sometimes bright) blotches."""
    x0, y0, x1, y1 = _box(rng, h, w, (50, 200), (40, 150))
    ph, pw = y1 - y0, x1 - x0
    field = _smooth_noise(rng, ph, pw, cell=int(rng.integers(12, 30)))
    yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
    ell = 1.0 - (((xx - pw / 2) / (pw / 2)) ** 2 + ((yy - ph / 2) / (ph / 2)) ** 2)
    blob = (field * 0.6 + ell) > 0.35
    sign = -1.0 if rng.random() < 0.8 else 1.0
    d = np.zeros((h, w), np.float32)
    d[y0:y1, x0:x1][blob] = sign * rng.uniform(22.0, 45.0)
    return d


def _pitted_surface(rng, h, w):
    """A cluster of small dark pits."""
    d = np.zeros((h, w), np.float32)
    x0, y0, x1, y1 = _box(rng, h, w, (50, 200), (40, 150))
    for _ in range(int(rng.integers(12, 50))):
        cx, cy = int(rng.integers(x0, x1)), int(rng.integers(y0, y1))
        r = int(rng.integers(1, 4))
        cv2.circle(d, (cx, cy), r, -float(rng.uniform(25, 60)), -1, cv2.LINE_8)
    return d


def _rolled_in_scale(rng, h, w):
    """Flakes of oxide scale pressed into the surface: irregular polygons, dark and bright."""
    d = np.zeros((h, w), np.float32)
    x0, y0, x1, y1 = _box(rng, h, w, (60, 240), (40, 160))
    for _ in range(int(rng.integers(6, 20))):
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        r = rng.uniform(3, 10)
        m = int(rng.integers(4, 8))
        ang = np.sort(rng.uniform(0, 2 * np.pi, m))
        rad = r * rng.uniform(0.5, 1.3, m)
        pts = np.stack([cx + rad * np.cos(ang), cy + 1.6 * rad * np.sin(ang)], 1)
        value = -rng.uniform(20, 45) if rng.random() < 0.7 else rng.uniform(20, 40)
        cv2.fillPoly(d, [np.round(pts).astype(np.int32)], float(value), cv2.LINE_8)
    return d


def _scratches(rng, h, w):
    """Long thin straight-ish scratches, mostly along the rolling direction, bright or dark."""
    d = np.zeros((h, w), np.float32)
    n = int(rng.integers(1, 4))
    bx = rng.uniform(20, w - 20)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    for _ in range(n):
        length = rng.uniform(0.4, 1.0) * h
        ang = np.deg2rad(90 + rng.normal(0, 15))
        cx, cy = bx + rng.normal(0, 25), rng.uniform(0.3, 0.7) * h
        dx, dy = 0.5 * length * np.cos(ang), 0.5 * length * np.sin(ang)
        p0 = (int(np.clip(cx - dx, 0, w - 1)), int(np.clip(cy - dy, 0, h - 1)))
        p1 = (int(np.clip(cx + dx, 0, w - 1)), int(np.clip(cy + dy, 0, h - 1)))
        cv2.line(d, p0, p1, float(sign * rng.uniform(25, 50)), int(rng.integers(1, 4)), cv2.LINE_8)
    return d


_DRAWERS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "crazing": _crazing,
    "inclusion": _inclusion,
    "patches": _patches,
    "pitted_surface": _pitted_surface,
    "rolled-in_scale": _rolled_in_scale,
    "scratches": _scratches,
}


def compose_from_crops(
    crops: Sequence[tuple[np.ndarray, np.ndarray]],
    width: int = 1600,
    height: int = 256,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tile real crops into one strip frame with exact ground truth.

    ``crops`` are (image uint8 [h, w], masks bool [K, h, w]) pairs, defective and clean (all-False
    masks) alike, e.g. 200x200 NEU-DET crops. They are laid row by row in a random order, cycling
    through the list until the frame is covered; a crop at the right or bottom edge is cut.
    Each crop's mean is pulled towards the frame's mean level (an affine grey change, so the
    masks stay exact) to keep seams plausible. Returns (frame uint8 [height, width], masks
    bool [K, height, width]).
    """
    if not crops:
        raise ValueError("compose_from_crops: crops must not be empty")
    if width < 1 or height < 1:
        raise ValueError(f"compose_from_crops: width and height must be positive, got {width}x{height}")
    rng = rng if rng is not None else np.random.default_rng(0)
    k = crops[0][1].shape[0] if getattr(crops[0][1], "ndim", 0) == 3 else -1
    for i, (img, m) in enumerate(crops):
        if img.dtype != np.uint8 or img.ndim != 2:
            raise ValueError(f"compose_from_crops: crop {i} image must be uint8 [h, w], got {img.dtype} {img.shape}")
        if m.dtype != bool or m.ndim != 3 or m.shape[1:] != img.shape:
            raise ValueError(f"compose_from_crops: crop {i} masks must be bool [K, {img.shape[0]}, {img.shape[1]}], got {m.dtype} {m.shape}")
        if m.shape[0] != k:
            raise ValueError(f"compose_from_crops: crop {i} has {m.shape[0]} classes, crop 0 has {k}")
    frame = np.zeros((height, width), np.uint8)
    masks = np.zeros((k, height, width), bool)
    target = float(np.mean([c[0].mean() for c in crops]))
    order = list(rng.permutation(len(crops)))
    pos = 0
    y = 0
    while y < height:
        x = 0
        row_h = 0
        while x < width:
            img, m = crops[order[pos % len(order)]]
            pos += 1
            ch, cw = img.shape
            hh, ww = min(ch, height - y), min(cw, width - x)
            piece = img[:hh, :ww].astype(np.float32)
            piece += 0.7 * (target - float(img.mean()))
            frame[y : y + hh, x : x + ww] = np.clip(np.rint(piece), 0, 255).astype(np.uint8)
            masks[:, y : y + hh, x : x + ww] = m[:, :hh, :ww]
            x += ww
            row_h = max(row_h, hh)
        y += row_h
    return frame, masks
