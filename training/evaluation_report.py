"""An evaluation's report: the markdown that `coilsight evaluate` prints and the JSON + markdown files it writes."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np



def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable summary of an evaluation report."""
    g = report["gate"]
    lines = [
        f"# Evaluation: {report.get('profile', '?')} / {report.get('split', '?')}",
        "",
        f"Models: {', '.join(f'{k} {v}' for k, v in report.get('models', {}).items() if k != 'directory')}  ",
        f"Images: {report['images']} ({report['defective_images']} defective)"
        + (f", plus {g['negative_crops']} defect-free crops for the gate" if g["negative_crops"] else "")
        + f"; backend {report['backend']}",
    ]
    lines += _detection_lines(report)
    lines += [
        "",
        "## Gate (frame score = max over class scores)",
        "",
        "| view | positives | negatives | ROC AUC | threshold | recall | precision | pass rate "
        "| pass rate (defect-free) | TP | FP | FN | TN |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    views = [("images" + (" + clean crops" if g["negative_crops"] else ""), g)]
    if report.get("gate_size_matched"):
        views.append(("crops only (size-matched)", report["gate_size_matched"]))
    for name, v in views:
        lines.append(
            f"| {name} | {v['positives']} | {v['negatives']} | {_fmt(v['auc'])} | {_fmt(v['threshold'], 4)} | "
            f"{_fmt(v['recall'])} | {_fmt(v['precision'])} | {_fmt(v['pass_rate'])} | "
            f"{_fmt(v['pass_rate_defect_free'])} | {v['tp']} | {v['fp']} | {v['fn']} | {v['tn']} |"
        )
    for name, v in views:
        if v.get("auc_note"):
            lines += ["", f"AUC not defined ({name}): {v['auc_note']}"]
    seg = report.get("segmentation")
    if seg:
        det = report["detection"]
        lines += [
            "",
            f"## Segmentation (truth: {seg['truth']})",
            "",
            f"Dice on images holding the class {_fmt(seg['dice_positive_mean'])}; "
            f"Severstal Dice mean {_fmt(seg['dice_mean'])}, which counts empty/empty pairs as 1 "
            f"(after the gate: {_fmt(seg['dice_mean_after_gate'])}; a model that never predicts scores "
            f"{_fmt(seg['dice_never_predict'])}); IoU mean {_fmt(seg['iou_mean'])}; "
            f"operating-point detection view ({det.get('events_from', 'components')}) mAP@0.5 {_fmt(det['map50'])}, "
            f"mAP@0.5:0.95 {_fmt(det['map50_95'])} ({det['predicted_boxes']} predicted, {det['gt_boxes']} true boxes)",
            "",
            "| class | Dice on positives (n) | Dice | Dice never-predict | IoU | AP@0.5 (operating point) "
            "| AP@0.5:0.95 (operating point) | true boxes "
            "| pixel threshold | min area px |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, dice in seg["dice_per_class"].items():
            t = seg["thresholds"][name]
            lines.append(f"| {name} | {_fmt(seg['dice_positive_per_class'][name])} "
                         f"({seg['positive_pairs_per_class'][name]}) | {_fmt(dice)} | "
                         f"{_fmt(seg['dice_never_predict_per_class'][name])} | {_fmt(seg['iou_per_class'][name])} | "
                         f"{_fmt(det['ap50_per_class'][name])} | "
                         f"{_fmt(det.get('ap50_95_per_class', {}).get(name))} | {det['gt_boxes_per_class'][name]} | "
                         f"{_fmt(t['pixel_threshold'], 2)} | {t['min_area_px']} |")
        if det.get("by_area"):
            coco = (report.get("detection_coco") or {}).get("by_area")
            head = "| area | true boxes | " + ("COCO mAP@0.5 | COCO mAP@0.5:0.95 | " if coco else "")
            lines += ["", "### mAP by true box area (px)", "",
                      head + "operating-point mAP@0.5 | operating-point mAP@0.5:0.95 |",
                      "|---|---|---|---|" + ("---|---|" if coco else "")]
            for label, a in det["by_area"].items():
                c = (coco or {}).get(label) or {}
                lines.append(f"| {label}{'' if label == 'all' else ' (sqrt of area)'} | {a['gt_boxes']} | "
                             + (f"{_fmt(c.get('map50'))} | {_fmt(c.get('map50_95'))} | " if coco else "")
                             + f"{_fmt(a['map50'])} | {_fmt(a['map50_95'])} |")
    inst = report.get("instances")
    if inst:
        lines += ["", f"## Instances (events from {inst['events_from']}, one-to-one at IoU >= {inst['match_iou']})",
                  "",
                  "| true defects | events | matched | same class | split | merged | missed | false | events per "
                  "defect | recall | precision | median best IoU | median matched IoU |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| {inst['true_defects']} | {inst['events']} | {inst['matched']} | {inst['matched_same_class']} | "
                  f"{inst['split']} | {inst['merged']} | {inst['missed']} | {inst['false_events']} | "
                  f"{_fmt(inst['events_per_defect'], 2)} | {_fmt(inst['recall'])} | {_fmt(inst['precision'])} | "
                  f"{_fmt(inst['median_best_iou'])} | {_fmt(inst['median_matched_iou'])} |",
                  "", "Recall by true box size (sqrt of area, px): " + ", ".join(
                      f"{k} {_fmt(v['recall'])} ({v['matched']} of {v['true']})"
                      for k, v in inst.get("recall_by_size", {}).items()) + ".",
                  "", "Class confusion of matched pairs (rows truth, columns events; (none): missed / false):", "",
                  "| truth \\ event | " + " | ".join(inst["confusion"]["labels"]) + " |",
                  "|---" * (len(inst["confusion"]["labels"]) + 1) + "|"]
        for label, row in zip(inst["confusion"]["labels"], inst["confusion"]["matrix"]):
            lines.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
    dt = report.get("defect_type")
    if dt:
        lines += ["", "## Defect type (argmax of gate scores, images with one class)", "",
                  f"Accuracy {_fmt(dt['accuracy'])} on {dt['images']} images."]
    t = report["timing"]
    lines += ["", f"Took {t['seconds']} s for {t['items']} frames ({_fmt(t['items_per_s'], 1)} per s)."]
    return "\n".join(lines) + "\n"


def _detection_lines(report: dict[str, Any]) -> list[str]:
    """The detection section, first after the header: the COCO view (what published detector figures
    mean) and the operating point (what the agent publishes), each for the seg model alone and
    through the gate."""
    det, coco = report.get("detection"), report.get("detection_coco")
    if not det:
        return []
    lines = ["", "## Detection (boxes against the annotated boxes; pycocotools COCOeval, maxDets 100)", ""]

    def views(d: dict[str, Any]) -> str:
        g = d.get("after_gate") or {}
        return (f"mAP@0.5 **{_fmt(d['map50'])}**, mAP@0.5:0.95 {_fmt(d['map50_95'])} ({d['predicted_boxes']} "
                f"predicted, {d['gt_boxes']} true boxes); through the gate (frames it stops predict nothing): "
                f"mAP@0.5 {_fmt(g.get('map50'))}, mAP@0.5:0.95 {_fmt(g.get('map50_95'))}")

    if coco:
        lines += [f"- COCO view ({coco['decode']}; the whole precision-recall curve, as published detector figures "
                  f"are read): {views(coco)}.",
                  f"- Operating point ({det.get('decode', det.get('events_from', 'components'))}; the events the agent "
                  f"publishes, the curve cut at the thresholds): {views(det)}.",
                  "", "| class | true boxes | COCO AP@0.5 | COCO AP@0.5:0.95 | COCO AP@0.5 through the gate "
                  "| operating-point AP@0.5 | operating-point AP@0.5:0.95 |", "|---|---|---|---|---|---|---|"]
        for name, n in coco["gt_boxes_per_class"].items():
            lines.append(f"| {name} | {n} | {_fmt(coco['ap50_per_class'][name])} | "
                         f"{_fmt(coco['ap50_95_per_class'][name])} | "
                         f"{_fmt(coco['after_gate']['ap50_per_class'][name])} | {_fmt(det['ap50_per_class'][name])} | "
                         f"{_fmt(det.get('ap50_95_per_class', {}).get(name))} |")
    else:
        lines += [f"- Operating point ({det.get('decode', det.get('events_from', 'components'))}): "
                  + (views(det) if det.get("after_gate") else
                     f"mAP@0.5 **{_fmt(det['map50'])}**, mAP@0.5:0.95 {_fmt(det['map50_95'])}") + ".",
                  "- No COCO view: the pack has no instance head, and components have no score floor to lower."]
    return lines


def _json_safe(value: Any) -> Any:
    """NaN/inf become null (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """evaluation_<split>.json and .md in out_dir; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = report.get("split", "all")
    json_path, md_path = out_dir / f"evaluation_{split}.json", out_dir / f"evaluation_{split}.md"
    json_path.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path
