"""One class's probability map -> its defects: threshold, 8-connected components, minimum area.

The single implementation of that rule: the agent turns its output into defect events
(engines/postprocess.py) and the evaluation into masks and boxes (training/evaluate.py), so what
is calibrated and scored is what the line reports. numpy and OpenCV only (the agent imports it).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Component:
    label: int  # its value in the label map
    bbox_px: tuple[int, int, int, int]  # x0, y0, x1, y1 in frame pixels, x1/y1 exclusive, clipped to the frame
    area_px: int  # cells x stride^2: frame pixels
    peak: float  # highest probability inside the component


def class_components(prob: np.ndarray, threshold: float, min_area_px: int, stride: int,
                     frame_hw: tuple[int, int]) -> tuple[np.ndarray | None, list[Component]]:
    """Components of ``prob >= threshold`` (a [h, w] map at output stride ``stride``) whose area
    in frame pixels is at least ``min_area_px``. Returns the label map (None when nothing is on)
    and the kept components; a component wholly outside the frame is dropped."""
    on = prob >= threshold
    if not on.any():
        return None, []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(on.view(np.uint8), connectivity=8)
    height, width = frame_hw
    cell_px = stride * stride
    out: list[Component] = []
    for i in range(1, n):
        x, y, w, h, cells = (int(v) for v in stats[i])
        if cells * cell_px < min_area_px:
            continue
        x0, y0 = x * stride, y * stride
        x1, y1 = min((x + w) * stride, width), min((y + h) * stride, height)
        if x1 <= x0 or y1 <= y0:
            continue
        window = prob[y:y + h, x:x + w]
        peak = float(window[labels[y:y + h, x:x + w] == i].max())
        out.append(Component(i, (x0, y0, x1, y1), cells * cell_px, peak))
    return labels, out
