"""Upload an image -> the same events and overlay as `coilsight inspect`.

Content checks, before any decoder sees the bytes: PNG or baseline (sequential) JPEG by their
magic bytes, nothing else; height and width read from the header (PNG IHDR, JPEG SOF) within
``web.max_upload_pixels``; a JPEG that is progressive, lossless or arithmetic-coded is refused (its
decode time is not bounded by its size, docs/protocol.md "Limits"); after decoding, the image must
be 8-bit with the header's height and width. Nothing is written anywhere: the bytes live in memory
for the one request.

``Inspector`` is the one place the page runs the pack: through `coilsight inspect`'s functions
(agent/tools/inspect.py), which follow the agent's rule (gate, then segmentation or instances on a
frame that passes, engines/postprocess.py).
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
    The work is `coilsight inspect`'s (agent/tools/inspect.py): the page and the command give the
    same events and the same overlay."""

    def __init__(self, models_dir: Path, calibration: str | None = None, *, max_events: int = 50):
        from agent.tools import inspect as shared
        from engines.modelpack import load_calibration

        self.lock = threading.Lock()
        self.max_events = max_events
        self._shared_mod = shared
        self._shared = shared.Inspector(models_dir, threads=1, max_events=max_events)
        self.pack = self._shared.pack
        if calibration:  # the agent's models.calibration, not the pack's own file
            self._shared.calibration = load_calibration(self.pack, calibration)
        self.calibration = self._shared.calibration

    def close(self) -> None:
        self._shared.close()

    def inspect(self, image: np.ndarray, name: str = "upload") -> InspectResult:
        """One image through the pack; an image the pack cannot take raises ValueError (a one-line reason)."""
        r = self._shared_mod.inspect_image(self._shared, image, name)
        return InspectResult(r.events, r.overlay_png, r.gate_score, r.passed, tuple(r.shape))
