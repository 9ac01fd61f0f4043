"""Calibrate a model pack: run it over labelled samples, choose every threshold, write the file.

``calibrate`` feeds the pack through engines.runner (as evaluation does), chooses the gate
threshold (calibration.gate) and the per-class thresholds (calibration.classes), and writes
``calibration.json`` beside the models, atomically, naming the sha256 of each model it was made
for; engines.modelpack.load_calibration refuses it for any other model. Reading the samples from
a dataset is the caller's job (training.calibrate does it for `coilsight calibrate thresholds`).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration import CalibrationError
from calibration.classes import (
    DEFAULT_MIN_AREAS,
    DEFAULT_MIN_POSITIVE_IMAGES,
    DEFAULT_PIXEL_THRESHOLDS,
    MISSING_CLASS_DEFAULT,
    ClassChoice,
    ClassSearch,
    _check_grids,
    _search_pairs,
    pick_class_thresholds,
)
from calibration.gate import LINE_FRAMES_CHOSEN_BY, GateChoice, choose_gate_threshold, gate_at, min_positives_for
from calibration.instances import INSTANCE_THRESHOLD_GRID, choose_instance_thresholds, true_boxes
from calibration.instances import OBJECTIVE as INSTANCE_OBJECTIVE
from calibration.links import LINK_GRID, choose_links
from calibration.links import OBJECTIVE as LINK_OBJECTIVE
from engines.instances import decode_instances
from engines.atomic import write_json_atomic
from engines.modelpack import CALIBRATION_FORMAT, ModelPack
from engines.portable import portable_tree
from metrics import box_masks

@dataclass
class CalibrationResult:
    path: Path | None
    document: dict[str, Any]
    gate: GateChoice
    classes: dict[str, ClassChoice]
    gate_scores: np.ndarray  # [N] max over classes
    gate_labels: np.ndarray  # [N] bool
    search: ClassSearch | None = field(default=None, repr=False)
    report_path: Path | None = None

    def summary(self) -> str:
        g = self.gate
        d = self.document["data"]
        lines = [
            f"calibration for profile {self.document.get('profile')}: models "
            + ", ".join(f"{role} {sha[:12]}" for role, sha in self.document["models"].items()),
            f"data: {d['what']} split={d['split']} images={d['n_images']} defective={d['n_defective']}",
            f"gate: threshold {g.threshold:.6g}  recall {g.recall:.4f} (target {g.recall_target}, "
            f"95% lower bound {g.recall_lower_95:.4f}, missed {g.n_defective - g.passed_defective}/{g.n_defective})  "
            f"precision {g.precision:.4f}  pass rate {g.pass_rate:.4f} of {g.n} frames",
        ]
        if self.document["gate"].get("note"):
            lines.append(f"gate: {self.document['gate']['note']}")
        if self.document["gate"].get("kept"):
            lines.append(f"gate: threshold KEPT, {self.document['gate']['kept']} (chosen by: "
                         f"{self.document['gate']['chosen_by']}); the figures above are its own on these samples")
        changed = self.document["gate"].get("segmenter_changed")
        if changed:
            lines.append(f"gate: WARNING: its line-frame recall was measured with segmenter {changed['measured_with']}, "
                         f"this pack's is {changed['now']}: {changed['what']}")
        sm = self.document["gate"].get("size_matched")
        if sm:
            lines.append(f"gate, size-matched view at this threshold: recall {sm['recall']:.4f} on {sm['n_defect_crops']} "
                         f"defect crops, pass rate {sm['pass_rate_clean_crops']:.4f} on {sm['n_clean_crops']} clean crops "
                         f"(its own threshold {sm['own_threshold']:.6g}; threshold chosen by: "
                         f"{self.document['gate']['chosen_by']})")
            est = sm.get("line_frame_pass_rate_estimate")
            if est:
                lines.append(f"gate, rough pass rate of a clean line frame at this threshold: {est['value']:.4f} "
                             f"({est['how']})")
        for name, c in self.classes.items():
            flag = "" if c.calibrated else "  [NOT CALIBRATED: default kept]"
            if c.calibrated and c.note:
                flag = f"  [{c.note}]"
            details = []
            if c.dice_on_positive is not None:
                details.append(f"on positive images {c.dice_on_positive:.4f}, found in {c.image_recall:.4f} of them")
            if c.dice_with_gate is not None:
                details.append(f"with gate {c.dice_with_gate:.4f}")
            details.append(f"never predicting it scores {c.empty_baseline:.4f}")
            dice = "n/a" if math.isnan(c.dice) else f"{c.dice:.4f}"
            lines.append(
                f"class {name}: pixel_threshold {c.pixel_threshold:.2f}  min_area_px {c.min_area_px}  "
                f"dice {dice} ({'; '.join(details)})  positive images {c.n_positive_images}/{c.n_images}{flag}"
            )
        if self.path is not None:
            lines.append(f"wrote {self.path}")
        if self.report_path is not None:
            lines.append(f"report {self.report_path}")
        return "\n".join(lines)


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coilsight")
    except PackageNotFoundError:
        return "unknown"


def _sample_masks(sample: Any) -> np.ndarray:
    if sample.masks is not None:
        return np.asarray(sample.masks, dtype=bool)
    image = np.asarray(sample.image)
    return box_masks(image.shape[:2], len(sample.classes), sample.boxes)


def _batches(shapes: Sequence[tuple[int, ...]], batch: int) -> list[list[int]]:
    """Indices grouped by equal image shape, in chunks of at most `batch`, in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return [idx[j : j + batch] for idx in groups.values() for j in range(0, len(idx), batch)]


@dataclass(frozen=True)
class SparseProbs:
    """A probability map kept for the linking choice: only the cells at or above ``floor`` (the
    lowest pixel threshold searched), so a calibration over thousands of line frames, mostly clean,
    holds a few cells a frame rather than every frame's whole map. ``dense()`` gives the map back
    with the other cells 0: components and their peaks at any threshold >= floor are the same."""

    shape: tuple[int, ...]
    index: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, probs: np.ndarray, floor: float) -> "SparseProbs":
        flat = np.asarray(probs, np.float32).ravel()
        index = np.flatnonzero(flat >= floor)
        return cls(tuple(np.shape(probs)), index.astype(np.int64), flat[index].copy())

    def dense(self) -> np.ndarray:
        out = np.zeros(int(np.prod(self.shape)), np.float32)
        out[self.index] = self.values
        return out.reshape(self.shape)


def line_frame_gate(pack: ModelPack) -> dict[str, Any] | None:
    """The pack's current gate section when its threshold was chosen on whole line frames for this
    very gate.onnx (calibration.json's gate sha256 is the pack's), else None. An unreadable or foreign
    calibration.json is no such gate: calibrate writes a new one."""
    if "gate" not in pack.models:
        return None
    try:
        doc = json.loads((pack.directory / "calibration.json").read_text())
        gate = doc["gate"]
        if (isinstance(gate, dict) and str(gate.get("chosen_by", "")).startswith(LINE_FRAMES_CHOSEN_BY)
                and doc["models"]["gate"] == pack.models["gate"].sha256 and 0.0 <= float(gate["threshold"]) <= 1.0):
            return gate
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def calibrate(
    pack: ModelPack,
    samples: Sequence[Any],
    *,
    negatives: Sequence[Any] = (),
    size_matched_positives: Sequence[Any] = (),
    gate_view: str = "images",
    recall_target: float = 0.99,
    min_gate_positives: int | None = None,
    pixel_thresholds: Sequence[float] = DEFAULT_PIXEL_THRESHOLDS,
    min_areas: Sequence[int] = DEFAULT_MIN_AREAS,
    min_positive_images: int = DEFAULT_MIN_POSITIVE_IMAGES,
    allow_missing_class: bool = False,
    min_image_recall: float | None = None,
    data_info: dict[str, Any] | None = None,
    backend: str = "onnxruntime",
    batch: int = 8,
    threads: int = 0,
    output: str | Path | None = None,
    write: bool = True,
    keep_line_gate: bool = True,
) -> CalibrationResult:
    """Run the pack's gate and seg models over `samples` and choose every threshold.

    `samples` are training.datasets.Sample-like (image uint8 HxW or HxWxC, masks bool [K,H,W]
    or None with boxes, labels multi-hot [K], source). `negatives` are defect-free frames for
    the gate only (clean crops of data without defect-free images), as training/evaluate.py uses
    them. `size_matched_positives` (defect crops of the negatives' size) only add a second,
    reported view of the gate at the chosen threshold: a fully convolutional gate taking the max
    over a larger image can score higher for size alone. Images are fed by engines.runner, as evaluation feeds them: uint8 NCHW, padded at the
    bottom/right to a multiple of PAD_MULTIPLE, equal sizes batched. Writes calibration.json
    (atomically) beside the models unless `output` says elsewhere or `write` is False.

    A gate threshold chosen on whole line frames (``chosen_by`` starting LINE_FRAMES_CHOSEN_BY:
    training/gate_strip.py) for the pack's very gate (same sha256) is kept as it is, with its figures
    on these samples beside it: images or crops of a dataset are not what that gate is read on.
    ``keep_line_gate=False`` (``--recalibrate-gate``) chooses the gate's threshold here all the same.
    """
    from engines.runner import PackRunner, RunnerError, stack_images

    if pack.seg is None:
        raise CalibrationError(f"{pack.directory}: the pack has no seg model; per-class thresholds need one")
    if gate_view not in ("both", "images"):
        raise CalibrationError(f"gate_view must be 'both' or 'images', got {gate_view!r}")
    if batch < 1:
        raise CalibrationError(f"batch must be >= 1, got {batch}")
    ts, areas = _check_grids(pixel_thresholds, min_areas)
    k_count = len(pack.classes)
    n = len(samples)
    if n == 0:
        raise CalibrationError("no samples to calibrate on")
    # gate input: samples (which also go to segmentation), negatives, size-matched positives
    frames = list(samples) + list(negatives) + list(size_matched_positives)
    n_main = n + len(negatives)
    n_frames = len(frames)

    # Truth first (cheap): refuse before any inference when the data cannot support the result.
    labels = np.zeros((n_frames, k_count), bool)
    shapes: list[tuple[int, ...]] = []
    for i, s in enumerate(frames):
        lab = np.asarray(s.labels).ravel()
        if lab.size != k_count:
            raise CalibrationError(f"{s.source}: {lab.size} labels, the model pack has {k_count} classes")
        if n <= i < n_main and lab.any():
            raise CalibrationError(f"{s.source}: a gate negative must be defect-free, its labels are {lab.tolist()}")
        if i >= n_main and not lab.any():
            raise CalibrationError(f"{s.source}: a size-matched positive must hold a defect")
        labels[i] = lab > 0
        shapes.append(tuple(np.asarray(s.image).shape))
    defective_all = labels.any(axis=1)
    defective = defective_all[:n_main]
    positives = labels[:n].sum(axis=0)
    short = [f"{name!r} ({int(c)})" for name, c in zip(pack.classes, positives) if c < min_positive_images]
    if short and not allow_missing_class:
        raise CalibrationError(
            f"classes with fewer than {min_positive_images} positive images: {', '.join(short)}; "
            "add data or pass --allow-missing-class to keep the documented default for them"
        )
    need = min_positives_for(recall_target) if min_gate_positives is None else min_gate_positives
    if defective.sum() < need or defective.all() or not defective.any():
        # choose_gate_threshold words the exact reason; call it on the truth alone to fail fast
        choose_gate_threshold(np.linspace(0, 1, n_main), defective, recall_target, min_gate_positives)

    gate_scores = np.empty((n_frames, k_count), np.float32)
    stride = pack.seg.output_stride

    def batch_input(idx: list[int]) -> np.ndarray:
        return stack_images(pack, [frames[i].image for i in idx], [frames[i].source for i in idx])

    try:
        with PackRunner(pack, backend=backend, threads=threads, max_batch=batch, roles=("gate",)) as models:
            for idx in _batches(shapes, batch):
                gate_scores[idx] = models.gate(batch_input(idx), frames[idx[0]].source)
            backend_name = models.backend_name
    except RunnerError as exc:
        raise CalibrationError(str(exc)) from None
    all_scores = gate_scores.max(axis=1).astype(np.float64)
    frame_scores = all_scores[:n_main]
    gate_choice = choose_gate_threshold(frame_scores, defective, recall_target, min_gate_positives)
    chosen_by = "images"
    size_doc = None
    if size_matched_positives:
        # Same-size view: defect crops vs the clean crops (the gate is trained on such crops).
        # A crop may cut a large defect, so this view is pessimistic for recall; "both" takes it
        # as a constraint all the same.
        crop_pos = all_scores[n_main:]
        crop_neg = frame_scores[n:]
        view_scores = np.r_[crop_pos, crop_neg]
        view_labels = np.r_[np.ones(crop_pos.size, bool), np.zeros(crop_neg.size, bool)]
        own = choose_gate_threshold(view_scores, view_labels, recall_target, min_gate_positives)
        if gate_view == "both" and own.threshold < gate_choice.threshold:
            gate_choice = gate_at(frame_scores, defective, own.threshold, recall_target)
            chosen_by = "size_matched"
        at = gate_at(view_scores, view_labels, gate_choice.threshold, recall_target)
        size_doc = {
            "what": "defect crops (training.datasets.defect_crops) of the clean crops' size vs those clean crops",
            "own_threshold": own.threshold,
            "recall": round(at.recall, 6),
            "pass_rate_clean_crops": round(at.passed_clean / max(at.n_clean, 1), 6),
            "n_defect_crops": int(crop_pos.size),
            "n_clean_crops": int(crop_neg.size),
            "recall_lower_95": round(at.recall_lower_95, 6),
        }
        if negatives:
            # What a whole line frame would cost: it holds many windows of the crops' size and
            # passes when any one does. Windows are not independent, so this is a rough guide.
            ch, cw = np.asarray(negatives[0].image).shape[:2]
            windows = max(1, (pack.height // ch) * (pack.width // cw))
            size_doc["line_frame_pass_rate_estimate"] = {
                "value": round(1.0 - (1.0 - at.passed_clean / max(at.n_clean, 1)) ** windows, 6),
                "how": f"1 - (1 - clean-crop pass rate)^{windows}: a {pack.height}x{pack.width} frame holds "
                       f"{windows} windows of {ch}x{cw}; assumes independent windows",
            }
    gate_doc = gate_choice.to_json()
    gate_doc["chosen_by"] = chosen_by
    t = gate_choice.threshold
    gate_doc["threshold_logit"] = round(math.log(t / (1.0 - t)), 6) if 0.0 < t < 1.0 else None
    if t > 0.999:
        # float32 spacing near 1 is 6e-8: fine where the sigmoid runs in FP32, not in FP16 (5e-4)
        gate_doc["note"] = (f"WARNING: gate scores saturate near 1 (threshold {t:.7f}, logit "
                            f"{gate_doc['threshold_logit']}); every backend must keep the final sigmoid in FP32")
    if size_doc is not None:
        gate_doc["size_matched"] = size_doc
    kept = line_frame_gate(pack) if keep_line_gate else None
    if kept is not None:
        gate_choice = gate_at(frame_scores, defective, float(kept["threshold"]), recall_target)
        gate_doc = {**kept, "on_calibration_samples": {
            **gate_choice.to_json(), "what": "the kept threshold on this calibration's samples (reported only)",
            **({"size_matched": size_doc} if size_doc is not None else {})},
            "kept": "chosen on whole line frames for this very gate; `coilsight calibrate thresholds "
                    "--recalibrate-gate` replaces it"}
        gate_doc.pop("segmenter_changed", None)
        strip = kept.get("textured_strip")
        measured_with = strip.get("segmenter") if isinstance(strip, dict) else None
        if isinstance(measured_with, str) and measured_with and not pack.seg.sha256.startswith(measured_with):
            # its recall counted the line frames whose defect that segmenter reports: a figure of the old pair
            gate_doc["segmenter_changed"] = {
                "measured_with": measured_with, "now": pack.seg.sha256[:12],
                "what": "the kept threshold's recall counts the line frames whose defect the earlier segmenter "
                        "reports; re-measure it with this one (python -m training.gate_strip measure --run RUN "
                        "--pack DIR --data-root ROOT), or ship a gate chosen with it"}

    head = pack.seg.instances  # an instance head: its per-class thresholds are chosen too
    decoded: list[tuple[list, Any]] = []
    linkable: list[tuple[SparseProbs, list, tuple[int, int]]] = []
    floor = min(ts)  # every calibrated pixel threshold is on the grid: cells below it never count

    def probs_and_masks():
        with PackRunner(pack, backend=backend, threads=threads, max_batch=batch, roles=("seg",)) as models:
            for idx in _batches(shapes[:n], batch):
                try:
                    outs = models.seg_outputs(batch_input(idx), frames[idx[0]].source)
                except RunnerError as exc:
                    raise CalibrationError(str(exc)) from None
                out = outs[pack.seg.output]
                for j, i in enumerate(idx):
                    if head is not None:
                        decoded.append((decode_instances(
                            outs[head.heatmap][j], outs[head.size][j], outs[head.offset][j], stride=head.stride,
                            thresholds=min(INSTANCE_THRESHOLD_GRID), frame_hw=shapes[i][:2], max_instances=100),
                            true_boxes(frames[i])))
                    if head is None:  # component events: their linking distance is chosen below
                        linkable.append((SparseProbs.of(out[j], floor), true_boxes(frames[i]), shapes[i][:2]))
                    yield i, out[j], _sample_masks(frames[i])

    order: list[int] = []

    def in_batch_order():
        for i, p, m in probs_and_masks():
            order.append(i)
            yield p, m

    search = _search_pairs(in_batch_order(), pack.classes, ts, areas, stride)
    # rows come in batch order; put them back in sample order
    per_image = np.empty_like(search.per_image)
    per_image[order] = search.per_image
    pos = np.empty_like(search.positives)
    pos[order] = search.positives
    search = ClassSearch(search.classes, search.pixel_thresholds, search.min_areas, per_image, pos)
    choices = pick_class_thresholds(search, min_positive_images, allow_missing_class, min_image_recall)

    # Dice of the whole pipeline: frames the gate stops get no prediction at all.
    stopped = frame_scores[:n] < gate_choice.threshold
    for k, name in enumerate(pack.classes):
        c = choices[name]
        if not c.calibrated:
            continue
        ti, ai = ts.index(c.pixel_threshold), areas.index(c.min_area_px)
        d = search.per_image[:, k, ti, ai].copy()
        d[stopped] = np.where(search.positives[stopped, k], 0.0, 1.0)
        c.dice_with_gate = float(d.mean())

    instance_docs = choose_instance_thresholds(pack.classes, decoded) if head is not None else {}
    if head is None:
        settings = {name: (choices[name].pixel_threshold, choices[name].min_area_px) if choices[name].calibrated else None
                    for name in pack.classes}
        link_docs = choose_links(pack.classes, settings, ((p.dense(), t, hw) for p, t, hw in linkable), stride)
        linkable.clear()
        for name, doc in link_docs.items():
            instance_docs[name] = {**instance_docs.get(name, {}), **doc}

    info = dict(data_info or {})
    info.setdefault("what", "samples")
    info.setdefault("split", "unknown")
    info["n_images"] = n
    info["n_defective"] = int(defective[:n].sum())
    info["n_gate_negatives"] = len(negatives)
    info["n_size_matched_positives"] = len(size_matched_positives)
    info["n_positive_images"] = {name: int(c) for name, c in zip(pack.classes, positives)}
    document: dict[str, Any] = {
        "format": CALIBRATION_FORMAT,
        "profile": pack.profile,
        "models": {role: m.sha256 for role, m in pack.models.items()},
        "gate": gate_doc,
        "classes": {name: {**choices[name].to_json(), **instance_docs.get(name, {})} for name in pack.classes},
        "search": {
            "pixel_thresholds": list(ts),
            "min_areas_px": list(areas),
            "objective": "Severstal Dice (metrics.dice_severstal), mean over images; "
                         "components below min_area_px (output cells x stride^2, as engines/postprocess.py "
                         "counts them) removed, masks upsampled nearest to image size",
            "tie_break": "lowest pixel_threshold, then smallest min_area_px",
            **({"instance_thresholds": list(INSTANCE_THRESHOLD_GRID), "instance_objective": INSTANCE_OBJECTIVE}
               if head is not None else {"link_px": list(LINK_GRID), "link_objective": LINK_OBJECTIVE}),
            "min_positive_images": min_positive_images,
            "min_image_recall": min_image_recall,
            "min_gate_positives": min_positives_for(recall_target) if min_gate_positives is None else min_gate_positives,
            "missing_class_default": MISSING_CLASS_DEFAULT,
        },
        "data": portable_tree(info),  # the data set, not this machine's folders (engines/portable.py)
        "backend": backend_name,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "tool": {"name": "coilsight calibrate thresholds", "version": _tool_version()},
    }
    path = Path(output) if output else pack.directory / "calibration.json"
    if write:
        write_json_atomic(path, document)
    return CalibrationResult(
        path=path if write else None,
        document=document,
        gate=gate_choice,
        classes=choices,
        gate_scores=frame_scores,
        gate_labels=defective,
        search=search,
    )


