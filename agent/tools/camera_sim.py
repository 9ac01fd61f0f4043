"""Camera simulator: publishes coils over the wire protocol, writes exact ground truth.

Sources: the synthetic strip generator (training/synth.py), or a folder of images. With a
ground-truth folder it writes ``frames/<coil>_<index>.png`` and ``ground_truth.csv`` in the
Severstal layout (ImageId, ClassId 1-based, EncodedPixels) so `coilsight calibrate` and
`coilsight evaluate` can read what the camera sent, and ``instances.csv``: one row per painted
defect (ImageId, index, ClassId 1-based, class, x0, y0, x1, y1 in px, x1/y1 exclusive), the truth
events are matched against (metrics.instances). The same instances are in ``SentCoil.instances``
for callers in the same process (bench, demo).

A frame source yields ``(image, masks)`` or ``(image, masks, instances)``, instances being
``(class_id, x0, y0, x1, y1)`` tuples; ``synthetic_frames`` and ``composed_frames`` give them with
``with_instances=True`` (one per painted or pasted defect, exact, never a component of a mask).
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
import structlog
import zmq

from agent.protocol import encode_control, encode_frame
from training.datasets import rle_encode

log = structlog.get_logger(__name__)


INSTANCES_HEADER = ["ImageId", "index", "ClassId", "class", "x0", "y0", "x1", "y1"]


@dataclass(frozen=True)
class TrueInstance:
    """One defect the camera painted: its frame, class and box in px (x1/y1 exclusive)."""

    index: int
    class_id: int
    class_name: str
    bbox_px: tuple[int, int, int, int]


@dataclass
class SentCoil:
    """What the camera really sent: the ground truth a test compares the summary with."""

    coil: str
    camera: str
    sent: int = 0
    defective: set[int] = field(default_factory=set)  # frame indices with ground-truth defects
    classes: dict[int, set[str]] = field(default_factory=dict)  # index -> classes present
    dropped: list[int] = field(default_factory=list)  # indices the camera could not hand to ZeroMQ
    instances: dict[int, list[TrueInstance]] = field(default_factory=dict)  # index -> painted defects, when known
    first_seq: int = 0
    last_seq: int = 0


def synthetic_frames(n: int, defect_fraction: float, *, seed: int = 0, width: int = 1600, height: int = 256,
                     classes: tuple[str, ...] | None = None, with_instances: bool = False) -> Iterator[tuple]:
    """n frames; a deterministic ``defect_fraction`` of them carry defects (with masks, and with
    ``with_instances`` each painted defect's class and box)."""
    from training.synth import STEEL_CLASSES, StripGenerator

    gen = StripGenerator(width=width, height=height, classes=classes or STEEL_CLASSES, seed=seed)
    rng = np.random.default_rng(seed + 7919)
    for i in range(n):
        defective = bool(rng.random() < defect_fraction)
        img, masks, instances = gen.frame_with_instances(i, defective)
        yield (img, masks, instances) if with_instances else (img, masks)


def composed_frames(n: int, defect_fraction: float, *, profile: str = "steel", data_root: Path, split: str = "val",
                    seed: int = 0, width: int = 1600, height: int = 256, with_instances: bool = False
                    ) -> Iterator[tuple]:
    """Line frames composed from REAL crops (issue: the gate must be judged on what the line sees).

    A clean frame tiles defect-free crops cut outside every box (training.datasets.clean_crops,
    the definition training and calibration use); a defective frame is a clean one with one real
    defective image pasted at a random place, its grey level shifted to the frame's (an affine
    change, so its masks stay exact). Masks are [K, height, width] bool, exact; with
    ``with_instances`` the pasted image's annotated boxes, moved to where it was pasted, come too.
    """
    from training.datasets import CLEAN_CROPS_DEFAULT, boxes_to_masks, clean_crops, load_profile_dataset
    from training.synth import compose_from_crops

    ds = load_profile_dataset(profile, data_root, split)
    samples = [ds[i] for i in range(len(ds))]
    if not samples:
        raise ValueError(f"no {profile} images in the {split} split under {data_root}")
    k = len(samples[0].classes)
    clean = [(c.image, np.zeros((k, *c.image.shape), bool)) for c in clean_crops(samples, **CLEAN_CROPS_DEFAULT)]
    defective = [(s.image, s.masks if s.masks is not None else boxes_to_masks(s), s.boxes) for s in samples
                 if s.labels.any() and s.image.shape[0] <= height and s.image.shape[1] <= width]
    if not clean or not defective:
        raise ValueError(f"{profile} {split}: need clean crops and defective images, got {len(clean)} / {len(defective)}")
    rng = np.random.default_rng(seed)
    for _ in range(n):
        picks = [clean[j] for j in rng.choice(len(clean), size=min(len(clean), 160), replace=False)]
        frame, masks = compose_from_crops(picks, width, height, rng)
        instances = []
        if rng.random() < defect_fraction:
            img, m, boxes = defective[int(rng.integers(len(defective)))]
            h, w = img.shape
            y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            shift = float(frame[y:y + h, x:x + w].mean()) - float(img.mean())
            frame[y:y + h, x:x + w] = np.clip(img.astype(np.float32) + shift, 0, 255).astype(np.uint8)
            masks[:, y:y + h, x:x + w] = m
            instances = [(b.cls, int(round(b.x0)) + x, int(round(b.y0)) + y, int(round(b.x1)) + x,
                          int(round(b.y1)) + y) for b in boxes]
        yield (frame, masks, instances) if with_instances else (frame, masks)


def folder_frames(folder: Path) -> Iterator[tuple[np.ndarray, None]]:
    """The folder's images in name order. A missing folder or one without images is an OSError here,
    at the call, before any socket is opened (not when the first frame is due)."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"no folder {folder}")
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not paths:
        raise FileNotFoundError(f"no images (png, jpg, bmp) in {folder}")
    return _read_images(paths)


def _read_images(paths: list[Path]) -> Iterator[tuple[np.ndarray, None]]:
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ValueError(f"{p}: OpenCV cannot read this image")
        if img.ndim == 3:
            img = img[..., ::-1].copy()
        yield img, None


def read_instances(path: Path) -> dict[str, list[TrueInstance]]:
    """instances.csv (written by send_coil) -> ImageId -> its painted defects."""
    out: dict[str, list[TrueInstance]] = {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header != INSTANCES_HEADER:
            raise ValueError(f"{path}: header {header} is not {INSTANCES_HEADER}")
        for row in rows:
            image_id, index, class_id, name, *box = row
            out.setdefault(image_id, []).append(
                TrueInstance(int(index), int(class_id) - 1, name, tuple(int(v) for v in box)))  # type: ignore[arg-type]
    return out


def score_events(sent: SentCoil, events: Iterable[dict], n_classes: int, min_iou: float = 0.5) -> dict:
    """The agent's defect events of this coil against its painted defects (metrics.instances), on the
    frames whose truth is known: true defects, events, events per true defect, matched one-to-one,
    split, merged, recall, precision, the median best IoU of each true defect and of matched pairs."""
    from metrics.instances import InstanceCounts, count_instances

    by_index: dict[int, list[dict]] = {}
    for ev in events:
        by_index.setdefault(int(ev["index"]), []).append(ev)
    total = InstanceCounts(n_classes)
    for index, truth in sent.instances.items():
        evs = by_index.get(index, [])
        total.add(count_instances([t.bbox_px for t in truth], [min(t.class_id, n_classes - 1) for t in truth],
                                  [e["bbox_px"] for e in evs], [min(int(e["class_id"]), n_classes - 1) for e in evs],
                                  n_classes, min_iou=min_iou))
    out = total.to_dict()
    out.pop("confusion")
    out["unscored_events"] = sum(len(v) for i, v in by_index.items() if i not in sent.instances)
    return out


class CameraSim:
    def __init__(self, endpoint: str, *, camera: str = "cam0", ctx: zmq.Context | None = None, sndhwm: int = 100,
                 send_timeout_ms: int = 10_000, seq_start: int = 0, socket_setup=None):
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 5000)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        if socket_setup:
            socket_setup(self.sock)
        self.sock.connect(endpoint)
        self.camera = camera
        self.seq = seq_start

    def _send(self, parts: list) -> bool:
        try:
            self.sock.send_multipart(parts, copy=len(parts) == 1)
        except zmq.Again:
            return False
        finally:
            self.seq += 1
        return True

    def send_coil(self, coil: str, frames: Iterable[tuple[np.ndarray, np.ndarray | None]], *, rate_hz: float = 0.0,
                  mm_per_px_y: float = 0.5, encoding: str = "raw", gt_dir: Path | None = None,
                  classes: tuple[str, ...] = (), send_end: bool = True, start_index: int = 0) -> SentCoil:
        sent = SentCoil(coil, self.camera, first_seq=self.seq)
        gt_rows: list[tuple[str, int, str]] = []
        if gt_dir is not None:
            (gt_dir / "frames").mkdir(parents=True, exist_ok=True)
        self._send(encode_control("coil_start", self.camera, coil, self.seq, ts_ns=time.time_ns()))
        period = 1.0 / rate_hz if rate_hz > 0 else 0.0
        next_t = time.perf_counter()
        pos_mm = 0.0
        index = start_index
        inst_rows: list[list] = []
        for index, item in enumerate(frames, start=start_index):
            img, masks = item[0], item[1]
            if masks is not None and masks.any():
                sent.defective.add(index)
                sent.classes[index] = {classes[k] for k in range(len(masks)) if masks[k].any()} if classes else set()
            if len(item) > 2 and item[2] is not None:
                truth = [TrueInstance(index, int(c), classes[c] if c < len(classes) else str(c),
                                      (int(x0), int(y0), int(x1), int(y1))) for c, x0, y0, x1, y1 in item[2]]
                sent.instances[index] = truth
                inst_rows += [[f"{coil}_{index:06d}.png", index, t.class_id + 1, t.class_name, *t.bbox_px]
                              for t in truth]
            parts = encode_frame(self.camera, coil, self.seq, index, img, ts_ns=time.time_ns(), pos_mm=pos_mm,
                                 encoding=encoding)
            if not self._send(parts):
                sent.dropped.append(index)
                log.warning("camera_frame_not_sent", coil=coil, index=index)
            sent.sent += 1
            pos_mm += img.shape[0] * mm_per_px_y
            if gt_dir is not None:
                name = f"{coil}_{index:06d}.png"
                if img.ndim == 3 and img.shape[2] > 4:  # PNG holds at most 4 channels: chip dies go as .npy
                    name = name[:-4] + ".npy"
                    np.save(gt_dir / "frames" / name, img)
                else:  # frames on the wire are RGB, OpenCV writes BGR
                    cv2.imwrite(str(gt_dir / "frames" / name), img[..., ::-1] if img.ndim == 3 else img)
                if masks is not None:
                    for k in range(len(masks)):
                        if masks[k].any():
                            gt_rows.append((name, k + 1, rle_encode(masks[k])))
            if period:
                next_t += period
                delay = next_t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
        if send_end:
            self._send(encode_control("coil_end", self.camera, coil, self.seq, ts_ns=time.time_ns(),
                                      frames=sent.sent, length_mm=pos_mm))
        sent.last_seq = self.seq - 1
        if gt_dir is not None:
            with open(gt_dir / "ground_truth.csv", "a", newline="") as f:
                w = csv.writer(f)
                if f.tell() == 0:
                    w.writerow(["ImageId", "ClassId", "EncodedPixels"])
                w.writerows(gt_rows)
            if sent.instances:
                with open(gt_dir / "instances.csv", "a", newline="") as f:
                    w = csv.writer(f)
                    if f.tell() == 0:
                        w.writerow(INSTANCES_HEADER)
                    w.writerows(inst_rows)
        return sent

    def close(self, linger_ms: int = 5000) -> None:
        self.sock.close(linger=linger_ms)
