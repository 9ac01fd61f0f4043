"""CURVE end to end through the real agent: keys from files, allow-list through ZAP."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import zmq
from tinypack import frame_with

from agent import auth
from agent.tools.camera_sim import CameraSim
from agent.config import config_dict, dump_toml
from agent.protocol import encode_replay_request, unpack_body
from agent.service import status_request
from agent.subscriber import Subscriber


def test_only_allowed_peers_get_in_or_out(tmp_path, running_agent, capsys):
    creds, allow, other = tmp_path / "creds", tmp_path / "allow", tmp_path / "other"
    for d in (creds, allow, other):
        d.mkdir()
    auth.generate_keys(creds, "curve-server")
    cam_pub, cam_sec = auth.generate_keys(tmp_path, "camera")
    sub_pub, sub_sec = auth.generate_keys(tmp_path, "subscriber")
    _, stranger_sec = auth.generate_keys(other, "stranger")
    (allow / "camera.key").write_bytes(cam_pub.read_bytes())
    (allow / "subscriber.key").write_bytes(sub_pub.read_bytes())
    server_pub = creds / "curve-server.key"

    agent = running_agent(auth={"enabled": True, "credentials_dir": str(creds), "allow_dir": str(allow)})
    cfg = agent.cfg
    client = lambda secret: (lambda s: auth.make_curve_client(s, secret, server_pub))  # noqa: E731

    good_sub = Subscriber(cfg.publish.endpoint, cfg.publish.replay_endpoint, from_seq=1,
                          socket_setup=client(sub_sec))
    stranger_sub = Subscriber(cfg.publish.endpoint, cfg.publish.replay_endpoint, socket_setup=client(stranger_sec))
    plain_sub = Subscriber(cfg.publish.endpoint, cfg.publish.replay_endpoint)
    time.sleep(0.5)

    # Peers without an allowed key: nothing gets in.
    for setup in (None, client(stranger_sec)):
        cam = CameraSim(cfg.ingest.endpoint, camera="intruder", socket_setup=setup, send_timeout_ms=300)
        cam.send_coil("intruder-coil", [(frame_with("bright", 8, 8), None)] * 3)
        cam.close(linger_ms=0)
    # The allowed camera gets every frame in.
    cam = CameraSim(cfg.ingest.endpoint, camera="cam0", socket_setup=client(cam_sec))
    cam.send_coil("good-coil", [(frame_with("bright", 8, 8), None)] * 5)
    cam.close()

    got = []
    for topic, msg in good_sub.messages(timeout_s=20):
        got.append((topic, msg))
        if topic == "summary":
            break
    summary = got[-1][1]
    assert summary["coil"] == "good-coil" and summary["frames"]["inspected"] == 5
    assert sum(1 for t, _ in got if t == "defect") == 5
    assert "intruder-coil" not in agent.coils.open_coils()
    assert agent.ingest.received_messages == 7  # the allowed camera's start + 5 frames + end

    for sub in (stranger_sub, plain_sub):
        assert list(sub.messages(timeout_s=1.0)) == []
        sub.close()
    good_sub.close()
    # The old single list (auth.allow_dir) stands for every role: its keys are operators too, and with
    # auth on the control socket takes CURVE only.
    assert status_request(cfg.control.endpoint, curve=(sub_sec, server_pub))["ok"]
    with pytest.raises(TimeoutError):
        status_request(cfg.control.endpoint, timeout_ms=800, curve=(stranger_sec, server_pub))
    logged = capsys.readouterr().out
    assert "curve_peer_denied" in logged  # the stranger's key, refused by the ZAP allow-list
    assert "curve_handshake_failed" in logged  # the plain-text camera and subscriber, seen by the watch
    assert "config_deprecated" in logged and "auth.allow_dir: deprecated" in logged


# --- roles (issue 16, item 9) and revocation on SIGHUP (item 7), through the real agent -------


@pytest.fixture
def roles(tmp_path):
    """The server key in a credentials dir; cam0, cam1 (camera), sub0, sub1 (subscriber), op0
    (operator), each public key in its role's allow-list; `auth` is the config section."""
    creds = tmp_path / "creds"
    creds.mkdir()
    auth.generate_keys(creds, "curve-server")
    dirs = {role: tmp_path / f"{role}s" for role in auth.ROLES}
    for d in dirs.values():
        d.mkdir()
    secret = {}
    for name, role in (("cam0", "camera"), ("cam1", "camera"), ("sub0", "subscriber"), ("sub1", "subscriber"),
                       ("op0", "operator")):
        public, secret[name] = auth.generate_keys(tmp_path / "peers", name, role)
        shutil.copy(public, dirs[role] / public.name)
    section = {"enabled": True, "credentials_dir": str(creds), "cameras_dir": str(dirs["camera"]),
               "subscribers_dir": str(dirs["subscriber"]), "operators_dir": str(dirs["operator"])}
    return {"auth": section, "secret": secret, "dirs": dirs, "server": creds / "curve-server.key"}


def curve_client(roles, name):
    return lambda s: auth.make_curve_client(s, roles["secret"][name], roles["server"])


def raw_sub(ctx, endpoint, setup):
    s = ctx.socket(zmq.SUB)
    s.linger = 0
    setup(s)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(endpoint)
    return s


def drain(sock, for_s):
    """Everything that arrives within the next `for_s` seconds: [(topic, body)]."""
    got = []
    deadline = time.monotonic() + for_s
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(max(1, int(left * 1000))):
            topic, body = sock.recv_multipart()
            got.append((topic.decode(), unpack_body(body)))
    return got


def replay_answered(ctx, endpoint, setup, timeout_ms=1500) -> bool:
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    setup(req)
    req.connect(endpoint)
    try:
        req.send(encode_replay_request(1, 10))
        return bool(req.poll(timeout_ms))
    finally:
        req.close()


def test_each_role_may_do_only_what_it_is_for(running_agent, roles):
    agent = running_agent(auth=roles["auth"])
    cfg = agent.cfg
    ctx = zmq.Context.instance()
    good_sub = raw_sub(ctx, cfg.publish.endpoint, curve_client(roles, "sub0"))
    cam_as_sub = raw_sub(ctx, cfg.publish.endpoint, curve_client(roles, "cam0"))
    time.sleep(0.5)
    # A subscriber key cannot push frames (nor open, nor close a coil).
    sneaky = CameraSim(cfg.ingest.endpoint, camera="cam9", socket_setup=curve_client(roles, "sub0"),
                       send_timeout_ms=300)
    sneaky.send_coil("sneaky-coil", [(frame_with("bright", 8, 8), None)] * 2)  # queued in its PUSH, never let in
    deadline = time.monotonic() + 10
    while agent.authenticator.allow_lists["camera"].denied == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.authenticator.allow_lists["camera"].denied >= 1  # ZAP saw the subscriber key on ingest
    sneaky.close(linger_ms=0)
    # A camera key can.
    cam = CameraSim(cfg.ingest.endpoint, camera="cam0", socket_setup=curve_client(roles, "cam0"))
    assert cam.send_coil("good-coil", [(frame_with("bright", 8, 8), None)] * 3).dropped == []
    cam.close()
    deadline = time.monotonic() + 20
    got = []
    while not any(t == "summary" for t, _ in got) and time.monotonic() < deadline:
        got += drain(good_sub, 0.5)
    summaries = [m for t, m in got if t == "summary"]
    assert [s["coil"] for s in summaries] == ["good-coil"] and summaries[0]["frames"]["inspected"] == 3
    assert agent.ingest.received_messages == 5  # cam0's start, 3 frames, end; nothing of the subscriber key's
    # A camera key cannot subscribe or replay; a subscriber key can.
    assert drain(cam_as_sub, 0.5) == []
    assert not replay_answered(ctx, cfg.publish.replay_endpoint, curve_client(roles, "cam0"))
    assert replay_answered(ctx, cfg.publish.replay_endpoint, curve_client(roles, "sub0"))
    # Control: operators only, and only with CURVE (auth is on and control is on tcp://).
    assert status_request(cfg.control.endpoint, curve=(roles["secret"]["op0"], roles["server"]))["ok"]
    for who in ("cam0", "sub0"):
        with pytest.raises(TimeoutError):
            status_request(cfg.control.endpoint, timeout_ms=800, curve=(roles["secret"][who], roles["server"]))
    with pytest.raises(TimeoutError):
        status_request(cfg.control.endpoint, timeout_ms=800)  # plain text: any local process
    assert agent.authenticator.allow_lists["operator"].denied >= 2
    good_sub.close()
    cam_as_sub.close()


def test_control_on_ipc_is_guarded_by_its_file_mode(running_agent, roles, tmp_path):
    path = tmp_path / "run" / "control.sock"
    path.parent.mkdir()
    agent = running_agent(auth=roles["auth"], control={"endpoint": f"ipc://{path}", "socket_mode": "0660"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert agent.control_endpoint == f"ipc://{path}"
    reply = status_request(f"ipc://{path}")  # no key: the file mode is the guard
    assert reply["ok"] and reply["health"]["state"] == "ready"


def _notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.2)
    return s, path


def _wait_notify(sock, want, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if want in sock.recv(4096).decode().split("\n"):
                return
        except TimeoutError:
            continue
    raise AssertionError(f"{want} not received within {timeout} s")


def test_sighup_revokes_removed_keys_without_a_restart(tmp_path, agent_config, roles):
    """A real process and a real SIGHUP: a camera and a subscriber, connected and working, lose
    their keys; afterwards the camera gets no frame in and the subscriber gets nothing out, while
    the peers that kept their keys go on, all without a restart."""
    control = tmp_path / "control.sock"
    cfg = agent_config(auth=roles["auth"], control={"endpoint": f"ipc://{control}"})
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(dump_toml(config_dict(cfg)))
    notify, notify_path = _notify_socket(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg_path)],
                            env={**os.environ, "NOTIFY_SOCKET": notify_path}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ctx = zmq.Context()
    try:
        _wait_notify(notify, "READY=1", 60)
        subs = {name: raw_sub(ctx, cfg.publish.endpoint, curve_client(roles, name)) for name in ("sub0", "sub1")}
        cams = {name: CameraSim(cfg.ingest.endpoint, camera=name, ctx=ctx, send_timeout_ms=300,
                                socket_setup=curve_client(roles, name)) for name in ("cam0", "cam1")}
        time.sleep(0.5)
        for name, cam in cams.items():
            assert cam.send_coil(f"before-{name}", [(frame_with("bright", 8, 8), None)] * 2).dropped == []

        def summaries(sub, until_coil, timeout_s=20):
            got, deadline = [], time.monotonic() + timeout_s
            while until_coil not in got and time.monotonic() < deadline:
                got += [m["coil"] for t, m in drain(sub, 0.3) if t == "summary"]
            return got

        for sub in subs.values():  # both subscribers and both cameras work
            got = summaries(sub, "before-cam1")
            assert "before-cam0" in got and "before-cam1" in got
        (roles["dirs"]["camera"] / "cam0.key").unlink()
        (roles["dirs"]["subscriber"] / "sub0.key").unlink()
        proc.send_signal(signal.SIGHUP)
        _wait_notify(notify, "RELOADING=1", 10)
        _wait_notify(notify, "READY=1", 30)
        drain(subs["sub0"], 0.5)  # what was on the wire before the cut
        # cam0's connection was cut and the agent refuses its key now: this coil stays in its PUSH queue.
        cams["cam0"].send_coil("after-cam0", [(frame_with("bright", 8, 8), None)] * 2)
        assert cams["cam1"].send_coil("after-cam1", [(frame_with("bright", 8, 8), None)] * 2).dropped == []
        kept = summaries(subs["sub1"], "after-cam1")
        assert "after-cam1" in kept and "after-cam0" not in kept
        kept += [m["coil"] for t, m in drain(subs["sub1"], 1.0) if t == "summary"]
        assert "after-cam0" not in kept
        assert drain(subs["sub0"], 1.5) == []  # not even a heartbeat (every 0.2 s) reaches the revoked key
        health = status_request(f"ipc://{control}")["health"]
        assert health["reloads"] == 1 and "after-cam0" not in health["coils_open"]
        for cam in cams.values():
            cam.close(linger_ms=0)
        for sub in subs.values():
            sub.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
        ctx.destroy(linger=0)
