"""Generated photos of red and white painted parts with scratches, and distractors, with exact boxes.

Modelled on the karpovaknn_scratches photos (4608x3072 RGB: a small painted plastic part held by a
clip on a thin stick in front of a grey studio backdrop, beside other sticks and clips; scratches
are thin, often curved lines where the paint is scraped: lighter on red parts, lighter or darker
on white ones, 25-180 px long at full resolution). A scene has:

- a grey backdrop with a soft gradient and vignetting, and 4-7 sticks with clips (long straight
  edges, bright plastic: distractors);
- one part, red or white: a rotated rounded rectangle with a lit-from-above shading, ridges and
  holes moulded into it (edges that are not scratches);
- specular reflections on the part (soft, wider, elongated highlights: the hardest distractor) and
  dust (specks of 1-3 px) on the part and the backdrop;
- 0-4 scratches on the part (30 % of parts have none): quadratic curves 1-2.5 px wide at half
  resolution, 12-90 px long, contrast drawn at random within the colour's range.

Scenes are drawn at half resolution (``SCALE``; the pack's ``input_pool`` 2 gives the model the
same half-resolution view of a full frame); ``frame()`` upsamples a scene to the full 4608x3072.
Boxes are in full-resolution pixels, ``[x0, y0, x1, y1]`` exclusive, as COCO boxes of the real
set are. ``sample(i)`` depends only on (seed, i). numpy and OpenCV only.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

PARTS_CLASSES: tuple[str, ...] = ("scratch",)
FULL_W, FULL_H = 4608, 3072
SCALE = 2  # scenes are drawn at FULL / SCALE
SEEDS = {"train": 1408, "val": 2408, "test": 3408}
CLEAN_SHARE = 0.3
RED = (178, 52, 38)
WHITE = (214, 214, 208)


@dataclass(frozen=True)
class PartSample:
    image: np.ndarray  # uint8 [h, w, 3] RGB at half resolution (the model's view)
    mask: np.ndarray  # bool [h, w]: scratch pixels
    boxes: tuple[tuple[int, int, int, int], ...]  # full-resolution [x0, y0, x1, y1) per scratch
    colour: str  # "red" or "white"
    offset: tuple[int, int] = (0, 0)  # full-resolution (x, y) of this scene's top-left corner

    def frame(self) -> np.ndarray:
        """The scene as a full-resolution camera frame (upsampled SCALE x)."""
        h, w = self.image.shape[:2]
        return cv2.resize(self.image, (w * SCALE, h * SCALE), interpolation=cv2.INTER_LINEAR)


class PartsGenerator:
    """``sample(i)``: a whole 4608x3072 scene (drawn at 2304x1536); ``sample(i, window=384)``: a
    window x window (half-resolution) scene around the part, the same drawing, for training."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def sample(self, i: int, window: int | None = None, defective: bool | None = None) -> PartSample:
        rng = np.random.default_rng([self.seed, int(i), 0x5C])
        if window is None:
            h, w = FULL_H // SCALE, FULL_W // SCALE
            cx, cy = rng.uniform(0.38, 0.62) * w, rng.uniform(0.35, 0.55) * h
        else:
            h = w = int(window)
            cx, cy = rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h
        colour = "red" if rng.random() < 0.5 else "white"
        if defective is None:
            defective = bool(rng.random() >= CLEAN_SHARE)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        g = rng.uniform(95, 135)
        img = g + rng.uniform(-15, 15) * (yy / h - 0.5) + rng.uniform(-10, 10) * (xx / w - 0.5)
        img = np.repeat(img[..., None], 3, axis=2) * np.array([1.0, 1.0, rng.uniform(1.0, 1.06)], np.float32)
        # sticks and clips (distractors with long edges)
        for _ in range(int(rng.integers(4, 8))):
            sx = rng.uniform(0, w)
            top = rng.uniform(0.3, 0.7) * h
            tone = rng.choice([rng.uniform(190, 235), rng.uniform(30, 60)])
            thick = int(rng.integers(3, 8))
            cv2.line(img, (int(sx), int(top)), (int(sx + rng.uniform(-40, 40)), h), (tone,) * 3, thick, cv2.LINE_AA)
            cv2.rectangle(img, (int(sx - 9), int(top - 35)), (int(sx + 9), int(top)), (rng.uniform(180, 230),) * 3, -1,
                          cv2.LINE_AA)
        # the part
        pw, ph = rng.uniform(110, 260), rng.uniform(60, 220)
        if window is not None:
            pw, ph = min(pw, 0.7 * w), min(ph, 0.7 * h)
        angle = rng.uniform(-25, 25)
        part = np.zeros((h, w), np.uint8)
        box = cv2.boxPoints(((cx, cy), (pw, ph), angle)).astype(np.int32)
        cv2.fillConvexPoly(part, box, 1, cv2.LINE_AA)
        part = cv2.erode(cv2.dilate(part, np.ones((9, 9), np.uint8)), np.ones((9, 9), np.uint8)) > 0
        base = np.array(RED if colour == "red" else WHITE, np.float32) * rng.uniform(0.85, 1.1)
        shade = 1.0 + 0.18 * ((cy - yy) / max(ph, 1)) + rng.normal(0, 0.01, (h, w))
        body = base[None, None, :] * shade[..., None]
        # moulded ridges and holes: edges that are not scratches
        relief = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            p0 = (cx + rng.uniform(-0.4, 0.4) * pw, cy + rng.uniform(-0.4, 0.4) * ph)
            length, a = rng.uniform(0.3, 0.8) * pw, np.deg2rad(angle + rng.choice([0, 90]))
            p1 = (p0[0] + length * np.cos(a), p0[1] + length * np.sin(a))
            cv2.line(relief, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), rng.choice([-0.18, 0.15]),
                     int(rng.integers(4, 9)), cv2.LINE_AA)
        for _ in range(int(rng.integers(0, 4))):
            hc = (int(cx + rng.uniform(-0.4, 0.4) * pw), int(cy + rng.uniform(-0.4, 0.4) * ph))
            cv2.circle(relief, hc, int(rng.integers(3, 9)), -0.35, -1, cv2.LINE_AA)
        relief = cv2.GaussianBlur(relief, (0, 0), 1.2)
        body *= (1.0 + relief)[..., None]
        # specular reflections: soft, elongated, wider than a scratch
        spec = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(0, 3))):
            p0 = (cx + rng.uniform(-0.4, 0.4) * pw, cy + rng.uniform(-0.4, 0.4) * ph)
            a = rng.uniform(0, np.pi)
            length = rng.uniform(20, 80)
            p1 = (p0[0] + length * np.cos(a), p0[1] + length * np.sin(a))
            cv2.line(spec, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), 1.0, int(rng.integers(5, 12)),
                     cv2.LINE_AA)
        spec = cv2.GaussianBlur(spec, (0, 0), rng.uniform(3.0, 5.0)) * rng.uniform(40, 90)
        body += spec[..., None]
        img = np.where(part[..., None], body, img)
        # scratches on the part
        mask = np.zeros((h, w), bool)
        boxes = []
        inner = cv2.erode(part.astype(np.uint8), np.ones((11, 11), np.uint8)) > 0
        if defective:
            for _ in range(int(rng.choice([1, 1, 2, 2, 3, 4]))):
                for _try in range(20):
                    p0 = np.array([cx + rng.uniform(-0.45, 0.45) * pw, cy + rng.uniform(-0.45, 0.45) * ph])
                    a = rng.uniform(0, np.pi)
                    length = rng.uniform(12, 90)
                    p2 = p0 + length * np.array([np.cos(a), np.sin(a)])
                    bend = rng.uniform(-0.3, 0.3) * length
                    p1 = (p0 + p2) / 2 + bend * np.array([-np.sin(a), np.cos(a)])
                    t = np.linspace(0, 1, max(8, int(length)))[:, None]
                    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
                    xi, yi = pts[:, 0].astype(int), pts[:, 1].astype(int)
                    if (xi.min() >= 0 and yi.min() >= 0 and xi.max() < w and yi.max() < h
                            and inner[yi, xi].all()):
                        break
                else:
                    continue
                line = np.zeros((h, w), np.uint8)
                width = int(rng.choice([1, 1, 2, 2, 3]))
                cv2.polylines(line, [pts.astype(np.int32).reshape(-1, 1, 2)], False, 1, width, cv2.LINE_8)
                m = line > 0
                if colour == "red":
                    target = np.array([rng.uniform(200, 245), rng.uniform(150, 215), rng.uniform(140, 210)], np.float32)
                else:
                    target = np.full(3, rng.uniform(90, 160) if rng.random() < 0.7 else rng.uniform(240, 255),
                                     np.float32)
                alpha = rng.uniform(0.45, 0.95)
                img[m] = (1 - alpha) * img[m] + alpha * target
                mask |= m
                ys, xs = np.nonzero(m)
                boxes.append((int(xs.min()) * SCALE, int(ys.min()) * SCALE, (int(xs.max()) + 1) * SCALE,
                              (int(ys.max()) + 1) * SCALE))
        # dust on everything
        for _ in range(int(rng.integers(5, 40))):
            d = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
            cv2.circle(img, d, int(rng.integers(1, 3)), (float(rng.uniform(20, 250)),) * 3, -1, cv2.LINE_AA)
        vignette = 1.0 - 0.12 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2)
        img = cv2.GaussianBlur(img * vignette[..., None], (0, 0), 0.6) + rng.normal(0, 2.0, (h, w, 1))
        return PartSample(np.clip(np.rint(img), 0, 255).astype(np.uint8), mask, tuple(boxes), colour)
