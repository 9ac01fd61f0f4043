"""Strict, typed configuration loaded in one place.

Unknown keys are errors, every field has a default or is required, numbers have bounds, and
every error names its key path (``publish.heartbeat_s: must be > 0``). ``coilsight
check-config FILE`` prints all errors at once.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.packs import shipped_pack_dir


class ConfigError(ValueError):
    """One or more configuration errors; ``errors`` lists 'key.path: problem' strings."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))





def F(default: Any = dataclasses.MISSING, *, lo=None, hi=None, choices: tuple = (), factory=None, doc: str = ""):
    meta = {"lo": lo, "hi": hi, "choices": choices, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class AgentSection:
    name: str = F("coilsight", doc="agent id, named in every published message")
    profile: str = F("steel", doc="product-line profile (model pack name)")
    state_dir: str = F("", doc="journal and engines; empty = $STATE_DIRECTORY or ~/.local/state/coilsight")
    log_format: str = F("auto", choices=("auto", "json", "console"))
    log_level: str = F("info", choices=("debug", "info", "warning", "error"))
    tick_s: float = F(0.2, lo=0.01, hi=5.0, doc="main-loop period: watchdog, deadlines, heartbeats")


@dataclass(frozen=True)
class IngestSection:
    endpoint: str = F("tcp://127.0.0.1:5555", doc="PULL socket the cameras PUSH frames to (bound)")
    max_queue_frames: int = F(64, lo=1, hi=100_000, doc="frames waiting for inference, all cameras; over it frames are shed")
    rcvhwm: int = F(1000, lo=1, hi=1_000_000)
    overload: str = F("shed", choices=("shed", "backpressure"),
                      doc="queue full: shed the heaviest camera's oldest frame (counted), or stop reading "
                          "so ZeroMQ's bounded queues push back on the cameras (their drops show as missing)")
    coil_idle_timeout_s: float = F(30.0, lo=0.1, hi=86_400, doc="no frames for this long closes a coil as incomplete")
    max_width: int = F(4096, lo=1, hi=65_536)
    max_height: int = F(4096, lo=1, hi=65_536)
    allowed_encodings: tuple[str, ...] = F(("raw", "png", "jpeg"), factory=None)


@dataclass(frozen=True)
class PublishSection:
    endpoint: str = F("tcp://127.0.0.1:5556", doc="PUB socket subscribers connect to (bound)")
    replay_endpoint: str = F("tcp://127.0.0.1:5557", doc="REP socket serving missed ranges (bound)")
    heartbeat_s: float = F(1.0, lo=0.05, hi=60.0)
    sndhwm: int = F(100_000, lo=1, hi=10_000_000)
    linger_ms: int = F(2000, lo=0, hi=60_000)
    max_replay: int = F(1000, lo=1, hi=100_000, doc="most messages one replay reply carries")
    fsync: bool = F(True, doc="fsync the journal before publishing each group of messages")


@dataclass(frozen=True)
class ControlSection:
    endpoint: str = F("tcp://127.0.0.1:5558", doc="REP socket for `coilsight status` and reloads (bound)")
    metrics_port: int = F(0, lo=0, hi=65_535, doc="Prometheus HTTP port on 127.0.0.1; 0 = off")


@dataclass(frozen=True)
class AuthSection:
    enabled: bool = F(False, doc="CURVE on the ingest, publish and replay sockets")
    credentials_dir: str = F("", doc="where the server secret key is; $CREDENTIALS_DIRECTORY wins under systemd")
    server_key: str = F("curve-server.key_secret", doc="file name of the server secret key in credentials_dir")
    allow_dir: str = F("/etc/coilsight/curve/clients", doc="public keys of allowed cameras and subscribers")


@dataclass(frozen=True)
class ModelsSection:
    dir: str = F("", doc="model pack dir; empty = the shipped engines/models/<profile>")
    calibration: str = F("", doc="calibration.json; empty = <dir>/calibration.json")
    backends: tuple[str, ...] = F(("onnxruntime",), factory=None, doc="fallback chain, best first")
    strict: bool = F(False, doc="refuse to start when the first backend cannot load (else fall back)")
    threads: int = F(2, lo=0, hi=256, doc="intra-op threads per model; 0 = runtime default")
    workers: int = F(1, lo=1, hi=16, doc="inference threads taking batches concurrently (models are shared)")
    max_batch: int = F(8, lo=1, hi=256)
    opt_batch: int = F(8, lo=1, hi=256, doc="TensorRT optimisation profile's opt batch")
    cpu_max_batch: int = F(1, lo=1, hi=256, doc="batch cap while a model runs on the CPU, where a larger batch "
                                                "is no faster and multiplies activation memory")
    max_wait_ms: float = F(20.0, lo=0.0, hi=10_000.0, doc="longest a partial batch waits for more frames (backends "
                                                            "that run stacked batches only; at one frame per call, "
                                                            "as on the CPU, frames never wait)")


@dataclass(frozen=True)
class CoilSection:
    budget_s: float = F(300.0, lo=1.0, hi=86_400.0, doc="coil start to summary")
    provisional_at: float = F(0.9, lo=0.1, hi=1.0, doc="fraction of the budget at which an unfinished coil gets a provisional summary")
    worst_defects: int = F(10, lo=0, hi=1000)
    max_events_per_frame: int = F(50, lo=1, hi=10_000)


@dataclass(frozen=True)
class CameraSection:
    id: str = F(doc="camera id as sent in frame headers")
    mm_per_px_x: float = F(0.5, lo=1e-6, hi=1e4, doc="across the strip")
    mm_per_px_y: float = F(0.5, lo=1e-6, hi=1e4, doc="along the strip")
    offset_x_mm: float = F(0.0, lo=-1e6, hi=1e6, doc="strip coordinate of the frame's column 0")
    flip_x: bool = F(False)


@dataclass(frozen=True)
class Config:
    agent: AgentSection = F(factory=AgentSection)
    ingest: IngestSection = F(factory=IngestSection)
    publish: PublishSection = F(factory=PublishSection)
    control: ControlSection = F(factory=ControlSection)
    auth: AuthSection = F(factory=AuthSection)
    models: ModelsSection = F(factory=ModelsSection)
    coil: CoilSection = F(factory=CoilSection)
    cameras: tuple[CameraSection, ...] = F(factory=tuple)
    source: str = field(default="<defaults>", compare=False)

    def models_dir(self) -> Path:
        return Path(self.models.dir) if self.models.dir else shipped_pack_dir(self.agent.profile)

    def state_path(self) -> Path:
        if self.agent.state_dir:
            return Path(self.agent.state_dir)
        from engines.manifest import state_dir

        return state_dir()

    def camera(self, camera_id: str) -> CameraSection | None:
        for cam in self.cameras:
            if cam.id == camera_id:
                return cam
        return None


def _check_value(path: str, value: Any, ftype: Any, meta: dict, errors: list[str]) -> Any:
    origin = typing.get_origin(ftype)
    if dataclasses.is_dataclass(ftype):
        if not isinstance(value, dict):
            errors.append(f"{path}: must be a table, got {type(value).__name__}")
            return None
        return _build(ftype, value, path, errors)
    if origin is tuple:
        (item_type, _) = typing.get_args(ftype)
        if not isinstance(value, list):
            errors.append(f"{path}: must be an array, got {type(value).__name__}")
            return None
        items = []
        for i, item in enumerate(value):
            items.append(_check_value(f"{path}[{i}]", item, item_type, {}, errors))
        return tuple(items)
    if ftype is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: must be true or false, got {value!r}")
        return value
    if ftype is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: must be an integer, got {value!r}")
            return value
    elif ftype is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: must be a number, got {value!r}")
            return value
        value = float(value)
    elif ftype is str:
        if not isinstance(value, str):
            errors.append(f"{path}: must be a string, got {value!r}")
            return value
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices") or ()
    if lo is not None and value < lo:
        errors.append(f"{path}: must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        errors.append(f"{path}: must be <= {hi}, got {value}")
    if choices and value not in choices:
        errors.append(f"{path}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            errors.append(f"{prefix}{'.' if prefix else ''}{key}: unknown key (known: {known})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _check_value(path, data[name], hints[name], dict(f.metadata), errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{path}: required")
    try:
        return cls(**{k: v for k, v in kwargs.items() if v is not None})
    except TypeError:
        return None


def _cross_checks(cfg: Config, errors: list[str]) -> None:
    ids = [c.id for c in cfg.cameras]
    for i, cid in enumerate(ids):
        if not cid:
            errors.append(f"cameras[{i}].id: must not be empty")
        if ids.count(cid) > 1 and ids.index(cid) == i:
            errors.append(f"cameras[{i}].id: duplicate camera id {cid!r}")
    if cfg.models.opt_batch > cfg.models.max_batch:
        errors.append("models.opt_batch: must be <= models.max_batch")
    if not cfg.models.backends:
        errors.append("models.backends: must name at least one backend")
    from engines.backends import BACKENDS

    for i, name in enumerate(cfg.models.backends):
        if name not in BACKENDS:
            errors.append(f"models.backends[{i}]: unknown backend {name!r} (known: {', '.join(sorted(BACKENDS))})")
    for i, enc in enumerate(cfg.ingest.allowed_encodings):
        if enc not in ("raw", "png", "jpeg"):
            errors.append(f"ingest.allowed_encodings[{i}]: must be raw, png or jpeg, got {enc!r}")
    endpoints = [cfg.ingest.endpoint, cfg.publish.endpoint, cfg.publish.replay_endpoint, cfg.control.endpoint]
    for name, ep in zip(("ingest.endpoint", "publish.endpoint", "publish.replay_endpoint", "control.endpoint"), endpoints):
        if not ep.startswith(("tcp://", "ipc://", "inproc://")):
            errors.append(f"{name}: must start with tcp://, ipc:// or inproc://, got {ep!r}")
        elif endpoints.count(ep) > 1:
            errors.append(f"{name}: endpoint {ep} is used twice")


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    if cfg is not None and not errors:
        _cross_checks(cfg, errors)
    if errors:
        raise ConfigError([f"{source}: {e}" for e in errors])
    return dataclasses.replace(cfg, source=source)


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
    return config_from_dict(data, str(path))


def with_overrides(cfg: Config, **sections: dict) -> Config:
    """A copy of cfg with some fields replaced, e.g. with_overrides(cfg, ingest={"endpoint": ...})."""
    data = dataclasses.asdict(cfg)
    data.pop("source")
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section].update(values)
        else:
            data[section] = values
    return config_from_dict(_listify(data), cfg.source)


def _listify(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _listify(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_listify(v) for v in obj]
    return obj


def dump_toml(data: dict) -> str:
    """Write a config dict (as config_from_dict takes it) back as TOML."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {scalar(v)}" for k, v in value.items()]
            lines.append("")
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], dict):
            for item in value:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {scalar(v)}" for k, v in item.items()]
                lines.append("")
    return "\n".join(lines)


def config_dict(cfg: Config) -> dict:
    data = _listify(dataclasses.asdict(cfg))
    data.pop("source", None)
    return data
