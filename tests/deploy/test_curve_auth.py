"""CURVE authentication with real ZeroMQ sockets on loopback and real key files."""
from __future__ import annotations

import argparse
import stat
import time

import pytest
import structlog
import zmq

from agent.auth import (
    ROLES,
    AuthError,
    HandshakeWatch,
    bind_private_ipc,
    credentials_dir,
    drop_connections,
    generate_keys,
    key_role,
    make_curve_client,
    make_curve_server,
    register,
    start_authenticator,
)

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")


@pytest.fixture
def keys(tmp_path):
    """server + cam0 (allowed) + intruder (valid keys, not in the allow-list)."""
    d = tmp_path / "keys"
    allow = tmp_path / "clients"
    allow.mkdir()
    out = {}
    for name in ("server", "cam0", "intruder"):
        out[name] = generate_keys(d, name)
    (allow / "cam0.key").write_bytes(out["cam0"][0].read_bytes())
    out["allow_dir"] = allow
    return out


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def auth(ctx, keys):
    a = start_authenticator(ctx, keys["allow_dir"])
    yield a
    a.stop()


def server_socket(ctx, kind, keys):
    s = ctx.socket(kind)
    s.linger = 0
    make_curve_server(s, keys["server"][1])
    port = s.bind_to_random_port("tcp://127.0.0.1")
    return s, f"tcp://127.0.0.1:{port}"


def client_socket(ctx, kind, keys, name, addr, server_public=None):
    c = ctx.socket(kind)
    c.linger = 0
    if name is not None:
        make_curve_client(c, keys[name][1], server_public or keys["server"][0])
    c.connect(addr)
    return c


def recv_within(sock, timeout_ms):
    if sock.poll(timeout_ms, zmq.POLLIN):
        return sock.recv_multipart()
    return None


def try_send(sock, payload):
    """PUSH blocks while no handshake completed; send only if the socket would take it."""
    if sock.poll(500, zmq.POLLOUT):
        sock.send(payload, zmq.NOBLOCK)


def wait_for(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_push_pull_allowed_client_gets_through(ctx, keys, auth):
    pull, addr = server_socket(ctx, zmq.PULL, keys)
    push = client_socket(ctx, zmq.PUSH, keys, "cam0", addr)
    push.send_multipart([b"header", b"pixels"])
    assert recv_within(pull, 5000) == [b"header", b"pixels"]
    assert auth.allow_list.allowed >= 1


def test_push_pull_unknown_key_is_denied_and_logged(ctx, keys, auth):
    pull, addr = server_socket(ctx, zmq.PULL, keys)
    with structlog.testing.capture_logs() as logs:
        intruder = client_socket(ctx, zmq.PUSH, keys, "intruder", addr)
        try_send(intruder, b"let me in")
        assert wait_for(lambda: auth.allow_list.denied >= 1), "ZAP never saw the intruder"
    assert recv_within(pull, 300) is None
    denied = [e for e in logs if e["event"] == "curve_peer_denied"]
    assert denied and denied[0]["key"] == keys["intruder"][0].read_text().split('"')[1]


def test_push_pull_plaintext_peer_gets_nothing_in(ctx, keys, auth):
    pull, addr = server_socket(ctx, zmq.PULL, keys)
    watch = HandshakeWatch(pull, "ingest")
    plain = client_socket(ctx, zmq.PUSH, keys, None, addr)
    try_send(plain, b"plain text")
    # Positive evidence: the server refused the handshake (mechanism mismatch), and said so.
    with structlog.testing.capture_logs() as logs:
        assert wait_for(lambda: watch.drain() > 0), "server never reported the failed handshake"
    assert recv_within(pull, 300) is None
    assert logs[0]["event"] == "curve_handshake_failed"
    assert logs[0]["socket"] == "ingest" and logs[0]["endpoint"] == addr
    assert auth.allow_list.allowed == 0
    watch.close()


def test_client_without_the_server_key_gets_nothing_in(ctx, keys, auth):
    pull, addr = server_socket(ctx, zmq.PULL, keys)
    # cam0 is allowed, but it was given the wrong server key (it does not hold the real one).
    watch = HandshakeWatch(pull, "ingest")
    push = client_socket(ctx, zmq.PUSH, keys, "cam0", addr, server_public=keys["intruder"][0])
    try_send(push, b"x")
    assert wait_for(lambda: watch.drain() > 0), "server never reported the failed handshake"
    assert recv_within(pull, 300) is None
    watch.close()


def test_pub_sub_only_the_allowed_subscriber_receives(ctx, keys, auth):
    pub, addr = server_socket(ctx, zmq.PUB, keys)
    subs = {}
    for name in ("cam0", "intruder", None):
        s = client_socket(ctx, zmq.SUB, keys, name, addr)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        subs[name] = s
    got: dict[object, list] = {name: [] for name in subs}
    deadline = time.monotonic() + 10
    while len(got["cam0"]) < 5 and time.monotonic() < deadline:
        pub.send_multipart([b"defect", b"{}"])
        for name, s in subs.items():
            while (msg := recv_within(s, 10)) is not None:
                got[name].append(msg)
    assert len(got["cam0"]) >= 5
    assert auth.allow_list.denied >= 1
    assert got["intruder"] == [] and got[None] == []


def test_allow_list_reload_admits_a_new_peer(ctx, keys, auth):
    pull, addr = server_socket(ctx, zmq.PULL, keys)
    (keys["allow_dir"] / "intruder.key").write_bytes(keys["intruder"][0].read_bytes())
    assert auth.allow_list.reload() == 2
    push = client_socket(ctx, zmq.PUSH, keys, "intruder", addr)
    push.send(b"now allowed")
    assert recv_within(pull, 5000) == [b"now allowed"]


def test_generate_keys_modes_and_no_overwrite(tmp_path):
    public, secret = generate_keys(tmp_path / "k", "cam7")
    assert public.name == "cam7.key" and secret.name == "cam7.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" not in public.read_text()
    with pytest.raises(AuthError, match=r"cam7.key already exists; remove it first"):
        generate_keys(tmp_path / "k", "cam7")
    with pytest.raises(AuthError, match=r"key name '../x' must be a plain file name"):
        generate_keys(tmp_path / "k", "../x")


def test_keys_generate_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="coilsight")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["keys", "generate", "--out", str(tmp_path), "--name", "server"])
    assert args.func(args) == 0
    assert f"public key: {tmp_path / 'server.key'}" in capsys.readouterr().out
    assert args.func(args) == 1
    assert "server.key already exists" in capsys.readouterr().err


def test_key_file_errors(ctx, keys, tmp_path):
    sock = ctx.socket(zmq.PULL)
    with pytest.raises(AuthError, match=r"CURVE key file .*nope.key_secret does not exist"):
        make_curve_server(sock, tmp_path / "nope.key_secret")
    with pytest.raises(AuthError, match=r"server.key holds no secret-key \(use the .key_secret file\)"):
        make_curve_server(sock, keys["server"][0])
    empty = tmp_path / "curve-server.key_secret"
    empty.touch(mode=0o600)
    with pytest.raises(AuthError, match=r"curve-server.key_secret is empty"):
        make_curve_server(sock, empty)
    fallback = tmp_path / "creds" / "curve-server.key_secret"  # what systemd writes from SetCredential=
    fallback.parent.mkdir()
    fallback.write_text("# no CURVE key: /etc/coilsight/curve/server.key_secret was missing")
    fallback.chmod(0o400)
    with pytest.raises(AuthError, match=r"not a zmq certificate: # no CURVE key: .*server.key_secret was missing"):
        make_curve_server(sock, fallback)
    junk = tmp_path / "junk.key"
    junk.write_text("hello\n")
    with pytest.raises(AuthError, match=r"junk.key is not a zmq certificate"):
        make_curve_client(sock, keys["cam0"][1], junk)
    short = tmp_path / "short.key"
    short.write_text('public-key = "abc"\n')
    with pytest.raises(AuthError, match=r"short.key: public-key is not a 40-character Z85 key"):
        make_curve_client(sock, keys["cam0"][1], short)
    keys["server"][1].chmod(0o644)
    with pytest.raises(AuthError, match=r"server.key_secret is readable by others \(mode 0644\); chmod 600"):
        make_curve_server(sock, keys["server"][1])
    sock.close()


def test_allow_dir_errors(ctx, tmp_path):
    with pytest.raises(AuthError, match=r"allow-list directory .*missing does not exist"):
        start_authenticator(ctx, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AuthError, match=r"allow-list directory .*empty has no \*.key files"):
        start_authenticator(ctx, tmp_path / "empty")


def test_secret_key_in_allow_dir_is_warned(ctx, keys):
    generate_keys(keys["allow_dir"], "oops")  # drops oops.key_secret into the allow-list
    with structlog.testing.capture_logs() as logs:
        a = start_authenticator(ctx, keys["allow_dir"])
    a.stop()
    warned = [e for e in logs if e["event"] == "curve_secret_keys_in_allow_dir"]
    assert warned and warned[0]["files"] == ["oops.key_secret"]


def test_credentials_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert credentials_dir(tmp_path) == tmp_path
    with pytest.raises(AuthError, match=r"no credentials directory: \$CREDENTIALS_DIRECTORY is unset"):
        credentials_dir(None)
    with pytest.raises(AuthError, match=r"credentials directory .*absent \(auth.credentials_dir\) does not"):
        credentials_dir(tmp_path / "absent")
    systemd_creds = tmp_path / "creds"
    systemd_creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(systemd_creds))
    assert credentials_dir(tmp_path / "ignored") == systemd_creds  # systemd wins over the config


# --- roles (issue 16, item 9) and revocation (item 7) ---------------------------------------

@pytest.fixture
def role_keys(tmp_path):
    """server; cam0, cam1 (camera), sub0 (subscriber), each role's allow-list directory."""
    d = tmp_path / "keys"
    out = {"server": generate_keys(d, "server")}
    dirs = {role: tmp_path / f"{role}s" for role in ROLES}
    for p in dirs.values():
        p.mkdir()
    for name, role in (("cam0", "camera"), ("cam1", "camera"), ("sub0", "subscriber"), ("op0", "operator")):
        out[name] = generate_keys(d, name, role)
        (dirs[role] / f"{name}.key").write_bytes(out[name][0].read_bytes())
    out["dirs"] = dirs
    return out


@pytest.fixture
def role_auth(ctx, role_keys):
    a = start_authenticator(ctx, role_keys["dirs"])
    yield a
    a.stop()


def role_server(ctx, kind, keys, role):
    s = ctx.socket(kind)
    s.linger = 0
    make_curve_server(s, keys["server"][1], role)
    return s, f"tcp://127.0.0.1:{s.bind_to_random_port('tcp://127.0.0.1')}"


def test_a_key_gets_in_only_on_its_roles_sockets(ctx, role_keys, role_auth):
    ingest, ingest_addr = role_server(ctx, zmq.PULL, role_keys, "camera")
    pub, pub_addr = role_server(ctx, zmq.PUB, role_keys, "subscriber")
    # A subscriber key cannot push frames; a camera key can.
    sneaky = client_socket(ctx, zmq.PUSH, role_keys, "sub0", ingest_addr)
    try_send(sneaky, b"frame from a subscriber key")
    assert wait_for(lambda: role_auth.allow_lists["camera"].denied >= 1), "ZAP never saw the subscriber key"
    cam = client_socket(ctx, zmq.PUSH, role_keys, "cam0", ingest_addr)
    cam.send(b"frame from a camera")
    assert recv_within(ingest, 5000) == [b"frame from a camera"]
    assert recv_within(ingest, 300) is None
    # A camera key cannot subscribe; a subscriber key can.
    subs = {}
    for name in ("cam0", "sub0"):
        s = client_socket(ctx, zmq.SUB, role_keys, name, pub_addr)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        subs[name] = s
    got = {name: 0 for name in subs}
    deadline = time.monotonic() + 10
    while got["sub0"] < 5 and time.monotonic() < deadline:
        pub.send(b"event")
        for name, s in subs.items():
            while recv_within(s, 10) is not None:
                got[name] += 1
    assert got["sub0"] >= 5 and got["cam0"] == 0
    assert role_auth.allow_lists["subscriber"].denied >= 1


def test_an_unknown_zap_domain_admits_nobody(ctx, role_keys, role_auth):
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    make_curve_server(pull, role_keys["server"][1])  # no role: domain "" -> no list for it
    addr = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    push = client_socket(ctx, zmq.PUSH, role_keys, "cam0", addr)
    try_send(push, b"x")
    assert recv_within(pull, 500) is None
    with pytest.raises(AuthError, match=r"unknown role 'admin' \(known: camera, subscriber, operator\)"):
        make_curve_server(pull, role_keys["server"][1], "admin")


def test_revoked_key_is_cut_off_and_the_others_reconnect(ctx, role_keys, role_auth):
    pull, addr = role_server(ctx, zmq.PULL, role_keys, "camera")
    cams = {}
    for name in ("cam0", "cam1"):
        c = client_socket(ctx, zmq.PUSH, role_keys, name, addr)
        c.sndtimeo = 100
        c.send(name.encode())
        cams[name] = c
    assert sorted([recv_within(pull, 5000)[0], recv_within(pull, 5000)[0]]) == [b"cam0", b"cam1"]
    (role_keys["dirs"]["camera"] / "cam0.key").unlink()
    revoked = role_auth.reload_and_revoke({"ingest": addr, "publish": None})
    assert revoked == {"camera": ["cam0"]}
    got = []
    deadline = time.monotonic() + 5
    while got.count(b"cam1") < 10 and time.monotonic() < deadline:
        for name, c in cams.items():
            try:
                c.send(name.encode())
            except zmq.Again:
                pass
        while (msg := recv_within(pull, 20)) is not None:
            got.append(msg[0])
    assert got.count(b"cam1") >= 10  # the kept camera reconnected by itself
    assert got.count(b"cam0") == 0  # the revoked one, connected before the reload, gets nothing in
    assert role_auth.allow_lists["camera"].denied >= 1


def test_revoked_subscriber_stops_receiving(ctx, role_keys, role_auth):
    pub, addr = role_server(ctx, zmq.PUB, role_keys, "subscriber")
    sub = client_socket(ctx, zmq.SUB, role_keys, "sub0", addr)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    deadline = time.monotonic() + 10
    while recv_within(sub, 20) is None and time.monotonic() < deadline:
        pub.send(b"before")
    (role_keys["dirs"]["subscriber"] / "sub0.key").unlink()
    assert role_auth.reload_and_revoke({"publish": addr}) == {"subscriber": ["sub0"]}
    while recv_within(sub, 100) is not None:  # what was on the wire before the cut
        pass
    for _ in range(20):
        pub.send(b"after")
        assert recv_within(sub, 20) is None


def test_drop_connections_leaves_the_listener_and_outgoing_connections(ctx, role_keys):
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    addr = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(addr)
    push.send(b"1")
    assert recv_within(pull, 5000) == [b"1"]
    assert drop_connections(addr) == 1  # the accepted one; not the listener, not the PUSH side
    push.send(b"2")  # the PUSH reconnects by itself to the same, still bound, listener
    assert recv_within(pull, 5000) == [b"2"]
    assert drop_connections("inproc://nothing") == 0


def test_reload_after_start_skips_bad_files_and_keeps_a_vanished_dir(ctx, role_keys, role_auth, tmp_path):
    cams = role_keys["dirs"]["camera"]
    (cams / "junk.key").write_text("hello\n")
    (cams / "wrong-role.key").write_bytes(role_keys["sub0"][0].read_bytes())
    with structlog.testing.capture_logs() as logs:
        assert role_auth.reload() == {}
    skipped = sorted(e["file"].rsplit("/", 1)[1] for e in logs if e["event"] == "curve_key_file_skipped")
    assert skipped == ["junk.key", "wrong-role.key"]
    assert role_auth.allow_lists["camera"].names() == ["cam0", "cam1"]
    subs = role_keys["dirs"]["subscriber"]
    (subs / "sub0.key").rename(tmp_path / "sub0.key")
    subs.rmdir()
    with structlog.testing.capture_logs() as logs:
        assert role_auth.reload() == {}
    assert [e["role"] for e in logs if e["event"] == "curve_allow_list_reload_failed"] == ["subscriber"]
    assert role_auth.allow_lists["subscriber"].names() == ["sub0"]  # kept: a missing dir is not "nobody"


def test_a_key_made_for_another_role_is_refused_at_start(ctx, role_keys):
    (role_keys["dirs"]["camera"] / "sub0.key").write_bytes(role_keys["sub0"][0].read_bytes())
    with pytest.raises(AuthError, match=r"sub0.key was generated for role 'subscriber' but is in the camera "
                                        r"allow-list .*; a subscriber key may not push frames"):
        start_authenticator(ctx, role_keys["dirs"])


def test_generate_keys_with_a_role(tmp_path, capsys):
    public, secret = generate_keys(tmp_path, "cam9", "camera")
    assert key_role(public) == "camera" and key_role(secret) == "camera"
    assert key_role(generate_keys(tmp_path, "plain")[0]) is None
    with pytest.raises(AuthError, match=r"unknown role 'admin'"):
        generate_keys(tmp_path, "x", "admin")
    parser = argparse.ArgumentParser(prog="coilsight")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["keys", "generate", "--out", str(tmp_path), "--name", "mes", "--role", "subscriber"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"install -m 0644 {tmp_path / 'mes.key'} /etc/coilsight/curve/subscribers/" in out
    assert "role: subscriber: may receive events" in out
    assert key_role(tmp_path / "mes.key") == "subscriber"


@pytest.mark.parametrize("mode", [0o600, 0o660])
def test_private_ipc_control_socket(ctx, tmp_path, mode):
    rep = ctx.socket(zmq.REP)
    rep.linger = 0
    path = bind_private_ipc(rep, f"ipc://{tmp_path}/control.sock", mode)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.connect(f"ipc://{path}")
    req.send(b"status")
    assert recv_within(rep, 5000) == [b"status"]
    with pytest.raises(AuthError, match=r"an abstract @name has no file permissions"):
        bind_private_ipc(rep, "ipc://@coilsight-control", 0o600)
