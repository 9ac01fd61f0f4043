"""Inference thread: batches -> gate -> segmentation on passed frames -> defects -> events."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np
import structlog

from agent.batcher import Frame, FrameQueue
from agent.coil import CoilRegistry
from agent.config import CameraSection, Config
from agent.guard import LoopGuard, isolate_failed_batch
from agent.metrics import RateLimiter
from engines import wafer
from engines.postprocess import Defect, extract_defects, extract_instances, frame_scores
from agent.threadnames import name_this_thread
from engines.geometry import CameraGeometry
from engines.backends import Backend
from engines.modelpack import (Calibration, ModelEntry, ModelPack, check_instance_outputs, load_calibration,
                               load_model_pack)

log = structlog.get_logger(__name__)


@dataclass
class Models:
    """A loaded model pack: backends, thresholds and where they came from."""

    pack: ModelPack
    calibration: Calibration
    gate: Backend
    seg: Backend | None
    fallbacks: list[dict] = field(default_factory=list)
    batch: int = 8  # frames per model call: models.max_batch, or models.cpu_max_batch on the CPU
    _summary_fields: dict | None = field(default=None, repr=False)

    def summary_fields(self) -> dict:
        """What a coil summary says of these models: `models`, `profile`, `backend` (docs/protocol.md)."""
        if self._summary_fields is None:
            self._summary_fields = {"models": self.pack.versions(), "profile": self.pack.profile,
                                    "backend": {role: d["backend"] for role, d in self.describe().items()}}
        return self._summary_fields

    def describe(self) -> dict:
        out = {"gate": {**self.gate.describe(), "sha": self.pack.models["gate"].short_hash, "batch": self.batch}}
        if self.seg is not None:
            out["seg"] = {**self.seg.describe(), "sha": self.pack.models["seg"].short_hash, "batch": self.batch}
        return out

    def warm_up(self, batch: int) -> None:
        """One batch of the configured shape through each engine before READY (Frigate does this)."""
        x = np.zeros((batch, self.pack.channels, self.pack.height, self.pack.width), np.uint8)
        self.gate.infer(self.pack.models["gate"].prepare(x))
        if self.seg is not None:
            self.seg.infer(self.pack.models["seg"].prepare(x))

    def close(self) -> None:
        from engines.backends.select import close_backends

        close_backends((self.seg, self.gate))  # a failed release is logged, never raised


def open_models(cfg: Config, models_dir=None) -> Models:
    """Load the pack and its calibration, open each model on the first backend of the chain that
    loads. Fails loudly (ModelPackError / BackendError) at start-up."""
    pack = load_model_pack(models_dir or cfg.models_dir())
    calibration = load_calibration(pack, cfg.models.calibration or None)
    # OpenCV pools frames for models with an input_pool, inside each inference worker: give it the
    # worker's thread budget, not a pool of one thread per core of its own (on 2 cores that pool
    # used ~0.1 CPU s per 4,000-frame coil and bought no speed; docs/performance.md)
    cv2.setNumThreads(max(1, cfg.models.threads))
    from engines import manifest
    from engines.backends import select

    engine_dir = None
    if "tensorrt" in cfg.models.backends:
        try:  # where `coilsight engines build` put this machine's engines; None = no GPU/TensorRT here
            engine_dir = manifest.engine_dir(pack.profile, manifest.machine_facts(), cfg.state_path())
        except manifest.ManifestError as exc:
            log.debug("tensorrt_unavailable", reason=str(exc))
    opened: dict[str, Backend] = {}
    reasons: list[dict] = []
    try:
        for role, entry in pack.models.items():
            shapes = manifest.profile_shapes(pack.channels, *entry.input_hw(pack.height, pack.width), min_batch=1,
                                             opt_batch=cfg.models.opt_batch, max_batch=cfg.models.max_batch)
            backend, why = select.open_backend(
                list(cfg.models.backends), entry, max_batch=cfg.models.max_batch, threads=cfg.models.threads,
                strict=cfg.models.strict, engine_dir=engine_dir, profile_shapes=shapes)
            opened[role] = backend
            reasons += [{"model": role, **r} for r in why]
        if "seg" in opened:  # an instances block naming outputs the graph lacks fails at start-up
            check_instance_outputs(pack, [o.name for o in opened["seg"].outputs])
    except BaseException:
        select.close_backends(opened.values())  # a failed release is logged; the start-up error is raised
        raise
    on_cpu = any(b.on_cpu for b in opened.values())
    batch = min(cfg.models.max_batch, cfg.models.cpu_max_batch) if on_cpu else cfg.models.max_batch
    return Models(pack, calibration, opened["gate"], opened.get("seg"), reasons, batch)


def camera_geometry(cam: CameraSection) -> CameraGeometry:
    return CameraGeometry(cam.mm_per_px_x, cam.mm_per_px_y, cam.offset_x_mm, cam.flip_x)


class Inference:
    """The inference stage: ``workers`` threads take batches from the frame queue and run them.

    With ONNX Runtime, two workers with one intra-op thread each keep both cores busy while the
    other worker waits on the queue, post-processes or publishes (docs/performance.md measures
    it); one session serves concurrent runs. Every worker reads the current models at the start
    of each batch, so a hot swap takes effect between batches, and the old models are closed
    only once every worker has moved past them.
    """

    name = "inference"

    def __init__(self, *, cfg: Config, frames: FrameQueue, coils: CoilRegistry, models: Models,
                 submit: Callable[[str, dict], None], on_stage: Callable[[str, float], None] | None = None,
                 on_alive: Callable[[], None] | None = None,
                 on_reject: Callable[[str, str | None], None] | None = None,
                 on_loop_error: Callable[[str, str], None] | None = None,
                 on_frames: Callable[[dict], None] | None = None, crops=None):
        self.cfg = cfg
        # The coil layer (agent/intel.py): which frames are through (after their events), and the
        # crop thread's bounded queue (agent/crops.py; a put that never waits). None = off.
        self.on_frames = on_frames
        self.crops = crops
        self.frames = frames
        self.coils = coils
        self.models = models
        self.submit = submit
        self.on_stage = on_stage or (lambda stage, s: None)
        self.on_alive = on_alive or (lambda: None)
        self.n_workers = cfg.models.workers
        self._halt = threading.Event()
        self._lock = threading.Lock()  # models generation, retired models, counters
        self._gen = 0
        self._worker_gen = [0] * self.n_workers
        self._retired: list[tuple[int, Models]] = []
        self._threads: list[threading.Thread] = []
        self.swapped = threading.Event()
        self.error: BaseException | None = None
        self.inspected = 0
        self.gated_out = 0
        self.batches = 0  # batches taken from the frame queue (up to models.max_batch frames each)
        self.model_calls = 0  # calls into the backends (up to Models.batch frames each)
        self._cameras = {c.id: camera_geometry(c) for c in cfg.cameras}
        self._default_cam = camera_geometry(CameraSection(id="default"))
        # No frame can end a worker: a failed batch is retried frame by frame (agent/guard.py); 50
        # batches in a row with no frame through end it, and the agent exits non-zero.
        self.guard = LoopGuard("inference", max_consecutive=50, on_error=on_loop_error)
        self.rejected: dict[str, int] = {}  # reason -> frames rejected here (inference_failed)
        self.on_reject = on_reject
        self.reject_log = RateLimiter(per_s=1.0, burst=10)

    def count_rejected(self, reason: str, camera: str | None) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if self.on_reject:
            self.on_reject(reason, camera)

    def _process_guarded(self, batch: list[Frame], models: Models, buf: list) -> None:
        try:
            self.process(batch, models, buf)
            self.guard.ok()
        except Exception as exc:
            from agent.publish import PublishError

            if isinstance(exc, PublishError):
                raise
            isolate_failed_batch(self, batch, models, buf, exc)

    def start(self) -> None:
        for i in range(self.n_workers):
            t = threading.Thread(target=self._run, args=(i,), name=f"inference-{i}", daemon=True)
            self._threads.append(t)
            t.start()

    def is_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 10.0) -> None:
        self._halt.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._close_retired(final=True)

    def request_swap(self, models: Models) -> None:
        """Hot swap: the new models take over at each worker's next batch."""
        with self._lock:
            self._retired.append((self._gen + 1, self.models))
            self.models = models
            self._gen += 1
            self.swapped.clear()

    def _acquire(self, worker: int) -> Models:
        """The models for this worker's next batch; closes retired models nobody holds any more."""
        with self._lock:
            self._worker_gen[worker] = self._gen
            models = self.models
        self._close_retired()
        return models

    def _close_retired(self, final: bool = False) -> None:
        with self._lock:
            floor = min(self._worker_gen) if not final else self._gen
            done = [m for gen, m in self._retired if gen <= floor]
            self._retired = [(gen, m) for gen, m in self._retired if gen > floor]
            all_moved = not self._retired
        for m in done:
            m.close()
        if done and all_moved:
            self.swapped.set()
            log.info("models_swapped", models=self.models.describe())

    def _run(self, worker: int) -> None:
        name_this_thread()
        buf: list[np.ndarray | None] = [None]
        try:
            while not self._halt.is_set():
                models = self._acquire(worker)
                batch = self.frames.get_batch(self.cfg.models.max_batch, self.fill_wait_s(models))
                if not batch:
                    self.on_alive()  # idle and responsive
                    continue
                self._process_guarded(batch, models, buf)
                self.on_alive()
            # Drain what is queued: SIGTERM publishes what the agent owes.
            while batch := self.frames.get_batch(self.cfg.models.max_batch, 0.0, idle_timeout_s=0.0):
                self._process_guarded(batch, self._acquire(worker), buf)
                self.on_alive()
            with self._lock:
                self._worker_gen[worker] = self._gen
        except BaseException as exc:
            self.error = exc
            log.exception("inference_failed", worker=worker)

    def fill_wait_s(self, models: Models) -> float:
        """How long a partial batch waits for more frames: `models.max_wait_ms` where the backend runs
        stacked batches (TensorRT, CUDA); none where it takes one frame per call (the CPU), since
        waiting there only adds up to max_wait_ms to every frame's latency at line rate."""
        return self.cfg.models.max_wait_ms / 1000.0 if models.batch > 1 else 0.0

    def _stack(self, images: list[np.ndarray], buf: list) -> np.ndarray:
        """One contiguous [N, C, H, W] array; a single C-contiguous frame is passed as a view (no copy)."""
        if len(images) == 1 and images[0].flags.c_contiguous:
            return images[0][None]
        shape = (len(images), *images[0].shape)
        b = buf[0]
        if b is None or b.shape[1:] != shape[1:] or b.shape[0] < shape[0]:
            b = buf[0] = np.empty((max(self.cfg.models.max_batch, len(images)), *shape[1:]), np.uint8)
        out = b[: len(images)]
        for i, img in enumerate(images):
            out[i] = img
        return out

    def _model_input(self, entry: ModelEntry, images: list[np.ndarray], buf: list) -> np.ndarray:
        """The model's input for these frames. A model with an `input_pool` gets each frame pooled on
        its own, so the full-size frames are never stacked (a copy of every frame) only to be pooled."""
        if entry.input_pool > 1:
            pooled = [entry.prepare(img[None]) for img in images]
            return pooled[0] if len(pooled) == 1 else np.concatenate(pooled)
        return self._stack(images, buf)

    def _run_model(self, backend: Backend, entry: ModelEntry, images: list[np.ndarray], per_call: int,
                   buf: list, every_output: bool = False, cams: list | None = None) -> list:
        """The model over these frames, `per_call` frames per call (Models.batch); one output per frame
        (views, no copies). At one frame per call the frames go to the runtime as views on their
        ZeroMQ buffers: on the CPU that skips a copy of every frame, which cost more than the extra
        calls (docs/performance.md)."""
        out: list = []
        for i in range(0, len(images), per_call):
            res = backend.infer(self._model_input(entry, images[i:i + per_call], buf))
            if every_output:  # an instance head: {name: [..]} per frame
                out.extend({name: v[j] for name, v in res.items()} for j in range(len(res[entry.output])))
            else:
                out.extend(res[entry.output])
            if cams is not None:  # a classification gate's class activation maps (the wafer profile)
                cams.extend(res[entry.cam_output])
        with self._lock:
            self.model_calls += -(-len(images) // per_call)
        return out

    def process(self, batch: list[Frame], m: Models | None = None, buf: list | None = None) -> None:
        m = m or self.models
        buf = buf if buf is not None else [None]
        images = [f.image for f in batch]
        t0 = time.perf_counter()
        gate_entry = m.pack.models["gate"]
        seg = m.pack.models.get("seg")
        inst = seg.instances if seg is not None else None
        probs, cams, every = None, None, None
        t1 = t0
        if gate_entry.scores_from == "seg" and m.seg is not None:
            # a whole-image inspector: its gate is the segmenter's frame scores, so the segmenter runs
            # once on every frame and the scores come from its maps (a passing frame: one run, not two)
            every = self._run_model(m.seg, seg, images, m.batch, buf, inst is not None)
            t1 = time.perf_counter()
            self.on_stage("seg", t1 - t0)
            scores = np.stack([frame_scores(o[seg.output] if inst is not None else o) for o in every])
        else:
            cams = [] if gate_entry.cam_output and m.seg is None else None
            scores = np.stack(self._run_model(m.gate, gate_entry, images, m.batch, buf, cams=cams))
        t_gate = time.perf_counter()
        self.on_stage("gate", t_gate - t1)
        top = scores.max(axis=1)
        passed = np.flatnonzero(top >= m.calibration.gate_threshold)
        if every is not None:
            probs = [every[i] for i in passed] if passed.size else None
        elif passed.size and m.seg is not None:
            probs = self._run_model(m.seg, seg, [images[i] for i in passed], m.batch, buf, inst is not None)
            self.on_stage("seg", time.perf_counter() - t_gate)
        t2 = time.perf_counter()
        events_by_frame: dict[int, list[dict]] = {}
        if probs is not None:
            stride = seg.output_stride
            for j, i in enumerate(passed):
                f = batch[i]
                if inst is not None:  # one event per instance (engines/instances.py)
                    defects = extract_instances(probs[j], inst, seg.output, stride, m.pack.classes,
                                                m.calibration.classes, f.image.shape[1:],
                                                self.cfg.coil.max_events_per_frame)
                else:
                    defects = extract_defects(probs[j], m.pack.classes, m.calibration.classes, stride,
                                              f.image.shape[1:], self.cfg.coil.max_events_per_frame)
                events_by_frame[int(i)] = [self._event(m, f, d, float(top[i])) for d in defects]
        elif passed.size and cams is not None:  # wafer maps: one event per wafer, its patterns and CAM peaks
            for i in passed:
                events_by_frame[int(i)] = self._wafer_events(m, batch[i], scores[i], cams[i])
        elif passed.size:  # classification-only profile: one event per class over its threshold
            for i in passed:
                events_by_frame[int(i)] = self._class_events(m, batch[i], scores[i])
        t3 = time.perf_counter()
        self.on_stage("postprocess", t3 - t2)
        passed_set = set(int(i) for i in passed)
        fields = m.summary_fields()
        for i, f in enumerate(batch):
            h = f.header
            events = events_by_frame.get(i, [])
            for ev in events:
                self.submit("defect", ev)
            if events and self.crops is not None:
                self.crops.offer(f.image, events, f.keepalive)
            state = "inspected" if i in passed_set else "gated_out"
            lot = self._lot_update(m, f, events)
            # finish() puts this batch's models in the summary itself: nothing to decorate
            for summary in self.coils.finish(h.camera, h.coil, h.index, state, events, models=fields,
                                             lot_update=lot):
                self.submit("summary", summary)
        if self.on_frames is not None:
            done: dict[tuple[str, str], list[int]] = {}
            for f in batch:
                done.setdefault((f.header.coil, f.header.camera), []).append(f.header.index)
            self.on_frames(done)
        self.on_stage("publish", time.perf_counter() - t3)
        with self._lock:
            self.inspected += len(passed_set)
            self.gated_out += len(batch) - len(passed_set)
            self.batches += 1

    def decorate_summary(self, summary: dict) -> dict:
        """A summary with its `models`, `profile` and `backend`: those the coil registry recorded for
        the coil's latest inspected frame, else (no frame through the models) the running ones."""
        if "models" in summary:
            return summary
        return {**summary, **self.models.summary_fields()}

    def _event(self, m: Models, f: Frame, d, gate_score: float) -> dict:
        h = f.header
        cam = self._cameras.get(h.camera, self._default_cam)
        return {
            "coil": h.coil, "camera": h.camera, "index": h.index, "class": d.class_name, "class_id": d.class_id,
            "confidence": d.confidence, "gate_score": round(gate_score, 4), "bbox_px": list(d.bbox_px),
            "area_px": d.area_px, **d.to_strip(cam, h.pos_mm, f.image.shape[2]),
            "frame_ts_ns": h.ts_ns, "recv_ts_ns": f.recv_ns, "models": m.pack.versions(),
            **({"instance": d.instance} if d.instance is not None else {}),
        }

    def _wafer_events(self, m: Models, f: Frame, scores: np.ndarray, cams: np.ndarray) -> list[dict]:
        """One event per wafer with a pattern over its threshold: the top pattern as the event's class and
        region (its CAM peak, in dies), every pattern found under ``patterns`` (engines/wafer.py)."""
        h = f.header
        H, W = f.image.shape[1:]
        names = m.pack.classes
        found = wafer.patterns(scores, cams, names, [m.calibration.classes[c].pixel_threshold for c in names],
                               m.pack.models["gate"].cam_stride, (H, W))
        if not found:
            return []
        top = found[0]
        x0, y0, x1, y1 = top["peak_die"]
        d = Defect(top["class_id"], top["class"], top["score"], (x0, y0, x1, y1), (x1 - x0) * (y1 - y0))
        cam = self._cameras.get(h.camera, self._default_cam)
        dies = wafer.die_counts(f.image, m.pack.meta["die_map"]) if m.pack.meta.get("die_map") else None
        return [{"coil": h.coil, "camera": h.camera, "index": h.index, "class": d.class_name, "class_id": d.class_id,
                 "confidence": d.confidence, "gate_score": round(float(scores.max()), 4), "bbox_px": list(d.bbox_px),
                 "area_px": d.area_px, **d.to_strip(cam, h.pos_mm, W), "patterns": found,
                 **({"dies": dies} if dies else {}),
                 "frame_ts_ns": h.ts_ns, "recv_ts_ns": f.recv_ns, "models": m.pack.versions()}]

    @staticmethod
    def _lot_update(m: Models, f: Frame, events: list[dict]) -> Callable[[dict], None] | None:
        """Wafer profile (model.json has a die_map): this wafer's dies and patterns, added to its lot."""
        die_map = m.pack.meta.get("die_map")
        if not die_map:
            return None
        dies = wafer.die_counts(f.image, die_map)
        found = events[0]["patterns"] if events else []
        return lambda lot: wafer.lot_add(lot, dies, found)

    def _class_events(self, m: Models, f: Frame, scores: np.ndarray) -> list[dict]:
        h = f.header
        out = []
        for k, name in enumerate(m.pack.classes):
            if scores[k] >= m.calibration.classes[name].pixel_threshold:
                H, W = f.image.shape[1:]
                out.append({"coil": h.coil, "camera": h.camera, "index": h.index, "class": name, "class_id": k,
                            "confidence": round(float(scores[k]), 4), "bbox_px": [0, 0, W, H], "area_px": H * W,
                            "frame_ts_ns": h.ts_ns, "recv_ts_ns": f.recv_ns, "models": m.pack.versions()})
        return out
