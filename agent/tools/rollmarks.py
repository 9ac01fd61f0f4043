"""Roll marks for simulated coils: the same dark mark once per roll turn (issue 19, periodic defects).

``with_roll_marks`` wraps a camera-sim frame source (``(image, masks[, instances])`` items, frames
following each other along the strip) and paints a mark every ``pitch_mm`` at a fixed place across,
with jitter along and some repeats missed, as a damaged work roll prints them. A mark that falls on a
frame boundary is painted on both frames (the agent's stitching makes it one track again). Each
painted part is added to the frame's masks and instances (class ``class_id``), so the ground truth
stays exact. ``RollMarks.positions`` lists where the marks were put (mm along the strip).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import cv2
import numpy as np


@dataclass
class RollMarks:
    pitch_mm: float = 2513.3  # an 800 mm work roll
    across_px: int = 1100
    class_id: int = 2  # patches: the steel pack calls a round dark blotch this (11 of 12 times, measured)
    first_mm: float = 700.0
    jitter_mm: float = 3.0
    missed: tuple[int, ...] = (4, 11)  # repeats the roll left no mark at (or the camera did not see)
    axes_px: tuple[int, int] = (50, 40)  # half width across, half length along
    contrast: float = -35.0
    seed: int = 0
    positions: list[float] = field(default_factory=list)  # mm along, the marks painted

    def describe(self, classes: tuple[str, ...], mm_per_px_x: float = 1.0, offset_x_mm: float = 0.0) -> str:
        name = classes[self.class_id] if self.class_id < len(classes) else str(self.class_id)
        return (f"{name} every {self.pitch_mm:.1f} mm at {offset_x_mm + self.across_px * mm_per_px_x:.0f} mm "
                f"across, {len(self.positions)} marks painted (roll diameter {self.pitch_mm / np.pi:.0f} mm)")


def with_roll_marks(frames: Iterable[tuple], marks: RollMarks, *, mm_per_px_y: float) -> Iterator[tuple]:
    rng = np.random.default_rng([marks.seed, 0x5011])
    pos_mm = 0.0
    k = 0
    pending: list[float] = []  # marks not yet wholly behind the current frame
    ry_mm = marks.axes_px[1] * mm_per_px_y
    for item in frames:
        img, masks = item[0], item[1]
        instances = list(item[2]) if len(item) > 2 and item[2] is not None else None
        h = img.shape[0]
        end_mm = pos_mm + h * mm_per_px_y
        while (nxt := marks.first_mm + k * marks.pitch_mm) < end_mm + ry_mm:
            if k not in marks.missed:
                p = nxt + float(rng.uniform(-marks.jitter_mm, marks.jitter_mm))
                pending.append(p)
                marks.positions.append(round(p, 1))
            k += 1
        here = [p for p in pending if p - ry_mm < end_mm and p + ry_mm > pos_mm]
        if here:
            img = img.copy()
            delta = np.zeros(img.shape[:2], np.float32)
            for p in here:
                cy = int(round((p - pos_mm) / mm_per_px_y))
                cv2.ellipse(delta, (marks.across_px, cy), marks.axes_px, 0, 0, 360, marks.contrast, -1)
            support = delta != 0
            img = np.clip(img.astype(np.float32) + (delta if img.ndim == 2 else delta[..., None]), 0, 255).astype(np.uint8)
            if masks is not None:
                masks = masks.copy()
                masks[:, support] = False
                masks[marks.class_id] |= support
            if instances is not None:
                ys, xs = np.nonzero(support)
                instances.append((marks.class_id, int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        pending = [p for p in pending if p + ry_mm > end_mm]
        pos_mm = end_mm
        yield (img, masks, instances) if len(item) > 2 else (img, masks)
