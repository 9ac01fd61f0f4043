"""MODEL_CARD.md of a model pack, made from the pack's own files, so a retrain regenerates it.

Sources, each named in the card: model.json (contract, training block), calibration.json
(thresholds and their validation figures), an evaluation folder written by `coilsight evaluate`
(evaluation_<split>.md/json; the test split by default), a speed measurement taken now with
ONNX Runtime in the agent's own set-up (one intra-op thread per caller, batch 1 and the agent's
batch), and CARD_NOTES.md beside the models: the hand-written part (limits, published figures,
decisions) that no file can produce. Nothing in the card is typed in by hand except that file.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from engines.atomic import write_atomic
from engines.packs import tier_of_model_size
from engines.portable import portable  # machine paths out of the card (also in model.json)

NOTES_FILE = "CARD_NOTES.md"


class CardError(ValueError):
    pass


def onnx_params(path: Path) -> int | None:
    """Number of weights in an ONNX graph (initializers); None when the onnx package is absent."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    model = onnx.load(str(path))
    return int(sum(numpy_helper.to_array(t).size for t in model.graph.initializer))


def measure_speed(pack_dir: Path, batches: tuple[int, ...] = (1, 8), frames: int = 32, repeats: int = 3) -> dict:
    """Frames/s of each model through the agent's own ONNX Runtime CPU backend with one intra-op
    thread (what one agent worker gets), random uint8 frames of the nominal size; best of
    `repeats` passes."""
    import onnxruntime as ort

    from engines.modelpack import load_model_pack
    from engines.runner import PackRunner

    pack = load_model_pack(pack_dir)
    if pack.channels * pack.height * pack.width > 8 << 20:  # 4608x3072 RGB parts: 42 MB a frame
        batches, frames, repeats = (1,), 3, 2
    rng = np.random.default_rng(0)
    x_all = rng.integers(0, 256, (frames, pack.channels, pack.height, pack.width), dtype=np.uint8)
    out: dict = {"backend": f"onnxruntime {ort.__version__} CPU, 1 intra-op thread, spinning off",
                 "frame": f"{pack.width}x{pack.height}x{pack.channels}", "cpu": platform.processor() or platform.machine(),
                 "measured": time.strftime("%Y-%m-%d"), "models": {}}
    for role in pack.models:
        per_batch = {}
        with PackRunner(pack, backend="onnxruntime", threads=1, max_batch=max(batches), roles=(role,)) as runner:
            model = runner.models[role]
            for b in batches:
                xs = [np.ascontiguousarray(x_all[i:i + b]) for i in range(0, frames - b + 1, b)]
                model(xs[0])  # warm-up, and the output checked against the contract once
                # a model with an input_pool gets pooled frames, and the pooling counts as its time
                best = min(_timed(model.raw, xs) for _ in range(repeats))
                per_batch[b] = round(len(xs) * b / best, 1)
        out["models"][role] = per_batch
    return out


def _timed(run, xs: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    for x in xs:
        run(x)
    return time.perf_counter() - t0


def _demote(markdown: str) -> str:
    """Headings one level down, the first (title) line dropped: it nests under a card section."""
    lines = markdown.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join("#" + line if line.startswith("#") else line for line in lines).strip()


# Where each profile's data set comes from and what terms its copy states, as recorded in the README
# of the copy the packs were trained on (shared/data/<folder>/README.md). Nobody has checked the
# original publishers' terms: check them before any commercial use. A card names the source, never
# the machine's copy of it.
DATASETS: dict[str, str] = {
    "steel": "NEU surface defect database (NEU-DET, Northeastern University, China; "
             "http://faculty.neu.edu.cn/yunhyan/NEU_surface_defect_database.html), as copied in the GitHub "
             "repository siddhartamukherjee/NEU-DET-Steel-Surface-Defect-Detection (commit 351bee2); licence: none "
             "stated in that copy, the original database's terms not checked: check them before any commercial use",
    "magnetic_tile": "Magnetic-tile defect data set of the paper \"Saliency of magnetic tile surface defects\" "
                     "(GitHub abin24/Magnetic-tile-defect-datasets., commit cc4eb53); licence: no licence file; "
                     "its README says \"It is welcomed to use our dataset. And if it is used in your research, "
                     "please cite our paper.\" Check with the authors before any commercial use",
    "kolektorsdd": "KolektorSDD (Kolektor Group and ViCoS, University of Ljubljana), in the YOLO-polygon "
                   "conversion of GitHub stoy95536/KolektorSDD_Yolov8_Datasets (commit 81e5cf3); licence: none "
                   "stated in that copy, the original dataset's terms not checked: check them before any "
                   "commercial use",
}


def _selection(train: dict, instances: bool, whole: bool) -> str:
    """How the run chose its checkpoint, as each trainer does it."""
    best = train.get("best", {})
    if instances:
        return f"checkpoint: the EMA weights of the best val mAP@0.5 (decoded at score >= 0.05): {json.dumps(_best_brief(best))}"
    if whole:
        return f"checkpoint: the EMA weights of the best val image ROC AUC + Dice on defective images: {json.dumps(best)}"
    return f"best checkpoint per model by val loss: {json.dumps(best)}"


def render(pack_dir: Path, evaluation_dir: Path | None, speed: dict | None, split: str = "test") -> str:
    pack_dir = Path(pack_dir)
    meta = json.loads((pack_dir / "model.json").read_text())
    calib_path = pack_dir / "calibration.json"
    calib = json.loads(calib_path.read_text()) if calib_path.exists() else None
    profile, classes, inp = meta["profile"], meta["classes"], meta["input"]
    train = meta.get("training", {})
    instances = train.get("kind") == "instances"
    ev = _evaluation_json(evaluation_dir, split, profile) if evaluation_dir is not None else None
    lines = [f"# Model card: {profile}", "",
             "Generated by `coilsight card` (training/card.py) from model.json, calibration.json, the evaluation "
             f"folder and {NOTES_FILE}; edit the notes file, not this one.", "",
             f"Classes: {', '.join(classes)}. Input: uint8 NCHW [N, {inp['channels']}, H, W], nominal frame "
             f"{inp['width']}x{inp['height']} (W x H), any H and W that are multiples of 8; normalisation "
             f"`(x/255 - {inp['mean']:.4f})/{inp['std']:.4f}` is the first op in the graph, sigmoid the last. "
             + "; ".join(_output_shape(role, m) for role, m in meta["models"].items()) + ".", ""]
    if instances:
        lines += _headline(train, ev, split)
    lines += ["## Models", "",
             "| role | file | sha256 | params | size | output |", "|---|---|---|---|---|---|"]
    for role, m in meta["models"].items():
        path = pack_dir / m["file"]
        params = onnx_params(path)
        lines.append(f"| {role} | `{m['file']}` | `{m['sha256'][:12]}` | {'-' if params is None else f'{params:,}'} | "
                     f"{path.stat().st_size / 1024:.0f} KiB | `{m['output']}` |")
    whole = train.get("model_size") == "wholeseg"  # training/wholeseg_cv.py: trains, chooses and exports in one
    if whole:
        lines += ["", f"Architecture: {train.get('architecture', 'training/wholeseg.py WholeSeg')} "
                      f"({json.dumps(train.get('model_config', {}))})."]
    elif train.get("model_size"):
        lines += ["", f"Architecture: training/nets.py, size `{train['model_size']}` "
                      f"({json.dumps(train.get('model_config', {}))})."]
    if speed:
        batches = sorted({b for per in speed["models"].values() for b in per})
        lines += ["", f"## Speed ({speed['backend']}; {speed['frame']}; measured {speed['measured']})", "",
                  "Frames/s of one caller; the agent runs `models.workers` callers side by side. Random uint8 "
                  "frames, best of 3 passes; the machine is shared, so expect +-20 %.", "",
                  "| model | " + " | ".join(f"batch {b}" for b in batches) + " | ms/frame (batch 1) |",
                  "|---|" + "---|" * (len(batches) + 1)]
        for role, per in speed["models"].items():
            lines.append(f"| {role} | " + " | ".join(str(per.get(b, "-")) for b in batches)
                         + f" | {1000.0 / per[batches[0]]:.2f} |")
    if train:
        lines += ["", "## Data and training", "",
                  f"- Data: {portable(train.get('data', '?'))}",
                  f"- Source and licence: {DATASETS.get(profile, 'not recorded for this profile')}",
                  f"- Split: {train.get('split', '?')}. Nothing was tuned on the test split.",
                  f"- Command: `{portable(train.get('command', '?'))}` then " + (
                      f"copy RUN/pack (the command exports it) to engines/models/{profile}" if whole else
                      f"`coilsight export --checkpoint RUN --profile {profile} --out engines/models/{profile}`"),
                  f"- Seed {train.get('seed')}, "
                  + (f"{train.get('steps')} steps" if whole else f"{train.get('epochs_run')} epochs")
                  + f", {train.get('minutes')} min on CPU; " + _selection(train, instances, whole)]
        src = train.get("seg_from")
        if src:  # a gate-only run: say where the segmenter was trained
            lines.append(f"- The gate alone was trained by that command; the segmenter is the one of an earlier run "
                         f"(size `{src.get('model_size')}`, {src.get('minutes')} min): `{portable(src.get('command', '?'))}`")
        if train.get("gate_crop"):
            lines.append(f"- Gate trained on {train['gate_crop']}x{train['gate_crop']} crops (clean crops "
                         f"{json.dumps(train.get('clean_crops', {}))}); seg on {train.get('seg_crop')} px windows. "
                         f"Synthetic strip fraction: {train.get('synthetic_fraction', 0)}.")
    if calib:
        g = calib["gate"]
        lines += ["", f"## Calibration (`coilsight calibrate thresholds`, val split; created {calib.get('created', '?')})",
                  "", f"Gate threshold {g['threshold']:.6g} (logit {g.get('threshold_logit', '-')}) for recall target {g['recall_target']}: recall "
                  f"{g.get('recall', '-')} (95 % lower bound {g.get('recall_lower_95')}), precision {g.get('precision')}, pass "
                  f"rate {g.get('pass_rate')} on {g.get('n')} frames ({g.get('n_defective')} defective, "
                  f"{g.get('n_clean')} defect-free)."]
        sm = g.get("size_matched")
        if sm:
            lines.append(f"Size-matched view: recall {sm['recall']} on {sm['n_defect_crops']} defect crops, pass rate "
                         f"{sm['pass_rate_clean_crops']} on clean crops.")
        line_f1 = [c.get("f1", c.get("defect_f1")) for c in calib["classes"].values()]
        if all(v is not None for v in line_f1):  # generated lines (training/lines.py): thresholds chosen by F1
            lines += ["", "| class | threshold | min area px | F1 (val) | positive images |", "|---|---|---|---|---|"]
            lines += [f"| {name} | {c['pixel_threshold']} | {c['min_area_px']} | {_f(f1)} | {c.get('n_positive_images')} |"
                      for (name, c), f1 in zip(calib["classes"].items(), line_f1)]
        lines += [] if all(v is not None for v in line_f1) else [
            "", "| class | pixel threshold | min area px | Dice on positive images (val) | Dice (val, empty/empty "
                "counts 1) | Dice never-predict | positive images | calibrated |", "|---|---|---|---|---|---|---|---|"]
        for name, c in ({} if all(v is not None for v in line_f1) else calib["classes"]).items():
            lines.append(f"| {name} | {c['pixel_threshold']} | {c['min_area_px']} | "
                         f"{_f(c.get('dice_on_positive_images'))} | {_f(c.get('dice'))} | {_f(c.get('dice_if_never_predicted'))} | "
                         f"{c.get('n_positive_images', '-')} | {c.get('calibrated')} |")
        if any("instance_threshold" in c for c in calib["classes"].values()):
            lines += ["", "Instance thresholds (an event is a heatmap peak >= the class's threshold; chosen per class by "
                          "the best F1 of instances matched at IoU >= 0.5 on the val split):", "",
                      "| class | instance threshold | F1 (val) | precision | recall | calibrated |", "|---|---|---|---|---|---|"]
            lines += [f"| {name} | {c.get('instance_threshold')} | {_f(c.get('instance_f1'))} | "
                      f"{_f(c.get('instance_precision'))} | {_f(c.get('instance_recall'))} | {c.get('instance_calibrated')} |"
                      for name, c in calib["classes"].items()]
        if any("link_px" in c for c in calib["classes"].values()):
            grid = calib.get("search", {}).get("link_px", [])
            lines += ["", "Linking (component events: pieces of one class at most link_px apart are one event; chosen per "
                          "class by the AP@0.5 of its events on the val split, ties to the smaller distance):", "",
                      "| class | link px | AP@0.5 (val) | AP@0.5 by link px " + " / ".join(str(g) for g in grid) + " |",
                      "|---|---|---|---|"]
            for name, c in calib["classes"].items():
                by = c.get("link_ap50_by_px") or {}
                lines.append(f"| {name} | {c.get('link_px', 0)} | {_f(c.get('link_ap50'))} | "
                             f"{' / '.join(_f(by.get(str(g))) for g in grid) if by else c.get('link_note', '-')} |")
        if (pack_dir / "calibration_report").is_dir():
            lines += ["", "Plots: calibration_report/ (gate_curve.png, class_dice.png, report.html)."]
    if evaluation_dir is not None:
        md = Path(evaluation_dir) / f"evaluation_{split}.md"
        js = Path(evaluation_dir) / f"evaluation_{split}.json"
        got = ev.get("models", {})
        stale = [role for role, m in meta["models"].items() if got.get(role) != m["sha256"][:12]]
        if stale:
            raise CardError(f"{js} evaluated other models ({', '.join(stale)}: {got.get(stale[0])} is not "
                            f"{meta['models'][stale[0]]['sha256'][:12]}); evaluate this pack again")
        lines += ["", f"## Evaluation on the {split} split (`coilsight evaluate --profile {profile} --split {split}`)",
                  "", _demote(md.read_text())]
    notes = pack_dir / NOTES_FILE
    if notes.exists():
        lines += ["", "## Notes, limits and decisions (from CARD_NOTES.md)", "", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def _evaluation_json(evaluation_dir: Path, split: str, profile: str) -> dict:
    md = Path(evaluation_dir) / f"evaluation_{split}.md"
    js = Path(evaluation_dir) / f"evaluation_{split}.json"
    if not md.exists() or not js.exists():
        raise CardError(f"no evaluation_{split}.md/.json in {evaluation_dir}: run `coilsight evaluate --profile "
                        f"{profile} --split {split} --out {evaluation_dir}` first")
    return json.loads(js.read_text())


def _best_brief(best: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in best.items() if k != "val_ap50_per_class"}


def _headline(train: dict, ev: dict | None, split: str) -> list[str]:
    """An instance pack's first section: its tier, then mAP and events per defect."""
    t = train.get("tier") or tier_of_model_size(train.get("model_size")) or train.get("model_size") or "?"
    what = {"edge": "the CPU default", "line": "for GPU line boxes"}.get(t, "")
    tta = train.get("tta") or {}
    lines = [f"## Headline: {t} tier" + (f" ({what})" if what else ""), "",
             f"Every figure in this card belongs to the **{t} tier** (instance model size `{train.get('model_size')}`, "
             "training/nets.py INSTANCE_CONFIGS"
             + (f"; seg.onnx runs it with `{tta.get('flips')}` test-time flips, {tta.get('passes')} passes averaged, "
                f"{tta.get('passes')}x its arithmetic" if tta else "")
             + "). One event = one instance (heatmap peak, box, mask).", ""]
    det, inst = (ev or {}).get("detection") or {}, (ev or {}).get("instances") or {}
    coco = (ev or {}).get("detection_coco") or {}
    if coco:  # the COCO view first (what published detector figures mean), the operating point beside it
        lines += [f"| {split} split | COCO mAP@0.5 | COCO mAP@0.5:0.95 | operating-point mAP@0.5 | operating-point "
                  "mAP@0.5:0.95 | events per defect | median matched IoU | instance recall | instance precision "
                  "| true defects | events | split | merged |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| {ev.get('images', '-')} images | {_f(coco.get('map50'))} | {_f(coco.get('map50_95'))} | "
                  f"{_f(det.get('map50'))} | {_f(det.get('map50_95'))} | "
                  f"{_f(inst.get('events_per_defect'))} | {_f(inst.get('median_matched_iou'))} | {_f(inst.get('recall'))} | "
                  f"{_f(inst.get('precision'))} | {inst.get('true_defects', '-')} | {inst.get('events', '-')} | "
                  f"{inst.get('split', '-')} | {inst.get('merged', '-')} |", ""]
        for name, d in (("COCO view", coco), ("operating point", det)):
            areas = d.get("by_area") or {}
            if areas:
                lines += [f"mAP@0.5 by true box area (sqrt px), {name}: " + ", ".join(
                    f"{label} {_f((a or {}).get('map50'))}" for label, a in areas.items()) + ".", ""]
        lines += [f"COCO view: {coco.get('decode', 'every peak >= 0.05')}, scored as published detector figures "
                  "are. Operating point: the events the agent publishes, peaks >= the calibrated instance "
                  "thresholds (below); events per defect, matched IoU and the instance counts are of those events. "
                  "The full evaluation is further down.", ""]
    elif det or inst:
        lines += [f"| {split} split | mAP@0.5 | mAP@0.5:0.95 | events per defect | median matched IoU | instance recall "
                  "| instance precision | true defects | events | split | merged |", "|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| {ev.get('images', '-')} images | {_f(det.get('map50'))} | {_f(det.get('map50_95'))} | "
                  f"{_f(inst.get('events_per_defect'))} | {_f(inst.get('median_matched_iou'))} | {_f(inst.get('recall'))} | "
                  f"{_f(inst.get('precision'))} | {inst.get('true_defects', '-')} | {inst.get('events', '-')} | "
                  f"{inst.get('split', '-')} | {inst.get('merged', '-')} |", ""]
        areas = det.get("by_area") or {}
        if areas:
            lines += ["mAP@0.5 by true box area (sqrt px): " + ", ".join(
                f"{name} {_f((a or {}).get('map50'))}" for name, a in areas.items()) + ".", ""]
        lines += ["Events are decoded at the calibrated instance thresholds (below); the full evaluation is further "
                  "down.", ""]
    best = train.get("best") or {}
    if best.get("val_map50") is not None:
        lines += [f"Checkpoint chosen on the val split: mAP@0.5 {_f(best['val_map50'])} (@0.5:0.95 "
                  f"{_f(best.get('val_map50_95'))}) at epoch {best.get('epoch')}, every peak >= 0.05 scored.", ""]
    return lines


def _output_shape(role: str, m: dict) -> str:
    stride = m.get("output_stride")
    shape = f"[N, K, H/{stride}, W/{stride}]" if stride else "[N, K]"
    inst = m.get("instances")
    if inst:
        st = inst.get("stride", stride)
        return (f"{role} -> `{m['output']}` {shape}, instance head `{inst['heatmap']}` [N, K, H/{st}, W/{st}], "
                f"`{inst['size']}` and `{inst['offset']}` [N, 2, H/{st}, W/{st}]")
    return f"{role} -> `{m['output']}` {shape}"


def _f(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def write_card(pack_dir: Path, evaluation_dir: Path | None, *, measure: bool = True, split: str = "test") -> Path:
    speed = measure_speed(pack_dir) if measure else None
    text = render(pack_dir, evaluation_dir, speed, split)
    out = Path(pack_dir) / "MODEL_CARD.md"
    write_atomic(out, text.encode())
    return out
