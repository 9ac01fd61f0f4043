"""CURVE authentication for the agent's ZeroMQ sockets (optional, per config).

Keys are files made by `coilsight keys generate` (zmq.auth format: NAME.key holds the public
key, NAME.key_secret both keys, mode 0600). The agent is the CURVE server on every socket it
binds: its secret key comes from $CREDENTIALS_DIRECTORY (systemd LoadCredential=) or a
configured directory, never from the config file itself. Peers are admitted by an allow-list:
the public key files in one directory, checked by a ZAP handler thread (pyzmq's
ThreadAuthenticator). Refused peers are logged at a bounded rate and counted.

Order matters: start the authenticator on the context, then `make_curve_server(sock, ...)`,
then `sock.bind(...)`.
"""
from __future__ import annotations

import argparse
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from agent.metrics import RateLimitedLog

log = structlog.get_logger(__name__)


class AuthError(RuntimeError):
    """Key material missing or unusable; the agent must not start."""


def credentials_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """$CREDENTIALS_DIRECTORY when systemd provides it, else the configured directory."""
    env = os.environ.get("CREDENTIALS_DIRECTORY")
    path = Path(env) if env else (Path(configured) if configured else None)
    if path is None:
        raise AuthError("no credentials directory: $CREDENTIALS_DIRECTORY is unset and "
                        "the config names no auth.credentials_dir")
    if not path.is_dir():
        source = "$CREDENTIALS_DIRECTORY" if env else "auth.credentials_dir"
        raise AuthError(f"credentials directory {path} ({source}) does not exist")
    return path


def _load(path: str | os.PathLike[str], want_secret: bool) -> tuple[bytes, bytes | None]:
    p = Path(path)
    if not p.is_file():
        raise AuthError(f"CURVE key file {p} does not exist")
    if p.stat().st_size == 0:
        raise AuthError(f"CURVE key file {p} is empty")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (ValueError, OSError) as exc:  # pyzmq raises ValueError for a file without keys
        # coilsight.service's SetCredential= fallback explains itself in a comment line.
        first = p.read_text(errors="replace").splitlines()[0].strip()
        why = first if first.startswith("#") else str(exc)
        raise AuthError(f"CURVE key file {p} is not a zmq certificate: {why}") from exc
    if len(public) != 40:
        raise AuthError(f"CURVE key file {p}: public-key is not a 40-character Z85 key")
    if want_secret:
        if secret is None:
            raise AuthError(f"CURVE key file {p} holds no secret-key (use the .key_secret file)")
        if len(secret) != 40:
            raise AuthError(f"CURVE key file {p}: secret-key is not a 40-character Z85 key")
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            raise AuthError(f"CURVE secret key file {p} is readable by others (mode {mode:04o}); "
                            f"chmod 600 it")
    return public, secret


def make_curve_server(sock: zmq.Socket, secret_key_file: str | os.PathLike[str]) -> bytes:
    """Make `sock` a CURVE server with the keys in `secret_key_file`; call before bind().
    Returns the server's public key (Z85), which clients need."""
    public, secret = _load(secret_key_file, want_secret=True)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return public


def make_curve_client(
    sock: zmq.Socket,
    client_secret_file: str | os.PathLike[str],
    server_public_file: str | os.PathLike[str],
) -> None:
    """Make `sock` a CURVE client of the server whose public key is in `server_public_file`;
    call before connect()."""
    public, secret = _load(client_secret_file, want_secret=True)
    server_public, _ = _load(server_public_file, want_secret=False)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


class AllowList:
    """CURVE credentials provider: the public keys of *.key files in one directory.

    pyzmq's ZAP thread calls `callback(domain, z85_key)` for each handshake; a refused key
    is counted (`denied`) and logged at a bounded rate."""

    def __init__(self, allow_dir: str | os.PathLike[str], per_s: float = 1.0, burst: int = 5) -> None:
        self.allow_dir = Path(allow_dir)
        self._keys: dict[bytes, str] = {}
        self._lock = threading.Lock()
        self._log = RateLimitedLog(log, per_s=per_s, burst=burst)
        self.denied = 0
        self.allowed = 0
        self.reload()

    def reload(self) -> int:
        """Re-read the directory (SIGHUP); returns the number of allowed keys."""
        if not self.allow_dir.is_dir():
            raise AuthError(f"CURVE allow-list directory {self.allow_dir} does not exist")
        keys: dict[bytes, str] = {}
        for path in sorted(self.allow_dir.glob("*.key")):
            public, _ = _load(path, want_secret=False)
            keys[public] = path.stem
        secrets = sorted(p.name for p in self.allow_dir.glob("*.key_secret"))
        if secrets:
            log.warning("curve_secret_keys_in_allow_dir", dir=str(self.allow_dir), files=secrets)
        if not keys:
            raise AuthError(f"CURVE allow-list directory {self.allow_dir} has no *.key files")
        with self._lock:
            self._keys = keys
        log.info("curve_allow_list_loaded", dir=str(self.allow_dir), peers=sorted(keys.values()))
        return len(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        with self._lock:
            name = self._keys.get(key)
        if name is None:
            self.denied += 1
            self._log.warning("curve_peer_denied", domain=domain, key=key.decode("ascii", "replace"),
                              denied_total=self.denied)
            return False
        self.allowed += 1
        return True


class CurveAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread with its `allow_list` (reload() on SIGHUP; allowed/denied counts)."""

    def __init__(self, ctx: zmq.Context, allow_list: AllowList) -> None:
        super().__init__(ctx)
        self.allow_list = allow_list


def start_authenticator(ctx: zmq.Context, allow_dir: str | os.PathLike[str]) -> CurveAuthenticator:
    """Start a ZAP handler on `ctx` admitting only the CURVE keys in `allow_dir`.

    Call before any CURVE server socket of `ctx` binds; `stop()` it before terminating `ctx`."""
    allow_list = AllowList(allow_dir)  # raises AuthError before any thread starts
    auth = CurveAuthenticator(ctx, allow_list)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=allow_list)
    return auth


class HandshakeWatch:
    """Counts and logs (bounded rate) peers refused during the CURVE handshake: plain-text
    peers and peers holding the wrong server key never reach the ZAP handler.

    Uses a ZeroMQ monitor socket, so it belongs to the thread that owns `sock`: that thread
    calls `drain()` from its loop (it never blocks) and `close()` before closing `sock`.
    """

    FAILURES = {
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no_detail",
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",  # e.g. plain-text peer, wrong server key
        zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",  # ZAP refused the key (see curve_peer_denied)
    }

    def __init__(self, sock: zmq.Socket, name: str, per_s: float = 1.0, burst: int = 5) -> None:
        self.name = name
        self._sock = sock
        mask = 0
        for event in self.FAILURES:
            mask |= event
        self.monitor = sock.get_monitor_socket(mask)
        self._log = RateLimitedLog(log, per_s=per_s, burst=burst)
        self.failures = 0

    def drain(self) -> int:
        """Handle the events waiting now; returns how many handshakes failed among them."""
        from zmq.utils.monitor import recv_monitor_message

        n = 0
        while self.monitor.poll(0, zmq.POLLIN):
            msg = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            reason = self.FAILURES.get(msg["event"])
            if reason is None:
                continue
            n += 1
            self.failures += 1
            self._log.warning("curve_handshake_failed", socket=self.name, reason=reason,
                              code=msg["value"], endpoint=msg["endpoint"].decode("utf-8", "replace"),
                              failures_total=self.failures)
        return n

    def close(self) -> None:
        self._sock.disable_monitor()
        self.monitor.close(linger=0)


# --- `coilsight keys generate` ---------------------------------------------------------
def generate_keys(out_dir: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write OUT/NAME.key (public) and OUT/NAME.key_secret (mode 0600); never overwrites."""
    if not name or "/" in name or name.startswith("."):
        raise AuthError(f"key name {name!r} must be a plain file name")
    out = Path(out_dir)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise AuthError(f"{p} already exists; remove it first to make a new key pair")
    out.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        pub_path, sec_path = zmq.auth.create_certificates(out, name)
    finally:
        os.umask(old_umask)
    os.chmod(sec_path, 0o600)
    os.chmod(pub_path, 0o644)
    return Path(pub_path), Path(sec_path)


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    try:
        public, secret = generate_keys(args.out, args.name)
    except AuthError as exc:
        print(f"coilsight keys generate: {exc}", file=sys.stderr)
        return 1
    print(f"public key: {public}")
    print(f"secret key: {secret} (mode 0600; give it to this peer only)")
    return 0


def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="CURVE key management")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    gen = keys_sub.add_parser("generate", help="write a CURVE key pair (NAME.key, NAME.key_secret)")
    gen.add_argument("--out", required=True, help="directory for the key files")
    gen.add_argument("--name", required=True, help="key name, e.g. server, cam0, mes-subscriber")
    gen.set_defaults(func=_cmd_keys_generate)
