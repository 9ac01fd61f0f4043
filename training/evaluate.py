"""Evaluate a shipped model pack on a labelled split: gate, segmentation, detection view, type.

The pack (engines.modelpack) is run through an inference backend (ONNX Runtime by default,
engines.backends) exactly as the agent would feed it: raw uint8 pixels, NCHW, at the image's
native size. Images are padded at the bottom/right with edge values to a multiple of
`PAD_MULTIPLE` (the models are fully convolutional; their strides need it) and the seg output
is cropped back. Images of equal size share a batch.

What is measured (thresholds from the pack's calibration.json):
- gate: ROC AUC of image-level defectiveness, the frame score being max_k scores[k];
  recall/precision of defective images and the pass rate at the calibrated gate threshold.
- segmentation: per class, pixels with prob >= pixel_threshold; 8-connected components found at
  the model's output resolution, a component dropped when its area (output cells x stride^2,
  image px) is below min_area_px, exactly as engines/postprocess.py and calibration/run.py
  count it; the kept mask is upsampled nearest (each cell to stride x stride px) and cropped to
  the image. Severstal Dice (metrics.dice_severstal) per class and mean, IoU pooled
  per class. Box-only data (NEU) is scored against its boxes rasterised as masks. Reported both
  for the seg model alone and for the pipeline (frames the gate stops predict nothing).
- detection, two views, each scored with pycocotools COCOeval (bbox, maxDets 100) against the
  annotated boxes: mAP@0.5 and mAP@0.5:0.95, overall, per class and by true box area (AREA_RANGES:
  0-40^2, 40-70^2, 70-96^2, 96^2+ px), for the seg model alone and through the gate (frames the
  gate stops predict nothing).
  * COCO view ("detection_coco"; packs with an instance head, model.json format 3): every
    heatmap peak >= COCO_SCORE_FLOOR (0.05, training's VAL_DECODE_THRESHOLD), at most
    COCO_MAX_DETS per image, score = the peak. This is how published detector figures (and the
    val mAP training chooses its checkpoint by) are read: the whole precision-recall curve.
  * operating point ("detection"): the events the agent would publish, as boxes: for a pack with
    an instance head its instances at the calibrated per-class instance thresholds, else each kept
    component (its extent in image px, score = the highest probability inside it). Its mAP is of a
    precision-recall curve cut at the thresholds, so it is below the COCO view's.
- instances (metrics.instances, the operating point): true defects, events, matched one-to-one at IoU >= 0.5, split
  (one defect, several events), merged (one event, several defects), missed, false, the median
  best and matched IoU, and a class confusion matrix of the matched pairs (plus missed / false).
- defect type: on images that carry exactly one class, argmax of the gate scores vs that class.

Data without defect-free images (NEU) gets gate negatives from training.datasets.clean_crops of
the same split (settings from model.json "training.clean_crops", else
training.datasets.CLEAN_CROPS_DEFAULT); those crops join the gate metrics as negatives and nothing
else. Because they are smaller than the images, a second gate view, "gate_size_matched", scores
them against training.datasets.defect_crops of the same size (one per image, centred on its first
box), so a gate that merely responds to image size cannot look skilled.
"""
from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from metrics import dice_pairs, precision_recall, roc_auc
from metrics.instances import SIZE_RANGES, InstanceCounts, count_instances
from training import datasets
from engines.components import class_components
from engines.instances import decode_instances
from training.datasets import Box, Sample
from engines import runner
from engines.modelpack import Calibration, ModelPack, load_calibration, load_model_pack

log = structlog.get_logger(__name__)

PAD_MULTIPLE = 8
MAX_PENDING_BATCHES = 4  # images waiting for a same-size partner, in batches
REPORT_FORMAT = 1
# COCO area ranges of true boxes (px^2) for mAP by size; seed 002's split of small defects, the
# size ranges (sqrt of area) instance recall is counted in (metrics.instances.SIZE_RANGES), squared
AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e10), **{name: (lo ** 2, min(hi ** 2, 1e10)) for name, (lo, hi) in SIZE_RANGES.items()},
}
MATCH_IOU = 0.5  # instance counts: one-to-one matches at this IoU
# the COCO view of an instance pack: every peak at or above the floor, at most COCO_MAX_DETS per image
# (training.train_instances.VAL_DECODE_THRESHOLD and MAX_INSTANCES, so val reads as training's val)
COCO_SCORE_FLOOR = 0.05
COCO_MAX_DETS = 100


from training.evaluation_report import render_markdown, write_report  # noqa: E402,F401 (the CLI's names)


class EvaluationError(RuntimeError):
    """Evaluation cannot run or the models broke the model contract; the message says why."""


# -- input preparation: engines.runner (the one offline runner) -----------------------------------

def to_chw(image: np.ndarray, channels: int, source: str = "image") -> np.ndarray:
    """engines.runner.to_chw, raising EvaluationError."""
    try:
        return runner.to_chw(image, channels, source)
    except runner.RunnerError as exc:
        raise EvaluationError(str(exc)) from None


def pad_to_multiple(chw: np.ndarray, multiple: int = PAD_MULTIPLE) -> np.ndarray:
    return runner.pad_to_multiple(chw, multiple)


# -- post-processing ---------------------------------------------------------------------------


def components(
    probs: np.ndarray, thresholds: Sequence[float], min_areas: Sequence[int], stride: int, image_hw: tuple[int, int],
    links: Sequence[int] | None = None,
) -> tuple[np.ndarray, list[tuple[Box, float]]]:
    """Per-class masks at image size and scored boxes from seg probs [K, h, w] at `stride`.

    Pixel on when prob >= threshold; 8-connected components at output resolution; a component
    is kept when cells * stride^2 >= min_area (image px). Masks: kept cells repeated stride x
    stride, cropped to image_hw. Boxes: component extent * stride, clipped to the image, score =
    the highest probability in the component; with ``links``, pieces of class k at most links[k]
    px apart are one component. The rule is engines.components.class_components, the same code the
    agent turns into defect events.
    """
    height, width = image_hw
    k_count = probs.shape[0]
    masks = np.zeros((k_count, height, width), dtype=bool)
    boxes: list[tuple[Box, float]] = []
    for k in range(k_count):
        labels, comps = class_components(probs[k], thresholds[k], min_areas[k], stride, image_hw,
                                          links[k] if links is not None else 0)
        if not comps:
            continue
        kept = np.isin(labels, [c.label for c in comps])
        full = np.repeat(np.repeat(kept, stride, axis=0), stride, axis=1)[:height, :width]
        masks[k, : full.shape[0], : full.shape[1]] = full
        boxes += [(Box(k, *(float(v) for v in c.bbox_px)), c.peak) for c in comps]
    return masks, boxes


# -- COCO detection metrics --------------------------------------------------------------------


def coco_map(
    gt_boxes: Sequence[Sequence[Box]],
    dt_boxes: Sequence[Sequence[tuple[Box, float]]],
    image_sizes: Sequence[tuple[int, int]],
    n_classes: int,
) -> dict[str, Any]:
    """mAP@0.5, mAP@0.5:0.95 (COCOeval, bbox, maxDets 100), both per class and by true box area
    (AREA_RANGES, COCO's rule: a range scores the true boxes of that area and ignores detections
    matched to others or, unmatched, of another area).

    gt_boxes[i] / dt_boxes[i] belong to image i of size image_sizes[i] (H, W); dt boxes carry
    their score. Values are None where no ground-truth box exists (nothing to score)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not (len(gt_boxes) == len(dt_boxes) == len(image_sizes)):
        raise EvaluationError("coco_map: gt, dt and image sizes differ in length")
    images, annotations, detections = [], [], []
    for i, ((h, w), gts, dts) in enumerate(zip(image_sizes, gt_boxes, dt_boxes), 1):
        images.append({"id": i, "width": int(w), "height": int(h)})
        for b in gts:
            bw, bh = b.x1 - b.x0, b.y1 - b.y0
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": b.cls + 1,
                                "bbox": [b.x0, b.y0, bw, bh], "area": bw * bh, "iscrowd": 0})
        for b, score in dts:
            detections.append({"image_id": i, "category_id": b.cls + 1,
                               "bbox": [b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0], "score": float(score)})
    gt_per_class = np.bincount([a["category_id"] - 1 for a in annotations], minlength=n_classes)
    result: dict[str, Any] = {"gt_boxes": len(annotations), "predicted_boxes": len(detections),
                              "gt_boxes_per_class": gt_per_class.tolist()}
    if not annotations:
        return {**result, "map50": None, "map50_95": None, "ap50_per_class": [None] * n_classes,
                "ap50_95_per_class": [None] * n_classes, "by_area": {}}
    if not detections:
        ap = [0.0 if c else None for c in gt_per_class]
        by_area = {}
        for label, (lo, hi) in AREA_RANGES.items():
            n_gt = sum(1 for x in annotations if lo <= x["area"] < hi)
            by_area[label] = {"gt_boxes": n_gt, "map50": 0.0 if n_gt else None, "map50_95": 0.0 if n_gt else None}
        return {**result, "map50": 0.0, "map50_95": 0.0, "ap50_per_class": ap, "ap50_95_per_class": ap,
                "by_area": by_area}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": k + 1, "name": str(k)} for k in range(n_classes)]}
        gt.createIndex()
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.areaRng = [list(r) for r in AREA_RANGES.values()]
        ev.params.areaRngLbl = list(AREA_RANGES)
        ev.evaluate()
        ev.accumulate()
    # COCOeval.summarize's means, computed here for every area range (summarize knows only its own):
    # precision [T IoUs, R recalls, K classes, A areas, M maxDets]; -1 where a class has no true box
    precision = ev.eval["precision"][..., -1]  # maxDets 100

    def mean_ap(p: np.ndarray) -> float | None:
        return float(p[p > -1].mean()) if (p > -1).any() else None

    ap50, ap50_95 = [], []
    for k in range(n_classes):
        ap50.append(mean_ap(precision[0, :, k, 0]) if gt_per_class[k] else None)
        ap50_95.append(mean_ap(precision[:, :, k, 0]) if gt_per_class[k] else None)
    by_area = {}
    for a, label in enumerate(AREA_RANGES):
        lo, hi = AREA_RANGES[label]
        n_gt = sum(1 for x in annotations if lo <= x["area"] < hi)
        by_area[label] = {"gt_boxes": n_gt, "map50": mean_ap(precision[0, :, :, a]) if n_gt else None,
                          "map50_95": mean_ap(precision[:, :, :, a]) if n_gt else None}
    return {**result, "map50": by_area["all"]["map50"], "map50_95": by_area["all"]["map50_95"],
            "ap50_per_class": ap50, "ap50_95_per_class": ap50_95, "by_area": by_area}


# -- the evaluation ----------------------------------------------------------------------------


@dataclass
class _Accumulator:
    """What evaluation keeps per image while the data streams past."""

    k: int
    frame_scores: list = field(default_factory=list)  # max_k gate score, images and crops
    defective: list = field(default_factory=list)
    is_crop: list = field(default_factory=list)
    dice_rows: list = field(default_factory=list)  # [K] Dice per image, seg model alone
    dice_rows_gated: list = field(default_factory=list)  # [K], empty prediction where the gate stops
    present: list = field(default_factory=list)  # [K] bool: truth non-empty
    gt_boxes: list = field(default_factory=list)
    dt_boxes: list = field(default_factory=list)  # the operating point's events, seg model alone
    dt_boxes_gated: list = field(default_factory=list)  # ... none where the gate stops the frame
    dt_coco: list = field(default_factory=list)  # an instance head's peaks >= COCO_SCORE_FLOOR
    dt_coco_gated: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    type_truth: list = field(default_factory=list)
    type_pred: list = field(default_factory=list)
    truth_from_boxes: int = 0
    counts: InstanceCounts = None  # type: ignore[assignment]
    inter: np.ndarray = None  # type: ignore[assignment]
    union: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.inter = np.zeros(self.k, np.int64)
        self.union = np.zeros(self.k, np.int64)
        self.counts = InstanceCounts(self.k)


def _thresholds(pack: ModelPack, cal: Calibration) -> tuple[list[float], list[int], list[int]]:
    return ([cal.classes[c].pixel_threshold for c in pack.classes], [cal.classes[c].min_area_px for c in pack.classes],
            [cal.classes[c].link_px for c in pack.classes])


def evaluate_samples(
    pack: ModelPack,
    cal: Calibration,
    samples: Iterable[Sample],
    *,
    crops: Iterable[Sample] = (),
    backend: str = "onnxruntime",
    threads: int = 0,
    max_batch: int = 8,
) -> dict[str, Any]:
    """Run the pack over samples and return the metrics dict.

    `crops` are gate-only: the defect-free ones join the gate metrics as negatives; all of them
    (defect-free and defective) make the size-matched gate view."""
    if max_batch < 1:
        raise EvaluationError(f"max_batch must be >= 1, got {max_batch}")
    k = len(pack.classes)
    seg_entry = pack.seg
    thresholds, min_areas, links = _thresholds(pack, cal)
    instance_thresholds = [cal.classes[c].instance_threshold for c in pack.classes]
    acc = _Accumulator(k)
    t0 = time.perf_counter()

    def tagged() -> Iterator[tuple[Sample, bool]]:
        yield from ((s, False) for s in samples)
        yield from ((s, True) for s in crops)

    with runner.PackRunner(pack, backend=backend, threads=threads, max_batch=max_batch) as models:
        pending: dict[tuple[int, ...], list[tuple[Sample, bool]]] = {}

        def run(batch: list[tuple[Sample, bool]]) -> None:
            first = batch[0][0]
            if tuple(first.classes) != tuple(pack.classes):
                raise EvaluationError(f"{first.source}: data classes {list(first.classes)} differ from the "
                                      f"model pack's {list(pack.classes)}")
            try:
                x = runner.stack_images(pack, [s.image for s, _ in batch], [s.source for s, _ in batch])
                scores = models.gate(x, first.source)
                probs = outs = None
                if models.has("seg") and not all(crop for _, crop in batch):
                    outs = models.seg_outputs(x, first.source)
                    probs = outs[seg_entry.output]
            except runner.RunnerError as exc:
                raise EvaluationError(str(exc)) from None
            for j, (sample, crop) in enumerate(batch):
                inst = inst_coco = None
                if outs is not None and not crop and seg_entry.instances is not None:
                    inst = _instances(outs, j, seg_entry, instance_thresholds, sample.shape)
                    inst_coco = _instances(outs, j, seg_entry, [COCO_SCORE_FLOOR] * k, sample.shape)
                _account(acc, sample, crop, scores[j], None if probs is None or crop else probs[j],
                         thresholds, min_areas, seg_entry.output_stride if seg_entry else 1, cal.gate_threshold,
                         inst, inst_coco, links=links)

        for item in tagged():
            key = tuple(item[0].image.shape)
            group = pending.setdefault(key, [])
            group.append(item)
            if len(group) == max_batch:
                run(pending.pop(key))
            elif sum(len(g) for g in pending.values()) >= MAX_PENDING_BATCHES * max_batch:
                # many different sizes (magnetic_tile, KolektorSDD): bound what waits in memory
                for waiting in pending.values():
                    run(waiting)
                pending.clear()
        for group in pending.values():
            run(group)
        backend_name = models.backend_name
        has_seg = models.has("seg")
    seconds = time.perf_counter() - t0
    return _summarise(pack, cal, acc, seconds, backend_name=backend_name, has_seg=has_seg)


def _instances(outs: dict[str, np.ndarray], j: int, entry, thresholds: Sequence[float],
               image_hw: tuple[int, int]) -> list[tuple[Box, float]]:
    """Image j's instances decoded at per-class ``thresholds`` as scored boxes, clipped to the image
    (its padding cut off), at most COCO_MAX_DETS (COCOeval's maxDets)."""
    spec = entry.instances
    insts = decode_instances(
        outs[spec.heatmap][j], outs[spec.size][j], outs[spec.offset][j], stride=spec.stride,
        thresholds=thresholds, frame_hw=image_hw, max_instances=COCO_MAX_DETS)
    return [(Box(i.class_id, *(float(v) for v in i.box)), i.score) for i in insts]


def _account(acc: _Accumulator, sample: Sample, crop: bool, scores: np.ndarray, probs: np.ndarray | None,
             thresholds, min_areas, stride: int, gate_threshold: float,
             instances: list[tuple[Box, float]] | None = None,
             coco_instances: list[tuple[Box, float]] | None = None, links: Sequence[int] | None = None) -> None:
    """One image into the accumulator; ``instances``: the pack's instances at the operating point (an
    instance head), else the components are the events; ``coco_instances``: the head's instances down to
    COCO_SCORE_FLOOR (the COCO view; None without an instance head)."""
    labels = np.asarray(sample.labels) > 0
    frame = float(scores.max())
    acc.frame_scores.append(frame)
    acc.defective.append(bool(labels.any()))
    acc.is_crop.append(crop)
    if crop:
        return
    if labels.sum() == 1 and acc.k > 1:
        acc.type_truth.append(int(np.argmax(labels)))
        acc.type_pred.append(int(np.argmax(scores)))
    if probs is None:
        return
    if sample.masks is not None:
        truth = np.asarray(sample.masks, dtype=bool)
    else:
        truth = datasets.boxes_to_masks(sample)
        acc.truth_from_boxes += 1
    masks, boxes = components(probs, thresholds, min_areas, stride, sample.shape, links)
    row = dice_pairs(masks[None], truth[None])[0]
    acc.dice_rows.append(row)
    acc.present.append(truth.any(axis=(1, 2)))
    passed = frame >= gate_threshold
    if passed:
        acc.dice_rows_gated.append(row)
    else:  # the agent never segments this frame: empty prediction
        acc.dice_rows_gated.append(np.where(truth.any(axis=(1, 2)), 0.0, 1.0))
    acc.inter += np.logical_and(masks, truth).sum(axis=(1, 2))
    acc.union += np.logical_or(masks, truth).sum(axis=(1, 2))
    if instances is not None:
        boxes = instances
    acc.gt_boxes.append(list(sample.boxes))
    acc.dt_boxes.append(boxes)
    acc.dt_boxes_gated.append(boxes if passed else [])  # the agent never segments a stopped frame
    if coco_instances is not None:
        acc.dt_coco.append(coco_instances)
        acc.dt_coco_gated.append(coco_instances if passed else [])
    acc.sizes.append(sample.shape)
    acc.counts.add(count_instances([(b.x0, b.y0, b.x1, b.y1) for b in sample.boxes], [b.cls for b in sample.boxes],
                                   [(b.x0, b.y0, b.x1, b.y1) for b, _ in boxes], [b.cls for b, _ in boxes], acc.k,
                                   min_iou=MATCH_IOU))


def _named_map(gt_boxes, dt_boxes, sizes, names: Sequence[str]) -> dict[str, Any]:
    """coco_map with its per-class lists as {class name: value}."""
    det = coco_map(gt_boxes, dt_boxes, sizes, len(names))
    for key in ("ap50_per_class", "ap50_95_per_class", "gt_boxes_per_class"):
        det[key] = dict(zip(names, det[key]))
    return det


def _nan_to_none(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _gate_view(frame: np.ndarray, defective: np.ndarray, threshold: float) -> dict[str, Any]:
    gate: dict[str, Any] = {"threshold": threshold, "positives": int(defective.sum()),
                            "negatives": int((~defective).sum())}
    try:
        gate["auc"] = roc_auc(frame, defective)
    except ValueError as exc:
        gate["auc"] = None
        gate["auc_note"] = str(exc)
    pr = precision_recall(frame, defective, threshold)
    gate.update(recall=_nan_to_none(pr.recall), precision=_nan_to_none(pr.precision), pass_rate=pr.positive_rate,
                pass_rate_defect_free=(pr.fp / (pr.fp + pr.tn)) if pr.fp + pr.tn else None,
                tp=pr.tp, fp=pr.fp, fn=pr.fn, tn=pr.tn)
    return gate


def _summarise(pack: ModelPack, cal: Calibration, acc: _Accumulator, seconds: float, *, backend_name: str,
               has_seg: bool) -> dict[str, Any]:
    frame = np.asarray(acc.frame_scores, np.float64)
    defective = np.asarray(acc.defective, bool)
    is_crop = np.asarray(acc.is_crop, bool)
    n_images = int((~is_crop).sum())
    if n_images == 0:
        raise EvaluationError("no images to evaluate")
    main = ~is_crop | ~defective  # the images, plus defect-free crops as negatives
    gate = _gate_view(frame[main], defective[main], cal.gate_threshold)
    gate["negative_crops"] = int((is_crop & ~defective).sum())
    report: dict[str, Any] = {"images": n_images, "defective_images": int(defective[~is_crop].sum()), "gate": gate}
    if (is_crop & defective).any():
        report["gate_size_matched"] = _gate_view(frame[is_crop], defective[is_crop], cal.gate_threshold)
    else:
        report["gate_size_matched"] = None
    names = list(pack.classes)
    if has_seg and acc.dice_rows:
        table = np.stack(acc.dice_rows)
        gated = np.stack(acc.dice_rows_gated)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(acc.union == 0, np.nan, acc.inter / np.maximum(acc.union, 1))
        present = np.stack(acc.present)
        positive_per_class = [float(table[present[:, k], k].mean()) if present[:, k].any() else None
                              for k in range(len(names))]
        report["segmentation"] = {
            "truth": "boxes rasterised as masks" if acc.truth_from_boxes else "masks",
            # Dice on images that hold the class first: the mean below counts empty/empty pairs as 1
            "dice_positive_mean": float(table[present].mean()) if present.any() else None,
            "dice_mean": float(table.mean()),
            "dice_per_class": dict(zip(names, table.mean(axis=0).tolist())),
            "dice_mean_after_gate": float(gated.mean()),
            # Severstal Dice counts empty/empty pairs as 1, so it is dominated by them; these say
            # what the figure is worth: Dice on pairs whose truth is non-empty (above), and the Dice
            # of a model that never predicts anything (the share of empty-truth pairs).
            "dice_positive_per_class": dict(zip(names, positive_per_class)),
            "positive_pairs_per_class": dict(zip(names, present.sum(axis=0).tolist())),
            "dice_never_predict": float((~present).mean()),
            "dice_never_predict_per_class": dict(zip(names, (~present).mean(axis=0).tolist())),
            "iou_per_class": {n: _nan_to_none(float(v)) for n, v in zip(names, iou)},
            "iou_mean": _nan_to_none(float(np.nanmean(iou))) if not np.all(np.isnan(iou)) else None,
            "thresholds": {n: {"pixel_threshold": cal.classes[n].pixel_threshold,
                               "min_area_px": cal.classes[n].min_area_px} for n in names},
            "output_stride": pack.seg.output_stride,
        }
        events_from = "instances" if pack.seg.instances is not None else "components"
        # the operating point: the events the agent publishes (keys as before the COCO view was added)
        det = _named_map(acc.gt_boxes, acc.dt_boxes, acc.sizes, names)
        det["events_from"] = events_from
        det["view"] = "operating_point"
        det["decode"] = (f"instances >= the calibrated per-class instance thresholds, at most {COCO_MAX_DETS} per "
                         "image" if events_from == "instances" else
                         "components at the calibrated pixel thresholds and minimum areas")
        det["after_gate"] = _named_map(acc.gt_boxes, acc.dt_boxes_gated, acc.sizes, names)
        report["detection"] = det
        if acc.dt_coco:
            coco = _named_map(acc.gt_boxes, acc.dt_coco, acc.sizes, names)
            report["detection_coco"] = {
                "view": "coco", "events_from": events_from, "score_floor": COCO_SCORE_FLOOR,
                "max_per_image": COCO_MAX_DETS,
                "decode": f"every instance-head peak >= {COCO_SCORE_FLOOR}, at most {COCO_MAX_DETS} per image",
                **coco, "after_gate": _named_map(acc.gt_boxes, acc.dt_coco_gated, acc.sizes, names)}
        else:  # components have no score floor to lower: their only view is the operating point
            report["detection_coco"] = None
        report["instances"] = {"match_iou": MATCH_IOU, "events_from": det["events_from"],
                               **acc.counts.to_dict(names)}
    else:
        report["segmentation"] = None
        report["detection"] = None
        report["detection_coco"] = None
        report["instances"] = None
    if acc.type_truth:
        truth, pred = np.asarray(acc.type_truth), np.asarray(acc.type_pred)
        confusion = np.zeros((len(names), len(names)), np.int64)
        np.add.at(confusion, (truth, pred), 1)
        report["defect_type"] = {"images": int(len(truth)), "accuracy": float((truth == pred).mean()),
                                 "confusion": confusion.tolist()}
    else:
        report["defect_type"] = None
    report["timing"] = {"seconds": round(seconds, 3), "items": len(frame),
                        "items_per_s": round(len(frame) / seconds, 2) if seconds > 0 else None}
    report["backend"] = backend_name
    return report


def evaluate_profile(
    profile: str,
    models_dir: str | Path,
    data_root: str | Path,
    split: str = "test",
    *,
    backend: str = "onnxruntime",
    threads: int = 0,
    max_batch: int = 8,
    calibration_path: str | Path | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Load the pack and the profile's split and evaluate; returns the JSON-ready report."""
    pack = load_model_pack(models_dir)
    if pack.profile != profile:
        raise EvaluationError(f"{Path(models_dir) / 'model.json'}: the model pack is for profile {pack.profile!r}, "
                              f"not {profile!r}")
    cal = load_calibration(pack, calibration_path)
    ds = datasets.load_profile_dataset(profile, data_root, split, grey=pack.channels == 1)
    if tuple(ds.classes) != tuple(pack.classes):
        raise EvaluationError(f"dataset {ds.name} classes {list(ds.classes)} differ from the model pack's "
                              f"{list(pack.classes)}")
    if limit is not None:
        ds = ds[:limit]
    if len(ds) == 0:
        raise EvaluationError(f"split {split!r} of {ds.name} under {data_root} holds no images")
    crops: list[Sample] = []
    crop_info = None
    samples: Sequence[Sample] = ds
    if ds.labels.any(axis=1).all():
        samples = list(ds)  # read once for both kinds of crop and the evaluation (NEU: 200x200 images)
        settings = datasets.clean_crop_settings(pack.meta.get("training"))
        clean = datasets.clean_crops(samples, settings["size"], stride=settings["stride"], margin=settings["margin"],
                                     max_per_image=settings["max_per_image"])
        defect = datasets.defect_crops(samples, settings["size"], max_per_image=1)
        crops = clean + defect
        crop_info = {"from": "training.datasets.clean_crops of the same split (it has no defect-free image)",
                     **settings, "n": len(clean),
                     "size_matched_positives": {"from": "training.datasets.defect_crops, one per image",
                                                "n": len(defect)}}
    log.info("evaluation_started", profile=profile, split=split, images=len(ds), crops=len(crops),
             models=pack.versions())
    report = evaluate_samples(pack, cal, samples, crops=crops, backend=backend, threads=threads,
                              max_batch=max_batch)
    report = {
        "format": REPORT_FORMAT,
        "profile": profile,
        "split": split,
        "split_rule": "training.datasets.assign_split: first byte of sha1(file stem) < 51 test, < 82 val, else train",
        "data": {"root": str(data_root), "dataset": ds.name, "limit": limit, "negative_crops": crop_info},
        "models": {"directory": str(pack.directory), **pack.versions()},
        "calibration": {"path": str(calibration_path or pack.directory / "calibration.json"),
                        "created": cal.raw.get("created")},
        **report,
    }
    log.info("evaluation_finished", profile=profile, split=split, seconds=report["timing"]["seconds"],
             auc=report["gate"]["auc"])
    return report
