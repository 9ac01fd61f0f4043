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
                     frame_hw: tuple[int, int], link_px: int = 0) -> tuple[np.ndarray | None, list[Component]]:
    """Components of ``prob >= threshold`` (a [h, w] map at output stride ``stride``) whose area
    in frame pixels is at least ``min_area_px``. Returns the label map (None when nothing is on)
    and the kept components; a component wholly outside the frame is dropped.

    ``link_px`` > 0: pieces whose gap is at most ``link_px`` frame pixels (ceil(link_px / stride)
    empty cells, counted along rows, columns or diagonals) are one component: one crack broken in
    three by a faint stretch is one defect. The label map then marks only the on cells, with their
    group's label; area, box and peak are the group's on cells."""
    on = prob >= threshold
    if not on.any():
        return None, []
    if link_px < 0:
        raise ValueError(f"link_px must be >= 0, got {link_px}")
    on8 = on.view(np.uint8)
    if link_px:
        # a (g + 1)-cell square grows a piece by g cells in all (left + right, up + down): pieces with
        # at most g empty cells between them (Chebyshev) then touch, farther ones do not
        g = -(-int(link_px) // stride)
        grown = cv2.dilate(on8, np.ones((g + 1, g + 1), np.uint8))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(grown, connectivity=8)
        labels[~on] = 0
    else:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(on8, connectivity=8)
    height, width = frame_hw
    cell_px = stride * stride
    out: list[Component] = []
    for i in range(1, n):
        x, y, w, h, cells = (int(v) for v in stats[i])
        mine = None  # the component's cells in its box, computed once it is kept (or to shrink a group)
        if link_px:  # the grown region's stats: take the group's own cells
            mine = labels[y:y + h, x:x + w] == i
            rows, cols = np.flatnonzero(mine.any(axis=1)), np.flatnonzero(mine.any(axis=0))
            y, x, h, w = y + int(rows[0]), x + int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
            mine = labels[y:y + h, x:x + w] == i
            cells = int(mine.sum())
        if cells * cell_px < min_area_px:
            continue
        x0, y0 = x * stride, y * stride
        x1, y1 = min((x + w) * stride, width), min((y + h) * stride, height)
        if x1 <= x0 or y1 <= y0:
            continue
        if mine is None:
            mine = labels[y:y + h, x:x + w] == i
        peak = float(prob[y:y + h, x:x + w][mine].max())
        out.append(Component(i, (x0, y0, x1, y1), cells * cell_px, peak))
    return labels, out
