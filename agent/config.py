"""Strict, typed configuration loaded in one place.

Unknown keys are errors, every field has a default or is required, numbers have bounds, and
every error names its key path (``publish.heartbeat_s: must be > 0``). ``coilsight
check-config FILE`` prints all errors at once.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.packs import DEFAULT_TIER, TIERS, missing_tier_pack, shipped_pack_dir


class ConfigError(ValueError):
    """One or more configuration errors; ``errors`` lists 'key.path: problem' strings."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))

    def tell(self, prefix: str = "config error: ") -> None:
        """Each error on its own stderr line, after ``prefix``: how every command reports a bad config."""
        for e in self.errors:
            print(f"{prefix}{e}", file=sys.stderr)


def F(default: Any = dataclasses.MISSING, *, lo=None, hi=None, choices: tuple = (), factory=None, doc: str = "",
      why: str = ""):
    """A config field. lo/hi: inclusive bounds; why: the reason for them, quoted in the error."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "doc": doc, "why": why}
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
    tick_s: float = F(0.2, lo=0.02, hi=1.0, doc="main-loop period: watchdog, deadlines, control requests",
                      why="the main loop pings the systemd watchdog, checks coil deadlines and idle timeouts, "
                          "answers the control socket and saves the crash checkpoint once per tick: under 20 ms "
                          "it spins a CPU core, over 1 s deadlines and control answers are late by that much")


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
    heartbeat_s: float = F(1.0, lo=0.05, hi=10.0, doc="period of the health heartbeat on the PUB socket",
                           why="subscribers see a gap, and a silent agent, only through heartbeats: over 10 s "
                               "a lost event goes unnoticed that long; under 50 ms heartbeats (a health "
                               "snapshot each) crowd the publisher thread and every subscriber")
    sndhwm: int = F(100_000, lo=1, hi=10_000_000)
    linger_ms: int = F(2000, lo=0, hi=60_000)
    max_replay: int = F(1000, lo=1, hi=100_000, doc="most messages one replay reply carries")
    fsync: bool = F(True, doc="fsync the journal before publishing each group of messages")


@dataclass(frozen=True)
class ControlSection:
    endpoint: str = F("tcp://127.0.0.1:5558", doc="REP socket for `coilsight status` and reloads (bound): "
                      "loopback tcp://, tcp:// with auth on (CURVE, operator keys), or ipc:// (file permissions)")
    socket_mode: str = F("0600", choices=("0600", "0660"), doc="file mode of an ipc:// control socket: "
                         "0600 = the agent's user only, 0660 = also its group (operators)")
    metrics_port: int = F(0, lo=0, hi=65_535, doc="Prometheus HTTP port on 127.0.0.1; 0 = off")


LEGACY_ALLOW_DIR = "/etc/coilsight/curve/clients"


@dataclass(frozen=True)
class AuthSection:
    enabled: bool = F(False, doc="CURVE on the ingest, publish and replay sockets (and control on tcp://)")
    credentials_dir: str = F("", doc="where the server secret key is; $CREDENTIALS_DIRECTORY wins under systemd")
    server_key: str = F("curve-server.key_secret", doc="file name of the server secret key in credentials_dir")
    cameras_dir: str = F("", doc="public keys of cameras: they may push frames and coil_start/coil_end (ingest)")
    subscribers_dir: str = F("", doc="public keys of subscribers: they may receive events (publish) and ask "
                                     "for replays (replay)")
    operators_dir: str = F("", doc="public keys of operators: they may use the control socket on tcp:// "
                                   "(status, reload); not needed with an ipc:// control socket")
    allow_dir: str = F("", doc="DEPRECATED: one list for every role (camera, subscriber and operator); "
                               f"used, as {LEGACY_ALLOW_DIR} when empty, only when no *_dir of a role is set")

    def role_dirs(self) -> dict[str, str]:
        """role -> allow-list directory; the deprecated single list stands for every role."""
        if self.legacy():
            single = self.allow_dir or LEGACY_ALLOW_DIR
            return {"camera": single, "subscriber": single, "operator": single}
        dirs = {"camera": self.cameras_dir, "subscriber": self.subscribers_dir, "operator": self.operators_dir}
        return {role: d for role, d in dirs.items() if d}

    def legacy(self) -> bool:
        return not (self.cameras_dir or self.subscribers_dir or self.operators_dir)

    def allow_lists(self) -> str | dict[str, str]:
        """What agent.auth.start_authenticator takes: the deprecated single directory, or role -> directory."""
        return (self.allow_dir or LEGACY_ALLOW_DIR) if self.legacy() else self.role_dirs()


@dataclass(frozen=True)
class JournalSection:
    keep_segments: int = F(16, lo=1, hi=10_000, doc="64 MiB journal segments kept for replay; older ones "
                                                    "are deleted (the replay horizon is about this x 64 MiB)")


@dataclass(frozen=True)
class ModelsSection:
    dir: str = F("", doc="model pack dir; empty = the shipped pack of models.tier: engines/models/<profile> (edge) "
                         "or engines/models/line/<profile> (line)")
    tier: str = F(DEFAULT_TIER, choices=TIERS, doc="edge = the CPU default pack; line = the larger pack for GPU line "
                                                  "boxes (docs/models.md, Tiers); chooses the shipped pack when "
                                                  "models.dir is empty")
    calibration: str = F("", doc="calibration.json; empty = <dir>/calibration.json")
    backends: tuple[str, ...] = F(("onnxruntime",), factory=None, doc="fallback chain, best first")
    strict: bool = F(False, doc="refuse to start when the first backend cannot load (else fall back)")
    threads: int = F(2, lo=0, hi=256, doc="intra-op threads per model; 0 = runtime default")
    workers: int = F(1, lo=1, hi=16, doc="inference threads taking batches concurrently (models are shared)")
    max_batch: int = F(8, lo=1, hi=256)
    opt_batch: int = F(8, lo=1, hi=256, doc="TensorRT optimisation profile's opt batch")
    cpu_max_batch: int = F(1, lo=1, hi=256, doc="batch cap while a model runs on the CPU, where a larger batch "
                                                "is no faster and multiplies activation memory")
    max_wait_ms: float = F(20.0, lo=0.0, hi=5_000.0, doc="longest a partial batch waits for more frames (backends "
                                                           "that run stacked batches only; at one frame per call, "
                                                           "as on the CPU, frames never wait)",
                           why="every frame of a partial batch waits this long before inference: it must stay "
                               "well under the systemd watchdog's stall time (WatchdogSec=10 s, no batch done "
                               "means no ping) and the coil's budget")


@dataclass(frozen=True)
class StitchSection:
    enabled: bool = F(True, doc="the coil layer (agent/intel.py): tracks, periodic series, grade, crops; "
                                "false = per-frame defects and summaries only, as before")
    gap_mm: float = F(5.0, lo=0.0, hi=10_000.0, doc="parts of one class whose strip boxes are this close (mm) "
                                                     "are one track: across frames and across cameras")
    max_open: int = F(4096, lo=1, hi=1_000_000, doc="open tracks kept; past it the oldest closes early (counted)")
    max_tracks_per_coil: int = F(100_000, lo=1, hi=10_000_000, doc="closed tracks a coil keeps for its "
                                                                   "periodic search and grade")


@dataclass(frozen=True)
class PeriodicSection:
    enabled: bool = F(True, doc="look for periodic series (roll marks) at each coil's end")
    min_repeats: int = F(5, lo=3, hi=10_000, doc="marks a series needs")
    across_tol_mm: float = F(25.0, lo=0.1, hi=10_000.0, doc="marks of a series lie this close across (a model may "
                             "split a mark into parts whose centres differ by tens of mm)")
    pitch_tol: float = F(0.02, lo=0.001, hi=0.2, doc="each mark within this fraction of the pitch of its place")
    max_missed: int = F(2, lo=0, hi=20, doc="repeats in a row a series may miss while it is found")
    min_pitch_mm: float = F(500.0, lo=1.0, hi=1e6)
    max_pitch_mm: float = F(10_000.0, lo=1.0, hi=1e6)
    min_fill: float = F(0.6, lo=0.0, hi=1.0, doc="share of the series' expected places that hold a mark")


@dataclass(frozen=True)
class GradeRuleSection:
    class_name: str = F("*", doc="a class of the profile, or * for every class")
    max_per_100m: float = F(0.0, lo=0.0, hi=1e9, doc="most tracks per 100 m of coil; 0 = no limit")
    max_length_mm: float = F(0.0, lo=0.0, hi=1e9, doc="longest track allowed; 0 = no limit")
    grade: str = F("downgrade", doc="the grade a coil breaking this rule gets (one of coil.grade.grades)")


@dataclass(frozen=True)
class GradeSection:
    grades: tuple[str, ...] = F(("pass", "downgrade", "fail"), factory=None, doc="best first")
    periodic: str = F("fail", doc="grade of a coil with a periodic series; empty = no such rule")
    rules: tuple[GradeRuleSection, ...] = F(factory=tuple)


@dataclass(frozen=True)
class CropsSection:
    enabled: bool = F(True, doc="keep a PNG crop of each track under <state_dir>/crops")
    size_px: int = F(96, lo=8, hi=1024, doc="a crop's longer side")
    margin_px: int = F(8, lo=0, hi=1024, doc="context kept around the part")
    max_coils: int = F(200, lo=1, hi=1_000_000, doc="coils whose crops are kept (oldest deleted first)")
    max_bytes: int = F(256 << 20, lo=1 << 16, hi=1 << 40, doc="bytes of crops kept, all coils")
    queue: int = F(64, lo=1, hi=10_000, doc="frames waiting for the crop thread; past it frames are not "
                                            "cropped (counted), inference never waits")


@dataclass(frozen=True)
class CoilSection:
    budget_s: float = F(300.0, lo=1.0, hi=86_400.0, doc="coil start to summary")
    provisional_at: float = F(0.9, lo=0.1, hi=1.0, doc="fraction of the budget at which an unfinished coil gets a provisional summary")
    worst_defects: int = F(10, lo=0, hi=1000)
    max_events_per_frame: int = F(50, lo=1, hi=10_000)
    stitch: StitchSection = F(factory=StitchSection)
    periodic: PeriodicSection = F(factory=PeriodicSection)
    grade: GradeSection = F(factory=GradeSection)
    crops: CropsSection = F(factory=CropsSection)


@dataclass(frozen=True)
class CameraSection:
    id: str = F(doc="camera id as sent in frame headers")
    mm_per_px_x: float = F(0.5, lo=1e-6, hi=1e4, doc="across the strip")
    mm_per_px_y: float = F(0.5, lo=1e-6, hi=1e4, doc="along the strip")
    offset_x_mm: float = F(0.0, lo=-1e6, hi=1e6, doc="strip coordinate of the frame's column 0")
    flip_x: bool = F(False)


@dataclass(frozen=True)
class WebSection:
    """`coilsight web`, the operator page: its own process (agent/web/), never part of the agent."""

    host: str = F("127.0.0.1", doc="address the page listens on; loopback by default")
    port: int = F(8470, lo=1, hi=65_535, doc="HTTP port of the page")
    upload: bool = F(True, doc="allow uploading an image to inspect it (runs the pack in the web process); "
                               "false = the page only reads")
    max_upload_bytes: int = F(8 << 20, lo=1024, hi=64 << 20, doc="largest request body the page accepts")
    max_upload_pixels: int = F(4096 * 4096, lo=64, hi=1 << 28, doc="largest uploaded image (height x width), "
                                                                  "checked from its header before decoding")
    token_file: str = F("", doc="file holding the page's access token; required when the page is not on loopback "
                                "and auth.enabled or upload is on; when set the page always asks for it")
    subscriber_key: str = F("", doc="with auth.enabled: the page's CURVE secret key (subscriber role) for the "
                                    "publish and replay sockets")
    operator_key: str = F("", doc="with auth.enabled and a tcp:// control socket: a CURVE secret key of the "
                                  "operator role, for /readyz")
    server_key: str = F("", doc="with auth.enabled: the agent's public key file (server.key)")


@dataclass(frozen=True)
class Config:
    agent: AgentSection = F(factory=AgentSection)
    ingest: IngestSection = F(factory=IngestSection)
    publish: PublishSection = F(factory=PublishSection)
    control: ControlSection = F(factory=ControlSection)
    auth: AuthSection = F(factory=AuthSection)
    journal: JournalSection = F(factory=JournalSection)
    models: ModelsSection = F(factory=ModelsSection)
    coil: CoilSection = F(factory=CoilSection)
    cameras: tuple[CameraSection, ...] = F(factory=tuple)
    web: WebSection = F(factory=WebSection)
    source: str = field(default="<defaults>", compare=False)

    def models_dir(self) -> Path:
        return Path(self.models.dir) if self.models.dir else shipped_pack_dir(self.agent.profile, self.models.tier)

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
        if not math.isfinite(value):  # nan passes every comparison; inf passes every lower bound
            errors.append(f"{path}: must be a finite number, got {value}")
            return value
    elif ftype is str:
        if not isinstance(value, str):
            errors.append(f"{path}: must be a string, got {value!r}")
            return value
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices") or ()
    why = f" ({meta['why']})" if meta.get("why") else ""
    if lo is not None and value < lo:
        errors.append(f"{path}: must be >= {lo}, got {value}{why}")
    if hi is not None and value > hi:
        errors.append(f"{path}: must be <= {hi}, got {value}{why}")
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


# The protocol's name rule (docs/protocol.md): agent.name also names the journal directory under
# the state dir, so it must be one plain path component ('.', '..' and '/' can never pass).
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}")
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*")
WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]")
IPC_PATH_MAX = 107  # sockaddr_un.sun_path less its terminating NUL


def endpoint_problem(ep: str) -> str | None:
    """What is wrong with a ZeroMQ endpoint the agent binds, or None. tcp://HOST:PORT with HOST
    an IP address, [IPv6], a host or interface name, or * and PORT an integer 1-65535;
    ipc://PATH; inproc://NAME."""
    if ep.startswith("tcp://"):
        rest = ep[len("tcp://"):]
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            return f"must be tcp://HOST:PORT, got {ep!r}"
        if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            return f"port {port!r} in {ep!r} is not an integer 1-65535"
        if host.startswith("[") and host.endswith("]"):
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                return f"host {host!r} in {ep!r} is not an IPv6 address"
        elif host != "*" and not _HOST_RE.fullmatch(host):
            return f"host {host!r} in {ep!r} is not an IP address, host or interface name, or *"
        elif host.replace(".", "").isdigit():
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                return f"host {host!r} in {ep!r} is not an IPv4 address"
        return None
    if ep.startswith("ipc://"):
        path = ep[len("ipc://"):]
        if not path or path == "@":
            return f"ipc:// needs a socket path, got {ep!r}"
        if len(path.encode()) > IPC_PATH_MAX:
            return f"ipc path in {ep!r} is {len(path.encode())} bytes, longer than the {IPC_PATH_MAX} a socket takes"
        return None
    if ep.startswith("inproc://"):
        return None if ep[len("inproc://"):] else f"inproc:// needs a name, got {ep!r}"
    return f"must start with tcp://, ipc:// or inproc://, got {ep!r}"


def tcp_host(ep: str) -> str | None:
    if not ep.startswith("tcp://"):
        return None
    return ep[len("tcp://"):].rpartition(":")[0]


def is_loopback(host: str) -> bool:
    h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if h in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _check_control(cfg: Config, errors: list[str]) -> None:
    """Control answers status and reloads models: never on every interface, never off the box
    without CURVE, and with auth on either CURVE (operator keys) or an ipc:// file socket."""
    ep = cfg.control.endpoint
    host = tcp_host(ep)
    if ep.startswith("ipc://@"):
        errors.append(f"control.endpoint: {ep} is an abstract socket, which any local process may connect to; "
                      f"use an ipc:// file path (its mode is control.socket_mode) or loopback tcp://")
    if host is None:
        return
    if host in WILDCARD_HOSTS:
        errors.append(f"control.endpoint: {ep} binds the control socket on every interface; bind it to "
                      f"127.0.0.1, to one interface with auth.enabled (CURVE, operator keys), or use ipc://")
    elif not is_loopback(host) and not cfg.auth.enabled:
        errors.append(f"control.endpoint: {ep} is not loopback and auth.enabled is false: anyone on that network "
                      f"could reload models; use 127.0.0.1, ipc://, or turn on auth (CURVE, operator keys)")


def _check_auth(cfg: Config, raw_auth: dict, errors: list[str]) -> None:
    a = cfg.auth
    role_keys = [k for k in ("cameras_dir", "subscribers_dir", "operators_dir") if raw_auth.get(k)]
    if raw_auth.get("allow_dir") and role_keys:
        errors.append(f"auth.allow_dir: the deprecated list for every role cannot be combined with "
                      f"auth.{', auth.'.join(role_keys)}; move its keys into the role directories and remove it")
        return
    if not a.enabled or a.legacy():
        return
    for key, what in (("cameras_dir", "the ingest socket admits only camera keys"),
                      ("subscribers_dir", "the publish and replay sockets admit only subscriber keys")):
        if not getattr(a, key):
            errors.append(f"auth.{key}: required when auth.enabled with per-role lists ({what})")
    if cfg.control.endpoint.startswith("tcp://") and not a.operators_dir:
        errors.append("auth.operators_dir: required for a tcp:// control endpoint with auth.enabled (the control "
                      "socket admits only operator keys); or put control.endpoint on ipc://")


def config_warnings(cfg: Config) -> list[str]:
    """Things that work but should change; `coilsight check-config` prints them, the agent logs them."""
    out: list[str] = []
    if cfg.auth.enabled and cfg.auth.legacy():
        d = cfg.auth.allow_dir or LEGACY_ALLOW_DIR
        out.append(f"auth.allow_dir: deprecated: the keys in {d} are admitted for every role (push frames, "
                   f"subscribe and replay, control); split them into auth.cameras_dir, auth.subscribers_dir and "
                   f"auth.operators_dir (docs/deployment.md, Roles)")
    return out


def models_problem(cfg: Config) -> str | None:
    """A config error about where the models are, or None: with models.dir empty, the configured tier's
    pack must be shipped. Checked by `coilsight check-config` and at start, not by load_config (tools that
    read a config for its endpoints or keys need no models)."""
    if cfg.models.dir:
        return None
    try:
        problem = missing_tier_pack(cfg.agent.profile, cfg.models.tier)
    except ValueError as exc:
        return f"agent.profile: {exc}"
    return f"models.tier: {problem}" if problem else None


def models_warnings(cfg: Config) -> list[str]:
    """The pack's model.json says it was trained as another tier than models.tier (training.tier)."""
    import json

    try:
        path = cfg.models_dir() / "model.json"
        trained = (json.loads(path.read_text()).get("training") or {}).get("tier")
    except (OSError, ValueError, AttributeError):
        return []  # a missing or broken pack is models_problem's or the loader's to report
    if trained is None or trained == cfg.models.tier:
        return []
    return [f"models.tier: {cfg.models.tier!r} is configured, but {path} was trained as the {trained!r} tier "
            f"(its training.tier); set models.tier = {json.dumps(str(trained))} or use the {cfg.models.tier} pack"]


def _cross_checks(cfg: Config, errors: list[str], raw: dict | None = None) -> None:
    if not NAME_RE.fullmatch(cfg.agent.name):
        errors.append(f"agent.name: must be 1-64 characters from A-Z a-z 0-9 _ . : - starting with a letter, digit "
                      f"or _ (it names the journal directory under the state dir), got {cfg.agent.name!r}")
    ids = [c.id for c in cfg.cameras]
    for i, cid in enumerate(ids):
        if not cid:
            errors.append(f"cameras[{i}].id: must not be empty")
        elif not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", cid):
            errors.append(f"cameras[{i}].id: must be 1-64 characters from A-Z a-z 0-9 _ . : - (the protocol's "
                          f"name rule; frames from another name are rejected), got {cid!r}")
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
    names = ("ingest.endpoint", "publish.endpoint", "publish.replay_endpoint", "control.endpoint")
    bad = False
    for name, ep in zip(names, endpoints):
        problem = endpoint_problem(ep)
        if problem:
            errors.append(f"{name}: {problem}")
            bad = True
        elif endpoints.count(ep) > 1:
            errors.append(f"{name}: endpoint {ep} is used twice")
    if not bad:
        _check_control(cfg, errors)
    _check_auth(cfg, (raw or {}).get("auth") or {}, errors)
    _check_coil_layer(cfg, errors)


def _check_coil_layer(cfg: Config, errors: list[str]) -> None:
    g, p = cfg.coil.grade, cfg.coil.periodic
    if not g.grades:
        errors.append("coil.grade.grades: must name at least one grade (best first)")
    if g.periodic and g.periodic not in g.grades:
        errors.append(f"coil.grade.periodic: {g.periodic!r} is not one of coil.grade.grades {list(g.grades)}")
    for i, r in enumerate(g.rules):
        if r.grade not in g.grades:
            errors.append(f"coil.grade.rules[{i}].grade: {r.grade!r} is not one of coil.grade.grades {list(g.grades)}")
    if p.min_pitch_mm >= p.max_pitch_mm:
        errors.append("coil.periodic.min_pitch_mm: must be < coil.periodic.max_pitch_mm")


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    if cfg is not None and not errors:
        _cross_checks(cfg, errors, data)
    if errors:
        raise ConfigError([f"{source}: {e}" for e in errors])
    return dataclasses.replace(cfg, source=source)


def read_toml(path: str | Path) -> dict:
    """A config file's TOML as a dict; an unreadable or malformed file is a ConfigError naming it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc


def load_config(path: str | Path) -> Config:
    return config_from_dict(read_toml(path), str(path))


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

    def tables(v: Any) -> bool:
        return isinstance(v, (list, tuple)) and bool(v) and isinstance(v[0], dict)

    def table(header: str, name: str, body: dict) -> None:  # nested tables ([coil.grade]) after the scalars
        lines.append(f"{header[0]}{name}{header[1]}")
        lines.extend(f"{k} = {scalar(v)}" for k, v in body.items() if not isinstance(v, dict) and not tables(v))
        lines.append("")
        for k, v in body.items():
            if isinstance(v, dict):
                table("[]", f"{name}.{k}", v)
            elif tables(v):
                for item in v:
                    table(("[[", "]]"), f"{name}.{k}", item)

    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            table("[]", key, value)
        elif tables(value):
            for item in value:
                table(("[[", "]]"), key, item)
    return "\n".join(lines)


def config_dict(cfg: Config) -> dict:
    data = _listify(dataclasses.asdict(cfg))
    data.pop("source", None)
    return data
