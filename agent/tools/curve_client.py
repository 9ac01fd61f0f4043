"""CURVE for the command-line clients of an agent (camera-sim): which key files to use, and what a
failed handshake means, in words (docs/protocol.md 4, docs/deployment.md "Roles").

The agent's config says whether it uses CURVE (``auth.enabled``), where its server key is, and which
directory holds each role's *public* keys. It never holds a client's secret key (that file stays
with the client), so a client names its own with ``--key``; the agent's public key comes from
``--server-key`` or, with the agent's config on the same box, from next to its secret key
(``auth.credentials_dir``, or the folder above ``auth.cameras_dir`` as install.sh lays it out).

A refused client sees no protocol message, only its ZeroMQ monitor (libzmq 4.3):
``HANDSHAKE_FAILED_AUTH`` (ZAP status 400: the key is on no allow-list of the socket's role),
``HANDSHAKE_FAILED_PROTOCOL`` with a mechanism mismatch (one side uses CURVE, the other not), or
``HANDSHAKE_FAILED_NO_DETAIL`` (a CURVE client holding another server's public key).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq

ROLE_DIR_KEY = {"camera": "auth.cameras_dir", "subscriber": "auth.subscribers_dir", "operator": "auth.operators_dir"}
FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class CurveSetupError(ValueError):
    """The key options cannot work together (a usage error); the message says what to pass."""


@dataclass(frozen=True)
class ClientKeys:
    """One client socket's CURVE keys: its secret key file and the agent's public key file; both
    None for a plain socket. ``allow_dir``: the agent's allow-list of this role, when known (for
    the messages)."""

    role: str
    key: Path | None = None
    server_key: Path | None = None
    allow_dir: str = ""

    @property
    def curve(self) -> bool:
        return self.key is not None

    def setup(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client (before connect); nothing for a plain one."""
        if self.key is not None and self.server_key is not None:
            from agent.auth import make_curve_client

            make_curve_client(sock, self.key, self.server_key)


def server_public_key(cfg) -> Path | None:
    """The agent's public key file, found from its config on this box: the public half of
    ``auth.server_key`` (NAME.key next to NAME.key_secret) in ``auth.credentials_dir``, else
    ``server.key`` in the folder above ``auth.cameras_dir`` (/etc/coilsight/curve/server.key)."""
    a = cfg.auth
    name = a.server_key[:-len("_secret")] if a.server_key.endswith("_secret") else a.server_key + ".pub"
    candidates = []
    if a.credentials_dir:
        candidates.append(Path(a.credentials_dir) / name)
    for d in (a.cameras_dir, a.subscribers_dir, a.allow_dir):
        if d:
            candidates.append(Path(d).parent / "server.key")
    return next((p for p in candidates if p.is_file()), None)


def _dir_hint(dirs: dict[str, str], role: str) -> str:
    return ROLE_DIR_KEY[role] + (f", {dirs[role]}" if dirs.get(role) else "")


def client_keys(cfg, config_path, role: str, *, key: Path | None, server_key: Path | None,
                extra_hint: str = "") -> ClientKeys:
    """One client's keys for ``role`` from the options and the agent's config (``cfg`` None: options
    only); CurveSetupError when they cannot work."""
    uses_curve = bool(cfg is not None and cfg.auth.enabled)
    dirs = cfg.auth.role_dirs() if uses_curve else {}
    if uses_curve and server_key is None:
        server_key = server_public_key(cfg)
        if server_key is None:
            raise CurveSetupError(
                f"the agent uses CURVE (auth.enabled in {config_path}) and its public key (server.key) is not "
                f"next to its secret key on this box: pass --server-key server.key")
    if uses_curve and key is None:
        raise CurveSetupError(
            f"the agent uses CURVE (auth.enabled in {config_path}): pass --key {role.upper()}.key_secret "
            f"({'an' if role[0] in 'aeiou' else 'a'} {role} "
            f"key whose public half is in {_dir_hint(dirs, role)}){extra_hint}; the agent's config holds only "
            "public keys, the secret ones stay with each client")
    if (key is None) != (server_key is None):
        raise CurveSetupError("--key and --server-key go together (a CURVE client needs its own secret key "
                              "and the agent's public key)")
    for flag, path in (("--key", key), ("--server-key", server_key)):
        if path is not None and not Path(path).is_file():
            raise CurveSetupError(f"{flag} {path}: no such file")
    keys = ClientKeys(role, key, server_key, dirs.get(role, ""))
    _check_files(keys)
    return keys


def resolve_keys(cfg, config_path, *, key: Path | None, server_key: Path | None, events_key: Path | None
                 ) -> tuple[ClientKeys, ClientKeys]:
    """camera-sim's keys: the camera's (ingest) and the verdict listener's (events, a subscriber key;
    default the camera's, for a key on both allow-lists). CurveSetupError when they cannot work."""
    dirs = cfg.auth.role_dirs() if cfg is not None and cfg.auth.enabled else {}
    camera = client_keys(cfg, config_path, "camera", key=key, server_key=server_key,
                         extra_hint=" and, for the verdict, --events-key SUBSCRIBER.key_secret (in "
                                    f"{_dir_hint(dirs, 'subscriber')}) or --no-verdict")
    if events_key is not None and not camera.curve:
        raise CurveSetupError("--events-key needs --key and --server-key (the agent uses CURVE on every socket)")
    if events_key is not None and not Path(events_key).is_file():
        raise CurveSetupError(f"--events-key {events_key}: no such file")
    events = ClientKeys("subscriber", events_key or camera.key, camera.server_key, dirs.get("subscriber", ""))
    _check_files(events)
    return camera, events


def _check_files(keys: ClientKeys) -> None:
    """The key files load as zmq certificates (a secret key of mode 0600), or CurveSetupError."""
    if not keys.curve:
        return
    from agent.auth import AuthError

    sock = zmq.Context.instance().socket(zmq.PUSH)
    try:
        keys.setup(sock)
    except AuthError as exc:
        raise CurveSetupError(str(exc)) from None
    finally:
        sock.close(linger=0)


def failure_rank(event: int, value: int) -> int:
    """How much a failed handshake tells: 3 the agent refused the key (ZAP), 2 CURVE on one side only,
    1 the peer closed the connection (another server's key, or, racing the mismatch, a CURVE client
    against an agent without CURVE)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return 3
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return 2
    return 1


def explain_failure(event: int, value: int, endpoint: str, keys: ClientKeys) -> str:
    """What a failed handshake on ``endpoint`` means for this client, and what to do."""
    role, where = keys.role, ROLE_DIR_KEY.get(keys.role, "its allow-list")
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        listed = f"{where} ({keys.allow_dir})" if keys.allow_dir else where
        return (f"the agent at {endpoint} refused this {role}'s CURVE key {keys.key} (ZAP status {value}): its "
                f"public key is not on the agent's {role} allow-list, {listed}; install the .key file there and "
                f"reload the agent (SIGHUP, `systemctl reload coilsight`), or use a {role} key that is")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        if keys.curve:
            return (f"the agent at {endpoint} does not use CURVE, this {role} does (--key): leave out --key, "
                    "--server-key and --events-key, or give the agent's --config")
        return (f"the agent at {endpoint} uses CURVE and this {role} does not: pass --key {role.upper()}.key_secret "
                f"(a {role} key in {where}) and --server-key server.key, or the agent's --config")
    if keys.curve:
        return (f"the CURVE handshake with {endpoint} failed (the agent closed the connection; libzmq event "
                f"{int(event)}, value {int(value)}): {keys.server_key} is not this agent's public key (server.key), "
                "or the agent does not use CURVE (then leave out --key, --server-key and --events-key)")
    return f"the ZeroMQ handshake with {endpoint} failed (libzmq event {int(event)}, value {int(value)})"
