"""`coilsight inspect`: a model pack over image files, offline, exactly as the agent would see them.

One image in, what the agent would publish for it out: the pack's gate, then (frames that pass)
its segmentation model, then the agent's post-processing rules (engines/postprocess.py, wafer
patterns for the wafer pack), all through the one offline runner (engines/runner.py). Each event
holds the keys of the agent's ``defect`` event (docs/protocol.md 2.1) without the stream's
(``coil``, ``camera``, ``index``, ``frame_ts_ns``, ``recv_ts_ns`` and the envelope), plus
``image``; millimetres are by the default camera geometry (0.5 mm/px, offset 0: a camera nobody
calibrated), the image's first row at 0 mm.

``Inspector`` + ``inspect_image`` are the reusable part (the web page's upload runs them); the
command (``run_inspect``, agent/tools/inspect_run.py) walks files and folders and writes outputs.

Images the pack cannot take as they are, per pack (``Inspector.prepare`` says which it did):
- a fixed-size model (the wafer gate, 52x52 die maps) gets the image resized, nearest neighbour so
  die codes stay die codes;
- fully convolutional models take the image at its own size, padded at the bottom and right with
  edge values to the pack's multiple (as evaluation does); events keep the image's own pixels;
- an image larger than 4x the pack's frame in height or width is rejected (the line never sends
  such frames; cut it into frames first);
- colour for a grey pack becomes grey and grey for a colour pack is repeated, as the runner does;
  any other channel count (a 6-channel chip die is a .npy file) is rejected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from engines import wafer
from engines.components import class_components
from engines.geometry import CameraGeometry
from engines.modelpack import load_calibration, load_model_pack
from engines.postprocess import Defect, extract_defects, extract_instances
from engines.runner import PackRunner, RunnerError, pad_to_multiple, to_chw

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")
DEFAULT_GEOMETRY = CameraGeometry(0.5, 0.5, 0.0)  # agent.config.CameraSection's defaults
MAX_EVENTS = 50  # agent.config: coil.max_events_per_frame's default
MAX_SCALE = 4  # images up to 4x the pack's frame in each direction
# class colours (RGB), repeated for packs with more classes
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


class BadImage(ValueError):
    """An image this pack cannot inspect; the message says why (and never holds a traceback)."""


@dataclass
class InspectResult:
    name: str
    events: list[dict]
    overlay_png: bytes
    masks: np.ndarray | None  # bool [K, H, W] per class of the pack (None: a pack without a seg model)
    gate_score: float
    passed: bool  # the gate let the image through to segmentation
    shape: tuple[int, ...]  # the image as given (H, W[, C])
    handling: list[str] = field(default_factory=list)  # what was done to fit the pack ("resized ...")

    def summary(self) -> dict:
        classes: dict[str, int] = {}
        for ev in self.events:
            classes[ev["class"]] = classes.get(ev["class"], 0) + 1
        return {"image": self.name, "shape": list(self.shape), "gate_score": round(self.gate_score, 4),
                "passed": self.passed, "events": len(self.events), "classes": classes,
                "handling": self.handling}


def class_colour(class_id: int) -> tuple[int, int, int]:
    return PALETTE[class_id % len(PALETTE)]


def decode_image_bytes(data: bytes, name: str = "image") -> np.ndarray:
    """An uploaded or read file's bytes -> uint8 HxW or HxWxC (RGB). .npy by its magic, else OpenCV."""
    if data[:6] == b"\x93NUMPY":
        import io

        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise BadImage(f"{name}: not a readable .npy array ({exc})") from None
        if arr.dtype != np.uint8:
            raise BadImage(f"{name}: array dtype {arr.dtype}; the models take uint8")
        if arr.ndim == 3 and arr.shape[0] < min(arr.shape[1:]) and arr.shape[2] > arr.shape[0]:
            arr = np.moveaxis(arr, 0, -1)  # C, H, W -> H, W, C
        return np.ascontiguousarray(arr)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if img is None:
        raise BadImage(f"{name}: not an image OpenCV can decode (png, jpg, bmp, tif) nor a .npy array")
    if img.dtype != np.uint8:
        raise BadImage(f"{name}: {img.dtype} pixels; the models take 8-bit images")
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 3:
        b, g, r = img[:, :, 0], img[:, :, 1], img[:, :, 2]
        if np.array_equal(b, g) and np.array_equal(b, r):  # grey saved as colour (NEU's JPEGs): grey
            return np.ascontiguousarray(b)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def read_image_file(path: Path) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadImage(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_image_bytes(data, str(path))


class Inspector:
    """A model pack opened for offline inspection (PackRunner + calibration). A context manager."""

    def __init__(self, pack_dir: str | Path, *, backend: str = "onnxruntime", threads: int = 0,
                 geometry: CameraGeometry = DEFAULT_GEOMETRY, max_events: int = MAX_EVENTS):
        self.pack = load_model_pack(pack_dir)
        self.calibration = load_calibration(self.pack)
        self.runner = PackRunner(self.pack, backend=backend, threads=threads, max_batch=1)
        self.geometry = geometry
        self.max_events = max_events
        gate_in = self.runner.models["gate"].backend.inputs[0].shape
        self.fixed_hw = (gate_in[2], gate_in[3]) if gate_in[2] is not None and gate_in[3] is not None else None

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> Inspector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prepare(self, image: np.ndarray, name: str = "image") -> tuple[np.ndarray, list[str]]:
        """The image as this pack takes it: uint8 [C, H, W] at the size events are reported in, and
        what was done to it. Raises BadImage when the pack cannot take it."""
        img = np.asarray(image)
        if img.dtype != np.uint8:
            raise BadImage(f"{name}: {img.dtype} pixels; the models take uint8")
        if img.ndim not in (2, 3) or min(img.shape[:2]) < 1:
            raise BadImage(f"{name}: shape {img.shape} is not an image (HxW or HxWxC)")
        c = 1 if img.ndim == 2 else img.shape[2]
        want, handling = self.pack.channels, []
        if c != want and not ((want == 1 and c == 3) or (want == 3 and c == 1)):
            raise BadImage(f"{name}: {c} channel(s); the {self.pack.profile} pack takes {want}"
                           + (" (save the die as a .npy HxWx6 array)" if want > 4 else ""))
        if c != want:
            handling.append("colour converted to grey" if want == 1 else "grey repeated to 3 channels")
        h, w = img.shape[:2]
        if self.fixed_hw is not None and (h, w) != self.fixed_hw:
            fh, fw = self.fixed_hw
            img = cv2.resize(img, (fw, fh), interpolation=cv2.INTER_NEAREST)
            handling.append(f"resized {w}x{h} -> {fw}x{fh} (nearest; the model takes only {fw}x{fh})")
        elif h > MAX_SCALE * self.pack.height or w > MAX_SCALE * self.pack.width:
            raise BadImage(f"{name}: {w}x{h} is more than {MAX_SCALE}x the {self.pack.profile} frame "
                           f"({self.pack.width}x{self.pack.height}); cut it into frames first")
        try:
            chw = to_chw(img, want, name)
        except RunnerError as exc:
            raise BadImage(str(exc)) from None
        return chw, handling

    def run(self, image: np.ndarray, name: str = "image") -> InspectResult:
        chw, handling = self.prepare(image, name)
        _, h, w = chw.shape
        x = chw if self.fixed_hw is not None else pad_to_multiple(chw, self.pack.pad_multiple)
        if x.shape[1:] != (h, w):
            handling.append(f"padded {w}x{h} -> {x.shape[2]}x{x.shape[1]} (edge values; events in the image's pixels)")
        x = x[None]
        try:
            events, masks, gate_score, passed = self._infer(x, (h, w), name)
        except RunnerError as exc:
            raise BadImage(str(exc)) from None
        overlay = draw_overlay(chw, events, masks, self.pack.classes, wafer_map=bool(self.pack.meta.get("die_map")))
        ok, png = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
        if not ok:
            raise BadImage(f"{name}: the overlay could not be encoded as PNG")
        return InspectResult(name, events, png.tobytes(), masks, gate_score, passed, tuple(np.shape(image)), handling)

    def _infer(self, x: np.ndarray, hw: tuple[int, int], name: str):
        pack, cal = self.pack, self.calibration
        gate_entry = pack.models["gate"]
        scores = self.runner.gate(x, name)[0]
        top = float(scores.max())
        passed = top >= cal.gate_threshold
        seg = pack.models.get("seg")
        masks = np.zeros((len(pack.classes), *hw), bool) if seg is not None else None
        if not passed:
            return [], masks, top, False
        if seg is not None:
            inst = seg.instances
            out = self.runner.seg_outputs(x, name)
            frame = {k: v[0] for k, v in out.items()}
            probs = frame[seg.output]
            if inst is not None:
                defects = extract_instances(frame, inst, seg.output, seg.output_stride, pack.classes, cal.classes, hw,
                                            self.max_events)
                for d in defects:
                    masks[d.class_id] |= _instance_mask(probs, d, cal.classes[d.class_name].pixel_threshold,
                                                        seg.output_stride, hw)
            else:
                defects = extract_defects(probs, pack.classes, cal.classes, seg.output_stride, hw, self.max_events)
                _component_masks(probs, defects, cal.classes, pack.classes, seg.output_stride, hw, masks)
            return [self._event(d, top, hw[1]) for d in defects], masks, top, True
        if gate_entry.cam_output:  # a wafer map: one event, its patterns and CAM peaks (agent/inference.py)
            cams = self.runner.models["gate"].raw(x)[gate_entry.cam_output][0]
            found = wafer.patterns(scores, cams, pack.classes, [cal.classes[c].pixel_threshold for c in pack.classes],
                                   gate_entry.cam_stride, hw)
            if not found:
                return [], None, top, True
            t = found[0]
            x0, y0, x1, y1 = t["peak_die"]
            d = Defect(t["class_id"], t["class"], t["score"], (x0, y0, x1, y1), (x1 - x0) * (y1 - y0))
            ev = self._event(d, top, hw[1])
            ev["patterns"] = found
            if pack.meta.get("die_map"):
                ev["dies"] = wafer.die_counts(x[0, :, :hw[0], :hw[1]], pack.meta["die_map"])
            return [ev], None, top, True
        events = []  # classification only: one event per class over its threshold
        for k, cname in enumerate(pack.classes):
            if scores[k] >= cal.classes[cname].pixel_threshold:
                events.append({"class": cname, "class_id": k, "confidence": round(float(scores[k]), 4),
                               "bbox_px": [0, 0, hw[1], hw[0]], "area_px": hw[0] * hw[1],
                               "models": pack.versions()})
        return events, None, top, True

    def _event(self, d: Defect, gate_score: float, width: int) -> dict:
        """agent/inference.py's Inference._event without the stream keys."""
        return {"class": d.class_name, "class_id": d.class_id, "confidence": d.confidence,
                "gate_score": round(gate_score, 4), "bbox_px": list(d.bbox_px), "area_px": d.area_px,
                **d.to_strip(self.geometry, 0.0, width), "models": self.pack.versions(),
                **({"instance": d.instance} if d.instance is not None else {})}


def inspect_image(inspector: Inspector, image: np.ndarray, name: str = "image") -> InspectResult:
    """One image through the pack: events as the agent would publish them, an overlay PNG and the masks.
    Raises BadImage (a one-line reason) for an image the pack cannot take."""
    result = inspector.run(image, name)
    for ev in result.events:
        ev["image"] = name
    return result


def _upsample(cells: np.ndarray, stride: int, hw: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(cells, stride, axis=0), stride, axis=1)[: hw[0], : hw[1]]


def _component_masks(probs, defects, thresholds, classes, stride, hw, masks) -> None:
    """Each event's mask: its connected component (engines/components.py, the rule extract_defects
    applies), found again by class, box and area, at frame pixels."""
    wanted: dict[int, set] = {}
    for d in defects:
        wanted.setdefault(d.class_id, set()).add((d.bbox_px, d.area_px))
    for k, keys in wanted.items():
        t = thresholds[classes[k]]
        labels, comps = class_components(probs[k], t.pixel_threshold, t.min_area_px, stride, hw, t.link_px)
        for comp in comps:
            if (comp.bbox_px, comp.area_px) in keys:
                masks[k] |= _upsample(labels == comp.label, stride, hw)


def _instance_mask(probs, d: Defect, threshold: float, stride: int, hw) -> np.ndarray:
    """An instance's mask: its class's probs inside its box at the pixel threshold (engines/instances.py)."""
    x0, y0, x1, y1 = d.bbox_px
    out = np.zeros(hw, bool)
    cells = _upsample(probs[d.class_id] >= threshold, stride, (probs.shape[1] * stride, probs.shape[2] * stride))
    out[y0:y1, x0:x1] = cells[y0:y1, x0:x1]
    return out


def draw_overlay(chw: np.ndarray, events: list[dict], masks: np.ndarray | None, classes, *,
                 wafer_map: bool = False) -> np.ndarray:
    """RGB uint8 HxWx3: the image (grey, RGB, or a 6-channel die's first three channels), each class's
    mask tinted in its colour, each event's box with its class and score."""
    c, h, w = chw.shape
    if c >= 3:
        base = np.ascontiguousarray(chw[:3].transpose(1, 2, 0))
    else:
        grey = chw[0]
        if wafer_map:  # die codes 0/1/2 -> visible grey levels
            grey = np.clip(grey.astype(np.int32) * 120, 0, 255).astype(np.uint8)
        base = np.repeat(grey[:, :, None], 3, axis=2)
    scale = int(np.ceil(256 / max(h, w))) if max(h, w) < 256 else 1
    out = base.astype(np.float32)
    if masks is not None:
        for k in range(masks.shape[0]):
            if masks[k].any():
                out[masks[k]] = 0.55 * out[masks[k]] + 0.45 * np.asarray(class_colour(k), np.float32)
    out = out.astype(np.uint8)
    if scale > 1:  # small images (a 52x52 wafer map, a 200x200 crop) are drawn larger so labels read
        out = cv2.resize(out, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    for ev in events:
        x0, y0, x1, y1 = (v * scale for v in ev["bbox_px"])
        colour = class_colour(ev["class_id"])
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, 1 if scale == 1 else 2)
        label = f"{ev['class']} {ev['confidence']:.2f}"
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        ty = y0 - 3 if y0 - th - 4 >= 0 else min(out.shape[0] - 2, y1 + th + 3)
        cv2.rectangle(out, (x0, ty - th - 2), (x0 + tw + 2, ty + 2), colour, -1)
        cv2.putText(out, label, (x0 + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return out
