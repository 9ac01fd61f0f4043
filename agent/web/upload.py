"""Upload an image -> the same events and overlay as `coilsight inspect`.

Content checks, before any decoder sees the bytes: PNG or baseline (sequential) JPEG by their
magic bytes, nothing else; height and width read from the header (PNG IHDR, JPEG SOF) within
``web.max_upload_pixels``; a JPEG that is progressive, lossless or arithmetic-coded is refused (its
decode time is not bounded by its size, docs/protocol.md "Limits"); after decoding, the image must
be 8-bit with the header's height and width. Nothing is written anywhere: the bytes live in memory
for the one request.

``Inspector`` is the one place the page runs the pack. It follows the agent's rule (gate, then
segmentation or instances on a frame that passes, engines/postprocess.py); when agent/tools/inspect.py
(`coilsight inspect`) provides the shared function, ``Inspector.inspect`` calls that instead.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from agent.protocol import JPEG_SEQUENTIAL_SOF, encoded_size, jpeg_sof

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# BGR colours per class index, the same order as the page's palette (agent/web/static/app.js)
PALETTE = ((40, 39, 214), (180, 119, 31), (44, 160, 44), (14, 127, 255), (189, 103, 148), (75, 86, 140),
           (194, 119, 227), (127, 127, 127), (34, 189, 188), (207, 190, 23))


class UploadRejected(ValueError):
    """The upload is not an image the page inspects; the message says why (HTTP 415 or 413)."""

    def __init__(self, message: str, status: int = 415):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """Checked bytes -> uint8 HxW or HxWx3 (RGB)."""
    if data.startswith(PNG_MAGIC):
        kind = "png"
    elif data.startswith(JPEG_MAGIC):
        kind = "jpeg"
    else:
        raise UploadRejected("not a PNG or JPEG image (by its first bytes); upload a .png or .jpg file")
    hw = encoded_size(data, kind)
    if hw is None or 0 in hw:
        raise UploadRejected(f"the {kind.upper()} header has no image size; the file is cut short or damaged")
    if kind == "jpeg" and jpeg_sof(data) not in JPEG_SEQUENTIAL_SOF:
        raise UploadRejected("progressive, lossless or arithmetic-coded JPEG is not accepted; save it as a "
                             "baseline JPEG or PNG")
    h, w = hw
    if h * w > max_pixels:
        raise UploadRejected(f"the image is {w}x{h} pixels, more than the {max_pixels} this page takes "
                             f"(web.max_upload_pixels)", status=413)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UploadRejected(f"the {kind.upper()} could not be decoded (damaged data)")
    if img.dtype != np.uint8:
        raise UploadRejected(f"the image has {img.dtype} pixels; the models take 8-bit images")
    if img.shape[:2] != (h, w):
        raise UploadRejected(f"the decoded image is {img.shape[1]}x{img.shape[0]}, its header says {w}x{h}")
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[:, :, :3]
        if img.shape[2] == 1:
            img = img[:, :, 0]
        else:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(img)


@dataclass
class InspectResult:
    events: list[dict]
    overlay_png: bytes
    gate_score: float | None = None
    passed: bool = True
    shape: tuple[int, ...] = field(default=())


class Inspector:
    """The configured pack opened once (ONNX Runtime, one thread: the agent keeps the cores), one
    image at a time; ``lock`` tells a second request to come back later instead of queueing.

    When agent/tools/inspect.py (`coilsight inspect`) is installed, its Inspector and inspect_image
    do the work, so the page and the command give the same events and overlay; the fallback below
    follows the same rules through the same runner."""

    def __init__(self, models_dir: Path, calibration: str | None = None, *, max_events: int = 50):
        from engines.modelpack import load_calibration, load_model_pack

        self.lock = threading.Lock()
        self.max_events = max_events
        self._shared_mod = _shared_inspect()
        self._shared = None
        if self._shared_mod is not None:
            self._shared = self._shared_mod.Inspector(models_dir, threads=1, max_events=max_events)
            self.pack = self._shared.pack
            if calibration:  # the agent's models.calibration, not the pack's own file
                self._shared.calibration = load_calibration(self.pack, calibration)
            self.calibration = self._shared.calibration
            return
        from engines.runner import PackRunner

        self.pack = load_model_pack(models_dir)
        self.calibration = load_calibration(self.pack, calibration or None)
        self.runner = PackRunner(self.pack, backend="onnxruntime", threads=1, max_batch=1)

    def close(self) -> None:
        (self._shared or self.runner).close()

    def inspect(self, image: np.ndarray, name: str = "upload") -> InspectResult:
        """One image through the pack; an image the pack cannot take raises ValueError (a one-line reason)."""
        if self._shared is not None:
            r = self._shared_mod.inspect_image(self._shared, image, name)
            return InspectResult(r.events, r.overlay_png, r.gate_score, r.passed, tuple(r.shape))
        return _inspect_with_runner(self, image, name)


def _shared_inspect():
    """agent.tools.inspect when it provides Inspector and inspect_image, else None."""
    try:
        from agent.tools import inspect as shared
    except ImportError:
        return None
    return shared if hasattr(shared, "Inspector") and hasattr(shared, "inspect_image") else None


def _inspect_with_runner(insp: Inspector, image: np.ndarray, name: str) -> InspectResult:
    from engines.postprocess import extract_defects, extract_instances
    from engines.runner import stack_images

    pack, cal = insp.pack, insp.calibration
    h, w = image.shape[:2]
    x = stack_images(pack, [image], [name])
    scores = insp.runner.gate(x, name)[0]
    top = float(scores.max())
    passed = top >= cal.gate_threshold
    events: list[dict] = []
    mask = None
    seg = pack.models.get("seg")
    if passed and seg is not None and insp.runner.has("seg"):
        outs = {k: v[0] for k, v in insp.runner.seg_outputs(x, name).items()}
        if seg.instances is not None:
            defects = extract_instances(outs, seg.instances, seg.output, seg.output_stride, pack.classes,
                                        cal.classes, (h, w), insp.max_events)
        else:
            defects = extract_defects(outs[seg.output], pack.classes, cal.classes, seg.output_stride, (h, w),
                                      insp.max_events)
        mask = _class_mask(outs[seg.output], pack.classes, cal, seg.output_stride, (h, w))
        events = [{"class": d.class_name, "class_id": d.class_id, "confidence": d.confidence,
                   "bbox_px": list(d.bbox_px), "area_px": d.area_px,
                   **({"instance": d.instance} if d.instance is not None else {})} for d in defects]
    elif passed:
        for k, cname in enumerate(pack.classes):
            if scores[k] >= cal.classes[cname].pixel_threshold:
                events.append({"class": cname, "class_id": k, "confidence": round(float(scores[k]), 4),
                               "bbox_px": [0, 0, w, h], "area_px": h * w})
    for ev in events:
        ev["gate_score"] = round(top, 4)
    return InspectResult(events, overlay_png(image, events, mask), round(top, 4), bool(passed), image.shape)


def _class_mask(probs: np.ndarray, classes, cal, stride: int, hw: tuple[int, int]) -> np.ndarray:
    """Per pixel: the class index + 1 where that class is over its pixel threshold (top class), else 0."""
    thr = np.array([cal.classes[c].pixel_threshold for c in classes], np.float32)[:, None, None]
    over = probs >= thr
    best = np.where(over.any(axis=0), np.argmax(np.where(over, probs, -1.0), axis=0) + 1, 0).astype(np.uint8)
    full = np.repeat(np.repeat(best, stride, axis=0), stride, axis=1)
    return full[:hw[0], :hw[1]]


def overlay_png(image: np.ndarray, events: list[dict], mask: np.ndarray | None = None) -> bytes:
    """The image with class masks tinted, boxes drawn and each labelled 'class 0.91'."""
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    out = bgr.copy()
    if mask is not None and mask.any():
        tint = np.zeros_like(bgr)
        for k in np.unique(mask[mask > 0]):
            tint[mask == k] = PALETTE[(int(k) - 1) % len(PALETTE)]
        sel = mask > 0
        out[sel] = (0.55 * bgr[sel] + 0.45 * tint[sel]).astype(np.uint8)
    for ev in events:
        x0, y0, x1, y1 = ev["bbox_px"]
        colour = PALETTE[ev["class_id"] % len(PALETTE)]
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, 1)
        label = f"{ev['class']} {ev['confidence']:.2f}"
        ty = y0 - 3 if y0 >= 12 else min(out.shape[0] - 2, y1 + 11)
        cv2.putText(out, label, (x0, ty), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", out)
    if not ok:
        raise RuntimeError("OpenCV could not encode the overlay as PNG")
    return buf.tobytes()
