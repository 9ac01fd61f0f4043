"""manifest.json beside the engines: what each engine was built from, with and for.

A TensorRT plan only runs with the exact TensorRT version and GPU it was built on, and no
TensorRT API tells which ones that were (NVIDIA/TensorRT#3073, #4233), so the build writes
it down here and the agent checks it *before* deserializing anything
(``check_engine``). Layout (docs/engines.md)::

    <state>/engines/<profile>/<gpu-slug>-trt<version>/
        gate.engine  seg.engine  gate.fp16.onnx  seg.fp16.onnx  manifest.json  timing.cache

``manifest.json`` (format 1) holds one entry per model role; each entry carries the machine
facts it was built under, so gate and seg may be (re)built separately.

This module needs neither TensorRT nor CUDA to import; ``machine_facts`` imports them lazily.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import structlog

from engines.atomic import fsync_dir, write_atomic
from engines.backends.base import BackendError
from engines.modelpack import sha256_file

log = structlog.get_logger(__name__)

MANIFEST_FORMAT = 1
MANIFEST_NAME = "manifest.json"
PRECISION = "fp16-from-onnx"


class ManifestError(RuntimeError):
    """The manifest or machine facts cannot be read; the message says which and why."""


class StaleEngineError(BackendError):
    """check_engine found reasons not to use an engine (stale, missing, truncated, corrupt)."""

    def __init__(self, engine: str | Path, reasons: list[str]):
        self.reasons = reasons
        super().__init__(f"tensorrt: refusing {engine}: " + "; ".join(reasons))


def state_dir() -> Path:
    """$STATE_DIRECTORY under systemd (first entry if several), else $XDG_STATE_HOME/coilsight,
    else ~/.local/state/coilsight (agent.config.Config.state_path uses it when the config names none)."""
    env = os.environ.get("STATE_DIRECTORY", "").strip()
    if env:
        return Path(env.split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "coilsight"


@dataclass(frozen=True)
class MachineFacts:
    """What an engine is bound to. Fields compared by check_engine (None = unknown here)."""

    tensorrt: str
    cuda_runtime: str | None
    cuda_driver: str | None
    gpu_name: str
    compute_capability: str
    gpu_uuid: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> "MachineFacts":
        try:
            return cls(**{k: d[k] for k in ("tensorrt", "cuda_runtime", "cuda_driver", "gpu_name",
                                               "compute_capability")}, gpu_uuid=d.get("gpu_uuid"))
        except KeyError as exc:
            raise ManifestError(f"{where}: machine facts lack key {exc.args[0]!r}") from None

    @property
    def slug(self) -> str:
        """Directory name for this GPU + TensorRT: e.g. ``nvidia-geforce-rtx-4090-sm89-trt10.13.3.9``."""
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-") or "gpu"
        cc = self.compute_capability.replace(".", "")
        return f"{gpu}-sm{cc}-trt{self.tensorrt}"


def _cuda_version(v: int) -> str:
    """CUDA encodes versions as 1000*major + 10*minor."""
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "none"


def _facts_from_cuda_python(device: int) -> tuple[str, str, str, str, str | None]:
    from cuda.bindings import runtime as cudart

    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or not count:
        raise ManifestError(f"no CUDA device visible (cudaGetDeviceCount: {err.name})")
    if device >= count:
        raise ManifestError(f"CUDA device {device} requested, only {count} visible")
    _, drv = cudart.cudaDriverGetVersion()
    _, rt = cudart.cudaRuntimeGetVersion()
    err, props = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        raise ManifestError(f"cudaGetDeviceProperties({device}) failed: {err.name}")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    uuid_bytes = bytes(props.uuid.bytes)
    uuid = "GPU-" + uuid_bytes.hex() if any(uuid_bytes) else None
    return _cuda_version(rt), _cuda_version(drv), name, f"{props.major}.{props.minor}", uuid


def _facts_from_pycuda(device: int) -> tuple[str, str, str, str, str | None]:
    import pycuda.driver as cuda

    try:
        cuda.init()
        count = cuda.Device.count()
        if device >= count:
            raise ManifestError(f"CUDA device {device} requested, only {count} visible")
        dev = cuda.Device(device)
        major, minor = dev.compute_capability()
        runtime = ".".join(str(p) for p in cuda.get_version()[:2])  # the CUDA pycuda was built against
        return runtime, _cuda_version(cuda.get_driver_version()), dev.name(), f"{major}.{minor}", None
    except cuda.Error as exc:
        raise ManifestError(f"pycuda: {exc}") from exc


def machine_facts(device: int = 0) -> MachineFacts:
    """TensorRT version and the CUDA device's identity; ManifestError when either is missing.

    CUDA facts come from cuda-python (cuda.bindings) when installed, else from pycuda (which
    cannot report the GPU UUID). Note: the "runtime" version is the CUDA runtime those bindings
    were built with; TensorRT has no call that reports its own.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ManifestError(f"TensorRT is not installed ({exc}); pip install the 'gpu' extra") from exc
    reasons = []
    for label, source in (("cuda-python", _facts_from_cuda_python), ("pycuda", _facts_from_pycuda)):
        try:
            runtime, driver, name, cc, uuid = source(device)
        except (ImportError, OSError, RuntimeError) as exc:  # not installed, no libcuda, no device
            reasons.append(f"{label}: {exc}")
            continue
        return MachineFacts(tensorrt=trt.__version__, cuda_runtime=runtime, cuda_driver=driver,
                            gpu_name=name, compute_capability=cc, gpu_uuid=uuid)
    raise ManifestError("cannot read the CUDA device: " + "; ".join(reasons))


def profile_shapes(channels: int, height: int, width: int, *, min_batch: int, opt_batch: int, max_batch: int,
                   input_name: str = "image") -> dict[str, dict[str, list[int]]]:
    """The optimisation profile an engine is built with, as recorded in (and checked against) the manifest.
    The agent passes the same (pack's C/H/W, 1, models.opt_batch, models.max_batch) to open_backend."""
    chw = [channels, height, width]
    return {input_name: {"min": [min_batch, *chw], "opt": [opt_batch, *chw], "max": [max_batch, *chw]}}


def engine_dir(profile: str, facts: MachineFacts, state: Path | None = None) -> Path:
    return (state or state_dir()) / "engines" / profile / facts.slug


def fp16_dir(profile: str, state: Path | None = None) -> Path:
    """FP16 ONNX files do not depend on the GPU: one copy per profile."""
    return (state or state_dir()) / "engines" / profile / "fp16"


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"missing: no {MANIFEST_NAME} in {directory}; run `coilsight engines build`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"corrupt: {path} is not valid JSON ({exc}); rebuild with --force") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"corrupt: {path} has format {data.get('format') if isinstance(data, dict) else None!r}, "
                            f"expected {MANIFEST_FORMAT}")
    if not isinstance(data.get("engines"), dict):
        raise ManifestError(f"corrupt: {path} has no 'engines' table")
    return data


def install_engine(directory: Path, role: str, moves: list[tuple[Path, Path]],
                   entry: Callable[[], dict[str, Any]]) -> Path:
    """Rename each new file (``(new, final)``, both in ``directory``) over its final name, then
    record ``entry()`` for ``role`` in manifest.json. Until the renames the old files are
    untouched; if a rename or the manifest write fails, the previous files and manifest are put
    back (from hard links taken first), so the old engine and its entry stay usable. A crash
    between the renames and the manifest write leaves a new engine the old entry does not match:
    check_engine refuses it (sha256), it is never used.
    """
    directory = Path(directory)
    finals = [final for _, final in moves] + [directory / MANIFEST_NAME]
    kept: list[tuple[Path, Path | None]] = []  # (final, hard link to its previous version, None = had none)
    try:
        for final in finals:
            previous = None
            if final.exists():
                previous = final.with_name(f".{final.name}.{os.getpid()}.previous")
                previous.unlink(missing_ok=True)
                try:
                    os.link(final, previous)
                except OSError:  # no hard links on this filesystem
                    shutil.copy2(final, previous)
            kept.append((final, previous))
        for new, final in moves:
            os.replace(new, final)
        fsync_dir(directory)
        path = record_engine(directory, role, entry())
    except BaseException:
        for final, previous in reversed(kept):
            try:
                if previous is None:
                    final.unlink(missing_ok=True)
                else:
                    os.replace(previous, final)
            except OSError as exc:  # reported; the error that stopped the install is raised
                log.error("engine_restore_failed", path=str(final), error=str(exc))
        fsync_dir(directory)
        log.warning("engine_install_rolled_back", dir=str(directory), model=role)
        raise
    finally:
        for _, previous in kept:
            if previous is not None:
                previous.unlink(missing_ok=True)
    return path


def record_engine(directory: Path, role: str, entry: dict[str, Any]) -> Path:
    """Add or replace one role's entry in manifest.json (atomically)."""
    directory = Path(directory)
    try:
        data = read_manifest(directory)
    except ManifestError:
        data = {"format": MANIFEST_FORMAT, "engines": {}}
    data["engines"][role] = entry
    path = directory / MANIFEST_NAME
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return path


def engine_entry(*, role: str, engine_path: Path, onnx_fp32: Path, onnx_fp16: Path, facts: MachineFacts,
                 profile_shapes: dict[str, dict[str, list[int]]], workspace_bytes: int, build_seconds: float,
                 built_at: str, fp16_recipe: dict[str, Any], parity: dict[str, Any] | None) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        coilsight_version = version("coilsight")
    except PackageNotFoundError:
        coilsight_version = "unknown (not installed)"
    return {
        "role": role,
        "engine": {"file": engine_path.name, "size": engine_path.stat().st_size, "sha256": sha256_file(engine_path)},
        "source": {
            "onnx_fp32": {"file": onnx_fp32.name, "sha256": sha256_file(onnx_fp32)},
            "onnx_fp16": {"file": onnx_fp16.name, "sha256": sha256_file(onnx_fp16)},
        },
        "precision": PRECISION,
        "fp16_recipe": fp16_recipe,
        "machine": facts.to_dict(),
        "profile_shapes": profile_shapes,
        "workspace_bytes": int(workspace_bytes),
        "built_at": built_at,
        "build_seconds": round(float(build_seconds), 2),
        "coilsight_version": coilsight_version,
        "parity": parity,
    }


_FACT_LABELS = {
    "tensorrt": "TensorRT version",
    "cuda_runtime": "CUDA runtime",
    "cuda_driver": "CUDA driver",
    "gpu_name": "GPU",
    "compute_capability": "compute capability",
    "gpu_uuid": "GPU UUID",
}


def check_engine(engine_dir: str | Path, onnx_path: str | Path, facts: MachineFacts, *, role: str | None = None,
                 profile_shapes: dict[str, dict[str, list[int]]] | None = None) -> list[str]:
    """Every reason the engine for ``onnx_path`` in ``engine_dir`` must not be used; [] = good.

    ``role`` defaults to the ONNX file's stem (gate.onnx -> gate). Checks, in order: manifest
    present and readable, entry for the role, engine file present, its size (truncation) and
    sha256 (corruption), then staleness: the source ONNX sha256, each machine fact, and the
    optimisation profile shapes when ``profile_shapes`` is given. Nothing is deserialized.
    """
    engine_dir, onnx_path = Path(engine_dir), Path(onnx_path)
    role = role or onnx_path.stem
    try:
        data = read_manifest(engine_dir)
    except ManifestError as exc:
        return [str(exc)]
    where = str(engine_dir / MANIFEST_NAME)
    entry = data["engines"].get(role)
    if not isinstance(entry, dict):
        return [f"missing: {where} has no entry for the {role} engine; run `coilsight engines build`"]
    try:
        eng, src, machine = entry["engine"], entry["source"]["onnx_fp32"], entry["machine"]
        recorded_size, recorded_sha = int(eng["size"]), str(eng["sha256"])
        engine_path = engine_dir / eng["file"]
    except (KeyError, TypeError, ValueError) as exc:
        return [f"corrupt: {where} entry {role!r} is malformed ({exc!r}); rebuild with --force"]
    reasons: list[str] = []
    if not engine_path.is_file():
        reasons.append(f"missing: engine file {engine_path} not found")
    else:
        size = engine_path.stat().st_size
        if size != recorded_size:
            kind = "truncated" if size < recorded_size else "corrupt"
            reasons.append(f"{kind}: {engine_path} is {size} bytes, the manifest records {recorded_size}")
        else:
            sha = sha256_file(engine_path)
            if sha != recorded_sha:
                reasons.append(f"corrupt: sha256 of {engine_path} is {sha[:12]}, the manifest records {recorded_sha[:12]}")
    if not onnx_path.is_file():
        reasons.append(f"missing: source model {onnx_path} not found")
    else:
        sha = sha256_file(onnx_path)
        if sha != src.get("sha256"):
            reasons.append(f"stale: source model {onnx_path.name} is now {sha[:12]}, "
                           f"the engine was built from {str(src.get('sha256'))[:12]}")
    now = facts.to_dict()
    for key, label in _FACT_LABELS.items():
        built, current = machine.get(key), now.get(key)
        if key == "gpu_uuid" and (built is None or current is None):
            continue  # pycuda cannot read the UUID; compare only when both sides know it
        if built != current:
            reasons.append(f"stale: {label} is {current}, the engine was built for {built}")
    if profile_shapes is not None and entry.get("profile_shapes") != profile_shapes:
        reasons.append(f"stale: profile shapes wanted {profile_shapes}, the engine was built for "
                       f"{entry.get('profile_shapes')}")
    return reasons
