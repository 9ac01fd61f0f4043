"""Model outputs -> defects, px -> mm.

Two rules, chosen by the pack: a seg model with an instance head (model.json format 3) gives one
defect per instance (engines/instances.py: heatmap peaks, boxes, masks from probs inside the box);
any other gives one defect per connected component of each class's thresholded mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engines.geometry import CameraGeometry
from engines.components import class_components
from engines.instances import InstanceSpec, decode_instances
from engines.modelpack import ClassThreshold


@dataclass(frozen=True)
class Defect:
    class_id: int
    class_name: str
    confidence: float  # highest class probability inside the component
    bbox_px: tuple[int, int, int, int]  # x0, y0, x1, y1 in frame pixels, x1/y1 exclusive
    area_px: int  # frame pixels
    instance: float | None = None  # instance packs: the peak's heatmap score (= confidence); else None

    def to_strip(self, geom: CameraGeometry, frame_pos_mm: float, frame_width: int) -> dict:
        """Centre and size in strip coordinates (mm): across from the strip's reference edge,
        along from the coil head, by the camera's calibrated geometry (engines/geometry.py)."""
        x0, y0, x1, y1 = self.bbox_px
        across, along = geom.px_to_strip_mm((x0 + x1) / 2.0, (y0 + y1) / 2.0, frame_pos_mm,
                                            frame_width_px=frame_width)
        width, length = geom.length_px_to_mm(x1 - x0, y1 - y0)
        return {
            "across_mm": round(across, 2),
            "along_mm": round(along, 2),
            "width_mm": round(width, 2),
            "length_mm": round(length, 2),
            "area_mm2": round(geom.area_px_to_mm2(self.area_px), 2),
        }


def frame_scores(probs: np.ndarray) -> np.ndarray:
    """A segmenter's frame scores: ``probs`` [K, h, w] -> [K], the max of each class map's 3x3 mean
    (cells outside the map not counted), as a whole-image inspector's gate computes them in its graph
    (training/wholeseg.py ``frame_scores``; model.json ``scores_from: "seg"``)."""
    import cv2

    p = np.ascontiguousarray(probs, dtype=np.float32)
    k, h, w = p.shape
    ones = np.ones((h, w), np.float32)
    count = cv2.boxFilter(ones, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
    out = np.empty(k, np.float32)
    for c in range(k):
        s = cv2.boxFilter(p[c], -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
        out[c] = (s / count).max()
    return out


def extract_defects(probs: np.ndarray, classes: tuple[str, ...], thresholds: dict[str, ClassThreshold],
                    stride: int, frame_shape: tuple[int, int], max_defects: int = 50) -> list[Defect]:
    """One frame's per-class probabilities [K, h, w] (output stride ``stride``) -> defects.

    A component counts when its area in frame pixels is at least the class's min_area_px; pieces
    at most the class's link_px apart are one component.
    The highest-confidence ``max_defects`` are kept (a frame full of noise cannot flood the bus).
    """
    if probs.ndim != 3 or probs.shape[0] != len(classes):
        raise ValueError(f"probs must be [K={len(classes)}, h, w], got {probs.shape}")
    peaks = probs.reshape(len(classes), -1).max(axis=1)
    defects: list[Defect] = []
    for k, name in enumerate(classes):
        t = thresholds[name]
        if peaks[k] < t.pixel_threshold:
            continue
        _, comps = class_components(probs[k], t.pixel_threshold, t.min_area_px, stride, frame_shape, t.link_px)
        defects += [Defect(k, name, round(c.peak, 4), c.bbox_px, c.area_px) for c in comps]
    if len(defects) > max_defects:
        defects.sort(key=lambda d: d.confidence, reverse=True)
        defects = defects[:max_defects]
    return defects


def extract_instances(outputs: dict[str, np.ndarray], spec: InstanceSpec, probs_name: str, probs_stride: int,
                      classes: tuple[str, ...], thresholds: dict[str, ClassThreshold],
                      frame_shape: tuple[int, int], max_defects: int = 50) -> list[Defect]:
    """One frame's outputs of an instance seg model (name -> array without the batch axis) -> one
    defect per instance, best first: confidence = instance = the peak's heatmap score; box from the
    size and offset heads; area from the class's mask inside the box (else the box's area)."""
    heat = outputs[spec.heatmap]
    if heat.ndim != 3 or heat.shape[0] != len(classes):
        raise ValueError(f"heatmap must be [K={len(classes)}, h, w], got {heat.shape}")
    insts = decode_instances(
        heat, outputs[spec.size], outputs[spec.offset], stride=spec.stride,
        thresholds=[thresholds[c].instance_threshold for c in classes], frame_hw=frame_shape,
        probs=outputs[probs_name], pixel_thresholds=[thresholds[c].pixel_threshold for c in classes],
        probs_stride=probs_stride, max_instances=max_defects)
    return [Defect(i.class_id, classes[i.class_id], i.score, i.bbox_px, i.area_px, instance=i.score) for i in insts]
