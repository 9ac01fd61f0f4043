"""Build TensorRT FP16 engines for a profile's model pack, in two steps.

(a) CPU, always: ``engines.fp16.convert`` writes the mixed-precision FP16 ONNX, and the parity
    gate compares it with the FP32 ONNX on ONNX Runtime CPU (engines.parity). A failure stops
    the build with the report.
(b) GPU: a strongly typed TensorRT build from the FP16 ONNX (precision comes from the graph:
    ``1 << STRONGLY_TYPED``, no precision flags; the same code serves 10.13+ and 11.x), with one
    optimisation profile (batch min/opt/max, H/W = the profile's frame size), a workspace limit
    and a persistent timing cache. It runs in a child process (repeated builds grow the builder's
    memory, NVIDIA/TensorRT#2220), writes the plan under a temporary name beside ``<role>.engine``,
    checks that plan against the FP32 ONNX once more (TensorRT vs ONNX Runtime), and only then
    renames it over ``<role>.engine`` and writes its manifest entry (atomically, fsynced). A
    failure at any step (build, parity, rename, manifest) leaves the previous engine and its
    manifest entry as they were: a failed rebuild never costs the line its working engine.

Every failure reaches the caller as a BuildError (or ParityError, which carries its report)
naming the model: FP16 conversion errors, pycuda/TensorRT errors in the parity run, a full disk.
``coilsight engines build`` prints it as one line and exits non-zero. The three steps that need
TensorRT and a GPU (machine facts, the plan build, opening a plan) are the fields of
``GpuSteps``; tests on a CPU box pass their own to exercise everything around them.

Files (engines.manifest): FP16 ONNX in ``<state>/engines/<profile>/fp16/``, engines and
manifest.json in ``<state>/engines/<profile>/<gpu-slug>-trt<version>/``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import structlog

from engines import manifest
from engines.backends.base import Backend, BackendError, describe_cause
from engines.fp16 import FP16Error, FP16Recipe, convert
from engines.modelpack import ModelPack, ModelPackError, load_calibration, sha256_file
from engines.instances import DEFAULT_INSTANCE_THRESHOLD
from engines.parity import ParityBar, ParityReport, compare, synthetic_frames

log = structlog.get_logger(__name__)

GiB = 1 << 30


class BuildError(RuntimeError):
    """An engine could not be built; the message says which model and why."""


class TensorRTMissing(BuildError):
    """Step (a) is done but this machine cannot run step (b)."""


@dataclass(frozen=True)
class BuildSpec:
    pack: ModelPack
    state: Path
    roles: tuple[str, ...] = ()  # empty = every model in the pack
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 8
    workspace_bytes: int = 4 * GiB
    recipe: FP16Recipe = field(default_factory=FP16Recipe)
    bar: ParityBar = field(default_factory=ParityBar)
    frames_path: Path | None = None  # .npy [N,C,H,W]/[N,H,W] uint8, or a folder of images
    parity_frames: int = 16
    parity_batch: int = 4
    force: bool = False
    device: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise BuildError(f"batch sizes must satisfy 1 <= min ({self.min_batch}) <= opt ({self.opt_batch}) "
                             f"<= max ({self.max_batch})")
        if self.workspace_bytes < 64 << 20:
            raise BuildError(f"workspace {self.workspace_bytes} bytes is below 64 MiB")
        unknown = [r for r in self.roles if r not in self.pack.models]
        if unknown:
            raise BuildError(f"model(s) {unknown} not in the {self.pack.profile} pack "
                             f"(has {sorted(self.pack.models)})")

    @property
    def selected(self) -> list[str]:
        return list(self.roles) or list(self.pack.models)

    def profile_shapes(self, role: str) -> dict[str, dict[str, list[int]]]:
        """The optimisation profile of this model's engine: the pack's frame, pooled where the model
        has an input_pool (the agent asks open_backend for the same)."""
        h, w = self.pack.models[role].input_hw(self.pack.height, self.pack.width)
        return manifest.profile_shapes(self.pack.channels, h, w,
                                       min_batch=self.min_batch, opt_batch=self.opt_batch, max_batch=self.max_batch)


@dataclass
class ModelOutcome:
    role: str
    status: str  # "up-to-date", "built", "fp16-only", "would-build", "failed"
    detail: str = ""
    engine: Path | None = None
    fp16_onnx: Path | None = None
    reasons: list[str] = field(default_factory=list)


# -- frames and thresholds for the parity gate ----------------------------------------------------

def load_frames(spec: BuildSpec) -> np.ndarray:
    """Parity frames [N, C, H, W] uint8 at the profile's frame size."""
    c, h, w = spec.pack.channels, spec.pack.height, spec.pack.width
    path = spec.frames_path
    if path is None:
        return synthetic_frames(spec.parity_frames, c, h, w)
    path = Path(path)
    if path.is_dir():
        import cv2

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
        if not files:
            raise BuildError(f"--frames {path}: no images (.png/.jpg/.bmp/.tif) in the folder")
        arrays = []
        for p in files[: spec.parity_frames]:
            img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE if c == 1 else cv2.IMREAD_UNCHANGED)
            if img is None:
                raise BuildError(f"--frames {p}: cannot decode the image")
            arrays.append(img[None] if img.ndim == 2 else img.transpose(2, 0, 1))
        if len({a.shape for a in arrays}) != 1:
            raise BuildError(f"--frames {path}: images differ in size")
        frames = np.stack(arrays)
    elif path.suffix == ".npy" and path.is_file():
        frames = np.load(path, allow_pickle=False)
        if frames.ndim == 3:
            frames = frames[:, None]
    else:
        raise BuildError(f"--frames {path}: expected a folder of images or a .npy file")
    if frames.dtype != np.uint8 or frames.shape[1:] != (c, h, w):
        raise BuildError(f"--frames {path}: frames are {frames.dtype} {tuple(frames.shape[1:])}, "
                         f"the {spec.pack.profile} profile needs uint8 {(c, h, w)}")
    return np.ascontiguousarray(frames[: spec.parity_frames])


def thresholds(pack: ModelPack) -> tuple[float, list[float], str]:
    """Gate threshold and per-class pixel thresholds from calibration.json, or 0.5 when absent."""
    try:
        cal = load_calibration(pack)
    except ModelPackError as exc:
        log.warning("parity_uses_default_thresholds", profile=pack.profile, reason=str(exc))
        return 0.5, [0.5] * len(pack.classes), f"defaults (0.5): {exc}"
    return cal.gate_threshold, [cal.classes[c].pixel_threshold for c in pack.classes], "calibration.json"


def instance_thresholds(pack: ModelPack) -> list[float]:
    """Per-class instance thresholds from calibration.json, or the contract's default when absent."""
    try:
        cal = load_calibration(pack)
    except ModelPackError:
        return [DEFAULT_INSTANCE_THRESHOLD] * len(pack.classes)  # thresholds() has logged why
    return [cal.classes[c].instance_threshold for c in pack.classes]


def run_parity(reference_path: Path, candidate, frames: np.ndarray, role: str, pack: ModelPack,
               bar: ParityBar, batch: int) -> ParityReport:
    """FP32 ONNX (ORT CPU) vs ``candidate`` (an active-able Backend); raises ParityError below the bar."""
    from engines.backends.onnxrt import OnnxRuntimeBackend

    gate_t, pixel_t, source = thresholds(pack)
    entry = pack.models[role]
    instances = entry.instances  # an instance head: its boxes are compared too
    instance_t = instance_thresholds(pack) if instances is not None else None
    cam = (entry.cam_output, entry.output, pixel_t) if entry.cam_output else None  # as agent.inference reads them
    frames = entry.prepare(frames)  # as the agent feeds this model
    batches = [frames[i:i + batch] for i in range(0, len(frames), batch)]
    with OnnxRuntimeBackend(reference_path, max_batch=batch) as ref, candidate as cand:
        report = compare(ref, cand, batches, role=role, gate_threshold=gate_t, pixel_thresholds=pixel_t,
                         model=reference_path.name, instances=instances, instance_thresholds=instance_t, cam=cam)
    log.info("parity_thresholds", model=reference_path.name, source=source)
    return report.check(bar)


# -- step (a): FP16 ONNX + parity on ONNX Runtime ---------------------------------------------------

def prepare_fp16(spec: BuildSpec, role: str, frames: np.ndarray) -> tuple[Path, dict[str, Any]]:
    """Write ``<role>.fp16.onnx`` and pass the parity gate on ONNX Runtime; the report goes to
    ``<role>.fp16.json`` beside it. A model that fails keeps no FP16 file."""
    from engines.backends.onnxrt import OnnxRuntimeBackend
    from engines.parity import ParityError

    entry = spec.pack.models[role]
    out_dir = manifest.fp16_dir(spec.pack.profile, spec.state)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / f"{role}.fp16.onnx"
    log.info("fp16_convert_started", model=role, source=str(entry.path))
    try:
        convert(entry.path, dest, spec.recipe)
    except FP16Error as exc:
        raise BuildError(f"{role}: FP16 conversion failed: {exc}") from exc
    except Exception as exc:  # onnx / onnxconverter-common raise their own types; traceback in the log
        log.error("fp16_convert_raised", model=role, error=describe_cause(exc), exc_info=True)
        raise BuildError(f"{role}: FP16 conversion failed: {describe_cause(exc)}") from exc
    candidate = OnnxRuntimeBackend(dest, max_batch=spec.parity_batch)
    try:
        report = run_parity(entry.path, candidate, frames, role, spec.pack, spec.bar, spec.parity_batch)
    except ParityError:
        dest.unlink()
        raise
    except BackendError as exc:
        dest.unlink(missing_ok=True)
        raise BuildError(f"{role}: the ONNX Runtime parity run of the FP16 model failed: {exc}") from exc
    record = {"source_sha256": sha256_file(entry.path), "recipe": spec.recipe.to_dict(),
              "sha256": sha256_file(dest), "parity": report.to_dict()}
    manifest.write_atomic(out_dir / f"{role}.fp16.json", json.dumps(record, indent=2).encode())
    return dest, record["parity"]


def _plan_steps():
    """engines.trt_build, imported when a GpuSteps is made (it imports this module's BuildError)."""
    from engines import trt_build

    return trt_build


@dataclass(frozen=True)
class GpuSteps:
    """The steps of a build that need TensorRT and a GPU; everything else in this module runs anywhere.

    - ``facts(device) -> MachineFacts``: raises ManifestError when this machine has no TensorRT/GPU;
    - ``build_plan(onnx_path, engine_path, *, shapes, workspace_bytes, timing_cache) -> {"seconds", ...}``:
      writes the plan to ``engine_path`` (the build passes a temporary name);
    - ``open_plan(engine_path, *, role, max_batch, device) -> Backend``: an inactive backend over a
      plan, for the parity run.
    """

    # Looked up when a GpuSteps is made, not when this module is imported.
    facts: Callable[[int], manifest.MachineFacts] = field(default_factory=lambda: manifest.machine_facts)
    build_plan: Callable[..., dict[str, Any]] = field(default_factory=lambda: _plan_steps().build_in_child)
    open_plan: Callable[..., Backend] = field(default_factory=lambda: _plan_steps().open_tensorrt_plan)


# -- the whole build ---------------------------------------------------------------------------------

def plan(spec: BuildSpec, gpu: GpuSteps | None = None
         ) -> tuple[manifest.MachineFacts | None, str | None, dict[str, list[str]]]:
    """Machine facts (or why there are none) and, per selected model, why it needs a build ([] = up to date)."""
    gpu = gpu or GpuSteps()
    try:
        facts, why_not = gpu.facts(spec.device), None
    except manifest.ManifestError as exc:
        facts, why_not = None, str(exc)
    needed: dict[str, list[str]] = {}
    for role in spec.selected:
        if facts is None:
            needed[role] = [f"cannot build here: {why_not}"]
            continue
        found = manifest.check_engine(manifest.engine_dir(spec.pack.profile, facts, spec.state),
                                      spec.pack.models[role].path, facts, role=role,
                                      profile_shapes=spec.profile_shapes(role))
        needed[role] = found or (["--force"] if spec.force else [])
    return facts, why_not, needed


def build(spec: BuildSpec, gpu: GpuSteps | None = None) -> list[ModelOutcome]:
    """Build every selected model that is not up to date. Raises TensorRTMissing after step (a)
    when this machine has no TensorRT/CUDA, BuildError/ParityError on failures."""
    gpu = gpu or GpuSteps()
    facts, why_not, needed = plan(spec, gpu)
    frames = None
    outcomes: list[ModelOutcome] = []
    for role, reasons in needed.items():
        if facts is not None and not reasons:
            log.info("engine_up_to_date", model=role, profile=spec.pack.profile)
            outcomes.append(ModelOutcome(role, "up-to-date"))
            continue
        log.info("engine_build_needed", model=role, profile=spec.pack.profile, reasons=reasons)
        try:
            frames = load_frames(spec) if frames is None else frames
            fp16_path, parity = prepare_fp16(spec, role, frames)
            if facts is None:
                outcomes.append(ModelOutcome(role, "fp16-only", fp16_onnx=fp16_path, reasons=reasons))
                continue
            outcomes.append(_build_engine(spec, role, facts, fp16_path, parity, frames, gpu))
        except OSError as exc:  # a full disk, a read-only state dir: name the model and the path
            raise BuildError(f"{role}: {exc}") from exc
    if facts is None:
        raise TensorRTMissing(f"{why_not}; FP16 ONNX and the ONNX Runtime parity gate are done "
                              f"({manifest.fp16_dir(spec.pack.profile, spec.state)}), engines need a GPU box")
    return outcomes


def _build_engine(spec: BuildSpec, role: str, facts: manifest.MachineFacts, fp16_path: Path,
                  parity_ort: dict[str, Any], frames: np.ndarray, gpu: GpuSteps) -> ModelOutcome:
    """Plan to a temporary name, parity on it, then install it over ``<role>.engine`` with its
    manifest entry. Until the install, the previous engine and manifest are untouched; the
    install itself puts them back if it fails (manifest.install_engine)."""
    from engines.parity import ParityError

    d = manifest.engine_dir(spec.pack.profile, facts, spec.state)
    d.mkdir(parents=True, exist_ok=True)
    engine_path, local_fp16 = d / f"{role}.engine", d / f"{role}.fp16.onnx"
    # Same folder, so the final rename is atomic; hidden and named for this process.
    new_engine = d / f".{role}.engine.{os.getpid()}.new"
    new_fp16 = d / f".{role}.fp16.onnx.{os.getpid()}.new"
    shapes = spec.profile_shapes(role)
    source = spec.pack.models[role].path
    try:
        try:
            result = gpu.build_plan(fp16_path, new_engine, shapes=shapes, workspace_bytes=spec.workspace_bytes,
                                    timing_cache=d / "timing.cache")
        except BuildError:
            raise
        except Exception as exc:  # pycuda/TensorRT's own types, from a build run in this process
            raise BuildError(f"{role}: the TensorRT build failed: {describe_cause(exc)}") from exc
        if not new_engine.is_file():
            raise BuildError(f"{role}: the TensorRT build reported success but wrote no plan at {new_engine}")
        try:
            candidate = gpu.open_plan(new_engine, role=role, max_batch=spec.parity_batch, device=spec.device)
            report = run_parity(source, candidate, frames, role, spec.pack, spec.bar, spec.parity_batch)
        except ParityError:  # carries its report; the previous engine is kept
            raise
        except BackendError as exc:  # pycuda out of memory, a plan that does not deserialize...
            raise BuildError(f"{role}: the parity run of the new engine failed: {exc}; "
                             f"the previous engine, if any, is kept") from exc
        except Exception as exc:  # a vendor library's own type that slipped through the backend
            log.error("engine_parity_run_raised", model=role, error=describe_cause(exc), exc_info=True)
            raise BuildError(f"{role}: the parity run of the new engine failed: {describe_cause(exc)}; "
                             f"the previous engine, if any, is kept") from exc
        # The report names the file the engine will have, not the temporary one it was checked under.
        report.candidate = report.candidate.replace(new_engine.name, engine_path.name)
        manifest.write_atomic(new_fp16, fp16_path.read_bytes())  # the exact graph this engine came from

        def entry() -> dict[str, Any]:  # from the installed files: same bytes as the ones checked
            return manifest.engine_entry(
                role=role, engine_path=engine_path, onnx_fp32=source, onnx_fp16=local_fp16, facts=facts,
                profile_shapes=shapes, workspace_bytes=spec.workspace_bytes, build_seconds=result["seconds"],
                built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                fp16_recipe=spec.recipe.to_dict(),
                parity={"onnxruntime_fp16": parity_ort, "tensorrt": report.to_dict()},
            )

        manifest.install_engine(d, role, [(new_engine, engine_path), (new_fp16, local_fp16)], entry)
    finally:
        for leftover in (new_engine, new_fp16):
            leftover.unlink(missing_ok=True)  # gone already when installed
    log.info("engine_built", model=role, engine=str(engine_path), seconds=round(result["seconds"], 1))
    return ModelOutcome(role, "built", engine=engine_path, fp16_onnx=local_fp16,
                        detail=f"{result['seconds']:.0f} s, parity max |diff| "
                               f"{max(o['max_abs_diff'] for o in report.to_dict()['outputs'].values()):.3g}")
