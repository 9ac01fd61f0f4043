"""CURVE authentication and roles for the agent's ZeroMQ sockets (optional, per config).

Keys are files made by `coilsight keys generate` (zmq.auth format: NAME.key holds the public
key, NAME.key_secret both keys, mode 0600). The agent is the CURVE server on every socket it
binds: its secret key comes from $CREDENTIALS_DIRECTORY (systemd LoadCredential=) or a
configured directory, never from the config file itself.

Peers are admitted per **role**, each with its own allow-list directory of public key files,
checked by one ZAP handler thread (pyzmq's ThreadAuthenticator) by the socket's ZAP domain:

    role         sockets                            may
    camera       ingest (PULL)                      push frames, coil_start / coil_end
    subscriber   publish (PUB), replay (REP)        receive events and heartbeats, ask for replays
    operator     control (REP, when on tcp://)      status, reload models

A key is admitted only on the sockets of the roles whose directory holds it. The deprecated
single ``auth.allow_dir`` is one list for every role (see docs/deployment.md, "Roles").
Refused peers are logged at a bounded rate and counted.

SIGHUP re-reads every list (`RoleAuthenticator.reload`). A new handshake sees the new lists at
once; a peer already connected with a key that was removed is cut off by `drop_connections`
(its TCP/IPC connections on that role's endpoints are shut down; every peer of the role
reconnects and goes through ZAP again, so only the revoked ones stay out).

Order matters: start the authenticator on the context, then `make_curve_server(sock, ...)`,
then `sock.bind(...)`.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import stat
import sys
import threading
from collections.abc import Mapping
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


# role -> the sockets it may use (the ZAP domain of each socket is its role's name)
ROLES = ("camera", "subscriber", "operator")
SOCKET_ROLES = {"ingest": "camera", "publish": "subscriber", "replay": "subscriber", "control": "operator"}
ROLE_RIGHTS = {
    "camera": "push frames and coil_start/coil_end to the ingest socket",
    "subscriber": "receive events and heartbeats on the publish socket; ask the replay socket for missed ranges",
    "operator": "status and model reload on the control socket",
}
_ROLE_LINE = re.compile(r"^\s*role\s*=\s*\"?([A-Za-z_-]+)\"?\s*$")


def key_role(path: str | os.PathLike[str]) -> str | None:
    """The role a key file was generated for (`coilsight keys generate --role`), or None."""
    in_metadata = False
    for line in Path(path).read_text(errors="replace").splitlines():
        if line.strip() == "metadata":
            in_metadata = True
        elif line and not line[0].isspace():
            in_metadata = False
        elif in_metadata and (m := _ROLE_LINE.match(line)):
            return m.group(1)
    return None


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


def make_curve_server(sock: zmq.Socket, secret_key_file: str | os.PathLike[str], role: str | None = None) -> bytes:
    """Make `sock` a CURVE server with the keys in `secret_key_file`; call before bind().
    `role` sets the socket's ZAP domain: only keys on that role's allow-list get in.
    Returns the server's public key (Z85), which clients need."""
    public, secret = _load(secret_key_file, want_secret=True)
    if role is not None:
        if role not in ROLES:
            raise AuthError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
        sock.zap_domain = role.encode()
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
    is counted (`denied`) and logged at a bounded rate. `role`: the role this list admits
    (None: the deprecated list for every role); a key generated for another role is refused."""

    def __init__(self, allow_dir: str | os.PathLike[str], role: str | None = None, per_s: float = 1.0,
                 burst: int = 5) -> None:
        self.allow_dir = Path(allow_dir)
        self.role = role
        self._keys: dict[bytes, str] = {}
        self._lock = threading.Lock()
        self._log = RateLimitedLog(log, per_s=per_s, burst=burst)
        self.denied = 0
        self.allowed = 0
        self.removed: list[str] = []  # names whose keys the last reload took away
        self.reload()

    def _read(self, strict: bool) -> dict[bytes, str]:
        keys: dict[bytes, str] = {}
        for path in sorted(self.allow_dir.glob("*.key")):
            try:
                public, _ = _load(path, want_secret=False)
                made_for = key_role(path)
                if self.role is not None and made_for is not None and made_for != self.role:
                    raise AuthError(f"CURVE key file {path} was generated for role {made_for!r} but is in the "
                                    f"{self.role} allow-list {self.allow_dir}; a {made_for} key may not "
                                    f"{ROLE_RIGHTS[self.role]}")
            except (AuthError, OSError) as exc:  # OSError: a file removed or unreadable meanwhile
                if strict:
                    if isinstance(exc, AuthError):
                        raise
                    raise AuthError(f"CURVE key file {path}: {exc}") from exc
                log.error("curve_key_file_skipped", file=str(path), role=self.role, error=str(exc))
                continue
            keys[public] = path.stem
        return keys

    def reload(self, strict: bool = True) -> int:
        """Re-read the directory; returns the number of allowed keys.

        strict (start-up): any unreadable key file, a missing or empty directory is an AuthError.
        Not strict (SIGHUP on a running agent): unreadable files are skipped and logged, an empty
        directory admits nobody of this role (that is what the files say), and only a missing
        directory keeps the old list (an AuthError the caller logs)."""
        if not self.allow_dir.is_dir():
            raise AuthError(f"CURVE allow-list directory {self.allow_dir} does not exist")
        keys = self._read(strict)
        secrets = sorted(p.name for p in self.allow_dir.glob("*.key_secret"))
        if secrets:
            log.warning("curve_secret_keys_in_allow_dir", dir=str(self.allow_dir), files=secrets)
        if not keys:
            if strict:
                raise AuthError(f"CURVE allow-list directory {self.allow_dir} has no *.key files")
            log.warning("curve_allow_list_empty", dir=str(self.allow_dir), role=self.role)
        with self._lock:
            self.removed = sorted(name for key, name in self._keys.items() if key not in keys)
            self._keys = keys
        log.info("curve_allow_list_loaded", dir=str(self.allow_dir), role=self.role or "all",
                 peers=sorted(keys.values()), removed=self.removed)
        return len(keys)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._keys.values())

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
    """pyzmq's ZAP thread with one allow-list per role (ZAP domain).

    `allow_lists`: role -> AllowList; the deprecated single list is the same object for every
    role. `allow_list`: that single list, or None with per-role lists."""

    def __init__(self, ctx: zmq.Context, allow_lists: Mapping[str, AllowList]) -> None:
        super().__init__(ctx)
        self.allow_lists = dict(allow_lists)
        distinct = {id(a) for a in self.allow_lists.values()}
        self.allow_list = next(iter(self.allow_lists.values())) if len(distinct) == 1 else None

    def configure(self) -> None:
        for role, allow_list in self.allow_lists.items():
            self.configure_curve_callback(domain=role, credentials_provider=allow_list)
        if self.allow_list is not None:  # sockets without a domain (older callers) use the single list
            self.configure_curve_callback(domain="*", credentials_provider=self.allow_list)

    def reload_and_revoke(self, bound: Mapping[str, str | None]) -> dict[str, list[str]]:
        """SIGHUP: re-read every list, then cut off the peers of each role that lost a key.
        `bound`: socket name (ingest, publish, replay, control) -> its bound endpoint."""
        revoked = self.reload()
        for role, names in revoked.items():
            eps = [ep for sock, ep in bound.items() if ep and SOCKET_ROLES.get(sock) == role]
            dropped = sum(drop_connections(ep) for ep in eps)
            log.warning("curve_keys_revoked", role=role, keys=names, endpoints=eps, connections_dropped=dropped)
        return revoked

    def reload(self) -> dict[str, list[str]]:
        """SIGHUP: re-read every list. Returns role -> names of keys removed (revoked) by this
        reload. A list whose directory is gone keeps its old keys and is logged."""
        revoked: dict[str, list[str]] = {}
        done: dict[int, list[str]] = {}
        for role, allow_list in self.allow_lists.items():
            if id(allow_list) not in done:
                try:
                    allow_list.reload(strict=False)
                    done[id(allow_list)] = list(allow_list.removed)
                except AuthError as exc:
                    log.error("curve_allow_list_reload_failed", role=role, error=str(exc), kept=allow_list.names())
                    done[id(allow_list)] = []
            if done[id(allow_list)]:
                revoked[role] = done[id(allow_list)]
        return revoked


def start_authenticator(ctx: zmq.Context,
                        allow: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]]) -> CurveAuthenticator:
    """Start a ZAP handler on `ctx` admitting only the CURVE keys of the allow-lists.

    `allow`: one directory (the deprecated list for every role), or role -> directory, e.g.
    {"camera": ".../cameras", "subscriber": ".../subscribers", "operator": ".../operators"}; a role
    left out admits nobody. Call before any CURVE server socket of `ctx` binds; `stop()` it
    before terminating `ctx`."""
    if isinstance(allow, Mapping):
        unknown = sorted(set(allow) - set(ROLES))
        if unknown:
            raise AuthError(f"unknown role(s) {', '.join(unknown)} (known: {', '.join(ROLES)})")
        lists = {role: AllowList(d, role=role) for role, d in allow.items()}  # raise before any thread starts
    else:
        single = AllowList(allow)
        lists = {role: single for role in ROLES}
    auth = CurveAuthenticator(ctx, lists)
    auth.start()
    auth.configure()
    return auth


def drop_connections(endpoint: str) -> int:
    """Shut down every connection a peer made to the socket bound at `endpoint` (tcp:// or
    ipc://, as LAST_ENDPOINT gives it) in this process; returns how many.

    A CURVE key removed from an allow-list stops new handshakes at once, but a peer already
    connected keeps its session: ZeroMQ has no call to drop one peer, and unbind() leaves
    accepted sessions running. Shutting the accepted sockets down makes libzmq see the peer
    leave; each peer reconnects and is checked by ZAP again. Accepted sockets are found in
    /proc/self/fd by their local address (the bound one) and having a peer; the listener and
    the process's own outgoing connections never match."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        want_port, host = int(port), host.strip("[]")

        def match(local: Any) -> bool:
            return (isinstance(local, tuple) and local[1] == want_port
                    and (host in ("0.0.0.0", "::", "*") or local[0] == host))

        families: tuple[int, ...] = (socket.AF_INET, socket.AF_INET6)
    elif endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        want_path = "\0" + path[1:] if path.startswith("@") else path  # abstract: a leading NUL

        def match(local: Any) -> bool:
            return local in (want_path, want_path.encode())

        families = (socket.AF_UNIX,)
    else:
        return 0
    dropped = 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError as exc:  # no /proc: new handshakes are checked, connected peers stay until they leave
        log.error("connection_drop_unavailable", endpoint=endpoint, error=str(exc))
        return 0
    for name in fds:
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except OSError:  # closed meanwhile, or the listing's own descriptor
            continue
        try:
            if s.family not in families or s.type != socket.SOCK_STREAM or not match(s.getsockname()):
                continue
            try:
                s.getpeername()  # the listener has none
            except OSError:
                continue
            s.shutdown(socket.SHUT_RDWR)  # the original fd sees the peer gone; libzmq cleans up
            dropped += 1
        except OSError as exc:
            log.warning("connection_drop_failed", endpoint=endpoint, fd=fd, error=str(exc))
        finally:
            s.close()  # closes only the duplicate
    return dropped


def bind_private_ipc(sock: zmq.Socket, endpoint: str, mode: int) -> Path:
    """Bind `sock` to an ipc:// endpoint whose socket file only its owner (0600) or owner and
    group (0660) may connect to. The file is created under umask 0077, so it is never open to
    others, not even between bind and chmod."""
    path = Path(endpoint[len("ipc://"):])
    if not endpoint.startswith("ipc://") or str(path).startswith("@"):
        raise AuthError(f"{endpoint}: a private control socket must be an ipc:// file path "
                        f"(an abstract @name has no file permissions)")
    old = os.umask(0o077)
    try:
        sock.bind(endpoint)
    finally:
        os.umask(old)
    os.chmod(path, mode)
    actual = stat.S_IMODE(path.stat().st_mode)
    if actual != mode:
        raise AuthError(f"control socket {path} has mode {actual:04o}, wanted {mode:04o}")
    return path


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
# Where install.sh and docs/deployment.md put each role's public keys on the line box.
ROLE_DIRS = {"camera": "/etc/coilsight/curve/cameras", "subscriber": "/etc/coilsight/curve/subscribers",
             "operator": "/etc/coilsight/curve/operators"}


def generate_keys(out_dir: str | os.PathLike[str], name: str, role: str | None = None) -> tuple[Path, Path]:
    """Write OUT/NAME.key (public) and OUT/NAME.key_secret (mode 0600); never overwrites.

    `role` (camera, subscriber, operator) is written into both files' metadata; the agent
    refuses such a key in another role's allow-list. The server key has no role."""
    if not name or "/" in name or name.startswith("."):
        raise AuthError(f"key name {name!r} must be a plain file name")
    if role is not None and role not in ROLES:
        raise AuthError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    out = Path(out_dir)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise AuthError(f"{p} already exists; remove it first to make a new key pair")
    out.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        pub_path, sec_path = zmq.auth.create_certificates(out, name)
        if role is not None:
            for path in (pub_path, sec_path):  # pyzmq writes metadata into the secret file only
                text = Path(path).read_text()
                Path(path).write_text(text.replace("metadata\n", f'metadata\n    role = "{role}"\n', 1))
    finally:
        os.umask(old_umask)
    os.chmod(sec_path, 0o600)
    os.chmod(pub_path, 0o644)
    return Path(pub_path), Path(sec_path)


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    try:
        public, secret = generate_keys(args.out, args.name, args.role)
    except AuthError as exc:
        print(f"coilsight keys generate: {exc}", file=sys.stderr)
        return 1
    print(f"public key: {public}")
    print(f"secret key: {secret} (mode 0600; give it to this peer only)")
    if args.role:
        print(f"role: {args.role}: may {ROLE_RIGHTS[args.role]}")
        print(f"allow it on the line box: install -m 0644 {public} {ROLE_DIRS[args.role]}/ && "
              f"systemctl reload coilsight")
    return 0


def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="CURVE key management")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    gen = keys_sub.add_parser("generate", help="write a CURVE key pair (NAME.key, NAME.key_secret)")
    gen.add_argument("--out", required=True, help="directory for the key files")
    gen.add_argument("--name", required=True, help="key name, e.g. server, cam0, mes-subscriber")
    gen.add_argument("--role", choices=ROLES,
                     help="the peer's role, written into the key files: camera (push frames), subscriber "
                          "(events and replay), operator (control socket); omit for the server key")
    gen.set_defaults(func=_cmd_keys_generate)
